"""ds_contrastive: exact very-large-batch contrastive training of text embedders on DeepSpeed."""

from .batch import BatchError
from .chunking import ChunkCosts
from .ds_config import ConfigError
from .engine import ContrastiveEngine, NonFiniteLoss
from .guide import Guide
from .guided import GuidedInfoNCE
from .losses import InfoNCE
from .matryoshka import Matryoshka
from .prefetch import prefetched

__all__ = ["BatchError", "ChunkCosts", "ConfigError", "ContrastiveEngine", "ContrastiveTrainer", "Guide", "GuidedInfoNCE", "InfoNCE",
           "Matryoshka", "NonFiniteLoss", "prefetched"]


def __getattr__(name: str) -> object:
    # The Trainer integration imports sentence-transformers' trainer (accelerate, datasets): load it on use.
    if name == "ContrastiveTrainer":
        from .hf_trainer import ContrastiveTrainer

        return ContrastiveTrainer
    raise AttributeError(f"module 'ds_contrastive' has no attribute {name!r}")
__version__ = "0.1.0"
