"""Training config: YAML plus command-line overrides, and clear errors for bad keys and values."""

import subprocess
import sys

import pytest

from ds_contrastive import ConfigError
from ds_contrastive.run.config import TrainConfig, argument_parser, load_train_config
from jobs import ROOT, job_env


def write(tmp_path, text):
    path = tmp_path / "train.yaml"
    path.write_text(text)
    return path


def test_yaml_then_overrides(tmp_path):
    path = write(tmp_path, "global_batch_size: 32\nlr: 1.0e-4\ndirections: [query_to_doc, doc_to_query]\n")
    cfg = load_train_config(path, {"lr": "3e-4", "negative_columns": "neg_a,neg_b", "wandb": "true",
                                   "max_steps": "null"})
    assert cfg.global_batch_size == 32 and cfg.lr == 3e-4 and cfg.wandb is True and cfg.max_steps is None
    assert cfg.directions == ["query_to_doc", "doc_to_query"]
    assert cfg.negative_columns == ["neg_a", "neg_b"]


def test_datasets_from_yaml_or_json_on_the_command_line(tmp_path):
    path = write(tmp_path, "datasets:\n  - {path: a.jsonl, weight: 3, query_prefix: 'query: '}\n  - {path: b.jsonl}\n")
    assert load_train_config(path, {}).datasets == [{"path": "a.jsonl", "weight": 3, "query_prefix": "query: "},
                                                     {"path": "b.jsonl"}]
    cfg = load_train_config(None, {"datasets": '[{"path": "c.jsonl", "name": "c", "max_examples": 10}]'})
    assert cfg.datasets == [{"path": "c.jsonl", "name": "c", "max_examples": 10}]


def test_defaults_are_the_quickstart():
    assert load_train_config(None, {}) == TrainConfig()


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("global_batch_sise: 8\n", {}, "unknown training config key 'global_batch_sise' (did you mean 'global_batch_size'?)"),
        ("", {"global_batch_size": "many"}, "global_batch_size must be int, got 'many'"),
        ("global_batch_size: 2.5\n", {}, "global_batch_size must be int"),
        ("wandb: maybe\n", {}, "wandb must be true or false"),
        ("global_batch_size: 0\n", {}, "global_batch_size must be >= 1"),
        ("warmup_ratio: 1.5\n", {}, "warmup_ratio must be in [0, 1)"),
        ("precision: fp16\n", {}, "precision must be 'bf16', 'fp32' or null"),
        ("chunk_tokens: null\n", {}, "set chunk_tokens, chunk_rows, or both"),
        ("- a\n- b\n", {}, "must be a mapping"),
        ("datasets: [{weight: 1}]\n", {}, "datasets[0] has no 'path'"),
        ("datasets: [{path: a.jsonl, wieght: 2}]\n", {}, "datasets[0]: unknown key 'wieght' (did you mean 'weight'?)"),
        ("datasets: [{path: a.jsonl}, {path: b.jsonl, weight: 0}]\n", {}, "datasets[1].weight must be a number > 0"),
        ("datasets: [{path: a.jsonl, negative_columns: neg}]\n", {}, "datasets[0].negative_columns must be list"),
        ("datasets: [a.jsonl]\n", {}, "datasets[0] must be a mapping"),
        ("datasets: {path: a.jsonl}\n", {}, "datasets must be a list of mappings"),
        ("train_data: t.jsonl\ndatasets: [{path: a.jsonl}]\n", {}, "set train_data or datasets, not both"),
        ("", {"datasets": "[{path: a.jsonl}]"}, "datasets on the command line must be JSON"),
        ("streaming: true\ntrain_data: a.jsonl\n", {}, "streaming reads one train_data file and needs max_steps"),
        ("streaming: true\nmax_steps: 5\n", {}, "does not combine with datasets or the built-in data"),
        ("stream_window_batches: 0\n", {}, "stream_window_batches must be >= 1 and max_bad_rows >= 0"),
        ("checkpoint_every_steps: 0\n", {}, "checkpoint_every_steps must be >= 1 or null"),
        ("checkpoint_every_minutes: 0\n", {}, "checkpoint_every_minutes must be > 0"),
        ("", {"collective_timeout_seconds": "-5"}, "collective_timeout_seconds must be > 0"),
        ("keep_checkpoints: 0\n", {}, "keep_checkpoints must be >= 1"),
        ("resume: ''\n", {}, "resume must be 'auto', a checkpoint directory, or null"),
    ],
)
def test_bad_config_names_the_problem(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError) as e:
        load_train_config(write(tmp_path, text), overrides)
    assert message in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(tmp_path / "nope.yaml", {})


def test_help_lists_every_key_with_its_default():
    out = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--help"], capture_output=True,
                         text=True, env=job_env(), timeout=300, check=True).stdout
    for name, value in vars(TrainConfig()).items():
        assert f"--{name}" in out
    assert "--deepspeed_config" in out and "default: 64" in " ".join(out.split())
    assert set(vars(argument_parser().parse_args([]))) >= set(vars(TrainConfig()))


@pytest.mark.parametrize("values,negatives", [({"global_batch_size": 3}, 2),
                                              ({"global_batch_size": 8, "negative_columns": "n"}, 15),
                                              ({"global_batch_size": 32}, 31), ({"global_batch_size": 33}, None),
                                              ({"global_batch_size": 17, "negative_columns": "n"}, None)])
def test_a_global_batch_with_few_negatives_is_warned_about(values, negatives):
    from ds_contrastive.run.setup import FEW_NEGATIVES, few_negatives_warning

    warning = few_negatives_warning(load_train_config(None, values))
    if negatives is None:
        assert warning is None
    else:
        assert f"gives each anchor {negatives} document negative(s), fewer than {FEW_NEGATIVES}" in warning
        assert "raise global_batch_size" in warning
