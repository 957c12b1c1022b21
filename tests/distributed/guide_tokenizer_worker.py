"""Worker for tests/test_guide_tokenizer.py: a guide with its own (cased) tokenizer sees its own ids.

Every guide forward call is intercepted; the ids it received must be exactly
the ids the guide's tokenizer makes from the raw strings of this rank's shard.
"""

import torch
from helpers import cased_guide_dir, load_model, worker_main

import ds_contrastive as dc
from ds_contrastive.core.runtime import world

TEXTS = [
    "Café au lait in Zürich", "ÉCOLE normale supérieure", "naïve Bayes for SPAM", "東京 and 大阪 by train",
    "Ωmega ≥ αlpha", "The CamelCase Name", "crème brûlée recipe", "São Paulo weather",
    "straße und Grüße", "ångström units", "Ñandú in Córdoba", "DNA vs dna vs Dna",
]


def letters(text: str) -> str:
    """The text without whitespace: WordPiece decoding re-spaces punctuation, nothing else."""
    return "".join(text.split())


def batch(step: int, rank: int) -> dict[str, list[str]]:
    rows = [(TEXTS[(i + step) % 12], TEXTS[(i + step + 5) % 12] + f" #{i}") for i in range(rank, 12, 2)]
    return {"anchor": [a for a, _ in rows], "positive": [p for _, p in rows]}


def build(args) -> list[dict]:
    from ds_contrastive.core.collectives import all_gather_objects

    rank, _ = world()
    corpus = [t for step in range(2) for r in range(2) for col in batch(step, r).values() for t in col]
    guide_dir = cased_guide_dir(args.work, corpus * 2) if rank == 0 else None
    guide_dir = all_gather_objects(str(guide_dir) if guide_dir else None)[0]
    student = load_model(args.model)
    loss = dc.GuidedInfoNCE(guide=guide_dir, temperature=0.05, margin=0.1)
    engine = dc.ContrastiveEngine(student, loss, ds_config={"zero_optimization": {"stage": 2},
                                                            "gradient_clipping": 0.0}, chunk_tokens=64, lr=1e-3)
    seen: list[list[int]] = []

    def capture(module, inputs):
        features = inputs[0]
        for ids, mask in zip(features["input_ids"], features["attention_mask"]):
            seen.append(ids[mask.bool()].tolist())

    engine.guide.model.register_forward_pre_hook(capture)
    before = [p.detach().clone() for p in engine.module.parameters()]
    results = []
    for step in range(2):
        seen.clear()
        shard = batch(step, rank)
        metrics = engine.train_step(shard)
        raw = [t for col in shard.values() for t in col]
        expected = engine.guide.model.tokenizer(raw, truncation=True, max_length=64)["input_ids"]
        student_ids = student.tokenizer(raw)["input_ids"]
        results.append({
            "guide_ids_exact": sorted(seen) == sorted(expected),
            "guide_calls_rows": len(seen),
            "texts": len(raw),
            "student_changes_text": sum(letters(student.tokenizer.decode(ids, skip_special_tokens=True)) != letters(t)
                                        for ids, t in zip(student_ids, raw)),
            "guide_round_trips": sum(
                letters(engine.guide.model.tokenizer.decode(ids, skip_special_tokens=True)) == letters(t)
                for ids, t in zip(expected, raw)),
            "loss": metrics["loss"],
            "masked_fraction": metrics["guide_masked_fraction_anchor_doc"],
        })
    changed = any(not torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
    return all_gather_objects({"steps": results, "trained": changed})


if __name__ == "__main__":
    worker_main(build, {"--work": dict(required=True)})
