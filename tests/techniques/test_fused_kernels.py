"""Fused kernels (Wijmans et al. 2024, arXiv 2411.09009; Liger, arXiv 2410.10989): the chunked linear +
cross-entropy equals torch's loss and gradients (fp32: atol 1e-5 / rtol 1e-5 on values of order 1e-2 to 10), the
model-level loss equals the stock Trainer's (ignore_index, padding, num_items_in_batch under gradient accumulation,
frozen / tied head, LoRA, MoE aux loss, bf16 autocast), no [tokens, vocab] tensor is ever allocated at vocab 32k,
one [chunk, vocab] buffer alive at a time, the refused combinations, the Liger wiring (mocked package) and a recipe
run."""

from __future__ import annotations

import functools
import sys
import types
import weakref
from functools import partial

import pydantic
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import BertConfig, BertForMaskedLM, Trainer

from hf_efftrain import Recipe, RecipeError
from hf_efftrain.core.build import build, make_techniques
from hf_efftrain.core.registry import get_technique
from hf_efftrain.core.technique import Env
from hf_efftrain.core.trainer import EffTrainer
from hf_efftrain.techniques.fused_kernels import (
    ChunkedCausalLMLoss,
    FusedKernelsConfig,
    FusedKernelsTechnique,
    chunked_linear_cross_entropy,
    head_problem,
)
from hf_efftrain.techniques.peft import apply_peft

TOL = {"atol": 1e-5, "rtol": 1e-5}


class LargestAllocation(TorchDispatchMode):
    """The largest storage (bytes) an op allocates while active: outputs sharing an input's storage (views such as
    ``t()``, ``expand``, a no-op ``float()``) allocate nothing."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        inputs = {t.untyped_storage().data_ptr() for t in flat if torch.is_tensor(t)}
        for t in torch.utils._pytree.tree_leaves(out):
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in inputs:
                if t.untyped_storage().nbytes() > self.largest:
                    self.largest, self.op = t.untyped_storage().nbytes(), func
        return out


class PeakLive(TorchDispatchMode):
    """The peak of the bytes alive at once in the storages ops make while active. A storage is freed when the last
    tensor on it made under the mode dies (a weakref finalizer: a tensor autograd still holds keeps its Python object,
    so it counts as alive); views of tensors made before the mode cost nothing."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.refs: dict[int, list[int]] = {}  # storage pointer -> [tensors alive on it, bytes]

    def _release(self, ptr: int) -> None:
        entry = self.refs[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= self.refs.pop(ptr)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        inputs = {t.untyped_storage().data_ptr() for t in flat if torch.is_tensor(t)}
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if not torch.is_tensor(t):
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr in self.refs:
                self.refs[ptr][0] += 1
            elif ptr in inputs:
                continue
            else:
                self.refs[ptr] = [1, t.untyped_storage().nbytes()]
                self.live += self.refs[ptr][1]
                self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._release, ptr)
        return out


def _rows(tiny, n=6, seq_len=12, seed=3) -> dict[str, torch.Tensor]:
    rows = tiny.rows(n, seq_len=seq_len, seed=seed)
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    batch["labels"][0, :5] = -100  # an SFT prompt
    batch["labels"][1, 8:] = -100  # padding
    batch["attention_mask"][1, 8:] = 0
    return batch


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_same_grads(a, b, **tol):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], **(tol or TOL), msg=name)


