"""The LoRA LLM recipe (configs/train/llm_lora_7b.yaml) trains a tiny Qwen2 on 2 ranks under ZeRO-3, as shipped.

Only what a CPU cannot hold is overridden (the model, the data, the batch, the chunk sizes, fp32): LoRA
on the attention projections, gradient checkpointing, the query instruction and the EOS token come from
the recipe. The merged model is saved with the transformer gathered one submodule at a time across the
two ranks; it loads without peft, ends texts with the EOS token, and only the adapted projections moved.
"""

import json
import subprocess
import sys

from helpers import corpus, tiny_decoder_dir
from jobs import ROOT, run_deepspeed
from safetensors.torch import load_file
from test_train_e2e import write_jsonl

LOAD_WITHOUT_PEFT = """
import json, sys
sys.modules["peft"] = None  # any import of peft fails: the merged model must not need it
from sentence_transformers import SentenceTransformer
model = SentenceTransformer(sys.argv[1], device="cpu")
ids = model.tokenizer("a query")["input_ids"]
print(json.dumps({"last_is_eos": ids[-1] == model.tokenizer.eos_token_id,
                  "shape": list(model.encode(["a query", "a document"]).shape)}))
"""


def test_the_lora_recipe_trains_a_decoder_under_zero3_and_saves_it_merged(tmp_path):
    model_dir = tiny_decoder_dir(tmp_path, "qwen2", tokenizer="bytes")
    data = corpus(16, 1, seed=21)
    write_jsonl(tmp_path / "train.jsonl", {"anchor": data["anchor"], "positive": data["positive"],
                                           "negative": data["negative_0"]})
    out = tmp_path / "out"
    log = run_deepspeed(ROOT / "launch/train.py", 2, [
        "--deepspeed_config", "zero3", "--config", "llm_lora_7b", "--model", str(model_dir),
        "--train_data", str(tmp_path / "train.jsonl"), "--global_batch_size", "8", "--max_steps", "2",
        "--max_length", "48", "--chunk_tokens", "256", "--retain_tokens", "128", "--precision", "fp32",
        "--progress_bar", "false", "--output_dir", str(out)], timeout=600).stdout
    assert "appending the EOS token '<|endoftext|>' to every text" in log, log[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2

    saved, base = load_file(str(out / "model.safetensors")), load_file(str(model_dir / "model.safetensors"))
    assert set(saved) == set(base)  # merged: no base_layer / lora_ keys
    moved = {k for k in base if not (saved[k] == base[k]).all()}
    assert moved and all(k.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj") for k in moved), moved
    loaded = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_PEFT, str(out)], check=True, capture_output=True,
                            text=True).stdout.strip().splitlines()[-1]
    assert json.loads(loaded) == {"last_is_eos": True, "shape": [2, 32]}
