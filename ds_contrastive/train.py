"""``deepspeed --module ds_contrastive.train ...``: ``launch/train.py`` for an installed package, no checkout needed.

Also ``torchrun -m ds_contrastive.train`` and ``python -m ds_contrastive.train``
(one process). The shipped configs go by name: ``--deepspeed_config zero2
--config quickstart``.
"""

from .run.train import main

if __name__ == "__main__":
    main()
