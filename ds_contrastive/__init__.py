"""ds_contrastive: exact very-large-batch contrastive training of text embedders on DeepSpeed.

The public API. Where things are: ``core/`` holds the step (read
``core/step.py`` for the algorithm), ``losses/`` the losses, ``data/`` where
batches come from, ``deepspeed_config/`` the DeepSpeed config checks,
``run/`` the training script and what it writes, ``hf/`` the Trainer.
"""

from .core.chunks import ChunkCosts
from .core.prefetch import prefetched
from .engine import ContrastiveEngine
from .errors import (BatchError, CheckpointError, ConfigError, DataError, NonFiniteLoss, OutputDirError, RankFailure,
                     ReportError)
from .losses.guide_model import Guide
from .losses.guided import GuidedInfoNCE
from .losses.infonce import InfoNCE
from .losses.matryoshka import Matryoshka

__version__ = "0.1.0"
__all__ = ["BatchError", "CheckpointError", "ChunkCosts", "ConfigError", "ContrastiveEngine", "ContrastiveTrainer",
           "DataError", "Guide", "GuidedInfoNCE", "InfoNCE", "Matryoshka", "NonFiniteLoss", "OutputDirError",
           "RankFailure", "ReportError", "prefetched"]


def __getattr__(name: str) -> object:
    # The Trainer integration imports sentence-transformers' trainer (accelerate, datasets): load it on use.
    if name == "ContrastiveTrainer":
        from .hf.trainer import ContrastiveTrainer

        return ContrastiveTrainer
    raise AttributeError(f"module 'ds_contrastive' has no attribute {name!r}")
