"""Mixed precision (Micikevicius et al. 2018, arXiv 1710.03740), pure bf16 with stochastic rounding / Kahan summation
(Zamirai et al. 2020, arXiv 2010.06192) and fp8 (arXiv 2209.05433)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hf_efftrain.core.build import build, make_techniques
from hf_efftrain.core.recipe import Recipe
from hf_efftrain.core.registry import get_technique
from hf_efftrain.core.technique import Env, has_package
from hf_efftrain.core.trainer import EffTrainer
from hf_efftrain.errors import MissingDependencyError, RecipeError
from hf_efftrain.runtime.metrics import optimizer_state_bytes
from hf_efftrain.techniques.mixed_precision import (
    BF16AdamW,
    MixedPrecisionConfig,
    MixedPrecisionTechnique,
    set_loss_scaler,
    stochastic_round_to_bf16,
    to_pure_bf16,
)


def _param_and_state_bytes(model: torch.nn.Module, optimizer) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + optimizer_state_bytes(optimizer)


def test_amp_keeps_fp32_master_weights_while_forward_runs_in_bf16(tiny):
    technique = MixedPrecisionTechnique(dtype="bf16")
    args = technique.training_args(tiny.args(max_steps=8, learning_rate=3e-3))
    assert args.bf16 and args.mixed_precision == "bf16"
    model = tiny.model()
    seen = []  # (weight dtype, output dtype), read inside the forward pass

    def hook(module, inputs, output):
        seen.append((module.weight.dtype, output.dtype))

    handles = [layer.mlp.down_proj.register_forward_hook(hook) for layer in model.model.layers]
    trainer = tiny.train(model, args)
    for h in handles:
        h.remove()

    assert seen and set(seen) == {(torch.float32, torch.bfloat16)}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    state = trainer.optimizer.optimizer.state if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer.state
    assert {s["exp_avg"].dtype for s in state.values()} == {torch.float32}
    losses = tiny.losses(trainer)
    assert len(losses) == 8 and losses[-1] < losses[0]


@pytest.mark.parametrize(("rounding", "ratio"), [("stochastic", 1 / 2), ("nearest", 1 / 2), ("kahan", 2 / 3)])
def test_pure_bf16_weights_and_states_are_bf16_and_smaller(tiny, rounding, ratio):
    base_args = tiny.args(max_steps=8, learning_rate=3e-3, lr_scheduler_type="constant")
    baseline = tiny.model(seed=0)
    base_trainer = tiny.train(baseline, base_args)  # fp32 weights, torch AdamW: 4 + 4 + 4 bytes per weight
    base_bytes = _param_and_state_bytes(baseline, base_trainer.optimizer)

    technique = MixedPrecisionTechnique(pure_bf16=True, update_rounding=rounding)
    args = technique.training_args(base_args)
    assert not args.bf16 and not args.fp16  # no autocast: the weights are bf16 already
    model = technique.on_model(tiny.model(seed=0))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers keep their precision
    trainer = tiny.train(model, args, optimizer_cls_and_kwargs=technique.optimizer_cls_and_kwargs(args))

    optimizer = trainer.optimizer.optimizer
    assert isinstance(optimizer, BF16AdamW if rounding != "nearest" else torch.optim.AdamW)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    states = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]
    assert states and {t.dtype for t in states} == {torch.bfloat16}
    # The fp32 baseline also keeps a 4-byte step counter per tensor, hence the tolerance.
    assert _param_and_state_bytes(model, trainer.optimizer) / base_bytes == pytest.approx(ratio, abs=0.005)
    losses = tiny.losses(trainer)
    assert losses[-1] < losses[0] - 0.1


def test_bf16_adamw_equals_torch_adamw_in_fp32():
    # With fp32 parameters every rounding mode is exact to float precision: the AdamW equations themselves.
    torch.manual_seed(0)
    ref = torch.randn(64, 32, requires_grad=True)
    ours = ref.detach().clone().requires_grad_()
    kwargs = {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}
    opt_ref, opt = torch.optim.AdamW([ref], **kwargs), BF16AdamW([ours], rounding="nearest", **kwargs)
    for step in range(5):
        grad = torch.randn(64, 32, generator=torch.Generator().manual_seed(step))
        ref.grad, ours.grad = grad.clone(), grad.clone()
        opt_ref.step()
        opt.step()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_compensated_updates_keep_what_plain_bf16_loses():
    # Weights in [1, 2): a bf16 ulp is 2^-7, so AdamW's per-step move of lr = 1e-3 (|m / sqrt(v)| = 1 for a constant
    # gradient) is under half an ulp and rounds back to the old weight.
    torch.manual_seed(0)
    w0 = (1 + torch.rand(4096)).to(torch.bfloat16)
    grad = torch.ones(4096)
    steps, lr = 100, 1e-3

    def run(opt_cls, dtype, **kwargs):
        w = w0.to(dtype).clone().requires_grad_()
        opt = opt_cls([w], lr=lr, **kwargs)
        for _ in range(steps):
            w.grad = grad.to(dtype)
            opt.step()
        return w.detach().float()

    reference = run(torch.optim.AdamW, torch.float32, weight_decay=0.0)
    torch.testing.assert_close(reference, w0.float() - steps * lr, rtol=0, atol=1e-5)
    assert torch.equal(run(torch.optim.AdamW, torch.bfloat16, weight_decay=0.0), w0.float())  # plain: nothing moves
    assert torch.equal(run(BF16AdamW, torch.bfloat16, rounding="nearest"), w0.float())

    ulp = 2.0**-7
    kahan = run(BF16AdamW, torch.bfloat16, rounding="kahan")
    assert (kahan - reference).abs().max() <= ulp  # within one bf16 step of the fp32 run, for every weight

    stochastic = run(BF16AdamW, torch.bfloat16, rounding="stochastic")
    assert (stochastic - w0.float()).mean() == pytest.approx(-steps * lr, rel=0.05)  # unbiased on average
    # Each weight random-walks around its fp32 path by about one ulp per sqrt(step); on average it stays close.
    assert (stochastic - reference).abs().mean() < 0.5 * steps * lr


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    x = torch.full((20000,), 1.0 + 2.0**-10)  # 1/8 of the way from 1 to the next bf16 value, 1 + 2^-7
    out = stochastic_round_to_bf16(x, torch.Generator().manual_seed(0))
    assert out.dtype == torch.bfloat16
    assert set(out.float().unique().tolist()) == {1.0, 1.0 + 2.0**-7}
    assert out.float().mean().item() == pytest.approx(x[0].item(), abs=2e-4)
    neg = stochastic_round_to_bf16(-x, torch.Generator().manual_seed(0))
    assert torch.equal(neg, -out)  # sign-magnitude: the same draw rounds -x to minus the same neighbour


def test_recipe_build_wires_pure_bf16(tiny_recipe):
    recipe = Recipe.parse(
        tiny_recipe(
            training={"max_steps": 3},
            techniques=[{"name": "mixed_precision", "pure_bf16": True, "update_rounding": "kahan"}],
        )
    )
    built = build(recipe, Env())
    assert all(p.dtype == torch.bfloat16 for p in built.model.parameters())
    built.trainer.train()
    optimizer = built.trainer.optimizer.optimizer
    assert isinstance(optimizer, BF16AdamW) and optimizer.rounding == "kahan"
    assert all("compensation" in s for s in optimizer.state.values())


def test_config_errors(tiny_recipe):
    def validate(**kwargs):
        MixedPrecisionTechnique(**kwargs).validate(None, Env())

    validate()
    validate(pure_bf16=True, update_rounding="kahan")
    for kwargs, path in [
        ({"dtype": "fp16", "pure_bf16": True}, "pure_bf16"),
        ({"update_rounding": "kahan"}, "update_rounding"),
        ({"init_scale": 128.0}, "init_scale"),
        ({"dtype": "bf16", "fp8_recipe": "rowwise"}, "fp8_recipe"),
        ({"pure_bf16": True, "full_eval": True}, "full_eval"),
    ]:
        with pytest.raises(RecipeError) as err:
            validate(**kwargs)
        assert err.value.path == path
    with pytest.raises(ValueError):
        MixedPrecisionConfig(dtype="fp4")
    with pytest.raises(RecipeError, match="DeepSpeed") as err:
        MixedPrecisionTechnique(pure_bf16=True).validate(None, Env(distributed_type="DEEPSPEED"))
    assert err.value.path == "pure_bf16"

    recipe = Recipe.parse(
        tiny_recipe(training={"optim": "adafactor"}, techniques=[{"name": "mixed_precision", "pure_bf16": True}])
    )
    with pytest.raises(RecipeError, match="training.optim") as err:
        make_techniques(recipe, Env())
    assert err.value.path == "techniques[0].update_rounding"
    techniques = [{"name": "mixed_precision", "pure_bf16": True}, {"name": "lion"}]
    with pytest.raises(RecipeError, match="lion") as err:
        make_techniques(Recipe.parse(tiny_recipe(techniques=techniques)), Env())
    assert err.value.path == "techniques[0].update_rounding"
    techniques[0]["update_rounding"] = "nearest"  # then Lion updates the bf16 weights itself
    assert len(make_techniques(Recipe.parse(tiny_recipe(techniques=techniques)), Env())) == 2


def test_fp16_needs_cuda_and_says_why(tiny):
    with pytest.raises(RecipeError, match="needs a CUDA GPU; use bf16 on CPU") as err:
        MixedPrecisionTechnique(dtype="fp16").validate(None, Env(cuda=False))
    assert err.value.path == "dtype"
    args = MixedPrecisionTechnique(dtype="fp16").training_args(tiny.args())
    assert args.fp16 and args.mixed_precision == "fp16"


def test_the_technique_is_the_one_way_to_set_precision(tiny_recipe):
    for field, entry in [
        ("bf16", "{name: mixed_precision, dtype: bf16}"),
        ("fp16", "{name: mixed_precision, dtype: fp16}"),
        ("bf16_full_eval", "{name: mixed_precision, dtype: bf16, full_eval: true}"),
        ("fp16_full_eval", "{name: mixed_precision, dtype: fp16, full_eval: true}"),
    ]:
        with pytest.raises(RecipeError) as err:
            Recipe.parse(tiny_recipe(training={field: True}))
        assert str(err.value) == (
            f"training.{field}: precision is the mixed_precision technique: remove this and add {entry} to techniques"
        )
    # The canonical way, end to end: bf16 autocast over fp32 weights in the EffTrainer ...
    recipe = Recipe.parse(
        tiny_recipe(training={"max_steps": 2}, techniques=[{"name": "mixed_precision", "dtype": "bf16"}])
    )
    built = build(recipe, Env())
    assert built.args.bf16 and built.args.mixed_precision == "bf16"
    built.trainer.train()
    assert built.trainer.accelerator.mixed_precision == "bf16"
    assert all(p.dtype == torch.float32 for p in built.model.parameters())
    # ... and in the benchmark baseline (the stock Trainer), which takes a technique that only sets the arguments.
    plain = built.plain_trainer()
    assert type(plain).__name__ == "Trainer" and plain.args.bf16
    plain.train()
    assert plain.accelerator.mixed_precision == "bf16"
    assert len([e for e in plain.state.log_history if "loss" in e]) == 2


def test_only_training_args_decides_what_the_stock_trainer_baseline_takes(tiny_recipe):
    assert MixedPrecisionTechnique(dtype="bf16").only_training_args()
    assert MixedPrecisionTechnique(dtype="fp16").only_training_args()
    assert not MixedPrecisionTechnique(dtype="fp16", init_scale=128.0).only_training_args()  # set in on_trainer
    assert not MixedPrecisionTechnique(pure_bf16=True).only_training_args()
    assert not MixedPrecisionTechnique(dtype="fp8").only_training_args()
    recipe = Recipe.parse(tiny_recipe(training={"max_steps": 1}, techniques=[{"name": "bf16"}, {"name": "lion"}]))
    with pytest.raises(RecipeError) as err:
        build(recipe, Env()).plain_trainer()
    assert str(err.value) == (
        "techniques[1]: lion runs in the training loop; the stock-Trainer baseline cannot run it"
    )


def test_set_loss_scaler_gives_dynamic_scaling():
    # Accelerate makes no scaler on a CPU, so a CPU GradScaler stands in for the one it makes on CUDA; the training
    # step is real fp16 autocast (CPU autocast supports float16) with the replaced scaler.
    accelerator = SimpleNamespace(scaler=torch.amp.GradScaler("cpu"))
    assert set_loss_scaler(accelerator, init_scale=1024.0, growth_interval=1)
    scaler = accelerator.scaler
    assert scaler.get_scale() == 1024.0 and scaler.get_growth_interval() == 1
    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([w], lr=0.5)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = torch.nn.functional.linear(torch.ones(1, 4), w.view(1, 4)).sum()
    assert loss.dtype == torch.float16
    scaler.scale(loss).backward()
    torch.testing.assert_close(w.grad, torch.full((4,), 1024.0))  # the backward ran on the scaled loss
    scaler.step(opt)  # unscales first: a plain SGD step with the true gradient of 1
    scaler.update()
    torch.testing.assert_close(w.detach(), torch.full((4,), 0.5))
    assert scaler.get_scale() == 2048.0  # one clean step (growth_interval=1): the scale doubles
    w.grad = torch.full((4,), float("inf"))
    scaler.step(opt)  # overflow: the step is skipped and the scale halves
    scaler.update()
    torch.testing.assert_close(w.detach(), torch.full((4,), 0.5))
    assert scaler.get_scale() == 1024.0
    assert not set_loss_scaler(SimpleNamespace(scaler=None))  # bf16 / DeepSpeed: nothing to replace


def test_fp8_errors_without_hopper():
    with pytest.raises(RecipeError, match="8.9") as err:
        MixedPrecisionTechnique(dtype="fp8").validate(None, Env(cuda=False))
    assert err.value.path == "dtype"
    if not torch.cuda.is_available() and not has_package("torchao"):
        # A (hypothetical) CUDA environment without torchao: the error names the extra to install.
        with pytest.raises(MissingDependencyError, match=r"hf_efftrain\[fp8\]"):
            MixedPrecisionTechnique(dtype="fp8").validate(None, Env(cuda=True))


def test_aliases_and_conflicts(tiny_recipe):
    assert get_technique("mixed_precision") is MixedPrecisionTechnique
    for alias, dtype in (("bf16", "bf16"), ("fp16", "fp16")):
        cls = get_technique(alias)
        assert issubclass(cls, MixedPrecisionTechnique) and cls().settings.dtype == dtype
        assert {"mixed_precision"} | ({"bf16", "fp16"} - {alias}) <= cls.conflicts
    assert {"bf16", "fp16"} <= MixedPrecisionTechnique.conflicts
    recipe = Recipe.parse(tiny_recipe(techniques=[{"name": "bf16"}, {"name": "mixed_precision"}]))
    with pytest.raises(RecipeError, match="cannot be combined"):
        make_techniques(recipe, Env())
    assert "2010.06192" in MixedPrecisionTechnique.paper and "1710.03740" in MixedPrecisionTechnique.paper
    for field_name, field in MixedPrecisionConfig.model_fields.items():
        assert field_name == "name" or field.description


def test_to_pure_bf16_functional_core(tiny):
    model = to_pure_bf16(tiny.model())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    batch = {k: torch.stack([r[k] for r in tiny.rows(2)]) for k in ("input_ids", "labels")}
    model(**batch).loss.backward()
    assert {p.grad.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_dynamic_loss_scaling_on_cuda(tiny):
    technique = MixedPrecisionTechnique(dtype="fp16", init_scale=1024.0, growth_interval=1)
    args = technique.training_args(tiny.args(max_steps=3, use_cpu=False))
    trainer = EffTrainer(model=tiny.model(), args=args, train_dataset=tiny.rows(), techniques=[technique])
    scaler = trainer.accelerator.scaler
    assert scaler is not None and scaler.get_scale() == 1024.0
    trainer.train()
    # growth_interval=1: the scale doubles after every step without overflow, halves on one with.
    assert trainer.accelerator.scaler is scaler and scaler.get_scale() in {1024.0 * 2.0**k for k in range(-3, 4)}
    assert scaler.get_scale() > 1024.0 / 8
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert all(torch.isfinite(torch.tensor(tiny.losses(trainer))))


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs an fp8 GPU"
)
def test_fp8_training_on_hopper(tiny):
    pytest.importorskip("torchao")
    from torchao.float8.float8_linear import Float8Linear

    technique = MixedPrecisionTechnique(dtype="fp8")
    technique.validate(None, Env.detect())
    model = technique.on_model(tiny.model())
    swapped = [n for n, m in model.named_modules() if isinstance(m, Float8Linear)]
    assert swapped and not any(n.endswith("lm_head") for n in swapped)
    args = technique.training_args(tiny.args(max_steps=6, use_cpu=False, learning_rate=3e-3))
    trainer = tiny.train(model, args)
    losses = tiny.losses(trainer)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


@pytest.mark.parametrize(
    "field, entry",
    [
        ("bf16", "{name: mixed_precision, dtype: bf16}"),
        ("bf16_full_eval", "{name: mixed_precision, dtype: bf16, full_eval: true}"),
        ("fp16", "{name: mixed_precision, dtype: fp16}"),
        ("fp16_full_eval", "{name: mixed_precision, dtype: fp16, full_eval: true}"),
    ],
)
def test_training_precision_fields_are_refused_for_the_technique(tiny_recipe, field, entry):
    with pytest.raises(RecipeError) as err:
        Recipe.parse(tiny_recipe(training={field: True}, techniques=[{"name": "lion"}]))
    assert str(err.value) == (
        f"training.{field}: precision is the mixed_precision technique: remove this and add {entry} to techniques"
    )
    with pytest.raises(RecipeError, match=f"training.{field}: precision is"):
        Recipe.parse(tiny_recipe(training={field: False}))  # refused whatever the value: one way to say it
