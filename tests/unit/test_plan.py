"""The memory planner against its references: the ZeRO paper's worked example, Korthikanti et al.'s per-layer
formula, the tensors autograd really saves, PEFT's own parameter count, real optimizer states, and the peak memory
of real (short) training runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from hf_efftrain.errors import RecipeError
from hf_efftrain.plan.activations import (
    LayerShape,
    activation_bytes,
    head_bytes,
    korthikanti_layer_bytes,
    layer_bytes,
    tensor_parallel_fraction,
)
from hf_efftrain.plan.estimate import (
    BNB8_STATE_BYTES,
    GB,
    MOMENTS,
    NF4_BYTES,
    cheapest_fit,
    estimate,
    zero_model_state_bytes,
)
from hf_efftrain.plan.inputs import (
    Setup,
    distributed_from_accelerate,
    model_from_config,
    model_from_count,
    parse_count,
)

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------- model states
def test_zero_paper_worked_example():
    """ZeRO (arXiv 1910.02054) Sec. 5 / Fig. 1: Psi = 7.5B, Nd = 64, K = 12."""
    psi, nd = 7.5e9, 64
    expected = {0: 120, 1: 31.4, 2: 16.6, 3: 1.9}  # baseline, P_os, P_os+g, P_os+g+p (GB = 1e9 bytes)
    for stage, gb in expected.items():
        total = sum(zero_model_state_bytes(psi, nd, stage, k=12).values())
        assert round(total / GB, 1) == gb

    # The full planner, for a 7.5B model trained with bf16 + AdamW under DeepSpeed on 64 GPUs, gives the same
    # model states (and so does DDP, whose fp32 weights + grads + two moments are also 16 bytes per parameter).
    model = model_from_count(int(psi))
    for stage, gb in expected.items():
        strategy = "ddp" if stage == 0 else f"zero{stage}"
        e = estimate(model, Setup(num_gpus=nd, strategy=strategy, precision="bf16"))
        states = sum(
            v for k, v in e.device.items() if k.split(" (")[0] in ("weights", "gradients", "optimizer states")
        )
        assert round(states / GB, 1) == gb


def test_optimizer_and_adapter_bytes_per_parameter():
    model = model_from_count(int(7e9))
    p = model.params

    def states(**kw):
        e = estimate(model, Setup(precision="fp32", **kw))
        return e.device.get("optimizer states", 0) + e.device.get("optimizer states (incl. fp32 master)", 0)

    assert states(optimizer="adamw") == 8 * p
    assert states(optimizer="lamb") == 8 * p
    assert states(optimizer="lion") == 4 * p
    assert states(optimizer="sgd_momentum") == 4 * p
    assert states(optimizer="sgd") == 0
    assert states(optimizer="adamw", optimizer_bits=8) == int(2 * BNB8_STATE_BYTES * p)
    # mixed precision under DeepSpeed: fp32 master (4) + two fp32 moments (8)
    e = estimate(model, Setup(precision="bf16", strategy="zero1", num_gpus=1))
    assert e.device["optimizer states (incl. fp32 master)"] == 12 * p and e.device["weights"] == 2 * p

    lora = estimate(model, Setup(precision="bf16", adapter="lora", lora_rank=16, lora_targets="all-linear"))
    adapters = model.lora_params(16, "all-linear")
    assert lora.trainable == adapters > 0
    assert lora.device["weights"] == int(2 * p + 4 * adapters)  # 16-bit frozen base + fp32 adapters
    assert lora.device["gradients"] == 4 * adapters and lora.device["optimizer states"] == 8 * adapters
    qlora = estimate(model, Setup(precision="bf16", adapter="qlora", lora_rank=16, lora_targets="all-linear"))
    linear = model.block_linear_params
    assert qlora.device["weights"] == int(NF4_BYTES * linear + 2 * (p - linear) + 4 * adapters)


def test_optimizer_states_match_real_optimizers(tiny_llama_spec):
    """Bytes per trainable parameter of the planner == what torch's optimizers really allocate."""
    from hf_efftrain.runtime.metrics import optimizer_state_bytes
    from hf_efftrain.techniques.lion import Lion

    config, model = tiny_llama_spec
    net = __import__("transformers").LlamaForCausalLM(config)
    n = sum(p.numel() for p in net.parameters())
    assert n == model.params  # the meta-device count is the real count
    for name, opt in (
        ("adamw", torch.optim.AdamW(net.parameters())),
        ("lion", Lion(net.parameters())),
        ("sgd_momentum", torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)),
    ):
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        planned = estimate(model, Setup(precision="fp32", optimizer=name)).device["optimizer states"]
        steps = sum(s["step"].numel() * s["step"].element_size() for s in opt.state.values() if "step" in s)
        assert optimizer_state_bytes(opt) - steps == planned