# ---- the function ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 7, 64, None])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_ce_equals_torch_cross_entropy(chunk, with_bias):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = (torch.randn(50, 16, generator=g) * 0.3).requires_grad_()
    b = torch.randn(50, generator=g, requires_grad=True) if with_bias else None
    y = torch.randint(0, 50, (37,), generator=g)
    y[::4] = -100
    params = [t for t in (h, w, b) if t is not None]
    total, count = chunked_linear_cross_entropy(h, w, b, y, chunk)
    assert int(count) == int((y != -100).sum())
    ref = F.cross_entropy(F.linear(h, w, b), y, ignore_index=-100)
    torch.testing.assert_close(total / count, ref, **TOL)
    for a, r in zip(torch.autograd.grad(total / count, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(a, r, **TOL)


def test_no_targets_and_no_grad():
    h, w = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8)
    total, count = chunked_linear_cross_entropy(h, w, None, torch.full((4,), -100))
    assert total.item() == 0.0 and count.item() == 0  # mean would be 0/0 = nan, as torch's
    total.backward()
    assert torch.equal(h.grad, torch.zeros_like(h))
    with torch.no_grad():
        total, _ = chunked_linear_cross_entropy(h, w, None, torch.tensor([1, 2, 3, 4]))
    assert not total.requires_grad
    with pytest.raises(ValueError, match="need hidden"):
        chunked_linear_cross_entropy(h, w, None, torch.tensor([1, 2]))


def test_frozen_head_gets_no_weight_gradient_and_no_vocab_by_hidden_buffer():
    h = torch.randn(30, 16, requires_grad=True)
    w = torch.randn(4096, 16)  # frozen (requires_grad False): no dW, no [V, H] accumulator
    y = torch.randint(0, 4096, (30,))
    with LargestAllocation() as seen:
        total, count = chunked_linear_cross_entropy(h, w, None, y, chunk_size=5)
        total.backward()
    assert seen.largest <= 5 * 4096 * 4  # one chunk of logits; a dW buffer would be 4096 * 16 * 4 (larger)
    torch.testing.assert_close(h.grad, *torch.autograd.grad(F.cross_entropy(h @ w.t(), y, reduction="sum"), h), **TOL)


@pytest.mark.parametrize("grad", [True, False])
def test_one_chunk_of_logits_alive_at_a_time(grad):
    """Peak live memory is one [chunk, V] fp32 buffer (16 MiB) plus dW (2 MiB): a chunk kept alive while the next
    one is made (no ``del z``) would show 32 MiB."""
    vocab, hidden, tokens, chunk = 32768, 16, 1024, 128
    h = torch.randn(tokens, hidden, requires_grad=grad)
    w = torch.randn(vocab, hidden, requires_grad=grad)
    y = torch.randint(0, vocab, (tokens,))
    one = chunk * vocab * 4
    with torch.set_grad_enabled(grad), PeakLive() as seen:
        total, _ = chunked_linear_cross_entropy(h, w, None, y, chunk_size=chunk)
        if grad:
            total.backward()
    assert one <= seen.peak < one + vocab * hidden * 4 + one // 4, seen.peak / 2**20


# ---- the model-level loss -------------------------------------------------------------------------------------
def test_model_loss_and_grads_equal_the_stock_loss(tiny):
    model = tiny.model().train()
    batch = _rows(tiny)
    model(**batch).loss.backward()
    ref = _grads(model)
    ref_loss = model(**batch).loss.detach()
    model.zero_grad(set_to_none=True)
    core = ChunkedCausalLMLoss(model, chunk_size=7)
    loss = core.loss(model, batch)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    loss.backward()
    _assert_same_grads(_grads(model), ref)
    # evaluation / generation: the head is the original one again
    logits = model(**batch).logits
    assert logits.untyped_storage().nbytes() == logits.numel() * 4 and logits.abs().sum() > 0
    core.undo()
    assert "forward" not in vars(model.lm_head)


def test_num_items_in_batch_over_two_micro_batches(tiny):
    # Gradient accumulation: the Trainer's count covers both micro-batches, each loss is sum / that count.
    model = tiny.model().train()
    a, b = _rows(tiny, seed=1), _rows(tiny, seed=2)
    n = sum(x["labels"][:, 1:].ne(-100).sum() for x in (a, b))
    for x in (a, b):
        model(**x, num_items_in_batch=n).loss.backward()
    ref = _grads(model)
    core = ChunkedCausalLMLoss(model)
    losses = [core.loss(model, x, num_items_in_batch=n) for x in (a, b)]
    torch.testing.assert_close(sum(losses), sum(model(**x, num_items_in_batch=n).loss for x in (a, b)), **TOL)
    sum(losses).backward()
    _assert_same_grads(_grads(model), ref)
    assert core.calls == 2


def test_shift_labels_from_the_collator_are_used_as_given(tiny):
    model = tiny.model().train()
    batch = _rows(tiny)
    shift = F.pad(batch["labels"], (0, 1), value=-100)[..., 1:].contiguous()
    shift[2, 3] = -100  # differs from labels' own shift: must be honoured
    ref = model(**batch, shift_labels=shift).loss
    got = ChunkedCausalLMLoss(model).loss(model, {**batch, "shift_labels": shift})
    torch.testing.assert_close(got, ref, **TOL)


def test_tied_head_gets_both_gradients(tiny):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(tiny.config(tie_word_embeddings=True)).train()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    batch = _rows(tiny)
    model(**batch).loss.backward()
    ref = _grads(model)
    ChunkedCausalLMLoss(model).loss(model, batch).backward()
    _assert_same_grads(_grads(model), ref)


def test_lora_model_frozen_head(tiny):
    model = apply_peft(tiny.model(), method="lora", r=4).train()
    batch = _rows(tiny)
    model(**batch).loss.backward()
    ref = _grads(model)
    assert not any("lm_head" in n for n in ref) and any("lora" in n for n in ref)
    core = ChunkedCausalLMLoss(model)
    assert core.head is model.get_base_model().lm_head
    core.loss(model, batch).backward()
    _assert_same_grads(_grads(model), ref)


def test_bf16_autocast_close_to_stock(tiny):
    model = tiny.model().train()
    batch = _rows(tiny)
    core = ChunkedCausalLMLoss(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(**batch).loss
        got = core.loss(model, batch)
    assert got.dtype == torch.float32
    # the stock logits are bf16-rounded, ours fp32: equal to bf16 precision
    torch.testing.assert_close(got, ref, atol=0.0, rtol=2e-2)


def test_moe_router_aux_loss_is_added():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
        router_aux_loss_coef=0.5, pad_token_id=0,
    )  # fmt: skip
    model = MixtralForCausalLM(config).train()
    ids = torch.randint(1, 64, (2, 9))
    ref = model(input_ids=ids, labels=ids)
    assert ref.aux_loss is not None
    got = ChunkedCausalLMLoss(model).loss(model, {"input_ids": ids, "labels": ids})
    torch.testing.assert_close(got, ref.loss, **TOL)


def test_a_forward_that_changes_the_logits_is_caught(tiny):
    model = tiny.model().train()
    core = ChunkedCausalLMLoss(model)
    model.register_forward_hook(lambda m, a, out: out.__setitem__("logits", out["logits"] * 2) or out)
    with pytest.raises(RuntimeError, match="transformed the logits"):
        core.loss(model, _rows(tiny))


def test_no_tokens_by_vocab_tensor_at_vocab_32k(tiny):
    from transformers import LlamaForCausalLM

    vocab, tokens = 32768, 4 * 128
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(tiny.config(vocab_size=vocab, max_position_embeddings=128)).train()
    ids = torch.randint(3, vocab, (4, 128))
    batch = {"input_ids": ids, "labels": ids}
    full = tokens * vocab * 4  # one fp32 [tokens, vocab] tensor: 64 MiB
    with LargestAllocation() as stock:
        model(**batch).loss.backward()
    assert stock.largest >= full  # the check can see full logits
    model.zero_grad(set_to_none=True)
    core = ChunkedCausalLMLoss(model, chunk_size=64)
    with LargestAllocation() as ours:
        core.loss(model, batch).backward()
    head = vocab * 64 * 4  # the head weight / its gradient: 8 MiB, as one 64-row chunk of logits
    assert ours.largest <= head <= full / 8, (ours.largest, ours.op)


# ---- EffTrainer and the stock Trainer -------------------------------------------------------------------------
def _sft_rows(tiny, n=32):
    rows = tiny.rows(n)
    for i, r in enumerate(rows):
        r["labels"] = r["labels"].clone()
        r["labels"][: 2 + i % 5] = -100  # different target counts per row: the mean-of-means would differ
    return rows


def test_training_equals_the_stock_trainer_with_gradient_accumulation(tiny):
    args = partial(tiny.args, max_steps=3, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    stock = Trainer(model=tiny.model(), args=args(), train_dataset=_sft_rows(tiny))
    stock.train()
    tech = FusedKernelsTechnique(chunk_size=5)
    model = tech.on_model(tiny.model())
    ours = EffTrainer(model=model, args=args(), train_dataset=_sft_rows(tiny), techniques=[tech])
    ours.train()
    assert tech.core.calls == 6  # 3 steps x 2 micro-batches
    assert tiny.losses(ours) == pytest.approx(tiny.losses(stock), abs=1e-5)
    for (name, a), b in zip(stock.model.named_parameters(), ours.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_stock_trainer_install_and_undo(tiny):
    trainer = Trainer(model=tiny.model(), args=tiny.args(max_steps=2), train_dataset=tiny.rows(16))
    core = ChunkedCausalLMLoss(trainer.model)
    handle = core.install(trainer)
    trainer.train()
    assert core.calls == 2
    handle.undo()
    assert "compute_loss" not in vars(trainer)


# ---- refusals ------------------------------------------------------------------------------------------------
def _techniques(tiny_recipe, *entries, env=None, **sections):
    return make_techniques(Recipe.parse(tiny_recipe(techniques=list(entries), **sections)), env or Env())


@pytest.mark.parametrize(
    ("other", "field"),
    [
        ({"name": "selective_backprop"}, "techniques[0].name"),
        ({"name": "token_dropping", "strategy": "importance"}, "techniques[0].strategy"),
    ],
)
def test_full_logits_techniques_are_refused(tiny_recipe, other, field):
    with pytest.raises(
        RecipeError, match=rf"techniques\[1\]: cannot be combined with {field}".replace("[0]", r"\[0\]")
    ):
        _techniques(tiny_recipe, other, {"name": "fused_kernels"})
    # random token dropping and el2n pruning need no logits of this run's model
    _techniques(tiny_recipe, {"name": "token_dropping"}, {"name": "fused_kernels"})
    _techniques(tiny_recipe, {"name": "data_pruning", "score": "el2n"}, {"name": "fused_kernels"})


@pytest.mark.parametrize(
    ("sections", "match"),
    [
        ({"model": {"name_or_path": "builtin:tiny-bert", "task": "masked_lm"}}, "model.task is masked_lm"),
        ({"training": {"label_smoothing_factor": 0.1}}, "training.label_smoothing_factor"),
        ({"training": {"use_liger_kernel": True}}, "training.use_liger_kernel is set by fused_kernels"),
    ],
)
def test_recipe_refusals(tiny_recipe, sections, match):
    with pytest.raises(RecipeError, match=match):
        _techniques(tiny_recipe, {"name": "fused_kernels"}, **sections)


def test_backend_refusals(tiny_recipe, monkeypatch):
    monkeypatch.setattr("hf_efftrain.techniques.fused_kernels.liger.liger_available", lambda: False)
    with pytest.raises(RecipeError, match=r"techniques\[0\].backend: liger's Triton kernels need a CUDA GPU"):
        _techniques(tiny_recipe, {"name": "fused_kernels", "backend": "liger"})
    with pytest.raises(RecipeError, match=r"backend: needs the 'liger-kernel' package: .*hf_efftrain\[liger\]"):
        _techniques(tiny_recipe, {"name": "fused_kernels", "backend": "liger"}, env=Env(cuda=True))
    with pytest.raises(RecipeError, match=r"techniques\[0\].kernels"):
        _techniques(tiny_recipe, {"name": "fused_kernels", "backend": "torch", "kernels": ["rope"]})
    zero3 = Env(distributed_type="DEEPSPEED", deepspeed_config={"zero_optimization": {"stage": 3}})
    with pytest.raises(RecipeError, match="ZeRO-3"):
        _techniques(tiny_recipe, {"name": "fused_kernels"}, env=zero3)
    [tech] = _techniques(tiny_recipe, {"name": "fused_kernels"}, env=Env(cuda=True))  # auto without liger: torch
    assert not tech.use_liger and tech.fallback == "liger-kernel not installed"


def test_models_the_chunked_loss_cannot_stand_in_for(tiny):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    lora_head = apply_peft(tiny.model(), method="lora", r=4, target_modules=["q_proj", "lm_head"])
    assert "not a plain torch.nn.Linear" in head_problem(lora_head)

    bert = BertForMaskedLM(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=16))  # fmt: skip
    assert "not a causal LM" in head_problem(bert)
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=40, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8))  # fmt: skip
    assert "final_logit_softcapping=30.0" in head_problem(gemma)
    tech = FusedKernelsTechnique()
    tech.path = "techniques[2]"
    with pytest.raises(RecipeError, match=r"techniques\[2\]: Gemma2ForCausalLM transforms its logits"):
        tech.on_model(gemma)
    with pytest.raises(ValueError, match="softcapping"):
        ChunkedCausalLMLoss(gemma)


