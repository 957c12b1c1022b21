"""A decoder embedder with LoRA (peft): only the adapter trains, and the saved model is the merged one.

Before, ``engine.save`` wrote peft's ``base_layer`` / ``lora_A`` keys: ``SentenceTransformer(path)`` loaded the
base model with the adapted projections randomly initialised, with only a warning.
"""

import json
import subprocess
import sys

import pytest
import torch
from helpers import corpus, load_model, tiny_bert_dir, tiny_decoder_dir
from safetensors import safe_open

import ds_contrastive as dc

peft = pytest.importorskip("peft")

TEXTS = ["what is a heap", "A heap is a tree whose parent is never larger than a child.", "storm over the river"]
LOAD_WITHOUT_PEFT = """
import json, sys
sys.modules["peft"] = None  # any import of peft fails: the saved model must not need it
from sentence_transformers import SentenceTransformer
model = SentenceTransformer(sys.argv[1], device="cpu")
print(json.dumps(model.encode(json.loads(sys.argv[2]), convert_to_tensor=True).tolist()))
"""


def with_lora(model, route: str):
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    if route == "injected":  # LoRA layers injected into the inner transformers model in place
        peft.get_peft_model(model[0].auto_model, config)
    else:  # the PeftModel as the Transformer module's model
        model[0].model = peft.get_peft_model(model[0].model, config)
    return model


def trained_lora_engine(model_dir, route: str, stage: int) -> dc.ContrastiveEngine:
    """Two steps of a LoRA model; its adapters have moved from their zero start."""
    model = with_lora(load_model(model_dir), route)
    engine = dc.ContrastiveEngine(model, dc.InfoNCE(), ds_config={"zero_optimization": {"stage": stage}},
                                  chunk_rows=4, lr=5e-2)
    data = corpus(16, negatives=1, seed=3)
    for step in range(2):
        engine.train_step({k: v[8 * step: 8 * step + 8] for k, v in data.items()})
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    with gathered(lora_b, stage == 3):
        assert all(float(p.detach().abs().max()) > 0 for p in lora_b)
    return engine


def gathered(params, zero3: bool):
    import contextlib

    import deepspeed

    return deepspeed.zero.GatheredParameters(params) if zero3 else contextlib.nullcontext()