def test_lora_count_matches_peft(tiny_llama_spec):
    peft = pytest.importorskip("peft")
    config, model = tiny_llama_spec
    for rank, targets in ((8, None), (4, ["q_proj", "down_proj"]), (16, "all-linear")):
        net = __import__("transformers").LlamaForCausalLM(config)
        cfg = peft.LoraConfig(r=rank, target_modules=targets or list(model.default_lora_targets))
        wrapped = peft.get_peft_model(net, cfg)
        trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        assert model.lora_params(rank, targets if targets is None else targets if isinstance(targets, str)
                                 else tuple(targets)) == trainable  # fmt: skip


# ---------------------------------------------------------------------------------------------- activations
@pytest.mark.parametrize("s,b,h,a", [(2048, 1, 4096, 32), (1024, 4, 2048, 16), (512, 8, 768, 12)])
def test_korthikanti_formula(s, b, h, a):
    """arXiv 2205.05198 Sec. 4.1: s*b*h*(34 + 5*a*s/h) per layer in 16-bit; 2*s*b*h with full recomputation."""
    shape = LayerShape.paper_gpt(h, a)
    exact = layer_bytes(shape, s, b, compute_bytes=2, attention="eager", small_buffers=False)
    assert exact == korthikanti_layer_bytes(s, b, h, a) == pytest.approx(s * b * h * (34 + 5 * a * s / h))
    # Flash/SDPA keep no a*s*s scores (softmax output, its mask and dropout output: 5 bytes each), only a
    # log-sum-exp per row.
    flash = layer_bytes(shape, s, b, compute_bytes=2, attention="flash", small_buffers=False)
    assert exact - flash == 5 * a * s * s * b - 4 * a * s * b
    layers = 24
    full = activation_bytes(shape, layers, s, b, vocab=1, compute_bytes=2, residual_bytes=2, attention="eager")
    ckpt = activation_bytes(
        shape, layers, s, b, vocab=1, compute_bytes=2, residual_bytes=2, attention="eager", checkpointing=True
    )
    one = layer_bytes(shape, s, b, compute_bytes=2, attention="eager")
    assert full["layers"] == layers * one
    assert ckpt["layers"] == 2 * s * b * h * layers + one  # inputs kept + one block recomputed at a time


def _saved_bytes(net, run, x, autocast: bool, tokens: int) -> int:
    """Bytes of every distinct storage autograd saves for backward in ``run(x)``, except parameters and the tensors
    shared by all layers (RoPE cos/sin) or sized like weights (autocast's 16-bit weight copies, counted elsewhere)."""
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and t.numel() % tokens == 0:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            run(x)
    return sum(seen.values())