def test_config_and_contract(tiny_recipe):
    assert get_technique("fused_kernels") is FusedKernelsTechnique
    assert "2411.09009" in FusedKernelsTechnique.paper and "2410.10989" in FusedKernelsTechnique.paper
    for field_name, field in FusedKernelsConfig.model_fields.items():
        assert field_name == "name" or field.description
    for bad in ({"chunk_size": 0}, {"kernels": []}, {"kernels": ["rope", "rope"]}, {"kernels": ["fast"]},
                {"backend": "triton"}, {"bogus": 1}):  # fmt: skip
        with pytest.raises(pydantic.ValidationError):
            FusedKernelsConfig(**bad)
    with pytest.raises(RecipeError, match=r"techniques\[0\]\.chunk_size"):
        Recipe.parse(tiny_recipe(techniques=[{"name": "fused_kernels", "chunk_size": -1}]))
    assert FusedKernelsTechnique.status().startswith("ready")


# ---- Liger wiring (a stand-in package: liger-kernel needs CUDA and Triton) -----------------------------------
@pytest.fixture
def fake_liger(monkeypatch):
    """liger_kernel with the two names used; its instance patch sets a liger-named forward (running the stock one)."""
    from transformers import LlamaForCausalLM

    calls = []

    @functools.wraps(LlamaForCausalLM.forward)  # liger's forward has the same parameters (the Trainer reads them)
    def lce_forward(self, *args, **kwargs):
        return type(self).forward(self, *args, **kwargs)

    lce_forward.__module__ = "liger_kernel.transformers.model.llama"

    def apply_to_instance(model, **kwargs):
        calls.append((model, kwargs))
        if kwargs.get("fused_linear_cross_entropy"):
            model.forward = types.MethodType(lce_forward, model)

    pkg = types.ModuleType("liger_kernel")
    pkg.__path__ = []
    transformers_mod = types.ModuleType("liger_kernel.transformers")
    transformers_mod._apply_liger_kernel_to_instance = apply_to_instance
    monkey_patch = types.ModuleType("liger_kernel.transformers.monkey_patch")
    monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": None, "mistral": None}
    for name, mod in [("", pkg), (".transformers", transformers_mod), (".transformers.monkey_patch", monkey_patch)]:
        monkeypatch.setitem(sys.modules, "liger_kernel" + name, mod)
    monkeypatch.setattr("transformers.integrations.liger.is_liger_kernel_available", lambda: True)
    return types.SimpleNamespace(calls=calls, table=monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN)


