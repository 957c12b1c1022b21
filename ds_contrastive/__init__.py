"""ds_contrastive: exact very-large-batch contrastive training of text embedders on DeepSpeed."""

from .batch import BatchError
from .ds_config import ConfigError
from .engine import ContrastiveEngine
from .losses import InfoNCE

__all__ = ["BatchError", "ConfigError", "ContrastiveEngine", "InfoNCE"]
__version__ = "0.1.0"
