"""Shared by every test: offline settings, the support code on the path, the tiny model, markers by directory.

tests/unit/ runs in this process; tests/distributed/ starts multi-rank jobs
(each worker script beside its test) and is marked ``distributed``;
tests/support/ is the code both use (helpers, jobs, the full-batch
reference, the W&B reader).
"""

import os
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
# the chunk planner's measured costs: one cache for the session's jobs, none left in the user's home
os.environ.setdefault("DS_CONTRASTIVE_CACHE", os.path.join(tempfile.mkdtemp(prefix="ds_contrastive_cache_"),
                                                           "calibration.json"))
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))  # helpers, jobs, reference, wandb_offline


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random-init BERT SentenceTransformer (dropout 0.1), built once per session."""
    from helpers import tiny_bert_dir

    return tiny_bert_dir(tmp_path_factory.mktemp("models"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/distributed/ ``distributed``: ``pytest -m "not distributed"`` skips them."""
    for item in items:
        if "distributed" in Path(item.path).parent.parts[-1:]:
            item.add_marker(pytest.mark.distributed)
