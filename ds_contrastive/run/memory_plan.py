"""``ds-contrastive plan``: how much GPU memory one rank of a run needs, before the run.

The estimate adds what one rank holds during a cached step (see the README's
"How much memory"), each part a function below:

* the fixed parts, held all step: parameters, gradients and optimizer state as
  DeepSpeed lays them out for the ZeRO stage, offload and precision; under
  ZeRO-3 the parameters gathered for the module that runs; DeepSpeed's
  gradient-reduction bucket; the gathered embeddings and their cached gradient
  (held from the gather through pass 2); a fixed framework overhead;
* the largest of the step's moments: the loss (the kept pass-1 graphs, the
  loss's working copies of the embeddings, one tile of logits), pass 2 (the
  kept graphs or one chunk's activations, whichever is larger, plus the working
  memory of a backward) and the optimizer step (its temporaries).

Activations are counted tensor by tensor from what a layer saves for backward
(Hugging Face BERT and Llama-family layers in transformers 5, checked against
the engine's own measurement in the tests), for the worst chunk: every
sequence ``max_length`` long. The planner then suggests the largest
``chunk_tokens`` and ``retain_tokens`` (the training options of those names)
that fit in SAFETY of the card, or names what does not fit and what to change.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..core.step import BACKWARD_SHARE
from ..errors import ConfigError

GiB = 2**30
OVERHEAD_BYTES = 1.5 * GiB  # CUDA context (~0.5 GiB), cuBLAS/cuDNN workspaces, NCCL buffers, the allocator's cache
SAFETY = 0.9  # suggestions fill at most this share of the card: fragmentation and what the estimate leaves out
LOSS_BYTES_PER_LOGIT = 17  # fp32 logits, masked copy, log-sum-exp input, gradient, bool mask (16.6 measured on CPU)
LOSS_WORKING_COPIES = 5  # of the gathered embeddings, inside the loss: normalized, query/document leaves, 2 gradients
LOSS_TILE_ELEMENTS = 1 << 25  # InfoNCE.tile_elements: logits per tile
MAX_SUGGESTED_CHUNK = 65536  # larger chunks gain little once a GPU is busy; the rest of the memory keeps graphs
# DeepSpeed 0.19 defaults (deepspeed/runtime/zero/config.py) and the shipped configs (configs/deepspeed/*.json)
REDUCE_BUCKET_SIZE = 500_000_000
PREFETCH_BUCKET_SIZE = 50_000_000  # stage3_prefetch_bucket_size
PERSISTENCE_THRESHOLD = 100_000  # stage3_param_persistence_threshold: smaller parameters stay gathered
OFFLOADS = ("none", "optimizer", "optimizer+params")
ATTENTIONS = ("sdpa", "flash", "eager")
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "mpnet")


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on in a transformer embedder (no LM head: embedders load the base model).

    ``kind`` is ``"encoder"`` (BERT family: post-LayerNorm, GELU MLP, learned
    positions, biases) or ``"decoder"`` (Llama family: RMSNorm, gated MLP,
    rotary positions, grouped-query attention).
    """

    name: str
    kind: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int = 0  # 0: hidden // heads
    positions: int = 0  # encoder: learned position embeddings
    token_types: int = 0  # encoder: token-type embeddings
    qkv_bias: bool = False  # decoder: Qwen2 has biases on q, k, v
    qk_norm: bool = False  # decoder: Qwen3 normalizes q and k per head
    hidden_dropout: float = 0.0  # encoder: dropout on the embeddings and after attention and MLP
    attention_dropout: float = 0.0

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def layer_linears(self) -> dict[str, list[tuple[int, int]]]:
        """Each Linear of one layer by the name LoRA targets it with: (in, out) features."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.dim, self.kv_heads * self.dim
        if self.kind == "encoder":
            return {"query": [(h, h)], "key": [(h, h)], "value": [(h, h)], "dense": [(h, h), (h, i), (i, h)]}
        return {"q_proj": [(h, q)], "k_proj": [(h, kv)], "v_proj": [(h, kv)], "o_proj": [(q, h)],
                "gate_proj": [(h, i)], "up_proj": [(h, i)], "down_proj": [(i, h)]}

    def small_parameters(self) -> int:
        """Biases and norm weights: vectors that ZeRO-3 keeps gathered (below its persistence threshold)."""
        h, i = self.hidden, self.intermediate
        if self.kind == "encoder":  # per layer: 4 attention biases, 2 MLP biases, 2 LayerNorms; embedding LayerNorm
            return self.layers * (4 * h + i + h + 4 * h) + 2 * h + h  # + the pooler's bias
        per_layer = 2 * h + (self.heads + 2 * self.kv_heads) * self.dim * self.qkv_bias + 2 * self.dim * self.qk_norm
        return self.layers * per_layer + h

    def parameters(self) -> int:
        """Every parameter of the base model (the encoder's pooler included: DeepSpeed holds it too)."""
        weights = sum(a * b for shapes in self.layer_linears().values() for a, b in shapes) * self.layers
        embeddings = (self.vocab + self.positions + self.token_types) * self.hidden
        pooler = self.hidden * self.hidden if self.kind == "encoder" else 0
        return weights + embeddings + pooler + self.small_parameters()

    def largest_parameter(self) -> int:
        """The largest single weight: ZeRO-3 gathers it whole when its module runs."""
        linears = max(a * b for shapes in self.layer_linears().values() for a, b in shapes)
        return max(linears, self.vocab * self.hidden)


# Shapes of public configs (config.json on the Hugging Face hub) for the README's table.
PRESETS = {
    "minilm": ModelShape("all-MiniLM-L6-v2", "encoder", hidden=384, layers=6, heads=12, kv_heads=12,
                         intermediate=1536, vocab=30522, positions=512, token_types=2, hidden_dropout=0.1,
                         attention_dropout=0.1),
    "bert-base": ModelShape("bert-base-uncased", "encoder", hidden=768, layers=12, heads=12, kv_heads=12,
                            intermediate=3072, vocab=30522, positions=512, token_types=2, hidden_dropout=0.1,
                            attention_dropout=0.1),
    "qwen2.5-0.5b": ModelShape("Qwen2.5-0.5B", "decoder", hidden=896, layers=24, heads=14, kv_heads=2,
                               intermediate=4864, vocab=151936, qkv_bias=True),
    "qwen3-0.6b": ModelShape("Qwen3-Embedding-0.6B", "decoder", hidden=1024, layers=28, heads=16, kv_heads=8,
                             intermediate=3072, vocab=151669, head_dim=128, qk_norm=True),
    "qwen2-1.5b": ModelShape("gte-Qwen2-1.5B-instruct", "decoder", hidden=1536, layers=28, heads=12, kv_heads=2,
                             intermediate=8960, vocab=151936, qkv_bias=True),
    "mistral-7b": ModelShape("e5-mistral-7b-instruct", "decoder", hidden=4096, layers=32, heads=32, kv_heads=8,
                             intermediate=14336, vocab=32000),
    "qwen3-8b": ModelShape("Qwen3-Embedding-8B", "decoder", hidden=4096, layers=36, heads=32, kv_heads=8,
                           intermediate=12288, vocab=151665, head_dim=128, qk_norm=True),
}


def shape_from_config(path: str | Path) -> ModelShape:
    """The shape in a transformers ``config.json``: a model directory, a SentenceTransformer directory, or the file."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model: cannot read a transformers config.json at {file} ({e}); give a model directory "
                          f"or one of the presets {', '.join(PRESETS)}") from None
    try:
        kind = "encoder" if config.get("model_type") in ENCODER_TYPES else "decoder"
        heads = config["num_attention_heads"]
        return ModelShape(
            name=str(config.get("_name_or_path") or path.name), kind=kind, hidden=config["hidden_size"],
            layers=config["num_hidden_layers"], heads=heads, kv_heads=config.get("num_key_value_heads") or heads,
            intermediate=config["intermediate_size"], vocab=config["vocab_size"],
            head_dim=config.get("head_dim") or 0,
            positions=config.get("max_position_embeddings", 0) if kind == "encoder" else 0,
            token_types=config.get("type_vocab_size", 0) if kind == "encoder" else 0,
            qkv_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
            qk_norm=config.get("model_type") == "qwen3",
            hidden_dropout=float(config.get("hidden_dropout_prob", 0.0)),
            attention_dropout=float(config.get("attention_probs_dropout_prob", config.get("attention_dropout", 0.0))))
    except KeyError as e:
        raise ConfigError(f"model: {file} has no {e.args[0]!r}: not a transformer config the planner knows") from None


def model_shape(model: str) -> ModelShape:
    """A preset's shape by name, else the config.json at ``model``."""
    return PRESETS[model] if model in PRESETS else shape_from_config(model)


@dataclass(frozen=True)
class PlanOptions:
    """A run's settings, named as the training options and DeepSpeed config keys they stand for.

    ``chunk_tokens`` / ``retain_tokens`` None: suggest them.
    """

    gpu_memory_gb: float = 80.0
    world_size: int = 1
    zero_stage: int = 2
    offload: str = "none"  # DeepSpeed's offload_optimizer / offload_param (to the CPU)
    precision: str = "bf16"
    lora_rank: int | None = None
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    gradient_checkpointing: bool = False
    attention: str = "sdpa"
    global_batch_size: int = 16384
    columns: int = 2  # anchor, positive and hard negatives
    max_length: int = 512
    embedding_dim: int | None = None  # None: the hidden size
    chunk_tokens: int | None = None
    retain_tokens: int | None = None
    reduce_bucket_size: int = REDUCE_BUCKET_SIZE
    prefetch_bucket_size: int = PREFETCH_BUCKET_SIZE

    def check(self) -> None:
        """Refuse values that cannot describe a run, naming the option."""
        choices = {"zero_stage": (0, 1, 2, 3), "offload": OFFLOADS, "precision": ("bf16", "fp32"),
                   "attention": ATTENTIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(map(str, allowed))}, got {getattr(self, name)!r}")
        for name in ("world_size", "global_batch_size", "max_length", "reduce_bucket_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lora_rank", "embedding_dim", "chunk_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.gpu_memory_gb) and self.gpu_memory_gb > 0):
            raise ConfigError(f"gpu_memory_gb must be > 0, got {self.gpu_memory_gb}")
        if self.columns < 2:
            raise ConfigError(f"columns must be >= 2 (anchor and positive, then hard negatives), got {self.columns}")
        if self.retain_tokens is not None and self.retain_tokens < 0:
            raise ConfigError(f"retain_tokens must be >= 0, got {self.retain_tokens}")
        if self.prefetch_bucket_size < 0:
            raise ConfigError(f"prefetch_bucket_size must be >= 0, got {self.prefetch_bucket_size}")
        if self.offload != "none" and self.zero_stage == 0:
            raise ConfigError("offload needs ZeRO stage 1, 2 or 3 (DeepSpeed's offload_optimizer)")
        if self.offload == "optimizer+params" and self.zero_stage != 3:
            raise ConfigError("offload optimizer+params needs zero_stage 3 (DeepSpeed's offload_param)")


def element_bytes(options: PlanOptions) -> int:
    """Bytes of a parameter, gradient or activation element in the run's precision."""
    return 2 if options.precision == "bf16" else 4


def trainable_parameters(shape: ModelShape, options: PlanOptions) -> int:
    """What the optimizer holds: every parameter, or with LoRA only the adapters (the base is frozen)."""
    if options.lora_rank is None:
        return shape.parameters()
    linears = shape.layer_linears()
    unknown = [name for name in options.lora_target_modules if name not in linears]
    if unknown:
        raise ConfigError(f"lora_target_modules {', '.join(unknown)} name no Linear of a {shape.kind} model "
                          f"(its names: {', '.join(linears)})")
    adapters = sum(a + b for name in options.lora_target_modules for a, b in linears[name])
    return options.lora_rank * adapters * shape.layers


def parameter_bytes(shape: ModelShape, options: PlanOptions) -> float:
    """The model's weights in the run's precision: whole on every rank, or a 1/W slice under ZeRO-3.

    Offloaded parameters (``optimizer+params``) leave only the ones ZeRO-3
    never partitions (below its persistence threshold) on the GPU.
    """
    full = shape.parameters() * element_bytes(options)
    if options.zero_stage < 3:
        return full
    if options.offload == "optimizer+params":
        return shape.small_parameters() * element_bytes(options)
    return full / options.world_size


def gradient_bytes(shape: ModelShape, options: PlanOptions) -> float:
    """Gradients of the trainable parameters, at their peak (the reduction after pass 2).

    Every stage holds a whole gradient per parameter through pass 2: the
    engine reduces once per step (ZeRO 1-3: ``coalesce_grad_reduction``
    leaves each backward's gradients on the parameters), so ZeRO-2/3 do not
    split this part. The reduction then fills this rank's 1/W slice, and the
    step reads an fp32 flat copy of it (ZeRO 0 under bf16: of all gradients).
    Offloading the optimizer moves the slices to the CPU.
    """
    trainable, size, w = trainable_parameters(shape, options), element_bytes(options), options.world_size
    if options.zero_stage == 0:
        return trainable * (size + (4 if size == 2 else 0))
    if options.offload != "none":
        return trainable * size
    return trainable * size + trainable * (size + 4) / w


def optimizer_bytes(shape: ModelShape, options: PlanOptions) -> float:
    """AdamW's two fp32 moments and fp32 master weights, 1/W of them under ZeRO 1-3; offloaded: none on the GPU.

    ZeRO 1-3 keep an fp32 master slice whatever the precision; ZeRO 0 only
    under bf16 (DeepSpeed's bf16 wrapper), in fp32 the optimizer updates the
    parameters themselves.
    """
    if options.offload != "none":
        return 0.0
    if options.zero_stage == 0:
        return trainable_parameters(shape, options) * (8 + (4 if element_bytes(options) == 2 else 0))
    return trainable_parameters(shape, options) * 12 / options.world_size


def step_bytes(shape: ModelShape, options: PlanOptions) -> float:
    """The optimizer step's temporaries: torch AdamW's foreach update makes an fp32 tensor the size of what it
    updates (the square root of the second moment)."""
    if options.offload != "none":
        return 0.0
    share = 1 if options.zero_stage == 0 else options.world_size
    return trainable_parameters(shape, options) * 4 / share


def live_parameter_bytes(shape: ModelShape, options: PlanOptions) -> float:
    """ZeRO-3: the parameters gathered while a module runs.

    The largest weight being used, the prefetch bucket fetched ahead
    (stage3_prefetch_bucket_size) and the small parameters kept gathered; at
    most the whole model. One rank gathers nothing (each partition is whole).
    """
    if options.zero_stage < 3 or options.world_size == 1:
        return 0.0
    elements = shape.largest_parameter() + options.prefetch_bucket_size + shape.small_parameters()
    return min(elements, shape.parameters()) * element_bytes(options)


def bucket_bytes(shape: ModelShape, options: PlanOptions) -> float:
    """DeepSpeed's gradient-reduction buffer.

    ZeRO 1-3 allocate ``reduce_bucket_size`` elements in the gradient dtype at
    once (stage_1_and_2.py ``setup_buckets``, stage3.py), however few
    parameters train. ZeRO 0 flattens the gradients into buckets of that size
    for its all-reduce. ZeRO 1/2 gather the updated parameters with
    ``all_gather_into_tensor`` straight into the flat weights: no allgather bucket.
    """
    elements = options.reduce_bucket_size
    if options.zero_stage == 0:
        elements = min(elements, trainable_parameters(shape, options))
    return elements * element_bytes(options)


def layer_token_bytes(shape: ModelShape, options: PlanOptions) -> float:
    """Bytes one layer saves for backward per token, attention scores aside.

    Encoder: the input of the q/k/v projections, q, k, v, the attention
    output, the output projection's result before its LayerNorm, the MLP's
    input, its activation's input and output, and the second LayerNorm's
    input (8 x hidden + 2 x intermediate); dropout masks take a byte each.
    Decoder: q, k, v, the attention output and the MLP's input and output
    projections' inputs, the gated MLP's three intermediate tensors and the
    down projection's input; each RMSNorm keeps its input in fp32 (Hugging
    Face upcasts) and its normalized value and output in the run's precision.
    LoRA adds each adapter's rank-sized middle, and a frozen Linear that no
    adapter targets keeps no input (its weight needs no gradient).
    """
    h, i, e = shape.hidden, shape.intermediate, element_bytes(options)
    q, kv = shape.heads * shape.dim, shape.kv_heads * shape.dim
    lora = 0
    if options.lora_rank is not None:
        lora = options.lora_rank * e * sum(len(shape.layer_linears()[n]) for n in options.lora_target_modules)
    if shape.kind == "encoder":
        masks = 2 * h if shape.hidden_dropout > 0 else 0
        return e * (8 * h + 2 * i) + masks + lora - e * frozen_inputs(shape, options)
    norms = 2 * (4 * h + e * h)
    qk_norms = (4 + e) * (q + kv) if shape.qk_norm else 0
    return norms + qk_norms + e * (2 * h + 2 * q + 2 * kv + 4 * i) + lora - e * frozen_inputs(shape, options)


def frozen_inputs(shape: ModelShape, options: PlanOptions) -> int:
    """Elements per token of the Linear inputs that only a frozen Linear would keep (LoRA leaves them out)."""
    if options.lora_rank is None:
        return 0
    targets = set(options.lora_target_modules)
    h, i = shape.hidden, shape.intermediate
    if shape.kind == "encoder":  # the q/k/v input; "dense" names the MLP's two Linears (h and i inputs)
        return h * targets.isdisjoint({"query", "key", "value"}) + (h + i) * ("dense" not in targets)
    return (h * targets.isdisjoint({"q_proj", "k_proj", "v_proj"}) + h * targets.isdisjoint({"gate_proj", "up_proj"})
            + i * ("down_proj" not in targets))


def attention_row_bytes(shape: ModelShape, options: PlanOptions, length: int) -> float:
    """Eager attention's per-row scores of one layer: softmax output and the probabilities (+ dropout's mask and
    output); sdpa and flash attention save none (their kernels recompute the scores)."""
    if options.attention != "eager":
        return 0.0
    e = element_bytes(options)
    per_score = 2 * e + ((1 + e) if shape.attention_dropout > 0 else 0)
    return shape.heads * length * length * per_score


def outside_layer_token_bytes(shape: ModelShape, options: PlanOptions) -> float:
    """Per token, outside the layers: the encoder's embedding LayerNorm input, its dropout mask and the pooling's
    input, or the decoder's final RMSNorm (fp32 input, normalized value, output) and the pooling's input."""
    h, e = shape.hidden, element_bytes(options)
    if shape.kind == "encoder":
        return 2 * e * h + (h if shape.hidden_dropout > 0 else 0)
    return 4 * h + 3 * e * h


def activation_bytes(shape: ModelShape, options: PlanOptions, tokens: int) -> float:
    """What one chunk of ``tokens`` padded tokens (sequences ``max_length`` long) saves for its backward.

    With gradient checkpointing a layer keeps only its input; the backward
    recomputes one layer at a time (counted in :func:`backward_working_bytes`).
    """
    length = options.max_length
    rows = max(1, tokens // length)
    tokens = rows * length
    outside = outside_layer_token_bytes(shape, options) * tokens
    if options.gradient_checkpointing:
        return outside + shape.layers * element_bytes(options) * shape.hidden * tokens
    layer = layer_token_bytes(shape, options) * tokens + attention_row_bytes(shape, options, length) * rows
    return outside + shape.layers * layer


def one_layer_bytes(shape: ModelShape, options: PlanOptions, tokens: int) -> float:
    """One layer's full activations for a chunk (checkpointing off)."""
    rows = max(1, tokens // options.max_length)
    tokens = rows * options.max_length
    full = replace(options, gradient_checkpointing=False)
    return layer_token_bytes(shape, full) * tokens + attention_row_bytes(shape, full, options.max_length) * rows


def backward_working_bytes(shape: ModelShape, options: PlanOptions, tokens: int) -> float:
    """Extra memory while a chunk's backward runs.

    The gradients of one layer's activations, as the engine's own budget
    counts them (a share of the graph, core.step.BACKWARD_SHARE), at least one
    layer; with checkpointing also the layer being recomputed; and the new
    gradient of the largest trainable weight before it is added to the one
    the earlier chunks left (the word embeddings, unless LoRA freezes them).
    """
    layer = one_layer_bytes(shape, options, tokens)
    working = max(layer, BACKWARD_SHARE * activation_bytes(shape, options, tokens))
    if options.lora_rank is None:
        largest = shape.largest_parameter()
    else:
        largest = options.lora_rank * max(max(a, b) for n in options.lora_target_modules
                                          for a, b in shape.layer_linears()[n])
    return working + (layer if options.gradient_checkpointing else 0.0) + largest * element_bytes(options)


def chunk_bytes(shape: ModelShape, options: PlanOptions, tokens: int) -> float:
    """One chunk run with grad in pass 2: what it saves plus its backward's working memory."""
    return activation_bytes(shape, options, tokens) + backward_working_bytes(shape, options, tokens)


def kept_graph_bytes(shape: ModelShape, options: PlanOptions, retain_tokens: int) -> float:
    """Pass-1 graphs kept for pass 2 (``retain_tokens`` padded tokens): their activations, held through the loss."""
    return activation_bytes(shape, options, retain_tokens) if retain_tokens > 0 else 0.0


def kept_gather_bytes(shape: ModelShape, options: PlanOptions, retain_tokens: int) -> float:
    """ZeRO-3 with kept graphs: a kept chunk's backward holds the whole model gathered until it ends (DeepSpeed
    frees a module's parameters after backward by a counter that every later forward resets)."""
    if options.zero_stage < 3 or retain_tokens <= 0:
        return 0.0
    return shape.parameters() * element_bytes(options) - parameter_bytes(shape, options)


def shard_rows(options: PlanOptions) -> int:
    """Rows of the largest rank's shard."""
    return math.ceil(options.global_batch_size / options.world_size)


def shard_tokens(options: PlanOptions) -> int:
    """Padded tokens of the largest shard when every text is ``max_length`` long."""
    return shard_rows(options) * options.columns * options.max_length


def embedding_bytes(shape: ModelShape, options: PlanOptions) -> float:
    """The gathered fp32 embeddings [N, C, d] and their gradient (held until pass 2 ends), the texts' hashes."""
    texts = shard_rows(options) * options.world_size * options.columns  # shards padded to the largest
    return texts * (2 * 4 * (options.embedding_dim or shape.hidden) + 8)


def loss_bytes(shape: ModelShape, options: PlanOptions) -> float:
    """The loss's working copies of the embeddings and one row tile of logits (InfoNCE, query_to_doc)."""
    n = shard_rows(options) * options.world_size
    copies = LOSS_WORKING_COPIES * n * options.columns * (options.embedding_dim or shape.hidden) * 4
    candidates = n * (options.columns - 1)
    logits = min(LOSS_TILE_ELEMENTS, shard_rows(options) * candidates)
    return copies + logits * LOSS_BYTES_PER_LOGIT


@dataclass
class Estimate:
    """Per-rank bytes of each part, and the step's peak: the fixed parts plus its larger moment."""

    parts: dict[str, float]
    peak: float
    moment: str  # "loss", "pass 2" or "optimizer step": which moment sets the peak


FIXED = ("parameters", "gradients", "optimizer state", "ZeRO-3 live parameters", "reduction bucket",
         "gathered embeddings", "framework overhead")


def estimate(shape: ModelShape, options: PlanOptions, chunk_tokens: int, retain_tokens: int) -> Estimate:
    """Every part for these chunk and retain budgets; the peak adds the fixed parts to the larger moment.

    The loss moment holds the kept graphs, the loss's copies and a tile; pass
    2 holds the kept graphs while it back-propagates them, then one re-run
    chunk at a time (the larger of the two, plus a backward's working memory);
    the optimizer step holds its temporaries. The gradients count as fixed:
    conservative before pass 2, where the previous step's are freed.
    """
    chunk = max(chunk_tokens, options.max_length)
    parts = {
        "parameters": parameter_bytes(shape, options),
        "gradients": gradient_bytes(shape, options),
        "optimizer state": optimizer_bytes(shape, options),
        "ZeRO-3 live parameters": live_parameter_bytes(shape, options),
        "reduction bucket": bucket_bytes(shape, options),
        "gathered embeddings": embedding_bytes(shape, options),
        "framework overhead": OVERHEAD_BYTES,
        "one chunk (activations + backward)": chunk_bytes(shape, options, chunk),
        "kept graphs": kept_graph_bytes(shape, options, retain_tokens),
        "ZeRO-3 gather for kept graphs": kept_gather_bytes(shape, options, retain_tokens),
        "loss (copies + tile)": loss_bytes(shape, options),
        "optimizer step temporaries": step_bytes(shape, options),
    }
    kept = parts["kept graphs"] + parts["ZeRO-3 gather for kept graphs"]
    loss = kept + parts["loss (copies + tile)"]
    activations = activation_bytes(shape, options, chunk)
    pass2 = (parts["ZeRO-3 gather for kept graphs"] + max(parts["kept graphs"], activations)
             + parts["one chunk (activations + backward)"] - activations)
    moments = {"loss": loss, "pass 2": pass2, "optimizer step": parts["optimizer step temporaries"]}
    moment = max(moments, key=moments.get)
    return Estimate(parts, sum(parts[name] for name in FIXED) + moments[moment], moment)


@dataclass
class Plan:
    """The estimate for the chosen (or suggested) budgets, whether it fits, and what to change if not."""

    model: str
    parameters: int
    trainable: int
    options: PlanOptions
    chunk_tokens: int
    retain_tokens: int
    suggested: list[str]  # which of chunk_tokens / retain_tokens the planner chose
    estimate: Estimate
    usable_bytes: float
    fits: bool
    advice: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        gib = {name: value / GiB for name, value in self.estimate.parts.items()}
        return {"model": self.model, "parameters": self.parameters, "trainable_parameters": self.trainable,
                "options": asdict(self.options), "chunk_tokens": self.chunk_tokens,
                "retain_tokens": self.retain_tokens, "suggested": self.suggested, "parts_gib": gib,
                "peak_gib": self.estimate.peak / GiB, "peak_moment": self.estimate.moment,
                "usable_gib": self.usable_bytes / GiB, "gpu_memory_gib": self.options.gpu_memory_gb,
                "fits": self.fits, "advice": self.advice}


def candidate_chunks(options: PlanOptions) -> list[int]:
    """chunk_tokens worth trying, largest first: powers of two up to the shard (and MAX_SUGGESTED_CHUNK), down to
    one sequence of ``max_length``."""
    top = min(MAX_SUGGESTED_CHUNK, shard_tokens(options))
    sizes, size = [], 1 << max(0, top.bit_length() - 1)
    while size > options.max_length:
        sizes.append(size)
        size //= 2
    return sizes + [options.max_length]


def largest_retain(shape: ModelShape, options: PlanOptions, chunk_tokens: int, usable: float) -> int:
    """The most padded tokens of kept graphs that fit with this chunk budget: whole chunks, up to the shard."""
    best, retain = 0, chunk_tokens
    while retain <= shard_tokens(options) and estimate(shape, options, chunk_tokens, retain).peak <= usable:
        best, retain = retain, retain + chunk_tokens
    return best


def plan(shape: ModelShape, options: PlanOptions) -> Plan:
    """Estimate the run; suggest the largest ``chunk_tokens`` then ``retain_tokens`` that fit in SAFETY of the card.

    A given budget is kept as it is (and judged); a missing one is chosen. Kept
    graphs get what the largest fitting chunk leaves; none is suggested when
    keeping even one chunk would not fit (under ZeRO-3 it gathers the model).
    """
    options.check()
    trainable = trainable_parameters(shape, options)
    usable = SAFETY * options.gpu_memory_gb * GiB
    suggested = [name for name in ("chunk_tokens", "retain_tokens") if getattr(options, name) is None]
    chunks = [options.chunk_tokens] if options.chunk_tokens else candidate_chunks(options)
    retain_given = options.retain_tokens
    chunk = next((c for c in chunks if estimate(shape, options, c, retain_given or 0).peak <= usable), chunks[-1])
    retain = retain_given if retain_given is not None else largest_retain(shape, options, chunk, usable)
    result = estimate(shape, options, chunk, retain)
    fits = result.peak <= usable
    return Plan(shape.name, shape.parameters(), trainable, options, chunk, retain, suggested, result, usable, fits,
                [] if fits else advice(shape, options, result, usable))


def advice(shape: ModelShape, options: PlanOptions, result: Estimate, usable: float) -> list[str]:
    """What does not fit, and the changes that would shrink the parts that are too large."""
    parts = result.parts
    fixed = sum(parts[name] for name in FIXED)
    largest = sorted(parts.items(), key=lambda kv: -kv[1])[:3]
    said = [f"the peak {result.peak / GiB:.1f} GiB exceeds {usable / GiB:.1f} GiB ({SAFETY:.0%} of the card); "
            "largest parts: " + ", ".join(f"{name} {value / GiB:.1f} GiB" for name, value in largest)]
    states = parts["parameters"] + parts["gradients"] + parts["optimizer state"]
    if states > 0.3 * usable:
        if options.zero_stage < 3:
            said.append("a higher zero_stage (ZeRO-2 splits gradients, ZeRO-3 also parameters, over the ranks)")
        if options.lora_rank is None:
            said.append("LoRA (lora_rank): only the adapters get gradients and optimizer state")
        if options.zero_stage > 0 and options.offload != OFFLOADS[-1]:
            said.append(f"offload {'optimizer+params' if options.zero_stage == 3 else 'optimizer'} to the CPU")
        more = ranks_that_fit(shape, options, usable)
        if options.zero_stage > 0 and more:
            said.append(f"more ranks: world_size {more} fits")
    if fixed - states > 0.3 * usable and parts["gathered embeddings"] > 0.2 * usable:
        said.append("a smaller global_batch_size or embedding_dim (the gathered embeddings grow with both)")
    if parts["one chunk (activations + backward)"] > 0.2 * usable or fixed <= usable:
        if not options.gradient_checkpointing:
            said.append("gradient_checkpointing: a layer keeps only its input")
        if options.attention == "eager":
            said.append("attention sdpa or flash: no length-squared scores")
        said.append(f"a smaller max_length (one sequence of {options.max_length} tokens must fit in a chunk)")
    if options.retain_tokens:
        said.append("retain_tokens 0 (kept graphs hold activations through the loss)")
    return said


def ranks_that_fit(shape: ModelShape, options: PlanOptions, usable: float, most: int = 4096) -> int | None:
    """The smallest power-of-two world size (above this one) at which one max_length chunk fits, if any."""
    w = options.world_size * 2
    while w <= most:
        trial = replace(options, world_size=w, chunk_tokens=options.max_length, retain_tokens=0)
        if estimate(shape, trial, options.max_length, 0).peak <= usable:
            return w
        w *= 2
    return None


def describe(result: Plan) -> str:
    """The plan as a readable table (GiB per part) with its verdict and suggestion."""
    o = result.options
    lora = f"LoRA r{o.lora_rank} ({','.join(o.lora_target_modules)})" if o.lora_rank else "full fine-tune"
    lines = [
        f"{result.model}: {result.parameters / 1e9:.3g}B parameters, {result.trainable / 1e6:.4g}M trainable ({lora})",
        f"{o.world_size} rank(s) x {o.gpu_memory_gb:g} GiB, ZeRO-{o.zero_stage}, offload {o.offload}, {o.precision}, "
        f"checkpointing {'on' if o.gradient_checkpointing else 'off'}, attention {o.attention}",
        f"global batch {o.global_batch_size} rows x {o.columns} columns, max_length {o.max_length}, "
        f"chunk_tokens {result.chunk_tokens}, retain_tokens {result.retain_tokens}",
        "",
        f"{'per rank':<36} {'GiB':>9}",
    ]
    lines += [f"{name:<36} {value / GiB:>9.2f}" for name, value in result.estimate.parts.items()]
    lines += [f"{'peak (fixed parts + ' + result.estimate.moment + ')':<36} {result.estimate.peak / GiB:>9.2f}",
              f"{'usable (' + f'{SAFETY:.0%} of the card)':<36} {result.usable_bytes / GiB:>9.2f}", ""]
    if result.fits:
        lines.append("fits." + (" suggested: " if result.suggested else "")
                     + " ".join(f"--{name} {getattr(result, name)}" for name in result.suggested))
    else:
        lines.append("does not fit: " + result.advice[0])
        lines += [f"  try: {change}" for change in result.advice[1:]]
    return "\n".join(lines)