@pytest.mark.parametrize(
    "family,attention,autocast",
    [
        ("llama", "eager", False),
        ("llama", "sdpa", False),
        ("llama", "eager", True),
        ("llama", "sdpa", True),
        ("gpt2", "eager", False),
        ("gpt2", "eager", True),
        ("gpt2", "sdpa", False),  # dropout: CPU SDPA falls back to the math path, which keeps the scores
        ("bert", "sdpa", False),
    ],
)
def test_layer_bytes_match_what_autograd_saves(family, attention, autocast):
    import transformers

    b, s = 3, 128  # b*s does not divide the weight or RoPE sizes, so the filter in _saved_bytes is exact
    if family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, use_cache=False,
        )  # fmt: skip
        net = transformers.LlamaForCausalLM._from_config(config, attn_implementation=attention)
        block = net.model.layers[0]
        pos = torch.arange(s)[None]

        def run(x):
            return block(x, attention_mask=None, position_embeddings=net.model.rotary_emb(x, pos), position_ids=pos)
    else:
        config = (
            transformers.GPT2Config(n_embd=256, n_layer=1, n_head=4, vocab_size=512, bos_token_id=0, eos_token_id=0)
            if family == "gpt2"
            else transformers.BertConfig(hidden_size=256, num_hidden_layers=1, num_attention_heads=4,
                                         intermediate_size=1024, vocab_size=512)
        )  # fmt: skip
        cls = transformers.GPT2LMHeadModel if family == "gpt2" else transformers.BertForMaskedLM
        net = cls._from_config(config, attn_implementation=attention)
        block = net.transformer.h[0] if family == "gpt2" else net.bert.encoder.layer[0]
        run = block
    net.train()
    spec = model_from_config(config, "AutoModelForCausalLM" if family != "bert" else "AutoModelForMaskedLM")
    c = 2 if autocast else 4
    x = torch.randn(b, s, 256, requires_grad=True)
    measured = _saved_bytes(net, run, x, autocast, b * s)
    counted_as = "eager" if spec.shape.attn_dropout else attention  # what estimate() does on CPU
    predicted = layer_bytes(spec.shape, s, b, compute_bytes=c, residual_bytes=4, attention=counted_as, mask_bytes=c)
    assert predicted == measured


