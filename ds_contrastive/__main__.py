"""``python -m ds_contrastive``: the ``ds-contrastive`` command."""

from .run.cli import main

main()
