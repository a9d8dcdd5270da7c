"""Inputs of the memory planner (``plan.py``): a model's shape and a training set-up, read from a recipe plus an
accelerate config, or from a bare parameter count such as ``7B``.

Parameters are counted exactly by building the model on the meta device (no weights are allocated or loaded);
the shape of one block (``plan_activations.LayerShape``) is read from the config and the module tree.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ..errors import RecipeError
from .activations import LayerShape

Strategy = Literal["single", "ddp", "zero1", "zero2", "zero3", "fsdp"]
STRATEGIES: tuple[str, ...] = ("single", "ddp", "zero1", "zero2", "zero3", "fsdp")
OPTIMIZERS: tuple[str, ...] = ("adamw", "adam", "lamb", "lion", "sgd", "sgd_momentum", "adafactor")
HEAD_DIM = 128  # Llama/Mistral-style models use 128-dimensional heads


@dataclass(frozen=True)
class ModelSpec:
    """What the planner needs to know about a model."""

    params: int
    layers: int
    shape: LayerShape
    vocab: int
    head_params: int  # output head + embeddings: not quantized by bitsandbytes, not LoRA targets
    linears: tuple[tuple[str, int, int], ...]  # (module name, in, out) of every linear layer inside the blocks
    default_lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    source: str = ""

    @property
    def block_linear_params(self) -> int:
        return sum(i * o for _, i, o in self.linears)

    def lora_params(self, rank: int, targets: tuple[str, ...] | str | None) -> int:
        """Trainable LoRA parameters ``r * (in + out)`` over the matching linear layers (PEFT's suffix match)."""
        if targets is None:
            targets = self.default_lora_targets
        chosen = [
            (i, o)
            for name, i, o in self.linears
            if targets == "all-linear" or any(name == t or name.endswith("." + t) for t in targets)
        ]
        return sum(rank * (i + o) for i, o in chosen)


@dataclass(frozen=True)
class Setup:
    """One way of training: batch, precision, optimizer, memory techniques, parallelism."""

    seq_len: int = 2048
    batch: int = 1  # per device micro-batch
    grad_accum: int = 1
    num_gpus: int = 1  # data-parallel degree
    tp: int = 1  # tensor-parallel degree (Megatron-style, no sequence parallelism)
    pp: int = 1  # pipeline stages (1F1B schedule)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"  # compute precision
    pure_16bit: bool = False  # weights and optimizer state stored in 16-bit too (no fp32 master)
    optimizer: str = "adamw"
    optimizer_bits: int = 32
    checkpointing: bool = False
    checkpoint_every: int = 1
    attention: Literal["eager", "sdpa", "flash"] = "sdpa"
    strategy: Strategy = "single"
    offload_optimizer: bool = False
    offload_params: bool = False
    adapter: Literal["lora", "qlora", "int8"] | None = None
    lora_rank: int = 8
    lora_targets: tuple[str, ...] | str | None = None
    device: Literal["cuda", "cpu"] = "cuda"
    # fused_kernels: tokens per chunk of the fused linear + cross-entropy (no [tokens, vocab] logits); liger's
    # runs its head in the compute dtype, the torch one ("chunked") in fp32. None: the model's own head and loss.
    loss_chunk: int | None = None
    fused_loss: Literal["chunked", "liger"] | None = None
    notes: tuple[str, ...] = field(default=(), compare=False)

    def changed(self, **kwargs: Any) -> Setup:
        return replace(self, **kwargs)


# ---------------------------------------------------------------------------------------------- from a count
_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_count(text: str, path: str = "--params") -> int:
    """``"7B"``, ``"1.3b"``, ``"125M"``, ``"6738415616"`` -> an integer; anything else is a user error."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMbBgGtT]?)\s*", str(text))
    if not match or float(match.group(1)) <= 0:
        raise RecipeError(path, f"expected a parameter count such as 7B, 1.3B, 125M or 350000000, got {text!r}")
    return int(float(match.group(1)) * _SUFFIX[match.group(2).upper()])


def model_from_count(
    params: int,
    *,
    layers: int | None = None,
    hidden: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    vocab: int = 32000,
) -> ModelSpec:
    """A Llama-style model of ``params`` parameters. Unknown sizes are derived from the count:

    per block ``4*h^2`` (attention) + ``3*h*I`` (SwiGLU MLP) with ``I = 8h/3`` gives ``12*h^2``; embeddings and an
    untied head add ``2*V*h``. With ``h = 128*L`` (Llama's width-to-depth ratio: 4096/32, 5120/40) the count fixes
    ``L``; with only one of ``L``/``h`` given, ``12*L*h^2 + 2*V*h = P`` is solved for the other. Heads are
    ``h/128``. The count itself is used for weights, gradients and optimizer states; the derived shape only for
    activations, LoRA and quantization.
    """
    how = []
    if hidden is None and layers is None:
        layers = max(1, min(range(1, 257), key=lambda n: abs(12 * n * (128 * n) ** 2 + 2 * vocab * 128 * n - params)))
        hidden = 128 * layers
        how.append(f"layers={layers}, hidden={hidden} from 12*L*h^2 + 2*V*h = P with h = 128*L")
    elif hidden is None:
        # 12 L h^2 + 2 V h - P = 0
        hidden = int((-2 * vocab + math.sqrt(4 * vocab**2 + 48 * layers * params)) / (24 * layers))
        hidden = max(64, 64 * round(hidden / 64))
        how.append(f"hidden={hidden} from 12*L*h^2 + 2*V*h = P")
    elif layers is None:
        layers = max(1, round((params - 2 * vocab * hidden) / (12 * hidden**2)))
        how.append(f"layers={layers} from 12*L*h^2 + 2*V*h = P")
    heads = heads or max(1, hidden // HEAD_DIM)
    kv_heads = kv_heads or heads
    intermediate = intermediate or int(256 * math.ceil(8 * hidden / 3 / 256))
    if not how:
        how.append("shape as given")
    head_dim = hidden // heads
    per_block = (
        ("q_proj", hidden, heads * head_dim),
        ("k_proj", hidden, kv_heads * head_dim),
        ("v_proj", hidden, kv_heads * head_dim),
        ("o_proj", heads * head_dim, hidden),
        ("gate_proj", hidden, intermediate),
        ("up_proj", hidden, intermediate),
        ("down_proj", intermediate, hidden),
    )
    linears = tuple((f"layers.{n}.{name}", i, o) for n in range(layers) for name, i, o in per_block)
    shape = LayerShape(hidden=hidden, heads=heads, kv_heads=kv_heads, intermediate=intermediate)
    return ModelSpec(
        params=params,
        layers=layers,
        shape=shape,
        vocab=vocab,
        head_params=2 * vocab * hidden,
        linears=linears,
        source=f"Llama-style, {', '.join(how)}; heads={heads}, intermediate={intermediate}, vocab={vocab}",
    )


# --------------------------------------------------------------------------------------------- from a config
def _get(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def model_from_config(config: Any, auto_class: str = "AutoModelForCausalLM") -> ModelSpec:
    """Count parameters exactly by building the model on the meta device; read the block shape from the config."""
    import torch
    import transformers
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        model = getattr(transformers, auto_class).from_config(config)
    params = sum(p.numel() for p in model.parameters())
    out_emb = model.get_output_embeddings()
    head_ids = {id(model.get_input_embeddings())} | ({id(out_emb)} if out_emb is not None else set())
    head_params = sum(p.numel() for m in model.modules() if id(m) in head_ids for p in m.parameters(recurse=False))
    linears, norms = [], set()
    for name, module in model.named_modules():
        if id(module) in head_ids:
            continue
        if isinstance(module, torch.nn.Linear):
            linears.append((name, module.in_features, module.out_features))
        elif isinstance(module, Conv1D):  # GPT-2's transposed linear
            linears.append((name, module.nx, module.nf))
        norms.add(type(module).__name__)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(_get(config, "hidden_size", "n_embd", "d_model"))
    heads = int(_get(config, "num_attention_heads", "n_head", "num_heads"))
    layers = int(_get(config, "num_hidden_layers", "n_layer", "num_layers"))
    layers += int(_get(config, "num_decoder_layers", default=0) or 0) if config.is_encoder_decoder else 0
    short = {n.rsplit(".", 1)[-1] for n, _, _ in linears}
    act = str(_get(config, "hidden_act", "activation_function", "dense_act_fn", default=""))
    drop_attn = float(_get(config, "attention_dropout", "attn_pdrop", "attention_probs_dropout_prob", default=0) or 0)
    drop_hidden = float(_get(config, "resid_pdrop", "hidden_dropout_prob", "dropout_rate", default=0) or 0)
    shape = LayerShape(
        hidden=hidden,
        heads=heads,
        kv_heads=_get(config, "num_key_value_heads"),
        head_dim=_get(config, "head_dim", "d_kv"),
        intermediate=int(_get(config, "intermediate_size", "n_inner", "d_ff", default=None) or 4 * hidden),
        gated_mlp=bool(short & {"gate_proj", "wi_0", "w1", "gate_up_proj"}),
        act_saved=4 if act == "gelu_new" else 1,  # transformers' gelu_new is Python: x, tanh, 0.5x, 1+tanh
        norm="rms" if any("RMS" in n or n == "T5LayerNorm" for n in norms) else "fused",
        fused_qkv=bool(short & {"c_attn", "query_key_value", "qkv_proj", "Wqkv"}),
        attn_dropout=drop_attn > 0,
        hidden_dropout=drop_hidden > 0,
    )
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as lora_defaults
    except ImportError:
        lora_defaults = {}
    targets = tuple(lora_defaults.get(getattr(config, "model_type", ""), ("q_proj", "v_proj")))
    # The head's output width: the vocabulary of an LM head, the classes of a classifier (a reward model: 1).
    vocab = int(_get(config, "vocab_size")) if out_emb is not None else int(getattr(config, "num_labels", 1))
    return ModelSpec(
        params=params,
        layers=layers,
        shape=shape,
        vocab=vocab,
        head_params=head_params,
        linears=tuple(linears),
        default_lora_targets=targets,
        source=f"{type(config).__name__} (parameters counted on the meta device)",
    )


# ------------------------------------------------------------------------------------------- from a recipe
def _optimizer_from_name(name: str) -> tuple[str, int]:
    name = name.lower()
    bits = 8 if "8bit" in name else 32
    for key in ("lion", "lamb", "adafactor", "sgd"):
        if key in name:
            return key, bits
    return ("adam" if name == "adam" else "adamw"), bits


def setup_from_recipe(recipe: Any, device: str = "cuda") -> tuple[Any, Setup]:
    """(model config, Setup) from a recipe: batch and length, the techniques that change memory. No weights load."""
    from ..builtins import is_builtin
    from ..core.build import load_tokenizer, recipe_objective
    from ..core.model_loading import load_config
    from ..core.technique import Env

    training = recipe.training
    # Only a builtin: config takes its vocabulary from the tokenizer; a config.json alone sizes any other model.
    config = load_config(recipe, load_tokenizer(recipe) if is_builtin(recipe.model.name_or_path) else None)
    techniques = {t.name: t.model_dump() for t in recipe.techniques}
    notes = []
    optim, bits = _optimizer_from_name(str(training.get("optim", "adamw_torch")))
    precision = "fp32"  # autocast comes only from the mixed_precision technique (training.bf16/fp16 are refused)
    pure = recipe.model.dtype in ("bfloat16", "float16")  # 16-bit weights: computes in 16-bit without autocast
    if pure:
        precision = "bf16" if recipe.model.dtype == "bfloat16" else "fp16"
    ckpt = bool(training.get("gradient_checkpointing") or training.get("activation_checkpointing"))
    every = 1
    attention = recipe.model.attn_implementation or _default_attention(config)
    adapter, rank, targets = None, 8, None
    fused: dict | None = None
    # This machine's bf16 on the planned device; a GPU that is not here counts as Ampere+ (Env.detect's default).
    native = replace(Env.detect(), cuda=device == "cuda").bf16_native
    for name, cfg in techniques.items():
        if name in ("bf16", "fp16", "mixed_precision"):  # the aliases' entries have no dtype field
            precision = "fp16" if cfg.get("dtype", name) == "fp16" else "bf16"
            pure = pure or bool(cfg.get("pure_bf16"))
            if cfg.get("only_if_native") and not native:
                precision = "fp32"  # as the technique does at run time (mixed_precision._not_native)
                notes.append(f"{name} only_if_native: planned in fp32, bf16 matmuls are not native on this {device}")
        elif name == "gradient_checkpointing":
            ckpt, every = True, int(cfg.get("every_n_layers") or 1)
        elif name == "lion":
            optim, bits = "lion", int(cfg.get("bits") or 32)
        elif name == "lamb":
            optim, bits = "lamb", 32
        elif name == "optimizer":
            optim, bits = _optimizer_from_name(str(cfg.get("type", "adamw")))
            if optim == "sgd" and (cfg.get("momentum") or 0) > 0:
                optim = "sgd_momentum"
        elif name == "peft":
            adapter = adapter or "lora"
            rank, targets = int(cfg.get("r") or 8), cfg.get("target_modules")
            if cfg.get("method", "lora") not in ("lora", "dora", "rslora", "loraplus"):
                notes.append(f"peft method {cfg.get('method')!r} counted as LoRA")
        elif name == "quantized_base":
            adapter = "qlora" if int(cfg.get("bits") or 4) == 4 else "int8"
        elif name == "fused_kernels":
            fused = cfg  # its loss chunk depends on the batch shape: set below
        elif name == "activation_offload":
            notes.append("activation_offload moves saved activations to host memory: device activations are lower")
    attention = "flash" if str(attention).startswith("flash") else attention
    if attention not in ("eager", "sdpa", "flash"):
        notes.append(f"attention {attention!r} counted as sdpa (no score matrix kept)")
        attention = "sdpa"
    # A pair objective (dpo, reward_model) runs both answers of each pair: 2 rows a pair (core/data/preference.py).
    rows = 2 if recipe_objective(recipe) else 1
    if rows == 2:
        notes.append("a pair objective: the micro-batch counts 2 rows (chosen, rejected) per pair")
    setup = Setup(
        seq_len=int(recipe.data.max_length),
        batch=int(training.get("per_device_train_batch_size", 8)) * rows,
        grad_accum=int(training.get("gradient_accumulation_steps", 1)),
        precision=precision,
        pure_16bit=pure and precision != "fp32",
        optimizer=optim,
        optimizer_bits=bits,
        checkpointing=ckpt,
        checkpoint_every=every,
        attention=attention,
        adapter=adapter,
        lora_rank=rank,
        lora_targets=tuple(targets) if isinstance(targets, list) else targets,
        device=device,
        notes=tuple(notes),
    )
    if fused is not None:
        from ..techniques.fused_kernels import planned_loss

        shape = (setup.seq_len * setup.batch, int(config.vocab_size), int(config.hidden_size))
        kind, chunk = planned_loss(fused, getattr(config, "model_type", None), device == "cuda", *shape)
        note = f"fused_kernels: {kind} linear + cross-entropy in chunks of {chunk} tokens, no [tokens, vocab] logits"
        setup = setup.changed(fused_loss=kind, loss_chunk=chunk, notes=(*setup.notes, note))
    return config, setup


def _default_attention(config: Any) -> str:
    """What transformers picks when the recipe does not say: SDPA where the model class supports it."""
    impl = getattr(config, "_attn_implementation", None)
    return impl if impl in ("eager", "sdpa") else "sdpa"


# ------------------------------------------------------------------------------------- from an accelerate config
def distributed_from_accelerate(path: str | Path) -> dict[str, Any]:
    """``{"strategy", "num_gpus", "offload_optimizer", "offload_params"}`` from an ``accelerate launch`` config.

    Reads ``distributed_type``, ``num_processes``, ``deepspeed_config.zero_stage`` / ``offload_*_device`` (or the
    same settings in its ``deepspeed_config_file`` JSON) and ``fsdp_config`` (sharding, ``fsdp_offload_params``).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RecipeError("--accelerate-config", f"file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise RecipeError("--accelerate-config", f"{path} is not valid YAML: {e}") from None
    kind = str(data.get("distributed_type", "NO")).upper()
    nproc = int(data.get("num_processes") or 1) * max(int(data.get("num_machines") or 1), 1)
    out: dict[str, Any] = {
        "strategy": "single",
        "num_gpus": nproc,
        "offload_optimizer": False,
        "offload_params": False,
    }
    if kind == "DEEPSPEED":
        ds = dict(data.get("deepspeed_config") or {})
        stage, opt_dev = ds.get("zero_stage"), ds.get("offload_optimizer_device")
        param_dev = ds.get("offload_param_device")
        if ds.get("deepspeed_config_file"):
            zero = _deepspeed_json(ds["deepspeed_config_file"], path).get("zero_optimization", {})
            stage = zero.get("stage", stage)
            opt_dev = (zero.get("offload_optimizer") or {}).get("device", opt_dev)
            param_dev = (zero.get("offload_param") or {}).get("device", param_dev)
        stage = int(stage if stage is not None else 2)
        out["strategy"] = "ddp" if stage == 0 else f"zero{stage}"
        out["offload_optimizer"] = str(opt_dev or "none").lower() in ("cpu", "nvme")
        out["offload_params"] = stage == 3 and str(param_dev or "none").lower() in ("cpu", "nvme")
    elif kind == "FSDP":
        fsdp = dict(data.get("fsdp_config") or {})
        strategy = str(fsdp.get("fsdp_sharding_strategy", "FULL_SHARD")).upper()
        reshard = fsdp.get("fsdp_reshard_after_forward", True)
        if "NO_SHARD" in strategy:
            out["strategy"] = "ddp"
        elif "SHARD_GRAD_OP" in strategy or reshard is False or str(reshard).upper() == "SHARD_GRAD_OP":
            out["strategy"] = "zero2"
        else:
            out["strategy"] = "fsdp"
        offload = bool(fsdp.get("fsdp_offload_params"))
        out["offload_optimizer"] = out["offload_params"] = offload
    elif kind in ("MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU"):
        tp = int((data.get("parallelism_config") or {}).get("parallelism_config_tp_size") or 1)
        if tp > 1:  # the processes form tp-sized groups that share a batch; data parallelism is what is left
            out["tp"], nproc = tp, max(nproc // tp, 1)
            out["num_gpus"] = nproc
        out["strategy"] = "ddp" if nproc > 1 else "single"
    return out


def _deepspeed_json(name: str, accelerate_path: Path) -> dict[str, Any]:
    for candidate in (Path(name), accelerate_path.parent / name, accelerate_path.parent / Path(name).name):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text(encoding="utf-8"))
            except ValueError as e:
                raise RecipeError("--accelerate-config", f"{candidate} is not valid JSON: {e}") from None
    raise RecipeError("--accelerate-config", f"deepspeed_config_file not found: {name}")
