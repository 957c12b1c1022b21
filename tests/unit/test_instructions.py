"""A query instruction reaches queries (anchors) and never documents, in every way data reaches the step."""

import json

from ds_contrastive.run.config import load_train_config
from ds_contrastive.run.setup import load_batches, load_eval_data

INSTRUCTION = "Instruct: Given a question, retrieve the passage that answers it\nQuery: "


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_the_instruction_goes_to_queries_only(tmp_path):
    rows = [{"q": f"question {i}", "d": f"answer {i}", "n": f"wrong {i}"} for i in range(8)]
    data = write(tmp_path / "qd.jsonl", rows)
    common = {"anchor_column": "q", "positive_column": "d", "negative_columns": "n", "global_batch_size": "4",
              "query_prefix": INSTRUCTION, "eval_data": data}
    for cfg in (load_train_config(None, {"train_data": data, **common}),  # one file
                load_train_config(None, {"datasets": json.dumps([{"path": data}]), **common})):  # the datasets default
        batches, _, _ = load_batches(cfg)
        _, shard = batches.shard(0, 0, 1)
        assert all(t.startswith(INSTRUCTION + "question ") for t in shard["anchor"]), shard["anchor"]
        assert all(t.startswith(("answer ", "wrong ")) for k in ("positive", "negative_1") for t in shard[k]), shard
        held_out = load_eval_data(cfg)
        assert held_out["anchor"][0] == INSTRUCTION + "question 0" and held_out["positive"][0] == "answer 0"
    own = load_train_config(None, {**common, "datasets": json.dumps([{"path": data, "query_prefix": "query: ",
                                                                        "document_prefix": "passage: "}])})
    _, shard = load_batches(own)[0].shard(0, 0, 1)
    assert shard["anchor"][0].startswith("query: question") and shard["positive"][0].startswith("passage: answer")


def test_the_trainer_script_takes_the_instruction():
    from ds_contrastive.hf.train_hf import parse

    _, args = parse(["--query_prefix", INSTRUCTION, "--document_prefix", "passage: ", "--output_dir", "unused"])
    assert (args.query_prefix, args.document_prefix) == (INSTRUCTION, "passage: ")