def encoded(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.encode(TEXTS, convert_to_tensor=True)


def load_elsewhere(path, without_peft: bool) -> torch.Tensor:
    """The embeddings of TEXTS by SentenceTransformer(path) in a fresh process (peft unimportable, or not)."""
    script = LOAD_WITHOUT_PEFT if without_peft else LOAD_WITHOUT_PEFT.replace('sys.modules["peft"] = None', "")
    out = subprocess.run([sys.executable, "-c", script, str(path), json.dumps(TEXTS)], check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return torch.tensor(json.loads(out))


@pytest.mark.parametrize("arch,route,stage", [("qwen2", "injected", 0), ("llama", "module_model", 2),
                                              ("qwen2", "module_model", 3)])
def test_only_the_adapter_trains_and_the_merged_save_loads_without_peft(arch, route, stage, tmp_path, monkeypatch):
    engine = trained_lora_engine(tiny_decoder_dir(tmp_path, arch), route, stage)
    model = engine.module.model
    if stage:  # ZeRO keeps flat fp32 copies of what it trains (one rank: all of it): count their elements
        flat = (engine.optimizer.fp32_partitioned_groups_flat if stage == 3 else
                [p for group in engine.optimizer.param_groups for p in group["params"]])
        held = sum(p.numel() for p in flat)
        lora_elements = sum(getattr(p, "ds_numel", p.numel()) for n, p in model.named_parameters() if "lora_" in n)
        assert held == lora_elements, (held, lora_elements)
    else:
        names = {id(p): n for n, p in model.named_parameters()}
        trained = [names[id(p)] for group in engine.optimizer.param_groups for p in group["params"]]
        assert trained and all("lora_A" in n or "lora_B" in n for n in trained), trained

    import deepspeed

    gathers, gather = [], deepspeed.zero.GatheredParameters

    def recording(params, *args, **kwargs):
        gathers.append(sum(p.ds_numel for p in params))
        return gather(params, *args, **kwargs)

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", recording)
    out = tmp_path / "saved"
    engine.save(out)
    monkeypatch.undo()
    if stage == 3:  # one submodule (a LoRA layer with its adapter, an embedding, a norm) whole at a time
        inner = model[0].auto_model
        largest = max(sum(p.ds_numel for p in (m.parameters() if hasattr(m, "lora_A") else
                                                 m.parameters(recurse=False))) for m in inner.modules())
        assert max(gathers) == largest and len(gathers) > 2 * 7, (max(gathers), largest, len(gathers))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("lora_" in k or "base_layer" in k for k in keys), keys[:8]
    assert any(k.endswith("q_proj.weight") for k in keys)
    got = load_elsewhere(out, without_peft=True)
    assert float((got - encoded(model)).abs().max()) < 1e-5
    # the engine's model is still the LoRA model it trains (the save swapped nothing in it)
    assert any("lora_A" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("route,stage", [("injected", 3), ("module_model", 0)])
def test_the_adapter_alone_saves_and_loads_onto_its_base(route, stage, tmp_path):
    model_dir = tiny_decoder_dir(tmp_path, "qwen2")
    engine = trained_lora_engine(model_dir, route, stage)
    out = tmp_path / "adapter"
    engine.save(out, adapter_only=True)
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model_dir) and config["r"] == 4
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert len(keys) == 2 * 2 * 2 and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in keys), keys
    got = load_elsewhere(out, without_peft=False)
    assert float((got - encoded(engine.module.model)).abs().max()) < 1e-5
    assert float((got - encoded(load_model(model_dir))).abs().max()) > 1e-3  # not the base model alone


def test_a_model_loaded_from_an_adapter_saves_merged_under_its_own_names(tmp_path):
    """transformers loads an adapter folder with key renamings for peft; a merged save must not apply them."""
    from sentence_transformers import SentenceTransformer

    from ds_contrastive.run.saving import save_consolidated

    engine = trained_lora_engine(tiny_decoder_dir(tmp_path, "qwen2"), "injected", 0)
    engine.save(tmp_path / "adapter", adapter_only=True)
    loaded = SentenceTransformer(str(tmp_path / "adapter"), device="cpu")
    out = tmp_path / "merged"
    save_consolidated(loaded, False, True, lambda: loaded.save(str(out)), str(out))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "embed_tokens.weight" in keys and not any(k.startswith("base_model") or "lora_" in k for k in keys)
    assert float((load_elsewhere(out, without_peft=True) - encoded(engine.module.model)).abs().max()) < 1e-5


@pytest.mark.parametrize("config,adapter_only,message", [
    (dict(lora_bias=True), False, "trains a LoRA bias"),
    (dict(use_dora=True), False, "LoRA variant"),
    (dict(target_modules=["q_proj", "embed_tokens"]), True, "LoRA on a Embedding layer"),
    (dict(modules_to_save=["norm"]), False, "modules_to_save"),
    (dict(bias="lora_only"), True, "trains base biases"),
])
def test_what_a_save_would_write_wrong_is_refused(config, adapter_only, message, tmp_path):
    from ds_contrastive.errors import ConfigError
    from ds_contrastive.run.saving import save_consolidated

    model = load_model(tiny_decoder_dir(tmp_path, "qwen2"))
    peft.get_peft_model(model[0].auto_model, peft.LoraConfig(**{"r": 4, "target_modules": ["q_proj"], **config}))
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=message):
        save_consolidated(model, False, True, lambda: model.save(str(out)), str(out),
                          "adapter" if adapter_only else "merged")
    assert not out.exists()


def test_the_adapter_alone_needs_adapters(tmp_path):
    from ds_contrastive.errors import ConfigError

    engine = dc.ContrastiveEngine(load_model(tiny_bert_dir(tmp_path)), dc.InfoNCE(), chunk_rows=4)
    with pytest.raises(ConfigError, match="no LoRA adapters to save"):
        engine.save(tmp_path / "out", adapter_only=True)
    assert not (tmp_path / "out").exists()


