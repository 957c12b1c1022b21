"""DeepSpeed configs checked at start: clear errors naming the file and key, 'auto' values resolved and printed."""

import inspect
import re
from dataclasses import fields

import pytest
import torch

from ds_contrastive import ConfigError
from ds_contrastive.deepspeed_config.auto import format_resolved, resolve_auto, warmup_steps
from ds_contrastive.deepspeed_config.checks import check_batch_keys, check_schedule, check_start, check_zero_optimizer
from ds_contrastive.deepspeed_config.loading import load_ds_config, resolve_ds_config
from ds_contrastive.deepspeed_config.schema import check_ds_config, deepspeed_top_level_keys
from ds_contrastive.run.config import TrainConfig, argument_parser, load_train_config
from jobs import ROOT

CONFIGS = sorted((ROOT / "configs/deepspeed").glob("*.json"))
QUICKSTART = load_train_config(ROOT / "configs/train/quickstart.yaml", {})
BASE = {"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}
ADAMW = {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}}
WARMUP_DECAY = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                    "warmup_num_steps": "auto", "total_num_steps": "auto"}}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_shipped_configs_pass(path, world_size):
    config = load_ds_config(path)
    check_ds_config(config, path)
    check_zero_optimizer(config, path)
    check_batch_keys(config, QUICKSTART.global_batch_size, world_size, path)
    if not path.name.startswith("hf_"):  # the HF Trainer's configs leave clipping and bf16 to TrainingArguments
        checked = check_start(config, QUICKSTART, world_size, path)
        assert checked["train_micro_batch_size_per_gpu"] == "auto"
        assert resolve_ds_config(checked, world_size)["train_batch_size"] == world_size


def test_hf_configs_need_what_the_training_config_lacks():
    with pytest.raises(ConfigError, match=r"hf_zero2.json: gradient_clipping is 'auto', which ds_contrastive cannot "
                                          r"resolve: the training config has no clipping setting"):
        check_start(load_ds_config(ROOT / "configs/deepspeed/hf_zero2.json"), QUICKSTART, 2, "hf_zero2.json")
    with pytest.raises(ConfigError, match=r"bf16.enabled is 'auto'.*set precision \(bf16 or fp32\)"):
        check_start({**BASE, "bf16": {"enabled": "auto"}}, QUICKSTART, 2, "x.json")


def test_deepspeeds_keys_are_read_from_deepspeed():
    keys = deepspeed_top_level_keys()
    assert {"zero_optimization", "optimizer", "scheduler", "bf16", "gradient_clipping", "train_batch_size",
            "zero_force_ds_cpu_optimizer", "activation_checkpointing", "flops_profiler", "tensorboard"} <= keys
    assert "zero_optimisation" not in keys


