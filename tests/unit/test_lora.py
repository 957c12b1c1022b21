"""A decoder embedder with LoRA (peft): only the adapter trains, and the saved model is the merged one.

Before, ``engine.save`` wrote peft's ``base_layer`` / ``lora_A`` keys: ``SentenceTransformer(path)`` loaded the
base model with the adapted projections randomly initialised, with only a warning.
"""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import ds_contrastive as dc
from helpers import corpus, load_model, tiny_bert_dir, tiny_decoder_dir

peft = pytest.importorskip("peft")

TEXTS = ["what is a heap", "A heap is a tree whose parent is never larger than a child.", "storm over the river"]
LOAD_WITHOUT_PEFT = """
import json, sys
sys.modules["peft"] = None  # any import of peft fails: the saved model must not need it
from sentence_transformers import SentenceTransformer
model = SentenceTransformer(sys.argv[1], device="cpu")
print(json.dumps(model.encode(json.loads(sys.argv[2]), convert_to_tensor=True).tolist()))
"""


def with_lora(model, route: str):
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    if route == "injected":  # LoRA layers injected into the inner transformers model in place
        peft.get_peft_model(model[0].auto_model, config)
    else:  # the PeftModel as the Transformer module's model
        model[0].model = peft.get_peft_model(model[0].model, config)
    return model


@pytest.mark.parametrize("arch,route,stage", [("qwen2", "injected", 0), ("llama", "module_model", 2)])
def test_only_the_adapter_trains_and_the_merged_save_loads_without_peft(arch, route, stage, tmp_path):
    model = with_lora(load_model(tiny_decoder_dir(tmp_path, arch)), route)
    engine = dc.ContrastiveEngine(model, dc.InfoNCE(), ds_config={"zero_optimization": {"stage": stage}},
                                  chunk_rows=4, lr=5e-2)
    if stage:  # ZeRO keeps flat fp32 copies of what it trains: count their elements
        held = sum(p.numel() for group in engine.optimizer.param_groups for p in group["params"])
        lora_elements = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        assert held == lora_elements, (held, lora_elements)
    else:
        names = {id(p): n for n, p in model.named_parameters()}
        trained = [names[id(p)] for group in engine.optimizer.param_groups for p in group["params"]]
        assert trained and all("lora_A" in n or "lora_B" in n for n in trained), trained
    data = corpus(16, negatives=1, seed=3)
    for step in range(2):
        engine.train_step({k: v[8 * step: 8 * step + 8] for k, v in data.items()})
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(float(p.detach().abs().max()) > 0 for p in lora_b)  # the adapter moved away from its zero start

    out = tmp_path / "saved"
    engine.save(out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("lora_" in k or "base_layer" in k for k in keys), keys[:8]
    assert any(k.endswith("q_proj.weight") for k in keys)
    model.eval()
    with torch.no_grad():
        want = model.encode(TEXTS, convert_to_tensor=True)
    loaded = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_PEFT, str(out), json.dumps(TEXTS)], check=True,
                            capture_output=True, text=True).stdout.strip().splitlines()[-1]
    got = torch.tensor(json.loads(loaded))
    assert float((got - want).abs().max()) < 1e-5
    # the engine's model is still the LoRA model it trains (the save swapped its layers back)
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_the_lora_options_inject_adapters_the_same_on_every_rank(tmp_path):
    from ds_contrastive.errors import ConfigError
    from ds_contrastive.run.config import load_train_config
    from ds_contrastive.run.setup import add_lora

    model_dir = tiny_decoder_dir(tmp_path, "qwen2")
    cfg = load_train_config(None, {"lora_rank": "4", "lora_target_modules": "q_proj,v_proj"})
    first, second = load_model(model_dir), load_model(model_dir)
    add_lora(first, cfg, seed=11)
    torch.manual_seed(123)  # another rank's RNG: the seed, not the state, decides the adapters
    add_lora(second, cfg, seed=11)
    trainable = [n for n, p in first.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable), trainable
    assert all("q_proj" in n or "v_proj" in n for n in trainable)
    for (_, a), (_, b) in zip(first.named_parameters(), second.named_parameters(), strict=True):
        assert torch.equal(a, b)
    bert = load_model(tiny_bert_dir(tmp_path))
    with pytest.raises(ConfigError, match=r"lora_target_modules \['q_proj', 'v_proj'\]"):
        add_lora(bert, cfg, seed=0)  # BERT names them query, key, value
    with pytest.raises(ConfigError, match="lora_rank >= 1"):
        add_lora(bert, load_train_config(None, {"lora_rank": "0"}), seed=0)