CUDA = Env(cuda=True)


def test_liger_is_applied_by_the_trainer_and_the_loss_is_left_to_it(tiny_recipe, fake_liger):
    recipe = Recipe.parse(tiny_recipe(training={"max_steps": 2}, techniques=[{"name": "fused_kernels"}]))
    built = build(recipe, CUDA)
    [tech] = built.techniques
    assert tech.use_liger and tech.core is None
    assert built.args.use_liger_kernel
    assert built.args.liger_kernel_config == {
        "rope": True, "rms_norm": True, "swiglu": True, "geglu": True, "layer_norm": True,
        "fused_linear_cross_entropy": True, "cross_entropy": False,
    }  # fmt: skip
    built.trainer.train()
    [(model, _)] = fake_liger.calls
    assert model is built.model
    assert tech.report()["backend"] == "liger" and tech.report()["liger_fused_loss_active"]


def test_liger_without_its_fused_loss_uses_the_chunked_loss(tiny_recipe, fake_liger):
    entry = {"name": "fused_kernels", "backend": "liger", "kernels": ["rope", "rms_norm"]}
    built = build(Recipe.parse(tiny_recipe(training={"max_steps": 2}, techniques=[entry])), CUDA)
    [tech] = built.techniques
    assert built.args.liger_kernel_config["rope"] and not built.args.liger_kernel_config["swiglu"]
    built.trainer.train()
    assert tech.core is not None and tech.core.calls == 2 and len(fake_liger.calls) == 1


