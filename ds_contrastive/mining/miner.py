"""Distributed positive-aware hard-negative mining: the steps in order, as :func:`mine` runs them.

1. **Read** (every rank, the same files): the pairs grouped by query and the
   deduplicated corpus (:mod:`.inputs`). A bad input is an error on every
   rank alike (:func:`agreed`).
2. **Embed**: each rank embeds its batches of the corpus and of the queries
   (:mod:`.embed`); the corpus share stays on its rank, on the host.
3. **Search**, one block of ``query_block`` queries at a time: the block's
   query embeddings are assembled on every rank (each row comes from the rank
   that embedded it: a sum with zeros elsewhere, exact), each rank ranks its
   own corpus share in tiles (:mod:`.search`), the ranks' lists are merged
   into the global top candidates, and each positive's score comes from the
   rank holding that positive.
4. **Select and write** (rank 0): the rules (:mod:`.rules`) pick each
   query's negatives; the rows stream into the output (:mod:`.output`),
   which appears only when complete; the score report is printed and plotted
   (:mod:`.report`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from ..core.collectives import all_gather_objects, first_error
from ..core.runtime import world
from ..errors import ConfigError, DataError, OutputDirError, RankFailure
from ..run.options import BUILTIN_MODEL
from .embed import embed_share, share_size
from .inputs import MiningData, read_inputs
from .output import MinedWriter, check_output
from .report import ScoreReport
from .rules import SelectionRules, select
from .search import decode, faiss_top_k, merge, top_k

SEARCHES = ("exact", "faiss")
T = TypeVar("T")


@dataclass(frozen=True)
class MiningOptions:
    """Everything a mining run takes; ``ds-contrastive mine`` builds it from its command line."""

    pairs: str
    output: str
    model: str = BUILTIN_MODEL
    anchor_column: str = "anchor"
    positive_column: str = "positive"
    corpus: str | None = None
    corpus_column: str | None = None
    rules: SelectionRules = field(default_factory=SelectionRules)
    query_prompt: str | None = None  # None: the model's own, as encode_query picks it
    corpus_prompt: str | None = None  # None: the model's own, as encode_document picks it
    batch_size: int = 32
    query_block: int = 4096
    corpus_tile: int = 16384
    search: str = "exact"
    seed: int = 0
    overwrite: bool = False
    plot: bool = True
    progress: bool = True


@dataclass
class MiningResult:
    """What a run did (rank 0's view): counts, where the files are, the printed table, seconds per phase."""

    output: Path
    plot: Path | None
    queries: int
    documents: int
    rows_written: int
    rows_dropped: int
    table: str
    seconds: dict[str, float]


def mine(options: MiningOptions) -> MiningResult | None:
    """Mine hard negatives on every rank of the process group (or alone); rank 0 returns the result."""
    rank = world()[0]
    device = compute_device()
    data, model = agreed(lambda: setup(options, rank))  # 1. read
    from ..run.setup import check_same_data

    check_same_data({"queries": data.queries, "corpus": data.corpus}, "data to mine")
    window_end = options.rules.window_end(data.max_positives)
    k = min(options.rules.candidates(data.max_positives), len(data.corpus))
    seconds: dict[str, float] = {}

    (corpus_indices, corpus), (query_indices, queries) = embed_both(model, data, options, device, seconds)  # 2.
    dimension = max(d for d in all_gather_objects(corpus.shape[1] if len(corpus) else 0))
    del model  # the search needs its memory more

    start = time.perf_counter()  # 3. search, 4. select and write
    search = (faiss_top_k(corpus, corpus_indices, k) if options.search == "faiss"
              else lambda block: top_k(block, corpus, corpus_indices, k, options.corpus_tile))
    query_row = owner_rows(query_indices, len(data.queries))
    corpus_row = owner_rows(corpus_indices, len(data.corpus))
    report = ScoreReport()
    rng = random.Random(options.seed)
    writer = MinedWriter(options.output, options.anchor_column, options.positive_column,
                         options.rules.num_negatives)
    bar = progress_bar(options, rank, len(data.queries), "searching")
    with contextlib.ExitStack() as stack:
        agreed(lambda: stack.enter_context(writer) if rank == 0 else None)  # rank 0 opens the partial file
        for first in range(0, len(data.queries), options.query_block):
            block = range(first, min(first + options.query_block, len(data.queries)))
            block_queries = assemble(queries, query_row[first : block.stop], dimension, device)
            candidates = merge(all_ranks(search(block_queries)), k).cpu()
            pairs = [(q - first, p) for q in block for p in data.positives[q]]
            positive = positive_scores(block_queries, corpus, corpus_row, pairs)
            error = None
            if rank == 0:
                error = write_block(writer, report, data, block, candidates, positive, options.rules, window_end, rng)
            if failure := first_error(error):
                raise OutputDirError(failure)
            bar.update(len(block))
        bar.close()
        agreed(lambda: writer.commit() if rank == 0 else None)
    seconds["search_and_write"] = time.perf_counter() - start
    if rank != 0:
        return None
    plot = None
    if options.plot and report.rows:
        plot = Path(options.output).with_suffix(".scores.png")
        report.plot(plot)
    rules = {name: getattr(options.rules, name) for name in report.skipped}
    return MiningResult(Path(options.output), plot, len(data.queries), len(data.corpus), writer.rows,
                        report.dropped_rows, report.table(rules), seconds)


def setup(options: MiningOptions, rank: int) -> tuple[MiningData, object]:
    """Check the options, read the data and load the model (every rank; errors are the user's to fix)."""
    from ..run.setup import load_model, resolve_model_path

    if options.search not in SEARCHES:
        raise ConfigError(f"--search must be one of {', '.join(SEARCHES)}, got {options.search!r}")
    if options.search == "faiss" and importlib.util.find_spec("faiss") is None:
        raise ConfigError("--search faiss needs faiss: pip install faiss-cpu (or faiss-gpu)")
    for name in ("batch_size", "query_block", "corpus_tile"):
        if getattr(options, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(options, name)}")
    if rank == 0:  # only rank 0 writes: the path is checked on its filesystem
        check_output(options.output, options.overwrite)
    data = read_inputs(options.pairs, options.anchor_column, options.positive_column, options.corpus,
                       options.corpus_column)
    options.rules.check(data.max_positives)
    needed = options.rules.num_negatives + data.max_positives
    if len(data.corpus) < needed:
        raise DataError(f"the corpus holds {len(data.corpus)} distinct texts (positives included), fewer than "
                        f"num_negatives={options.rules.num_negatives} plus the {data.max_positives} positive(s) of "
                        "the query with most: no query could get its negatives; give a larger --corpus")
    path = resolve_model_path(options.model)
    if not Path(path).is_dir():
        raise ConfigError(f"--model {options.model}: no such directory")
    if not any((Path(path) / name).exists() for name in ("modules.json", "config.json")):
        raise ConfigError(f"--model {options.model}: holds no saved model (no modules.json or config.json; a "
                          "training run writes its model into its output_dir when it ends)")
    model = load_model(options.model)
    return data, model.to(compute_device())


def model_prompt(model, given: str | None, names: tuple[str, ...]) -> str:
    """``given``, else the model's saved prompt as sentence-transformers' ``encode_query`` / ``encode_document``
    choose it (the first of ``names`` in ``model.prompts``, else its default prompt), else none."""
    if given is not None:
        return given
    prompts = getattr(model, "prompts", None) or {}
    for name in names:
        if name in prompts:
            return prompts[name]
    return prompts.get(getattr(model, "default_prompt_name", None) or "", "")


def embed_both(model, data: MiningData, options: MiningOptions, device: torch.device, seconds: dict[str, float]
               ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """This rank's (indices, embeddings) of the corpus and of the queries; the seconds each took go in ``seconds``."""
    start = time.perf_counter()
    corpus_prompt = model_prompt(model, options.corpus_prompt, ("document", "passage", "corpus"))
    corpus = agreed(lambda: embed(model, data.corpus, corpus_prompt, options, device, "embedding the corpus"))
    seconds["embed_corpus"] = time.perf_counter() - start
    start = time.perf_counter()
    query_prompt = model_prompt(model, options.query_prompt, ("query",))
    queries = agreed(lambda: embed(model, data.queries, query_prompt, options, device,
                                   "embedding the queries"))
    seconds["embed_queries"] = time.perf_counter() - start
    return corpus, queries


def embed(model, texts: list[str], prompt: str, options: MiningOptions, device: torch.device,
          label: str) -> tuple[torch.Tensor, torch.Tensor]:
    rank, world_size = world()
    bar = progress_bar(options, rank, share_size(len(texts), options.batch_size, rank, world_size),
                       f"{label} (rank 0's share)" if world_size > 1 else label)
    result = embed_share(model, texts, prompt, options.batch_size, rank, world_size, device, bar.update)
    bar.close()
    return result


def write_block(writer: MinedWriter, report: ScoreReport, data: MiningData, block: range, candidates: torch.Tensor,
                positive: torch.Tensor, rules: SelectionRules, window_end: int, rng: random.Random) -> str | None:
    """Select the block's negatives and write its rows (rank 0); the error message if the file cannot be written."""
    scores, indices = decode(candidates)
    widest = max(len(data.positives[q]) for q in block)
    positives = torch.tensor([data.positives[q] + [-1] * (widest - len(data.positives[q])) for q in block])
    per_query, at = [], 0
    for q in block:
        per_query.append(positive[at : at + len(data.positives[q])])
        at += len(data.positives[q])
    least_positive = torch.stack([scores_of_query.min() for scores_of_query in per_query])
    chosen = select(scores, indices, positives, least_positive, rules, window_end, rng)
    texts, row_scores, kept = [], [], []
    for row, q in enumerate(block):
        negatives = [data.corpus[i] for i in chosen.indices[row].tolist()] if chosen.found[row] else []
        for p, score in zip(data.positives[q], per_query[row].tolist()):
            kept.append(bool(chosen.found[row]))
            if kept[-1]:
                texts.append([data.queries[q], data.corpus[p], *negatives])
                row_scores.append([score, *chosen.scores[row].tolist()])
    rows_of_query = torch.tensor([len(data.positives[q]) for q in block])
    report.add(positive.numpy(), chosen.scores.repeat_interleave(rows_of_query, dim=0).numpy(),
               torch.tensor(kept).numpy(), chosen.skipped, int(torch.isfinite(scores).sum()))
    try:
        writer.write(texts, row_scores)
    except Exception as e:  # noqa: BLE001 - raised on every rank by the caller
        return f"--output {writer.path}: cannot write ({type(e).__name__}: {e})"
    return None


def owner_rows(indices: torch.Tensor, count: int) -> torch.Tensor:
    """For each of ``count`` global indices, its row in this rank's embeddings, or -1 where another rank holds it."""
    rows = torch.full((count,), -1, dtype=torch.int64)
    rows[indices] = torch.arange(len(indices))
    return rows


def assemble(embeddings: torch.Tensor, rows: torch.Tensor, dimension: int, device: torch.device) -> torch.Tensor:
    """A block of query embeddings on every rank: each rank fills the rows it embedded; a sum with zeros is exact."""
    block = torch.zeros((len(rows), dimension), dtype=torch.float32)
    mine = rows >= 0
    if mine.any():  # a rank may embed none of the queries (fewer batches than ranks)
        block[mine] = embeddings[rows[mine]]
    block = block.to(device)
    if world()[1] > 1:
        dist.all_reduce(block)
    return block


def all_ranks(keys: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's candidate keys for the block (all the same shape)."""
    if world()[1] == 1:
        return [keys]
    parts = [torch.empty_like(keys) for _ in range(world()[1])]
    dist.all_gather(parts, keys.contiguous())
    return parts


def positive_scores(block: torch.Tensor, corpus: torch.Tensor, corpus_row: torch.Tensor,
                    pairs: list[tuple[int, int]]) -> torch.Tensor:
    """The score of each (block row, positive) pair, computed by the rank holding the positive (a max over ranks)."""
    query, document = (torch.tensor(column, dtype=torch.int64) for column in zip(*pairs))
    rows = corpus_row[document]
    mine = rows >= 0
    scores = torch.full((len(pairs),), float("-inf"), device=block.device)
    if mine.any():
        documents = corpus[rows[mine]].to(block.device).double()
        scores[mine.to(block.device)] = (block[query[mine].to(block.device)].double() * documents).sum(1).float()
    if world()[1] > 1:
        dist.all_reduce(scores, op=dist.ReduceOp.MAX)
    return scores.cpu()


def agreed(build: Callable[[], T]) -> T:
    """``build()`` on every rank; an error on any rank is raised on every rank, so none waits for one that left.

    The rank that failed raises its own exception; the others raise the same
    DataError or ConfigError (the user's to fix), or a RankFailure naming
    the rank and its error (a tokenizer failing on one text, memory, a file
    only one rank could not open).
    """
    kinds = {"DataError": DataError, "ConfigError": ConfigError}
    try:
        value, own, error = build(), None, None
    except Exception as e:  # noqa: BLE001 - shared with every rank below
        value, own, error = None, e, (type(e).__name__, str(e))
    failures = [(rank, e) for rank, e in enumerate(all_gather_objects(error)) if e]
    if failures:
        if own is not None:
            raise own
        rank, (kind, message) = failures[0]
        if kind in kinds:
            raise kinds[kind](message)
        raise RankFailure(f"rank {rank} failed: {kind}: {message}")
    return value


def compute_device() -> torch.device:
    """This rank's GPU, made the current one (collectives of Python objects use the current device), or the CPU."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def progress_bar(options: MiningOptions, rank: int, total: int, label: str):
    """tqdm on rank 0 (when ``options.progress``); a bar that draws nothing elsewhere."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit="text", disable=rank != 0 or not options.progress, dynamic_ncols=True)