@pytest.mark.parametrize("config, message", [
    ({**BASE, "zero_optimisation": {}},
     "x.json: unknown DeepSpeed key 'zero_optimisation' (did you mean 'zero_optimization'?)"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_sise": 5}},
     "x.json: unknown key 'zero_optimization.reduce_bucket_sise' (did you mean 'reduce_bucket_size'?)"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"devise": "cpu"}}},
     "unknown key 'zero_optimization.offload_param.devise' (did you mean 'device'?)"),
    ({"zero_optimization": {"stage": "two"}}, "x.json: zero_optimization.stage: Input should be 0, 1, 2, 3"),
    ({"zero_optimization": 2}, "zero_optimization must be a mapping"),
    ({**BASE, "wall_clock_breakdown": "false"}, "wall_clock_breakdown must be true or false, got 'false'"),
    ({**BASE, "gradient_clipping": "1.0"}, "gradient_clipping must be a number, got '1.0'"),
    ({**BASE, "bf16": {"enabled": "yes please"}}, "bf16.enabled: Input should be a valid boolean"),
    ({**BASE, "bfloat16": {"enabled": True}}, "'bfloat16' is DeepSpeed's old spelling of 'bf16'"),
    ({**BASE, "tensorboard": {"enabled": True, "output_pth": "tb"}},
     "unknown key 'tensorboard.output_pth' (did you mean 'output_path'?)"),
    ({**BASE, "optimizer": {"type": "OneBitAdam", "params": {}}},
     r"optimizer.type='OneBitAdam' is not an optimizer DeepSpeed \S+ builds"),
    ({**BASE, "optimizer": {"type": "AdamWX"}}, "did you mean 'AdamW'"),
    ({**BASE, "optimizer": {"params": {"lr": 1e-4}}}, "optimizer has no 'type'"),
    ({**BASE, "optimizer": {"type": "AdamW", "parms": {}}}, "unknown key 'optimizer.parms' (did you mean 'params'?)"),
    ({**BASE, "scheduler": {"type": "WarmupDecay"}},
     "scheduler.type='WarmupDecay' is not a DeepSpeed or torch LR scheduler (did you mean 'WarmupDecayLR'?)"),
    ({**BASE, "scheduler": {"type": "WarmupLR", "params": {"total_num_steps": 10}}},
     "scheduler.params.total_num_steps is not a parameter of WarmupLR"),
    ({**BASE, "bf16": {"enabled": True}, "fp16": {"enabled": True}},
     "DeepSpeed refuses it: bfloat16 and fp16 modes cannot be simultaneously enabled"),
    ({**BASE, "amp": {"enabled": True}}, "DeepSpeed refuses it: NVIDIA Apex AMP integration has been removed"),
    ({"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu", "ratio": 0.5}}},
     "Partial offloading only supported for ZeRO Stage 3"),
])
def test_bad_deepspeed_config_names_file_and_key(config, message):
    with pytest.raises(ConfigError, match=message if "\\S" in message else re.escape(message)):
        check_ds_config(config, "x.json")


def test_auto_stays_allowed_where_deepspeed_or_hf_allow_it():
    check_ds_config({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                     "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
                     "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                                           "stage3_prefetch_bucket_size": "auto",
                                           "stage3_param_persistence_threshold": "auto"},
                     "optimizer": ADAMW, "scheduler": WARMUP_DECAY}, "x.json")


def test_duplicate_keys_are_refused(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{"zero_optimization": {"stage": 2, "stage": 3}}')
    with pytest.raises(ConfigError, match=r"dup.json: key 'stage' is given twice"):
        load_ds_config(path)


@pytest.mark.parametrize("keys, global_batch, world, message", [
    ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 16}, 64, 2,
     "train_batch_size=64 is not train_micro_batch_size_per_gpu=16 x gradient_accumulation_steps=1 x 2 ranks = 32"),
    ({"train_batch_size": 32}, 64, 2, "train_batch_size=32, but the training config's global_batch_size=64"),
    ({"train_micro_batch_size_per_gpu": 8}, 64, 4,
     "train_micro_batch_size_per_gpu=8 x 4 ranks is not the training config's global_batch_size=64: set 16"),
    ({"train_micro_batch_size_per_gpu": 2}, 10, 4, "global_batch_size=10 over 4 ranks gives shards of unequal size"),
    ({}, 2, 4, "global_batch_size=2 is smaller than the 4 ranks"),
    ({"gradient_accumulation_steps": 4}, 64, 2, "gradient_accumulation_steps=4 is refused"),
    ({"train_batch_size": "64"}, 64, 2, "train_batch_size must be a whole number >= 1 or 'auto', got '64'"),
    ({"train_micro_batch_size_per_gpu": 0}, 64, 2, "must be a whole number >= 1"),
])
def test_batch_keys_must_match_the_training_config(keys, global_batch, world, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_batch_keys({**BASE, **keys}, global_batch, world, "x.json")


@pytest.mark.parametrize("keys, global_batch, world", [
    ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 1}, 64, 2),
    ({"train_batch_size": 64}, 64, 4),
    ({"train_micro_batch_size_per_gpu": 16}, 64, 4),
    ({"train_batch_size": 10}, 10, 4),  # unequal shards: only the micro-batch cannot be stated
    ({}, 3, 3),
])
def test_matching_batch_keys_reach_the_engine_as_auto(keys, global_batch, world):
    config = {**BASE, **keys}
    checked = check_batch_keys(config, global_batch, world, "x.json")
    assert config == {**BASE, **keys}  # not changed in place
    assert {checked[k] for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                 "gradient_accumulation_steps")} == {"auto"}
    assert resolve_ds_config(checked, world)["train_batch_size"] == world


