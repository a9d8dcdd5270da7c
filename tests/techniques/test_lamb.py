"""LAMB (You et al. 2020, arXiv 1904.00962, Algorithm 2): trust ratio by hand, the zero-norm rule, steps against the
paper's equations, excluded tensors == AdamW, name-based groups, and training with the stock Trainer."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch

from hf_efftrain.core.registry import get_technique
from hf_efftrain.core.technique import Env
from hf_efftrain.errors import RecipeError
from hf_efftrain.techniques.lamb import (
    Lamb,
    LambConfig,
    LambFactory,
    LambTechnique,
    lamb_param_groups,
    lamb_trust_ratio,
)

F64 = torch.float64


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def test_trust_ratio_by_hand():
    w, r = t(3.0, 4.0), t(0.0, 2.0)  # ||w|| = 5, ||r|| = 2
    assert lamb_trust_ratio(w, r).item() == pytest.approx(2.5, abs=1e-7)
    assert lamb_trust_ratio(w, r, (0.0, 4.0)).item() == pytest.approx(2.0, abs=1e-7)  # phi(5) = 4
    assert lamb_trust_ratio(w, r, (6.0, 10.0)).item() == pytest.approx(3.0, abs=1e-7)  # phi(5) = 6


@pytest.mark.parametrize("clamp", [None, (1e-3, 10.0)])
def test_trust_ratio_is_one_where_a_norm_is_zero(clamp):
    assert lamb_trust_ratio(t(0.0, 0.0), t(1.0, 2.0), clamp).item() == 1.0
    assert lamb_trust_ratio(t(3.0, 4.0), t(0.0, 0.0), clamp).item() == 1.0
    assert lamb_trust_ratio(t(0.0, 0.0), t(0.0, 0.0), clamp).item() == 1.0


def test_first_step_by_hand():
    # Step 1: m_hat = g and v_hat = g^2 (bias correction), so with eps = 0: m_hat / sqrt(v_hat) = sign(g) = [1, -1].
    # r = [1, -1] + 0.5 * [3, 4] = [2.5, 1]; trust = ||w|| / ||r|| = 5 / sqrt(7.25); w -= 0.1 * trust * r.
    w = torch.nn.Parameter(t(3.0, 4.0))
    opt = Lamb([w], lr=0.1, betas=(0.9, 0.999), eps=0.0, weight_decay=0.5)
    w.grad = t(1.0, -2.0)
    opt.step()
    trust = 5 / math.sqrt(7.25)
    torch.testing.assert_close(w.detach(), t(3 - 0.25 * trust, 4 - 0.1 * trust), rtol=0, atol=1e-12)
    assert opt.last_trust_ratios[w].item() == pytest.approx(trust, rel=1e-6)
    # Layer-wise normalization: the step's norm is lr * ||w||, whatever the gradient's scale.
    assert (w.detach() - t(3.0, 4.0)).norm().item() == pytest.approx(0.1 * 5, rel=1e-12)


def _reference_lamb(w, grads, lr, b1, b2, eps, wd, adapt=True, clamp=None):
    """Algorithm 2 written out literally, in float64."""
    w, m, v = w.clone(), torch.zeros_like(w), torch.zeros_like(w)
    for step, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        r = (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + eps) + wd * w
        w_norm, r_norm = w.norm(), r.norm()
        phi = w_norm if clamp is None else w_norm.clamp(*clamp)
        trust = phi / r_norm if adapt and w_norm > 0 and r_norm > 0 else 1.0
        w = w - lr * trust * r
    return w


@pytest.mark.parametrize("clamp", [None, (0.5, 2.0)])
def test_five_steps_match_algorithm_2(clamp):
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(4, 3, generator=gen, dtype=F64)
    grads = [torch.randn(4, 3, generator=gen, dtype=F64) for _ in range(5)]
    w = torch.nn.Parameter(w0.clone())
    opt = Lamb([w], lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, weight_norm_clamp=clamp)
    for g in grads:
        w.grad = g
        opt.step()
    expected = _reference_lamb(w0, grads, 0.05, 0.8, 0.95, 1e-6, 0.1, clamp=clamp)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-12)
    assert opt.state[w]["step"].item() == 5


def _run(opt_cls, kwargs, groups_fn, steps=5):
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=F64)) for s in [(6, 4), (4,), (5,)]]
    opt = opt_cls(groups_fn(params), **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=F64)
        opt.step()
    return [p.detach() for p in params]


def test_not_adapted_tensors_take_exactly_the_adamw_update():
    # Trust 1: w - lr * (m_hat / (sqrt(v_hat) + eps) + wd * w) = w * (1 - lr * wd) - lr * m_hat / (...), which is
    # torch AdamW's decoupled decay (applied to the same old w), so the two agree to rounding.
    kwargs = {"lr": 0.01, "betas": (0.9, 0.99), "eps": 1e-8}
    groups = lambda ps: [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}]  # noqa: E731
    adamw = _run(torch.optim.AdamW, kwargs, groups)
    lamb_groups = lambda ps: [{**g, "adapt": False} for g in groups(ps)]  # noqa: E731
    lamb = _run(Lamb, kwargs, lamb_groups)
    for a, b in zip(adamw, lamb):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # ... and the trust ratio does change the update when it is on.
    adapted = _run(Lamb, kwargs, groups)
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(adamw, adapted))


def test_param_groups_from_names_match_trainer_rule(tiny):
    from transformers import Trainer

    model = tiny.model()
    decay_names = set(Trainer.get_decay_parameter_names(None, model))
    by_id = {id(p): n for n, p in model.named_parameters()}
    groups = lamb_param_groups(model, weight_decay=0.1)
    assert [(g["weight_decay"], g["adapt"]) for g in groups] == [(0.1, True), (0.0, False)]
    assert {by_id[id(p)] for p in groups[0]["params"]} == decay_names
    excluded = {by_id[id(p)] for p in groups[1]["params"]}
    assert excluded and all("norm" in n for n in excluded)

    # Separate lists: the embedding is decayed but not adapted; [] for decay excludes nothing.
    groups = lamb_param_groups(model, 0.1, exclude_from_weight_decay=[], exclude_from_adaptation=[r"embed"])
    summary = {(g["weight_decay"], g["adapt"]): {by_id[id(p)] for p in g["params"]} for g in groups}
    assert summary[(0.1, False)] == {"model.embed_tokens.weight"}
    assert len(summary[(0.1, True)]) == len(by_id) - 1

    # LayerNorm modules count as norms whatever their name (the Trainer's rule).
    ln = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    assert [len(g["params"]) for g in lamb_param_groups(ln, 0.1)] == [1, 3]


def test_trains_with_stock_trainer_through_factory(tiny):
    tech = LambTechnique(lr=3e-2, weight_decay=0.01, betas=(0.9, 0.98))
    tech.validate(None, Env())
    args = tech.training_args(tiny.args(max_steps=8, learning_rate=1.0))
    cls, kwargs = tech.optimizer_cls_and_kwargs(args)
    assert cls is LambFactory and kwargs["lr"] == 3e-2 and kwargs["eps"] == args.adam_epsilon
    trainer = tiny.train(tiny.model(), args, optimizer_cls_and_kwargs=(cls, kwargs))
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, Lamb)
    assert [(g["weight_decay"], g["adapt"], g["betas"]) for g in opt.param_groups] == [
        (0.01, True, (0.9, 0.98)),
        (0.0, False, (0.9, 0.98)),
    ]
    losses = tiny.losses(trainer)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.1, losses

    tech.on_trainer(trainer)
    report = tech.report()
    assert (
        report["tensors_adapted"] == 16 and report["tensors_not_adapted"] == 5
    )  # embedding, 2 x 7 matrices, lm_head; 5 norms
    assert 0 < report["last_trust_ratio"]["min"] <= report["last_trust_ratio"]["max"]


def test_lamb_class_with_trainer_groups(tiny):
    # Handed the class itself, the Trainer builds its decay / no-decay groups and every tensor is adapted.
    args = tiny.args(max_steps=2, weight_decay=0.01)
    trainer = tiny.train(tiny.model(), args, optimizer_cls_and_kwargs=(Lamb, {"lr": 1e-2, "weight_decay": 0.01}))
    opt = trainer.optimizer.optimizer
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.01]
    assert all(g["adapt"] for g in opt.param_groups)
    assert len(opt.last_trust_ratios) == sum(len(g["params"]) for g in opt.param_groups)


def test_closure_sparse_and_bad_hyperparameters():
    p = torch.nn.Parameter(torch.ones(3))
    opt = Lamb([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p * torch.tensor([1.0, -1.0, 2.0])).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(2.0)
    assert not torch.equal(p.detach(), torch.ones(3))

    emb = torch.nn.Embedding(4, 2, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        Lamb(emb.parameters()).step()
    for kwargs in (
        {"lr": -1},
        {"betas": (1.0, 0.9)},
        {"eps": -1},
        {"weight_decay": -1},
        {"weight_norm_clamp": (2, 1)},
    ):
        with pytest.raises(ValueError):
            Lamb([torch.nn.Parameter(torch.ones(1))], **kwargs)


def test_config_and_recipe_errors():
    assert get_technique("lamb") is LambTechnique
    assert {"optimizer", "lion"} <= LambTechnique.conflicts
    assert "1904.00962" in LambTechnique.paper
    for name, field in LambConfig.model_fields.items():
        assert name == "name" or field.description
    for bad in ({"betas": (0.9, 1.0)}, {"eps": 0}, {"weight_norm_clamp": (-1, 2)}, {"lrr": 1}):
        with pytest.raises(pydantic.ValidationError):
            LambConfig(**bad)
    with pytest.raises(RecipeError) as e:
        LambTechnique(exclude_from_adaptation=["bias", "(norm"]).validate(None, Env())
    assert e.value.path == "exclude_from_adaptation[1]"
    with pytest.raises(RecipeError) as e:
        LambTechnique(weight_norm_clamp=(2.0, 1.0)).validate(None, Env())
    assert e.value.path == "weight_norm_clamp"