# --------------------------------------------------------------------------------------------------- inputs
def test_parse_count_and_derived_shapes():
    assert parse_count("7B") == 7_000_000_000
    assert parse_count("1.3b") == 1_300_000_000
    assert parse_count("125M") == 125_000_000
    assert parse_count("350000000") == 350_000_000
    for bad in ("7X", "", "B", "-1B", "0"):
        with pytest.raises(RecipeError, match="--params"):
            parse_count(bad)
    # Llama 7B / 13B shapes come back from their counts (width 128 per layer, head_dim 128)
    for count, layers, hidden in ((6_738_415_616, 32, 4096), (13_015_864_320, 40, 5120)):
        m = model_from_count(count)
        assert (m.layers, m.shape.hidden, m.shape.heads) == (layers, hidden, hidden // 128)
    m = model_from_count(int(7e9), layers=16)
    assert 12 * 16 * m.shape.hidden**2 + 2 * 32000 * m.shape.hidden == pytest.approx(7e9, rel=0.05)


def test_accelerate_configs(tmp_path):
    def write(name, data):
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return path

    ds = write("ds.yaml", {"distributed_type": "DEEPSPEED", "num_processes": 4,
                           "deepspeed_config": {"zero_stage": 3, "offload_optimizer_device": "cpu",
                                                "offload_param_device": "cpu"}})  # fmt: skip
    assert distributed_from_accelerate(ds) == {
        "strategy": "zero3", "num_gpus": 4, "offload_optimizer": True, "offload_params": True,
    }  # fmt: skip
    zero2 = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    (tmp_path / "z2.json").write_text(json.dumps(zero2))
    ds_file = write("ds2.yaml", {"distributed_type": "DEEPSPEED", "num_processes": 2,
                                 "deepspeed_config": {"deepspeed_config_file": "z2.json"}})  # fmt: skip
    assert distributed_from_accelerate(ds_file)["strategy"] == "zero2"
    assert distributed_from_accelerate(ds_file)["offload_optimizer"] is True
    fsdp = write("fsdp.yaml", {"distributed_type": "FSDP", "num_processes": 8, "fsdp_config": {"fsdp_version": 2}})
    assert distributed_from_accelerate(fsdp)["strategy"] == "fsdp"
    ddp = write("ddp.yaml", {"distributed_type": "MULTI_GPU", "num_processes": 2})
    assert distributed_from_accelerate(ddp)["strategy"] == "ddp"
    with pytest.raises(RecipeError, match="not found"):
        distributed_from_accelerate(tmp_path / "missing.yaml")
    tp = distributed_from_accelerate(ROOT / "accelerate_configs" / "tp.yaml")  # 2 processes, tp_size 2
    assert tp["tp"] == 2 and tp["num_gpus"] == 1 and tp["strategy"] == "single"


@pytest.mark.parametrize("t", [1, 2, 8])
def test_tensor_parallel_activations_follow_korthikanti(t):
    """arXiv 2205.05198 Sec. 4.2.1 (tensor parallel, no sequence parallel): s*b*h*(10 + 24/t + 5*a*s/(h*t))."""
    s, b, h, a = 2048, 1, 4096, 32
    full = korthikanti_layer_bytes(s, b, h, a)
    assert full * tensor_parallel_fraction(s, h, a, t, "eager") == pytest.approx(
        s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
    )
    assert tensor_parallel_fraction(s, h, a, t, "flash") == pytest.approx((10 + 24 / t) / 34)


def test_tensor_and_pipeline_parallel_split_model_states_not_pipeline_activations():
    model = model_from_count(int(7e9))
    base = estimate(model, Setup(seq_len=2048, batch=1, attention="eager"))
    split = estimate(model, Setup(seq_len=2048, batch=1, attention="eager", tp=2, pp=4))
    for name in ("weights", "gradients", "optimizer states"):
        assert split.device[name] == pytest.approx(base.device[name] / 8, abs=1)
    shape = model.shape
    fraction = tensor_parallel_fraction(2048, shape.hidden, shape.heads, 2, "eager")
    # 1F1B keeps L layers' worth of activations on the first stage whatever p is: only t divides them
    assert split.device["activations (blocks)"] == pytest.approx(base.device["activations (blocks)"] * fraction, 1e-6)
    assert split.peak < base.peak / 2


# ----------------------------------------------------------------------------------------------- suggestions
def test_cheapest_fit_is_the_first_single_change_that_fits():
    model = model_from_count(int(7e9))
    base = Setup(seq_len=2048, batch=4, num_gpus=8, strategy="ddp")
    peak = estimate(model, base).peak
    budget = peak * 0.8
    sug = cheapest_fit(model, base, budget)
    assert sug is not None and sug["peak_bytes"] <= budget
    assert estimate(model, Setup(**sug["setup"])).peak == sug["peak_bytes"]
    assert len(sug["changes"]) == 1
    # every cheaper candidate alone does not fit
    from hf_efftrain.plan.estimate import _candidates

    for label, fn in _candidates(model, base):
        if label == sug["changes"][0]:
            break
        changed = fn(base)
        assert changed is None or estimate(model, changed).peak > budget

    # A 70B model on one 24 GB GPU needs stacked changes; a budget nothing reaches gives None.
    big = model_from_count(int(70e9))
    stacked = cheapest_fit(big, Setup(seq_len=4096, batch=1), 24 * GB)
    assert stacked is not None and len(stacked["changes"]) > 1 and stacked["peak_bytes"] <= 24 * GB
    assert cheapest_fit(big, Setup(seq_len=4096, batch=1), 1e6) is None


# -------------------------------------------------------------------------------------- measured on the CPU
# The child process measures what training adds to resident memory (peak RSS during training minus RSS right before
# the model is built). RSS rather than a tensor-allocation tracker because it is what runs out, it sees every
# allocation (autograd buffers, optimizer temporaries, the Trainer) and torch has no CPU allocator statistics.
# Two settings keep it honest: MALLOC_MMAP_THRESHOLD_ fixes glibc's threshold, so every tensor larger than 64 KiB
# is its own mapping that goes back to the OS when freed (the default threshold grows and lets freed memory linger
# in the heap), and writing 5 to /proc/self/clear_refs resets the peak (VmHWM) before each run.
_MEASURE = textwrap.dedent(
    """
    import gc, json, sys
    import torch
    from transformers import Trainer
    from hf_efftrain.core.build import load_tokenizer, make_techniques, make_training_args
    from hf_efftrain.core.model_loading import load_config, load_model
    from hf_efftrain.core.recipe import load_recipe

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    out = {}
    for path in sys.argv[1:]:
        recipe = load_recipe(path)
        techniques = make_techniques(recipe)
        args = make_training_args(recipe, techniques)
        config = load_config(recipe, load_tokenizer(recipe))
        b, s = args.per_device_train_batch_size, recipe.data.max_length
        ids = torch.randint(5, config.vocab_size, (b * args.max_steps, s), generator=torch.Generator().manual_seed(0))
        rows = [{"input_ids": x, "labels": x} for x in ids]
        gc.collect()
        base = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        model = load_model(recipe, config, "causal_lm", {"attn_implementation": recipe.model.attn_implementation})
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        out[path] = status("VmHWM") - base
        del trainer, model
        gc.collect()
    print(json.dumps(out))
    """
)


def _write_recipes(tmp_path, tiny_recipe, shape, runs, **training) -> list[str]:
    """One recipe YAML per ``(name, attention, techniques)``: builtin tiny-llama reshaped by ``shape``."""
    paths, max_length = [], training.pop("max_length", 256)
    for name, attention, techniques in runs:
        recipe = tiny_recipe(
            model={"name_or_path": "builtin:tiny-llama", "config_overrides": shape, "attn_implementation": attention},
            data={"train": "builtin:stdlib-docs", "max_length": max_length},
            training={"max_steps": 2, "disable_tqdm": True, "output_dir": str(tmp_path / name), **training},
            techniques=techniques,
        )
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        paths.append(str(path))
    return paths


def _predicted(path: str, device: str) -> int:
    from hf_efftrain.cli import _parser
    from hf_efftrain.plan.report import plan_from_args

    return plan_from_args(_parser().parse_args(["plan", path, "--device", device]))["peak_bytes"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
def test_predicted_peak_matches_measured_training(tmp_path, tiny_recipe):
    """fp32 AdamW on a Llama sized so that model states and activations both matter: eager attention without
    checkpointing (the a*s*s scores dominate), and SDPA with gradient checkpointing. Within 25%."""
    shape = {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 64}  # fmt: skip
    runs = (("eager", "eager", []), ("ckpt", "sdpa", [{"name": "gradient_checkpointing"}]))
    paths = _write_recipes(tmp_path, tiny_recipe, shape, runs, per_device_train_batch_size=8, use_cpu=True)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", _MEASURE, *paths], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    measured = json.loads(res.stdout.strip().splitlines()[-1])
    predicted = {p: _predicted(p, "cpu") for p in paths}
    for p in paths:
        assert predicted[p] == pytest.approx(measured[p], rel=0.25), (p, predicted[p], measured[p])
    # and checkpointing is predicted to save about what it really saves
    assert predicted[paths[1]] < 0.7 * predicted[paths[0]] and measured[paths[1]] < 0.7 * measured[paths[0]]


@pytest.mark.gpu
def test_predicted_peak_matches_measured_cuda_training(tmp_path, tiny_recipe):
    """The CUDA accounting (bf16 autocast over fp32 weights, SDPA, foreach AdamW) against the caching allocator's
    peak: a 111M-parameter Llama whose activations outweigh its model states; with and without checkpointing."""
    import gc

    from transformers import Trainer

    from hf_efftrain.core.build import load_tokenizer, make_techniques, make_training_args
    from hf_efftrain.core.model_loading import load_config, load_model
    from hf_efftrain.core.recipe import load_recipe

    shape = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 8,
             "num_key_value_heads": 8, "head_dim": 128}  # fmt: skip
    bf16 = {"name": "bf16"}
    runs = (("sdpa", "sdpa", [bf16]), ("ckpt", "sdpa", [bf16, {"name": "gradient_checkpointing"}]))
    for path in _write_recipes(tmp_path, tiny_recipe, shape, runs, per_device_train_batch_size=8, max_length=1024):
        recipe = load_recipe(path)
        args = make_training_args(recipe, make_techniques(recipe))
        config = load_config(recipe, load_tokenizer(recipe))
        ids = torch.randint(5, config.vocab_size, (8 * args.max_steps, 1024))
        rows = [{"input_ids": x, "labels": x} for x in ids]
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model = load_model(recipe, config, "causal_lm", {"attn_implementation": "sdpa"})
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        measured = torch.cuda.max_memory_allocated() - base
        del trainer, model
        assert _predicted(path, "cuda") == pytest.approx(measured, rel=0.25), (path, measured)


@pytest.fixture
def tiny_llama_spec():
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_cache=False,
    )  # fmt: skip
    return config, model_from_config(config)