def test_the_engine_alone_still_refuses_batch_sizes_in_examples():
    with pytest.raises(ConfigError, match="train_batch_size=64: the contrastive batch size is set by the data"):
        resolve_ds_config({**BASE, "train_batch_size": 64}, 2)


@pytest.mark.parametrize("config, message", [
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
     "zero_optimization.offload_param needs ZeRO stage 3 (stage 2 does not partition parameters"),
    ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}, "zero_force_ds_cpu_optimizer": False},
     "zero_optimization.offload_optimizer needs ZeRO stage 1, 2 or 3"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
     ("ZeRO-Offload with the engine's torch AdamW (no 'optimizer' section) is refused by DeepSpeed while "
      "zero_force_ds_cpu_optimizer is true")),
    ({"zero_optimization": {"stage": 1}, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}},
     "optimizer 'SGD' is not one DeepSpeed's ZeRO supports"),
    ({"zero_optimization": {"stage": 3}, "optimizer": {"type": "lamb"}}, "optimizer 'lamb' is not one DeepSpeed's ZeRO"),
])
def test_zero_stage_and_optimizer_combinations(config, message):
    with pytest.raises(ConfigError, match=re.escape(f"x.json: {message}")):
        check_zero_optimizer(config, "x.json")


@pytest.mark.parametrize("config", [
    {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}, "zero_force_ds_cpu_optimizer": False},
    {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}, "optimizer": ADAMW},
    {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}, "zero_force_ds_cpu_optimizer": False},
    {"zero_optimization": {"stage": 1}, "optimizer": {"type": "SGD"}, "zero_allow_untested_optimizer": True},
    {"zero_optimization": {"stage": 0}, "optimizer": {"type": "SGD"}},
    {"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adagrad"}},
    {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}},
])
def test_zero_combinations_deepspeed_runs(config):
    check_zero_optimizer(config, "x.json")


def test_schedules_that_would_be_dropped_are_refused():
    with pytest.raises(ConfigError, match="x.json: the 'scheduler' section would be ignored"):
        check_schedule({**BASE, "scheduler": WARMUP_DECAY}, "x.json")
    with pytest.raises(ConfigError, match=r"the learning rate would stay constant. Add \"scheduler\""):
        check_schedule({**BASE, "optimizer": ADAMW}, "x.json")
    check_schedule({**BASE, "optimizer": ADAMW, "scheduler": WARMUP_DECAY}, "x.json")
    check_schedule(BASE, "x.json")


def in_process_deepspeed(config, client_optimizer=True, client_scheduler=False):
    """deepspeed.initialize on a Linear in a one-rank group, as the engine calls it: (lr scheduler, engine)."""
    import deepspeed

    from ds_contrastive.core.runtime import init_process_group

    init_process_group()
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3) if client_optimizer else None
    scheduler = (lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda step: 0.5)) if client_scheduler else None
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, **config}
    engine, _, _, lr_scheduler = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=scheduler, config=config,
                                                      model_parameters=None if opt else list(model.parameters()))
    return lr_scheduler, engine


@pytest.mark.parametrize("config, client_optimizer", [
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, True),
    ({"zero_optimization": {"stage": 1}, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}, False),
    ({"zero_optimization": {"stage": 0}, "optimizer": {"type": "OneBitAdam", "params": {"lr": 0.1}}}, False),
])
def test_what_is_refused_early_deepspeed_refuses_late(config, client_optimizer):
    with pytest.raises(ConfigError):
        check_ds_config(config, "x.json")
        check_zero_optimizer(config, "x.json")  # reached when the keys and types are right
    with pytest.raises((AssertionError, RuntimeError, ValueError, Exception)):  # DeepSpeed's own types vary
        in_process_deepspeed(config, client_optimizer)