def test_the_lora_options_inject_adapters_the_same_on_every_rank(tmp_path):
    from ds_contrastive.errors import ConfigError
    from ds_contrastive.run.config import load_train_config
    from ds_contrastive.run.setup import add_lora

    model_dir = tiny_decoder_dir(tmp_path, "qwen2")
    cfg = load_train_config(None, {"lora_rank": "4", "lora_target_modules": "q_proj,v_proj"})
    first, second = load_model(model_dir), load_model(model_dir)
    add_lora(first, cfg, seed=11)
    torch.manual_seed(123)  # another rank's RNG: the seed, not the state, decides the adapters
    add_lora(second, cfg, seed=11)
    trainable = [n for n, p in first.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable), trainable
    assert all("q_proj" in n or "v_proj" in n for n in trainable)
    for (_, a), (_, b) in zip(first.named_parameters(), second.named_parameters(), strict=True):
        assert torch.equal(a, b)
    bert = load_model(tiny_bert_dir(tmp_path))
    with pytest.raises(ConfigError, match=r"lora_target_modules \['q_proj', 'v_proj'\]"):
        add_lora(bert, cfg, seed=0)  # BERT names them query, key, value
    with pytest.raises(ConfigError, match="lora_rank >= 1"):
        add_lora(bert, load_train_config(None, {"lora_rank": "0"}), seed=0)
    from ds_contrastive.run.setup import build_model

    with pytest.raises(ConfigError, match="save_adapter_only needs LoRA adapters: set lora_rank"):
        build_model(load_train_config(None, {"model": str(model_dir), "save_adapter_only": "true"}), seed=0)


@pytest.mark.parametrize("stage", [0, 3])
def test_a_lora_run_resumes_exactly_from_a_checkpoint(stage, tmp_path):
    """Adapters, their optimizer state and the RNG come back; under ZeRO-3 the frozen base is partitioned too."""
    from ds_contrastive.run.config import load_train_config
    from ds_contrastive.run.setup import add_lora

    cfg = load_train_config(None, {"lora_rank": "4", "lora_dropout": "0.1", "lora_target_modules": "q_proj,v_proj"})
    batches = [{k: v[8 * i: 8 * i + 8] for k, v in corpus(32, 1, seed=5).items()} for i in range(4)]

    def engine(seed: int) -> dc.ContrastiveEngine:
        model = load_model(tiny_decoder_dir(tmp_path, "qwen2"))
        add_lora(model, cfg, seed)
        return dc.ContrastiveEngine(model, dc.InfoNCE(), ds_config={"zero_optimization": {"stage": stage}},
                                    chunk_rows=4, lr=5e-2)

    def local(e: dc.ContrastiveEngine) -> dict[str, torch.Tensor]:
        return {n: getattr(p, "ds_tensor", p).detach().clone() for n, p in e.module.named_parameters()}

    first = engine(seed=1)
    for i, batch in enumerate(batches):
        first.train_step(batch)
        if i == 1:
            saved = first.save_checkpoint(tmp_path / "checkpoints", {}, {}, keep=1)
    second = engine(seed=2)  # other adapters: the checkpoint's must replace them
    second.load_checkpoint(saved)
    for batch in batches[2:]:
        second.train_step(batch)
    want, got = local(first), local(second)
    assert want.keys() == got.keys() and any("lora_B" in n for n in want)
    assert all(torch.equal(want[n], got[n]) for n in want), [n for n in want if not torch.equal(want[n], got[n])]
    if stage == 3:  # this rank holds a partition of the frozen base, not the whole of it
        base = next(p for n, p in second.module.named_parameters() if n.endswith("layers.0.mlp.up_proj.weight"))
        assert base.ds_tensor.numel() <= base.ds_numel and not base.requires_grad


def test_resuming_with_other_adapters_is_refused():
    from ds_contrastive.run import checkpoint
    from ds_contrastive.run.config import load_train_config
    from ds_contrastive.run.train import check_identity, run_identity

    def identity(**options: str) -> dict:
        return run_identity(load_train_config(None, options), total_steps=10, fingerprint="data")

    saved = identity(lora_rank="16")
    check_identity("ckpt", saved, identity(lora_rank="16", gradient_checkpointing="true"))  # same math: resumes
    with pytest.raises(checkpoint.CheckpointError, match=r"the run differs \(lora: saved \[16, 16.0, 0.0, "):
        check_identity("ckpt", saved, identity(lora_rank="8"))
    with pytest.raises(checkpoint.CheckpointError, match="lora: saved None"):
        check_identity("ckpt", {k: v for k, v in identity().items() if k != "lora"}, identity(lora_rank="16"))
