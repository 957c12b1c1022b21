"""``ds-contrastive mine`` on 2 and 3 ranks equals a single-process brute-force search, ties included; bad inputs
stop every rank with the same error; a killed run leaves no output file.

One 2-rank job (the worker: two mining runs and the bad inputs) and one 3-rank job (the real command under the
deepspeed launcher, ``--module ds_contrastive.mining``). Small batches, query blocks and corpus tiles make every
rank embed several batches and the search cross many tiles and blocks. The corpus holds case variants of some
documents, which the uncased tokenizer embeds identically: exact ties, which must break by the lower index.
"""

import json
import os
import random
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from helpers import corpus, load_model
from jobs import LAUNCHERS, job_env, run_deepspeed, run_worker

from ds_contrastive.mining.inputs import read_inputs
from ds_contrastive.mining.rules import SelectionRules, select
from ds_contrastive.mining.search import exact_scores

BATCH = 8
SEARCH = ["--batch_size", str(BATCH), "--query_block", "23", "--corpus_tile", "17"]
TOP = {"num_negatives": 3, "range_min": 1, "range_max": 40, "min_score": 0.5}
RANDOM = {"num_negatives": 2, "range_max": 12, "absolute_margin": 0.0, "sampling_strategy": "random"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def mining_data(root, rows: int = 120):
    """Pairs (some anchors repeated with another positive) and a corpus with case-variant twins."""
    data = corpus(rows, negatives=1, seed=5)
    pairs = [{"anchor": a, "positive": p} for a, p in zip(data["anchor"], data["positive"])]
    pairs += [{"anchor": data["anchor"][i], "positive": data["negative_0"][i]} for i in range(0, rows, 10)]
    documents = data["negative_0"][1::2] + [t.upper() for t in data["negative_0"][1:40:2]]
    corpus_file = write_jsonl(root / "corpus.jsonl", [{"body": t} for t in documents])
    return write_jsonl(root / "pairs.jsonl", pairs), corpus_file


def mined_rows(path, num_negatives):
    rows = [json.loads(line) for line in open(path)]
    return [(r["anchor"], r["positive"], [r[f"negative_{i}"] for i in range(1, num_negatives + 1)],
             np.float32(r["scores"]).tolist()) for r in rows]


def brute_force(model_dir, pairs, corpus_file, rules: SelectionRules, seed: int = 0, batch: int = BATCH):
    """One process, every score at once, full sort by (score desc, index asc), then the rules; returns the rows.

    Embeddings come from sentence-transformers' ``encode`` with the same batch size, one thread like the ranks.
    """
    data = read_inputs(pairs, "anchor", "positive", corpus_file, "body")
    model = load_model(model_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encode = lambda texts: model.encode(texts, batch_size=batch, normalize_embeddings=True,  # noqa: E731
                                            convert_to_tensor=True)
        queries, documents = encode(data.queries), encode(data.corpus)
    finally:
        torch.set_num_threads(threads)
    scores = exact_scores(queries, documents).numpy()
    order = np.lexsort((np.broadcast_to(np.arange(len(data.corpus)), scores.shape), -scores), axis=-1)
    window = rules.window_end(data.max_positives)
    k = min(rules.candidates(data.max_positives), len(data.corpus))
    top_scores = torch.from_numpy(np.take_along_axis(scores, order, 1)[:, :k].copy())
    top_indices = torch.from_numpy(order[:, :k].copy())
    widest = data.max_positives
    positives = torch.tensor([p + [-1] * (widest - len(p)) for p in data.positives])
    positive_scores = [[float(scores[q, p]) for p in data.positives[q]] for q in range(len(data.queries))]
    least = torch.tensor([min(s) for s in positive_scores])
    chosen = select(top_scores, top_indices, positives, least, rules, window, random.Random(seed))
    rows, ties = [], 0
    for q, query in enumerate(data.queries):
        if not chosen.found[q]:
            continue
        negatives = [data.corpus[i] for i in chosen.indices[q].tolist()]
        for p, score in zip(data.positives[q], positive_scores[q]):
            rows.append((query, data.corpus[p], negatives, np.float32([score, *chosen.scores[q].tolist()]).tolist()))
    row_scores = np.take_along_axis(scores, order, 1)[:, :k]
    ties = int((row_scores[:, 1:] == row_scores[:, :-1]).sum())
    return rows, ties


@pytest.fixture(scope="module")
def jobs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mining")
    pairs, corpus_file = mining_data(root)
    data = {"pairs": pairs, "corpus": corpus_file, "corpus_column": "body", "batch_size": BATCH, "query_block": 23,
            "corpus_tile": 17}
    bad_pairs = write_jsonl(root / "bad.jsonl", [{"anchor": "a", "positive": "b"}, {"anchor": "c", "positive": ""}])
    runs = {
        "top": {**data, "output": str(root / "top2.jsonl"), "rules": TOP},
        "random": {**data, "output": str(root / "random2.parquet"), "rules": RANDOM, "seed": 3},
        "empty_text": {**data, "pairs": bad_pairs, "output": str(root / "x.jsonl")},
        # found by rank 0 alone (it writes): rank 1 must stop with the same error, not wait in a collective
        "output_exists": {**data, "output": str(root / "top2.jsonl"), "rules": TOP},
        "missing_column": {**data, "corpus_column": "text", "output": str(root / "x.jsonl")},
        "corpus_smaller_than_k": {"pairs": bad_pairs.replace("bad", "tiny"), "output": str(root / "x.jsonl")},
        "duplicate_pair": {"pairs": write_jsonl(root / "dup.jsonl", [{"anchor": "a", "positive": "b"}] * 2),
                           "output": str(root / "x.jsonl")},
    }
    write_jsonl(root / "tiny.jsonl", [{"anchor": f"q{i}", "positive": f"d{i}"} for i in range(3)])
    runs["corpus_smaller_than_k"]["rules"] = {"num_negatives": 3}
    (root / "runs.json").write_text(json.dumps(runs))
    two = run_worker("mining", 2, tiny_model_dir, root, ["--runs", str(root / "runs.json")], timeout=240)
    options = [f"--{k}={v}" for k, v in TOP.items()]
    common = ["--model", str(tiny_model_dir), "--pairs", pairs, "--corpus", corpus_file, "--corpus_column", "body",
              "--no_progress", *options]
    run_deepspeed("ds_contrastive.mining", 3, [*common, "--output", str(root / "top3.jsonl"), *SEARCH],
                  timeout=240, launcher_args=["--module"])
    # 120 queries in batches of 64: two batches for three ranks, the third embeds no query at all
    run_deepspeed("ds_contrastive.mining", 3, [*common, "--output", str(root / "top3_big_batches.jsonl"),
                                               "--batch_size", "64"], timeout=240, launcher_args=["--module"])
    return root, two, pairs, corpus_file


@pytest.mark.parametrize("ranks", [2, 3])
def test_top_negatives_equal_single_process_brute_force(jobs, tiny_model_dir, ranks):
    root, _, pairs, corpus_file = jobs
    expected, ties = brute_force(tiny_model_dir, pairs, corpus_file, SelectionRules(**TOP))
    assert ties > 0  # the case-variant twins tie exactly: the order among them is the documented one
    assert mined_rows(root / f"top{ranks}.jsonl", 3) == expected
    assert 100 < len(expected) <= 132, len(expected)
    assert (root / f"top{ranks}.scores.png").exists()


def test_a_rank_without_queries_to_embed_still_searches_its_corpus(jobs, tiny_model_dir):
    root, _, pairs, corpus_file = jobs
    expected, _ = brute_force(tiny_model_dir, pairs, corpus_file, SelectionRules(**TOP), batch=64)
    assert mined_rows(root / "top3_big_batches.jsonl", 3) == expected


def test_random_sampling_on_two_ranks_equals_single_process(jobs, tiny_model_dir):
    import pyarrow.parquet as pq

    root, _, pairs, corpus_file = jobs
    expected, _ = brute_force(tiny_model_dir, pairs, corpus_file, SelectionRules(**RANDOM), seed=3)
    table = pq.read_table(root / "random2.parquet").to_pylist()
    rows = [(r["anchor"], r["positive"], [r["negative_1"], r["negative_2"]], np.float32(r["scores"]).tolist())
            for r in table]
    assert rows == expected and len(rows) > 10, len(rows)


@pytest.mark.parametrize("case,message", [
    ("empty_text", "DataError: {root}/bad.jsonl line 2: column 'positive' is empty"),
    ("missing_column", "DataError: {root}/corpus.jsonl line 1: no column(s) ['text'] (columns: ['body'])"),
    ("corpus_smaller_than_k", "DataError: the corpus holds 3 distinct texts (positives included), fewer than "
                              "num_negatives=3 plus the 1 positive(s)"),
    ("duplicate_pair", "DataError: {root}/dup.jsonl: rows 0 and 1 (0-based) hold the same (anchor, positive) pair"),
    ("output_exists", "ConfigError: --output {root}/top2.jsonl exists; pass --overwrite to replace it"),
])
def test_bad_inputs_stop_every_rank_with_the_same_error(jobs, case, message):
    root, two, _, _ = jobs
    errors = [per_rank[case] for per_rank in two["errors"]]
    assert errors[0] == errors[1] and errors[0].startswith(message.format(root=root)), errors
    assert not (root / "x.jsonl").exists()


def test_killed_run_leaves_no_output(tiny_model_dir, tmp_path):
    """SIGKILL the launcher and both ranks while rank 0 streams rows: the output never appears."""
    pairs, _ = mining_data(tmp_path, rows=1500)
    output = tmp_path / "mined.jsonl"
    cmd = [*LAUNCHERS["deepspeed"](2), "--module", "ds_contrastive.mining", "--model", str(tiny_model_dir),
           "--pairs", pairs, "--output", str(output), "--query_block", "1", "--no_progress", "--no_plot"]
    proc = subprocess.Popen(cmd, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline, partial = time.monotonic() + 120, []
    while not partial and proc.poll() is None and time.monotonic() < deadline:
        partial = list(tmp_path.glob(".mined.jsonl.*.partial"))
        time.sleep(0.02)
    time.sleep(0.3)  # some rows are in the partial file
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    assert partial and proc.returncode == -signal.SIGKILL, out[-3000:]
    assert partial[0].stat().st_size > 0 and not output.exists()