def test_what_is_refused_early_deepspeed_would_silently_drop():
    scheduler, _ = in_process_deepspeed({**BASE, "scheduler": {"type": "WarmupLR"}}, client_scheduler=True)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)  # the config's WarmupLR is ignored
    scheduler, _ = in_process_deepspeed({**BASE, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}},
                                        client_optimizer=False)
    assert scheduler is None  # constant learning rate
    _, engine = in_process_deepspeed({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}})
    optimizer = type(engine.optimizer)  # the stage 1-2 optimizer takes no parameter-offload settings at all
    assert optimizer.__name__ == "DeepSpeedZeroOptimizer"
    assert not any("offload_param" in name for name in inspect.signature(optimizer).parameters)


def test_auto_values_are_resolved_from_the_training_config_and_the_model():
    cfg = TrainConfig(lr=3e-4, weight_decay=0.05, warmup_ratio=0.1, precision="bf16")
    config = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                    "stage3_param_persistence_threshold": "auto", "overlap_comm": False},
              "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}, "train_batch_size": "auto",
              "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "betas": "auto",
                                                        "eps": "auto"}},
              "scheduler": WARMUP_DECAY}
    resolved, pairs = resolve_auto(config, cfg, total_steps=95, hidden_size=384, source="x.json")
    assert dict(pairs) == {
        "zero_optimization.reduce_bucket_size": 384 * 384,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * 384 * 384),
        "zero_optimization.stage3_param_persistence_threshold": 3840,
        "bf16.enabled": True, "fp16.enabled": False,
        "optimizer.params.lr": 3e-4, "optimizer.params.weight_decay": 0.05, "optimizer.params.betas": [0.9, 0.999],
        "optimizer.params.eps": 1e-8,
        "scheduler.params.warmup_min_lr": 0.0, "scheduler.params.warmup_max_lr": 3e-4,
        "scheduler.params.warmup_num_steps": 10, "scheduler.params.total_num_steps": 95,
    }
    assert resolved["zero_optimization"]["reduce_bucket_size"] == 147456 and resolved["bf16"] == {"enabled": True}
    assert resolved["train_batch_size"] == "auto"  # the engine's
    assert config["bf16"]["enabled"] == "auto"  # not changed in place
    check_ds_config(resolved, "x.json")
    resolve_ds_config(resolved, 2)
    text = format_resolved(pairs, "x.json")
    assert "scheduler.params.warmup_num_steps = 10  (warmup_ratio x steps, at least 1)" in text
    assert "zero_optimization.reduce_bucket_size = 147456  (hidden_size^2)" in text
    assert "x.json: no 'auto' values" in format_resolved([], "x.json")


def test_a_resolved_config_runs_in_deepspeed_with_the_training_schedule():
    cfg = TrainConfig(lr=1e-3, weight_decay=0.1, warmup_ratio=0.25, precision="fp32", global_batch_size=8)
    config = {"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}, "gradient_clipping": 1.0,
              "bf16": {"enabled": "auto"}, "train_batch_size": 8,
              "optimizer": {"type": "AdamW", "params": {**ADAMW["params"], "betas": "auto", "torch_adam": True}},
              "scheduler": {**WARMUP_DECAY, "params": {**WARMUP_DECAY["params"], "warmup_type": "linear"}}}
    checked = check_start(config, cfg, 1, "x.json")
    resolved, _ = resolve_auto(checked, cfg, total_steps=8, hidden_size=4, source="x.json")
    scheduler, engine = in_process_deepspeed(resolve_ds_config(resolved, 1), client_optimizer=False)
    assert type(scheduler).__name__ == "WarmupDecayLR" and scheduler.total_num_steps == 8
    assert engine.basic_optimizer.param_groups[0]["weight_decay"] == 0.1
    assert scheduler.warmup_num_steps == 2 and max(scheduler.max_lrs) == 1e-3


def test_precision_fp32_resolves_bf16_off_and_warmup_at_least_one_step():
    config = {"bf16": {"enabled": "auto"}, "optimizer": ADAMW, "scheduler": WARMUP_DECAY}
    resolved, _ = resolve_auto(config, TrainConfig(precision="fp32", warmup_ratio=0.0), 20, 8, "x.json")
    assert resolved["bf16"]["enabled"] is False
    assert resolved["scheduler"]["params"]["warmup_num_steps"] == 1  # DeepSpeed refuses 0
    assert warmup_steps(20, 0.0) == 0 and warmup_steps(20, 0.01) == 1 and warmup_steps(95, 0.1) == 10


