"""ContrastiveTrainer refuses what its exact step cannot honour, with a message naming the problem."""

import pytest
import torch
from datasets import Dataset
from helpers import load_model
from sentence_transformers import SentenceTransformerTrainingArguments

import ds_contrastive as dc
from ds_contrastive.hf.inputs import RawTextCollator
from ds_contrastive.hf.trainer import ContrastiveObjective

DATA = {"anchor": ["a question", "another question"], "positive": ["an answer", "another answer"]}


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir)


def args(tmp_path, **kwargs):
    return SentenceTransformerTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kwargs)


@pytest.mark.parametrize("kwargs, data, message", [
    ({"args": {"gradient_accumulation_steps": 4}}, DATA, "gradient_accumulation_steps=4"),
    ({}, {**DATA, "label": [1.0, 0.0]}, "column(s) ['label']"),
    ({}, {"anchor": ["only one column"]}, "needs an anchor and a positive column"),
    ({"data_collator": RawTextCollator()}, DATA, "do not pass data_collator"),
    ({"loss": dc.Matryoshka(dc.InfoNCE(), dims=(64, 16))}, DATA, "exceed the model's embedding size 32"),
    ({"args": {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}}}, DATA,
     "use_reentrant=True is not supported"),
    ({"save_adapter_only": True}, DATA, "save_adapter_only needs a model with LoRA adapters"),
])
def test_refusals(model, tmp_path, kwargs, data, message):
    kwargs = dict(kwargs)
    training_args = args(tmp_path, **kwargs.pop("args", {}))
    with pytest.raises(ValueError) as err:
        dc.ContrastiveTrainer(model=model, args=training_args, train_dataset=Dataset.from_dict(data), **kwargs)
    assert message in str(err.value)