def test_moments_table_covers_cli_choices():
    from hf_efftrain.plan.inputs import OPTIMIZERS

    assert set(OPTIMIZERS) == set(MOMENTS)


# ------------------------------------------------------------------------------------------------ fused_kernels
def test_fused_loss_head_keeps_one_chunk_not_the_logits():
    """fused_kernels' chunked loss: the head holds one fp32 [chunk, V] buffer, dL/dh and (trainable head) fp32 dL/dW,
    instead of three [tokens, V] fp32 tensors."""
    h, v, s, b = 2048, 32768, 2048, 8
    kw = {"compute_bytes": 2, "residual_bytes": 4}
    full = head_bytes(h, v, s, b, **kw)
    fused = head_bytes(h, v, s, b, loss_chunk=512, **kw)
    norm = (4 * h + 4 * h + 2 * h) * s * b
    assert full == norm + 3 * 4 * v * s * b
    grad_h = 4 * h * s * b
    assert fused == norm + max(4 * 512 * (v + 2 * h) + grad_h, 2 * grad_h) + 4 * v * h
    assert fused < full / 6  # 0.87 GB against 6.8 GB
    assert head_bytes(h, v, s, b, loss_chunk=512, head_trainable=False, **kw) == fused - 4 * v * h  # LoRA: frozen