@pytest.mark.parametrize("config, message", [
    ({"gradient_clipping": "auto"}, "x.json: gradient_clipping is 'auto', which ds_contrastive cannot resolve"),
    ({"bf16": {"enabled": "auto"}}, "x.json: bf16.enabled is 'auto'"),
    ({"zero_optimization": {"stage": 2, "overlap_comm": "auto"}}, "zero_optimization.overlap_comm is 'auto'"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "scheduler": WARMUP_DECAY},
     "x.json: optimizer.params.lr=0.001, but the training config gives 5e-05 (lr)"),
    ({"optimizer": ADAMW, "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 50}}},
     "scheduler.params.total_num_steps=50, but the training config gives 100 (steps)"),
    ({"optimizer": ADAMW, "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5}}},
     "scheduler.params.warmup_num_steps=5, but the training config gives 10"),
])
def test_unresolvable_or_contradicting_values_are_refused(config, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_auto(config, TrainConfig(), total_steps=100, hidden_size=384, source="x.json")


def test_agreeing_numbers_pass():
    config = {"optimizer": {"type": "AdamW", "params": {"lr": 5e-5, "weight_decay": 0.01}},
              "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 10, "total_num_steps": 100}}}
    assert resolve_auto(config, TrainConfig(), 100, 384, "x.json") == (config, [])


def test_help_lists_every_option_with_its_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        argument_parser().parse_args(["--help"])
    text = re.sub(r"\s+", "", capsys.readouterr().out)
    for f in fields(TrainConfig):  # every option: its description, the list syntax where it is a list, its default
        entry = text[text.index(f"--{f.name}VALUE", text.index("options:")):]
        entry = entry[: entry.index("--", 2) if "--" in entry[2:] else len(entry)]
        assert entry.startswith(re.sub(r"\s+", "", f"--{f.name} VALUE {f.metadata['help']}")), f.name
        assert entry.endswith(re.sub(r"\s+", "", f"default: {getattr(TrainConfig(), f.name)!r}")), f.name
        is_list = isinstance(getattr(TrainConfig(), f.name), list)
        assert ("onthecommandline:" in entry) == is_list, f.name  # comma-separated, or JSON for datasets
    assert ("--deepspeed_configVALUEDeepSpeedconfig:aJSONfile,orthenameofashippedone(hf_zero2,hf_zero3,zero0,"
            "zero1,zero2,zero3,zero3_offload).default:'zero2'") in text
    assert ("--configVALUEtrainingconfig:aYAMLfile,orthenameofashippedone(large_batch_gpu,llm_full_0.6b,"
            "llm_lora_7b,quickstart,") in text
    assert "--debugshowthetracebackofanerror" in text


def test_bucket_sizes_without_a_hidden_size_name_the_key():
    config = {"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": "auto"}}
    with pytest.raises(ConfigError, match=re.escape("zero_optimization.stage3_prefetch_bucket_size is 'auto', which "
                                                    "ds_contrastive cannot resolve: the model has no Hugging Face")):
        resolve_auto(config, TrainConfig(), 100, None, "x.json")
    assert resolve_auto({"zero_optimization": {"stage": 3}}, TrainConfig(), 100, None, "x.json")[1] == []


@pytest.mark.parametrize("key,value,message", [("retain_tokens", "-5", "retain_tokens must be 'auto' or an integer"),
                                               ("planner", "greedy", "planner"),
                                               ("retain_memory_fraction", "1.5", "retain_memory_fraction")])
def test_both_scripts_refuse_a_bad_chunking_option_before_loading_anything(key, value, message, capsys):
    from ds_contrastive.hf.train_hf import parse

    with pytest.raises(ConfigError, match=message):
        load_train_config(None, {key: value})
    with pytest.raises(ConfigError, match=message):
        parse([f"--{key}", value])
