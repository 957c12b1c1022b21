"""The pieces of bench/gpu_throughput.py, the one-GPU benchmark of ds_contrastive against sentence-transformers.

The script parses its options and hands them to :class:`gpu_bench.runner.Bench`, which runs the items
of :mod:`gpu_bench.plan` in order while :mod:`gpu_bench.budget` says they fit: per item the
ds_contrastive part (:mod:`gpu_bench.ds_side`), the floor on the chunks the engine ran
(:mod:`gpu_bench.floor`) and the sentence-transformers part (:mod:`gpu_bench.st_side`), on encoders from
:mod:`gpu_bench.models`, texts from :mod:`gpu_bench.workloads` and sizes from :mod:`gpu_bench.sizes`,
timed on :mod:`gpu_bench.device`; the 1,048,576-row batch is made in a background process
(:mod:`gpu_bench.big_batch`). :mod:`gpu_bench.ratios` turns the timings into ratios and targets,
:mod:`gpu_bench.report` writes the JSON and its table, :mod:`gpu_bench.environment` records the
software and the card, and :mod:`gpu_bench.watchdog` ends an overrunning run. Every module imports
torch and the libraries it times inside its functions, so that importing the package imports none
of them: ``--help`` stays instant, and bench/cpu_vs_st.py, which borrows the workload texts, sets its
thread counts before torch is first imported.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root
GIB = 2**30
