"""``python -m ds_contrastive``: the ``ds-contrastive`` command."""

from .cli import main

main()