def test_recipe_with_fused_kernels_plans_the_chunked_loss(tmp_path, tiny_recipe):
    from hf_efftrain.core.recipe import Recipe
    from hf_efftrain.plan.inputs import setup_from_recipe
    from hf_efftrain.techniques.fused_kernels.liger import loss_chunk

    model = {"name_or_path": "builtin:tiny-llama", "config_overrides": {"vocab_size": 32768}}
    plain = Recipe.parse(tiny_recipe(model=model))
    fused = Recipe.parse(tiny_recipe(model=model, techniques=[{"name": "fused_kernels"}]))
    config, with_fused = setup_from_recipe(fused, device="cpu")
    _, without = setup_from_recipe(plain, device="cpu")
    assert (with_fused.fused_loss, with_fused.loss_chunk) == ("chunked", (1 << 24) // 32768)
    assert without.loss_chunk is None and any("fused_kernels" in n for n in with_fused.notes)
    spec = model_from_config(config)
    assert (
        estimate(spec, with_fused).device["activations (LM head + loss)"]
        < estimate(spec, without).device["activations (LM head + loss)"]
    )
    # Liger sizes its chunk from the shape: next_power_of_2(ceil(tokens / ceil(V / h))).
    assert loss_chunk(2048 * 8, 32768, 2048) == 1024
    assert loss_chunk(3000, 32768, 2048) == 256  # ceil(3000 / 16) = 188 -> 256
    assert loss_chunk(1, 32768, 2048) == 1


def test_pair_objectives_plan_two_rows_a_pair_and_a_reward_model_without_an_lm_head(tiny_recipe):
    from hf_efftrain.core.recipe import Recipe
    from hf_efftrain.plan.report import recipe_model_and_setup

    data = {"train": "builtin:pref-synthetic"}
    sft, _ = recipe_model_and_setup(Recipe.parse(tiny_recipe()), "cpu")
    for name in ("dpo", "reward_model"):
        model, setup = recipe_model_and_setup(Recipe.parse(tiny_recipe(data=data, techniques=[{"name": name}])), "cpu")
        assert setup.batch == 2 * 8 and any("2 rows" in n for n in setup.notes)  # 8 pairs: 16 sequences
        # dpo trains the causal LM (its head: the vocabulary); a reward model's head has one row a class
        if name == "dpo":
            assert (model.vocab, model.params) == (sft.vocab, sft.params)
        else:  # one output: no [tokens, vocab] logits
            assert model.vocab == 1 and model.params < sft.params


@pytest.mark.parametrize("native", [False, True])
def test_only_if_native_bf16_is_planned_as_it_will_run(monkeypatch, tiny_recipe, native):
    """bf16 with only_if_native trains in fp32 where bf16 matmuls are emulated: the plan must say fp32 there too."""
    from hf_efftrain.core.recipe import Recipe
    from hf_efftrain.plan.inputs import setup_from_recipe

    monkeypatch.setattr("hf_efftrain.runtime.flops.cpu_bf16_native", lambda: native)
    pure = {"name": "mixed_precision", "pure_bf16": True, "update_rounding": "nearest", "only_if_native": True}
    for entry in ({"name": "bf16", "only_if_native": True}, {"name": "mixed_precision", "only_if_native": True}, pure):
        _, setup = setup_from_recipe(Recipe.parse(tiny_recipe(techniques=[entry])), device="cpu")
        assert setup.precision == ("bf16" if native else "fp32")
        assert setup.pure_16bit == (native and entry is pure)  # skipped pure_bf16 leaves the weights in fp32
        assert any("only_if_native" in n for n in setup.notes) is not native
    _, always = setup_from_recipe(Recipe.parse(tiny_recipe(techniques=[{"name": "bf16"}])), device="cpu")
    assert always.precision == "bf16"  # without the field, bf16 runs (emulated) and is planned as such


def test_cheapest_fit_offers_fused_kernels_first_when_the_logits_dominate():
    model = model_from_count(int(1e9), vocab=128256)
    base = Setup(seq_len=8192, batch=4)
    fit = cheapest_fit(model, base, estimate(model, base).peak * 0.8)
    assert fit is not None and fit["changes"][0].startswith("fused_kernels")


_MEASURE_BUILT = textwrap.dedent(
    """
    import gc, json, sys
    from hf_efftrain.core.build import build
    from hf_efftrain.core.recipe import load_recipe

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    out = {}
    for path in sys.argv[1:]:
        built = build(load_recipe(path))  # EffTrainer: fused_kernels routes the training loss
        gc.collect()
        base = status("VmRSS")  # the model exists already: what training adds on top
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        built.trainer.train()
        out[path] = status("VmHWM") - base
        del built
        gc.collect()
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
def test_predicted_fused_kernels_saving_matches_measured(tmp_path, tiny_recipe):
    """A vocabulary of 32k on a 2-layer, hidden-128 Llama: the logits and their fp32 copies are most of the memory.
    The prediction (less the weights, which exist before training) within 25% of what training adds, with and
    without fused_kernels."""
    shape = {"vocab_size": 32768, "num_hidden_layers": 2}
    runs = (
        ("full", "sdpa", [{"name": "packing"}]),
        ("fused", "sdpa", [{"name": "packing"}, {"name": "fused_kernels"}]),
    )
    paths = _write_recipes(tmp_path, tiny_recipe, shape, runs, per_device_train_batch_size=8, use_cpu=True,
                           max_steps=2)  # fmt: skip
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", _MEASURE_BUILT, *paths], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    measured = json.loads(res.stdout.strip().splitlines()[-1])
    predicted = {}
    for p in paths:
        from hf_efftrain.cli import _parser
        from hf_efftrain.plan.report import plan_from_args

        plan = plan_from_args(_parser().parse_args(["plan", p, "--device", "cpu"]))
        predicted[p] = plan["peak_bytes"] - plan["device_bytes"]["weights"]
    for p in paths:
        assert predicted[p] == pytest.approx(measured[p], rel=0.25), (p, predicted[p], measured[p])
    full, fused = paths
    assert measured[fused] < 0.4 * measured[full] and predicted[fused] < 0.4 * predicted[full]
