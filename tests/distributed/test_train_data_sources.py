"""launch/train.py on 2 ranks reading its batches from a mixture of datasets and from a stream."""

import json

import pytest
from helpers import corpus
from jobs import ROOT, run_deepspeed

from ds_contrastive.data.files import GlobalBatches
from ds_contrastive.data.mixture import MixedBatches, Source


def test_launch_train_on_two_datasets_logs_each(tiny_model_dir, tmp_path):
    """launch/train.py, 2 ranks: a 'qa' file with a hard negative and a 'nli' file with other column names."""
    qa, nli = corpus(24, 1, seed=21), corpus(16, 0, seed=22)
    with open(tmp_path / "qa.jsonl", "w") as f:
        for a, p, n in zip(qa["anchor"], qa["positive"], qa["negative_0"]):
            f.write(json.dumps({"anchor": a, "positive": p, "negative_0": n}) + "\n")
    with open(tmp_path / "nli.jsonl", "w") as f:
        for a, p in zip(nli["anchor"], nli["positive"]):
            f.write(json.dumps({"premise": a, "hypothesis": p}) + "\n")
    datasets = [{"path": str(tmp_path / "qa.jsonl"), "name": "qa", "weight": 2, "negative_columns": ["negative_0"],
                 "query_prefix": "query: ", "document_prefix": "passage: "},
                {"path": str(tmp_path / "nli.jsonl"), "weight": 1, "anchor_column": "premise",
                 "positive_column": "hypothesis"}]
    out = tmp_path / "run"
    run_deepspeed(ROOT / "launch/train.py", 2, [
        "--deepspeed_config", str(ROOT / "configs/deepspeed/zero2.json"), "--model", str(tiny_model_dir),
        "--datasets", json.dumps(datasets), "--eval_data", "null", "--global_batch_size", "8",
        "--max_steps", "6", "--chunk_tokens", "150", "--max_length", "32", "--progress_bar", "false",
        "--output_dir", str(out)], timeout=600)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 7))
    mix = MixedBatches([Source("qa", GlobalBatches(qa, 8, 42), 2.0), Source("nli", GlobalBatches(
        {"premise": nli["anchor"], "hypothesis": nli["positive"]}, 8, 42 + 1000), 1.0, "premise", "hypothesis")], 42)
    drawn = [mix.sources[mix.position(step)[0]].name for step in range(6)]
    assert set(drawn) == {"qa", "nli"}  # this seed draws both within 6 steps
    for line, name in zip(lines, drawn):  # each step logs the dataset it drew, and only that one
        assert line[f"train/{name}/loss"] == line["train/loss"]
        assert f"train/{'nli' if name == 'qa' else 'qa'}/loss" not in line
        assert 0.0 <= line[f"train/{name}/accuracy"] <= 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_examples"] == 40 and summary["steps"] == 6


def test_launch_train_streams_a_file_and_names_a_bad_line(tiny_model_dir, tmp_path):
    """launch/train.py --streaming, 2 ranks: trains from the stream; with a malformed line and no
    allowance for bad rows, the job stops with the file and line named."""
    data = corpus(48, 1, seed=31)
    lines = [json.dumps({"q": a, "d": p, "n": n}).encode() for a, p, n in zip(*data.values())]
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_bytes(b"\n".join(lines) + b"\n")
    bad.write_bytes(b"\n".join(lines[:9] + [b'{"q": "cut off'] + lines[9:]) + b"\n")
    common = ["--deepspeed_config", str(ROOT / "configs/deepspeed/zero2.json"), "--model", str(tiny_model_dir),
              "--streaming", "true", "--stream_window_batches", "2", "--anchor_column", "q",
              "--positive_column", "d", "--negative_columns", "n", "--eval_data", "null", "--global_batch_size", "8",
              "--max_steps", "8", "--chunk_tokens", "150", "--max_length", "32", "--progress_bar", "false"]
    run_deepspeed(ROOT / "launch/train.py", 2, [*common, "--train_data", str(good), "--output_dir", str(tmp_path / "ok")],
                  timeout=600)
    logged = [json.loads(line) for line in (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == list(range(1, 9))  # 8 steps: 6 batches per epoch, then the next epoch
    assert all(m["negatives/global_batch_size"] == 8 and m["train/bad_rows_skipped"] == 0 for m in logged)
    with pytest.raises(AssertionError) as failed:
        run_deepspeed(ROOT / "launch/train.py", 2, [*common, "--train_data", str(bad), "--output_dir",
                                                    str(tmp_path / "bad")], timeout=600)
    assert "bad.jsonl line 10: malformed JSON" in str(failed.value)
