"""A training run from a config: setup, the loop, checkpoints, held-out evaluation, tracking, report, the CLI."""