def test_fp16_from_accelerate_is_refused(model, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # accelerate's way: fp16 stays False
    with pytest.raises(ValueError, match="fp16 is not supported"):
        dc.ContrastiveTrainer(model=model, args=args(tmp_path), train_dataset=Dataset.from_dict(DATA))


def test_eval_columns_must_match_train(model, tmp_path):
    other = Dataset.from_dict({"query": DATA["anchor"], "document": DATA["positive"]})
    with pytest.raises(ValueError, match="differ from train_dataset's"):
        dc.ContrastiveTrainer(model=model, args=args(tmp_path), train_dataset=Dataset.from_dict(DATA),
                              eval_dataset=other)


TWO = {"a": DATA, "b": {"question": DATA["anchor"], "answer": DATA["positive"]}}


@pytest.mark.parametrize("train, kwargs, message", [
    (DATA, {"loss": {"a": dc.InfoNCE()}}, "train_dataset and eval_dataset must then be DatasetDicts"),
    (TWO, {"loss": {"a": dc.InfoNCE()}}, "dataset 'b' has no loss in the dict of losses (its keys: ['a'])"),
    (TWO, {"loss": {"a": dc.InfoNCE(learnable_temperature=True), "b": dc.InfoNCE()}},
     "give every loss learnable_temperature=True with the same temperature"),
    (TWO, {"loss": {"a": dc.InfoNCE(learnable_temperature=True),
                    "b": dc.InfoNCE(temperature=0.1, learnable_temperature=True)}}, "with the same temperature"),
    (TWO, {"args": {"prompts": {"a": {"anchor": "query: "}}}}, "dataset(s) ['b'] have none"),
    (TWO, {"loss": {"a": dc.InfoNCE(), "b": dc.InfoNCE(), "c": dc.InfoNCE()}}, "names dataset(s) ['c'] that neither"),
    (DATA, {"args": {"prompts": {"a": {"anchor": "query: "}}}}, "the datasets are single Datasets"),
    (TWO, {"eval_dataset": {"b": Dataset.from_dict(DATA)}},
     "eval_dataset['b']'s anchor and positive columns ['anchor', 'positive'] differ from train_dataset['b']'s"),
])
def test_multi_dataset_refusals(model, tmp_path, train, kwargs, message):
    kwargs = dict(kwargs)
    training_args = args(tmp_path, **kwargs.pop("args", {}))
    if train is TWO:
        train = {name: Dataset.from_dict(columns) for name, columns in TWO.items()}
    else:
        train = Dataset.from_dict(train)
    with pytest.raises(ValueError) as err:
        dc.ContrastiveTrainer(model=model, args=training_args, train_dataset=train, **kwargs)
    assert message in str(err.value)


def test_a_leftover_learnable_temperature_is_not_trained_silently(tiny_model_dir, tmp_path):
    from ds_contrastive.core.embedding_module import detach_log_scale

    model = load_model(tiny_model_dir)
    dc.ContrastiveTrainer(model=model, args=args(tmp_path), train_dataset=Dataset.from_dict(DATA),
                          loss=dc.InfoNCE(learnable_temperature=True))
    with pytest.raises(ValueError, match="carries a learnable temperature"):
        dc.ContrastiveTrainer(model=model, args=args(tmp_path), train_dataset=Dataset.from_dict(DATA))
    detach_log_scale(model)
    assert "log_scale" not in dict(model.named_parameters()) and "logit_scale" not in model(
        model.tokenize(["a text"]))
    dc.ContrastiveTrainer(model=model, args=args(tmp_path), train_dataset=Dataset.from_dict(DATA))


def test_collator_keeps_raw_strings_and_applies_prompts():
    rows = [{"anchor": "q1", "positive": "d1"}, {"anchor": "q2", "positive": 3}]
    assert RawTextCollator()(rows) == {"anchor": ["q1", "q2"], "positive": ["d1", 3]}  # the step rejects the 3
    assert RawTextCollator({"anchor": "query: "})(rows)["anchor"] == ["query: q1", "query: q2"]
    assert RawTextCollator("x ")(rows)["positive"] == ["x d1", 3]
    named = [{**row, "dataset_name": "b"} for row in rows]  # sentence-transformers' per-dataset forms
    assert RawTextCollator({"a": "x ", "b": {"anchor": "q: "}})(named) == {
        "anchor": ["q: q1", "q: q2"], "positive": ["d1", 3], "dataset_name": "b"}
    assert RawTextCollator({"a": "x ", "b": "y "})(named)["positive"] == ["y d1", 3]
    assert RawTextCollator({"anchor": "q: "})(named)["anchor"] == ["q: q1", "q: q2"]  # by column, any dataset


def test_objective_is_not_called_directly(model):
    with pytest.raises(RuntimeError, match="ContrastiveTrainer"):
        ContrastiveObjective(model, dc.InfoNCE())([{"input_ids": torch.zeros(1, 2, dtype=torch.long)}], None)


def test_eval_loss_is_the_objective_of_the_eval_batch(tiny_model_dir, tmp_path):
    """One process, no DeepSpeed: ``evaluate()`` on an eval_dataset gives the objective's loss and accuracy."""
    from helpers import corpus
    from reference import reference_loss

    model = load_model(tiny_model_dir)
    data = corpus(10, 1, seed=9)
    training_args = args(tmp_path, per_device_eval_batch_size=10)
    trainer = dc.ContrastiveTrainer(model=model, args=training_args, train_dataset=Dataset.from_dict(data),
                                    eval_dataset=Dataset.from_dict(data), loss=dc.InfoNCE(temperature=0.05),
                                    chunk_tokens=100, max_length=64)
    metrics = trainer.evaluate()
    model.eval()
    with torch.no_grad():
        emb = torch.stack([model.encode(col, convert_to_tensor=True) for col in data.values()], dim=1)
    want = float(reference_loss(emb, list(data.values()), torch.tensor(20.0), ("query_to_doc",), True))
    assert abs(metrics["eval_loss"] - want) < 1e-4, (metrics, want)
    logged = trainer.state.log_history[-1]  # the objective's other metrics are logged beside eval_loss
    assert logged["eval_loss"] == metrics["eval_loss"] and 0 <= logged["eval_accuracy"] <= 1, logged


def test_both_scripts_take_the_shared_options_with_their_descriptions(capsys, monkeypatch):
    from dataclasses import fields

    from ds_contrastive.hf.train_hf import ContrastiveArguments, parse
    from ds_contrastive.run.config import TrainConfig, argument_parser
    from ds_contrastive.run.options import ChunkingOptions, DataOptions, LossOptions, ModelOptions

    monkeypatch.setenv("COLUMNS", "200")
    shared = [f for group in (ModelOptions, DataOptions, LossOptions, ChunkingOptions) for f in fields(group)]
    assert {f.name for f in shared} <= {f.name for f in fields(TrainConfig)}
    assert {f.name for f in shared} == {f.name for f in fields(ContrastiveArguments)} - {"datasets"}
    for parser_help in (lambda: argument_parser().parse_args(["--help"]), lambda: parse(["--help"])):
        with pytest.raises(SystemExit):
            parser_help()
        text = " ".join(capsys.readouterr().out.split())
        for f in shared:
            assert f"--{f.name}" in text and " ".join(f.metadata["help"].split()) in text, f.name
    args = parse(["--retain_tokens", "5000", "--chunk_costs", "0.01", "1e-6", "1e-9"])[1]
    assert args.retain_tokens == 5000 and args.chunk_costs == [0.01, 1e-6, 1e-9]


@pytest.mark.parametrize("argv, message", [
    (["--datasets", "[{\"path\": \"a.jsonl\"}]", "--train_data", "b.jsonl"], "set --train_data or --datasets"),
    (["--datasets", "not json"], "neither a JSON list nor a readable .json/.yaml file"),
    (["--datasets", "[{\"path\": \"x/a.jsonl\"}, {\"path\": \"y/a.jsonl\"}]"], "names must be unique"),
    (["--datasets", "[{\"path\": \"a.jsonl\", \"weigth\": 2}]"], "datasets[0]: unknown key 'weigth'"),
    (["--datasets", "[]"], "non-empty list"),
])
def test_train_hf_datasets_refusals(argv, message):
    from ds_contrastive.errors import ConfigError
    from ds_contrastive.hf.train_hf import dataset_entries, parse

    with pytest.raises(ConfigError) as err:
        args = parse(argv)[1]
        dataset_entries(args.datasets)
    assert message in str(err.value)