def test_liger_unsupported_model_type(tiny_recipe, fake_liger):
    del fake_liger.table["llama"]
    built = build(Recipe.parse(tiny_recipe(techniques=[{"name": "fused_kernels"}])), CUDA)
    [tech] = built.techniques
    assert not built.args.use_liger_kernel and tech.core is not None  # auto: the chunked loss
    assert "no kernels for model type 'llama'" in tech.report()["fallback_reason"]
    with pytest.raises(RecipeError, match=r"techniques\[0\]\.backend: liger-kernel has no kernels .* mistral"):
        build(Recipe.parse(tiny_recipe(techniques=[{"name": "fused_kernels", "backend": "liger"}])), CUDA)
    zero3 = Env(cuda=True, distributed_type="DEEPSPEED", deepspeed_config={"zero_optimization": {"stage": 3}})
    [tech] = _techniques(tiny_recipe, {"name": "fused_kernels"}, env=zero3)  # liger's fused loss: allowed
    with pytest.raises(RecipeError, match=r"techniques\[0\]\.backend: .* untested under DeepSpeed ZeRO-3"):
        tech.on_model(built.model)  # ... until auto falls back to the chunked loss


# ---- a recipe run -------------------------------------------------------------------------------------------
def test_recipe_trains_with_the_stock_loss_and_evaluates(tiny_recipe, train_keeping_built):
    sections = {"training": {"max_steps": 3, "eval_strategy": "steps", "eval_steps": 3}}
    _, base = train_keeping_built(tiny_recipe(**sections))
    report, built = train_keeping_built(tiny_recipe(**sections, techniques=[{"name": "fused_kernels"}]))
    [entry] = [t for t in report["techniques"] if t["name"] == "fused_kernels"]
    assert entry["report"]["backend"] == "torch" and entry["report"]["loss_calls"] == 3
    assert entry["report"]["fallback_reason"] == "no CUDA"

    def logged(key):
        return [[e[key] for e in b.trainer.state.log_history if key in e] for b in (base, built)]

    for key in ("loss", "eval_loss", "eval_token_accuracy"):  # same init and data: the same run
        stock, ours = logged(key)
        assert stock and ours == pytest.approx(stock, abs=1e-4), key


def test_el2n_pruning_trains_alongside(tiny_recipe, train_keeping_built):
    # data_pruning trains its el2n proxies in on_dataset, with its own loop, before this run's model exists
    from hf_efftrain.techniques.data_pruning import COUNTERS

    before = COUNTERS["proxy_trainings"]
    entries = [
        {"name": "data_pruning", "score": "el2n", "proxy_steps": 1, "keep_fraction": 0.5},
        {"name": "fused_kernels"},
    ]
    report, built = train_keeping_built(
        tiny_recipe(training={"max_steps": 2}, data={"max_train_samples": 64}, techniques=entries)
    )
    assert COUNTERS["proxy_trainings"] == before + 1 and len(built.train_dataset) == 32
    assert built.techniques[-1].core.calls == 2
