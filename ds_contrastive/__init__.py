"""ds_contrastive: exact very-large-batch contrastive training of text embedders on DeepSpeed."""

from .batch import BatchError
from .ds_config import ConfigError
from .engine import ContrastiveEngine
from .guide import Guide
from .guided import GuidedInfoNCE
from .losses import InfoNCE
from .matryoshka import Matryoshka

__all__ = ["BatchError", "ConfigError", "ContrastiveEngine", "Guide", "GuidedInfoNCE", "InfoNCE", "Matryoshka"]
__version__ = "0.1.0"
