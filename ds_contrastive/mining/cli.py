"""``ds-contrastive mine``: the command line of :func:`~ds_contrastive.mining.miner.mine`.

One process: ``ds-contrastive mine --pairs pairs.jsonl --output mined.jsonl``
(or ``python -m ds_contrastive.mining``). Several: ``deepspeed --module
ds_contrastive.mining ...`` or ``torchrun --nproc_per_node 8 -m
ds_contrastive.mining ...``, with the same options. The selection options are
sentence-transformers' ``mine_hard_negatives`` arguments, with its names and
defaults.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from ..run.options import BUILTIN_DATA, BUILTIN_MODEL

DESCRIPTION = ("Mine hard negatives for (anchor, positive) pairs over one or many ranks: exact top-k search, "
               "sentence-transformers' selection rules, an output written atomically with negative_1..k columns.")


def parser() -> argparse.ArgumentParser:
    from .miner import SEARCHES, MiningOptions
    from .rules import SAMPLING_STRATEGIES, SelectionRules

    rules, defaults = SelectionRules(), MiningOptions(pairs="", output="")
    p = argparse.ArgumentParser(prog="ds-contrastive mine", description=DESCRIPTION)
    data = p.add_argument_group("data")
    data.add_argument("--pairs", required=True, help=f"JSONL/CSV/Parquet/save_to_disk (anchor, positive) pairs, "
                                                     f"or {BUILTIN_DATA} (the quickstart's pairs)")
    data.add_argument("--output", required=True, help="the mined file: .jsonl or .parquet")
    data.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    data.add_argument("--anchor_column", default=defaults.anchor_column)
    data.add_argument("--positive_column", default=defaults.positive_column)
    data.add_argument("--corpus", help="candidate documents besides the positives (default: the positives alone)")
    data.add_argument("--corpus_column", help="--corpus's text column")
    model = p.add_argument_group("model")
    model.add_argument("--model", default=BUILTIN_MODEL, help="a SentenceTransformer directory (a training run's "
                                                              "output_dir), or the packaged all-MiniLM-L6-v2")
    model.add_argument("--query_prompt", help="prepended to every anchor before embedding (default: the model's "
                                               "saved 'query' prompt, as encode_query uses it)")
    model.add_argument("--corpus_prompt", help="prepended to every document before embedding (default: the model's "
                                                "saved 'document' prompt, as encode_document uses it)")
    model.add_argument("--batch_size", type=int, default=defaults.batch_size, help="texts per forward call")
    select = p.add_argument_group("selection (sentence-transformers' mine_hard_negatives options)")
    select.add_argument("--num_negatives", type=int, default=rules.num_negatives)
    select.add_argument("--range_min", type=int, default=rules.range_min, help="skip the best range_min candidates")
    select.add_argument("--range_max", type=int, default=rules.range_max,
                        help="consider the best range_max candidates (default: derived, as sentence-transformers)")
    select.add_argument("--max_score", type=float, help="skip candidates scoring above")
    select.add_argument("--min_score", type=float, help="skip candidates scoring below")
    select.add_argument("--absolute_margin", type=float, help="skip candidates within this of the positive's score")
    select.add_argument("--relative_margin", type=float,
                        help="skip candidates above positive - |positive| * margin (0.05: NV-Retriever's 95%%)")
    select.add_argument("--sampling_strategy", default=rules.sampling_strategy, choices=SAMPLING_STRATEGIES)
    select.add_argument("--seed", type=int, default=defaults.seed, help="for --sampling_strategy random")
    search = p.add_argument_group("search")
    search.add_argument("--search", default=defaults.search, choices=SEARCHES,
                        help="exact: tiled, on the device; faiss: a flat inner-product index per rank")
    search.add_argument("--query_block", type=int, default=defaults.query_block, help="queries searched at once")
    search.add_argument("--corpus_tile", type=int, default=defaults.corpus_tile,
                        help="documents scored at once per query block (device memory: query_block x corpus_tile)")
    p.add_argument("--no_plot", action="store_true", help="do not write OUTPUT.scores.png")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.add_argument("--summary", metavar="FILE", help="also write the run's counts and seconds per phase as JSON")
    p.add_argument("--debug", action="store_true", help="show the traceback of every error")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # the deepspeed launcher passes it
    return p


def options_from(args: argparse.Namespace):
    from .miner import MiningOptions
    from .rules import SelectionRules

    rules = SelectionRules(num_negatives=args.num_negatives, range_min=args.range_min, range_max=args.range_max,
                           max_score=args.max_score, min_score=args.min_score, absolute_margin=args.absolute_margin,
                           relative_margin=args.relative_margin, sampling_strategy=args.sampling_strategy)
    return MiningOptions(pairs=args.pairs, output=args.output, model=args.model, anchor_column=args.anchor_column,
                         positive_column=args.positive_column, corpus=args.corpus, corpus_column=args.corpus_column,
                         rules=rules, query_prompt=args.query_prompt, corpus_prompt=args.corpus_prompt,
                         batch_size=args.batch_size, query_block=args.query_block, corpus_tile=args.corpus_tile,
                         search=args.search, seed=args.seed, overwrite=args.overwrite, plot=not args.no_plot,
                         progress=not args.no_progress)


def stop_on_sigterm() -> None:
    """Turn SIGTERM (a launcher stopping the job, a scheduler's preemption) into SystemExit, so the partial
    output file is removed on the way out."""
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))


def write_summary(path: str, result, world_size: int) -> None:
    """The counts and seconds of a run, with the throughput they imply, for scripts and benchmarks."""
    seconds = result.seconds
    summary = {"world_size": world_size, "queries": result.queries, "documents": result.documents,
               "rows_written": result.rows_written, "rows_dropped": result.rows_dropped, "seconds": seconds,
               "documents_per_second": result.documents / seconds["embed_corpus"],
               "queries_per_second": result.queries / seconds["embed_queries"],
               "searched_queries_per_second": result.queries / seconds["search_and_write"],
               "end_to_end_queries_per_second": result.queries / sum(seconds.values())}
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from ..core.runtime import init_process_group, share_cpu_threads, shutdown, world
    from ..run.console import clean_errors, quiet_other_ranks
    from .miner import mine

    quiet_other_ranks()
    stop_on_sigterm()
    with clean_errors(args.debug):
        share_cpu_threads()
        init_process_group()
        result = mine(options_from(args))
        if world()[0] == 0 and result is not None:
            print(result.table)
            rates = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in result.seconds.items())
            print(f"wrote {result.rows_written:,} rows to {result.output} ({result.rows_dropped:,} dropped: too few "
                  f"negatives); {result.queries:,} queries, {result.documents:,} documents; {rates}"
                  + (f"; plot: {result.plot}" if result.plot else ""), flush=True)
            if args.summary:
                write_summary(args.summary, result, world()[1])
        shutdown()
