"""Lion (Chen et al. 2023, arXiv 2302.06675): the update against Algorithm 2, foreach == loop, state size, training
with the stock Trainer, the from_adamw conversion rule, and 8-bit / paged state through bitsandbytes."""

from __future__ import annotations

import pydantic
import pytest
import torch

from hf_efftrain.core.registry import get_technique
from hf_efftrain.core.technique import Env
from hf_efftrain.errors import RecipeError
from hf_efftrain.runtime.metrics import optimizer_state_bytes
from hf_efftrain.techniques.lion import Lion, LionConfig, LionTechnique, lion_hparams_from_adamw


def _two_steps(weight_decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=weight_decay)
    # Step 2's first gradient element is negative, but the momentum from step 1 outweighs it: sign(c) = +1.
    for g in ([0.5, -1.0, 0.0], [-0.02, -0.5, 2.0]):
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    return p.detach(), opt.state[p]["exp_avg"]


def test_update_matches_algorithm_2_by_hand():
    # step 1: m=0 -> c = 0.1*g = [.05, -.1, 0] -> sign [1, -1, 0]; theta = [0.9, -1.9, 0.5]; m = 0.01*g
    # step 2: c = 0.9*[.005, -.01, 0] + 0.1*[-.02, -.5, 2] = [.0025, -.059, .2] -> sign [1, -1, 1]
    #         theta = [0.8, -1.8, 0.4]; m = 0.99*[.005, -.01, 0] + 0.01*[-.02, -.5, 2] = [.00475, -.0149, .02]
    theta, m = _two_steps(weight_decay=0.0)
    torch.testing.assert_close(theta, torch.tensor([0.8, -1.8, 0.4], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(m, torch.tensor([0.00475, -0.0149, 0.02], dtype=torch.float64), rtol=0, atol=1e-12)


def test_decoupled_weight_decay_by_hand():
    # theta <- theta * (1 - lr*wd) - lr*sign(c), lr*wd = 0.05; the signs are those of the test above.
    # step 1: [0.95 - 0.1, -1.9 + 0.1, 0.475] = [0.85, -1.8, 0.475]
    # step 2: [0.8075 - 0.1, -1.71 + 0.1, 0.45125 - 0.1] = [0.7075, -1.61, 0.35125]
    theta, m = _two_steps(weight_decay=0.5)
    torch.testing.assert_close(theta, torch.tensor([0.7075, -1.61, 0.35125], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(m, torch.tensor([0.00475, -0.0149, 0.02], dtype=torch.float64), rtol=0, atol=1e-12)


def _run(foreach: bool, device: str = "cpu") -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2), (11,)]
    params = [torch.nn.Parameter(torch.randn(s).to(device)) for s in shapes]
    params.append(torch.nn.Parameter(torch.randn(6, dtype=torch.float64).to(device)))  # a second dtype bucket
    frozen = torch.nn.Parameter(torch.randn(4).to(device))  # never gets a gradient: skipped, no state
    opt = Lion(
        [{"params": params[:3], "weight_decay": 0.1}, {"params": params[3:] + [frozen], "weight_decay": 0.0}],
        lr=1e-2,
        betas=(0.9, 0.99),
        foreach=foreach,
    )
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype).to(device)
        opt.step()
    states = [opt.state[p].get("exp_avg") for p in params + [frozen]]
    return [p.detach().cpu() for p in params + [frozen]], [None if s is None else s.cpu() for s in states]


def test_foreach_path_equals_loop_path_bitwise():
    p_foreach, s_foreach = _run(foreach=True)
    p_loop, s_loop = _run(foreach=False)
    for a, b in zip(p_foreach, p_loop):
        assert torch.equal(a, b)
    assert s_foreach[-1] is None and s_loop[-1] is None
    for a, b in zip(s_foreach[:-1], s_loop[:-1]):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_foreach_equals_loop_and_cpu():
    p_foreach, s_foreach = _run(foreach=True, device="cuda")
    p_loop, s_loop = _run(foreach=False, device="cuda")
    p_cpu, _ = _run(foreach=False)
    for a, b, c in zip(p_foreach, p_loop, p_cpu):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=0, atol=1e-6)
    for a, b in zip(s_foreach[:-1], s_loop[:-1]):
        assert torch.equal(a, b)


def test_one_state_tensor_per_param_half_of_adamw(tiny):
    model = tiny.model()
    batch = tiny.rows(4)[0]
    states = {}
    for cls in (Lion, torch.optim.AdamW):
        opt = cls(model.parameters(), lr=1e-4)
        model(**{k: v[None] for k, v in batch.items()}).loss.backward()
        opt.step()
        states[cls] = opt.state
        model.zero_grad()

    params = list(model.parameters())
    for p in params:
        assert set(states[Lion][p]) == {"exp_avg"}
        assert states[Lion][p]["exp_avg"].shape == p.shape and states[Lion][p]["exp_avg"].dtype == p.dtype

    def moment_bytes(state) -> int:  # tensors shaped like their parameter (AdamW also keeps a scalar step)
        return sum(t.numel() * t.element_size() for p in params for t in state[p].values() if t.shape == p.shape)

    param_bytes = sum(p.numel() * p.element_size() for p in params)
    assert moment_bytes(states[Lion]) == param_bytes
    assert 2 * moment_bytes(states[Lion]) == moment_bytes(states[torch.optim.AdamW])


def test_closure_sparse_and_grad_none():
    p = torch.nn.Parameter(torch.ones(3))
    q = torch.nn.Parameter(torch.ones(3))  # no grad: untouched
    opt = Lion([p, q], lr=0.5)

    def closure():
        opt.zero_grad()
        loss = (p * torch.tensor([1.0, -1.0, 2.0])).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(2.0)
    assert p.detach().tolist() == [0.5, 1.5, 0.5]
    assert q.detach().tolist() == [1.0, 1.0, 1.0] and q not in opt.state

    emb = torch.nn.Embedding(4, 2, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        Lion(emb.parameters()).step()


@pytest.mark.parametrize(
    "kwargs", [{"lr": -1.0}, {"betas": (1.0, 0.99)}, {"betas": (0.9, -0.1)}, {"weight_decay": -0.1}]
)
def test_bad_hyperparameters_raise(kwargs):
    with pytest.raises(ValueError):
        Lion([torch.nn.Parameter(torch.ones(1))], **kwargs)


@pytest.mark.parametrize("kwargs", [{"beta1": 1.0}, {"beta2": -0.5}, {"weight_decay": -1}, {"lr": 0}, {"lrr": 1}])
def test_bad_config_rejected(kwargs):
    with pytest.raises(pydantic.ValidationError):
        LionConfig(**kwargs)


def test_technique_contract():
    assert get_technique("lion") is LionTechnique
    assert "optimizer" in LionTechnique.conflicts
    assert "2302.06675" in LionTechnique.paper
    for field_name, field in LionConfig.model_fields.items():
        assert field_name == "name" or field.description


def test_trains_with_stock_trainer(tiny):
    tech = LionTechnique(lr=3e-3, beta1=0.95, weight_decay=0.1)
    args = tech.training_args(tiny.args(max_steps=8, learning_rate=1.0, weight_decay=0.0))
    assert args.learning_rate == 3e-3 and args.weight_decay == 0.1

    trainer = tiny.train(tiny.model(), args, optimizer_cls_and_kwargs=tech.optimizer_cls_and_kwargs(args))
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, Lion)
    # The Trainer built its usual decay / no-decay groups around Lion.
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.1]
    assert all(g["betas"] == (0.95, 0.99) and g["initial_lr"] == 3e-3 for g in opt.param_groups)
    losses = tiny.losses(trainer)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.1, losses


# ---- from_adamw: the paper's conversion rule (Sec. 5) ------------------------------------------------------------


@pytest.mark.parametrize("factor", [3.0, 10.0])
def test_from_adamw_rule_keeps_lr_times_wd(factor):
    lr, wd = lion_hparams_from_adamw(3e-3, 0.1, factor)
    assert lr == pytest.approx(3e-3 / factor) and wd == pytest.approx(0.1 * factor)
    assert lr * wd == pytest.approx(3e-3 * 0.1)  # the effective decay strength lr * wd is unchanged


def test_from_adamw_default_factor_and_range(caplog):
    assert lion_hparams_from_adamw(3e-3, 0.1) == pytest.approx((1e-3, 0.3))  # default factor 3
    with caplog.at_level("WARNING", logger="hf_efftrain.techniques.lion"):
        lion_hparams_from_adamw(3e-3, 0.1, 5.0)
        assert not caplog.records
        lion_hparams_from_adamw(3e-3, 0.1, 20.0)
    assert "outside the paper's range" in caplog.text
    with pytest.raises(ValueError):
        lion_hparams_from_adamw(3e-3, 0.1, 0.5)
    with pytest.raises(pydantic.ValidationError):
        LionConfig(from_adamw={"lr": 1e-3, "factor": 0.5})


def test_from_adamw_in_technique_and_report(tiny):
    tech = LionTechnique(from_adamw={"lr": 3e-3, "weight_decay": 0.1, "factor": 10})
    tech.validate(None, Env())
    args = tech.training_args(tiny.args(learning_rate=1.0, weight_decay=0.0))
    assert args.learning_rate == pytest.approx(3e-4) and args.weight_decay == pytest.approx(1.0)
    assert tech.optimizer_cls_and_kwargs(args)[1]["lr"] == pytest.approx(3e-4)
    report = tech.report()
    assert report["from_adamw"] == {"lr": 3e-3, "weight_decay": 0.1, "factor": 10.0}
    assert report["lr"] == pytest.approx(3e-4) and report["weight_decay"] == pytest.approx(1.0)

    # Without lr / weight_decay, the recipe's own (AdamW) training settings are converted.
    tech = LionTechnique(from_adamw={})
    args = tech.training_args(tiny.args(learning_rate=6e-3, weight_decay=0.01))
    assert (args.learning_rate, args.weight_decay) == pytest.approx((2e-3, 0.03))
    assert tech.report()["from_adamw"] == {"lr": 6e-3, "weight_decay": 0.01, "factor": 3.0}


@pytest.mark.parametrize("field", ["lr", "weight_decay"])
def test_from_adamw_with_explicit_value_is_a_recipe_error(field):
    tech = LionTechnique(from_adamw={"lr": 1e-3}, **{field: 0.1})
    with pytest.raises(RecipeError) as e:
        tech.validate(None, Env())
    assert e.value.path == field and "from_adamw" in e.value.message


# ---- 8-bit and paged state (bitsandbytes) ------------------------------------------------------------------------

BNB = Env(installed=frozenset({"bitsandbytes"}))


@pytest.mark.parametrize(
    "kwargs, env, path",
    [
        ({"paged": True}, BNB, "paged"),  # CPU: no unified memory to page into
        ({"bits": 8}, Env(), "bits"),  # bitsandbytes missing
        ({"bits": 8, "foreach": True}, BNB, "foreach"),
        ({"min_8bit_size": 100}, BNB, "min_8bit_size"),
    ],
)
def test_bnb_recipe_errors(kwargs, env, path):
    with pytest.raises(RecipeError) as e:
        LionTechnique(**kwargs).validate(None, env)
    assert e.value.path == path
    if path == "paged":
        assert "CUDA" in e.value.message


def _regression(make_opt, seed: int = 0, steps: int = 30):
    """Linear least squares on a 64 x 128 weight (8192 elements, above bnb's min_8bit_size): the trajectory."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 64, generator=g)
    y = x @ (torch.randn(64, 128, generator=g) / 8)
    w = torch.nn.Parameter(torch.randn(64, 128, generator=g) * 0.1)
    w0, opt, traj, losses = w.detach().clone(), make_opt([w]), [], []
    for _ in range(steps):
        idx = torch.randint(0, 512, (64,), generator=g)
        loss = ((x[idx] @ w - y[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        traj.append(w.detach().clone())
        losses.append(loss.item())
    return w0, traj, losses, opt


def test_8bit_lion_tracks_32bit_lion():
    pytest.importorskip("bitsandbytes")
    hp = {"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.1}
    cls, kwargs = LionTechnique(bits=8).optimizer_cls_and_kwargs(_args(hp))
    assert kwargs["optim_bits"] == 8
    w0, ref, ref_losses, _ = _regression(lambda ps: Lion(ps, **hp))
    _, q8, q8_losses, opt = _regression(lambda ps: cls(ps, **kwargs))
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert state["state1"].dtype == torch.uint8  # the momentum really is stored in 8 bits

    # Lion moves every element by exactly +-lr per step (plus decay), so 8-bit quantization of m can only change
    # the trajectory where |c| is below m's quantization error and the sign flips (a 2*lr jump). Measured: the
    # deviation stays ~3% of the distance travelled; we allow 10%. Changing beta1 to 0.8 or beta2 to 0.98 in the
    # 32-bit run gives 16-20%, so the bound separates quantization noise from a different algorithm.
    deviation = max(((a - b).norm() / (a - w0).norm()).item() for a, b in zip(ref, q8))
    assert 0 < deviation < 0.1
    assert max(abs(a - b) / a for a, b in zip(ref_losses, q8_losses)) < 2e-3  # measured ~3e-4
    assert q8_losses[-1] < 0.9 * q8_losses[0]


def test_bnb_32bit_lion_is_the_same_algorithm():
    pytest.importorskip("bitsandbytes")
    hp = {"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.1}
    cls, kwargs = LionTechnique(bits=32).optimizer_cls_and_kwargs(_args(hp))
    assert cls is Lion
    import bitsandbytes as bnb

    _, ref, _, _ = _regression(lambda ps: Lion(ps, **hp))
    _, b32, _, _ = _regression(lambda ps: bnb.optim.Lion(ps, optim_bits=32, **hp))
    for a, b in zip(ref, b32):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _args(hp):
    from transformers import TrainingArguments

    return TrainingArguments("unused", learning_rate=hp["lr"], weight_decay=hp["weight_decay"], use_cpu=True)


def test_8bit_state_bytes_about_a_quarter():
    pytest.importorskip("bitsandbytes")
    n = 1024 * 1024
    sizes = {}
    for bits in (32, 8):
        cls, kwargs = LionTechnique(bits=bits).optimizer_cls_and_kwargs(_args({"lr": 1e-4, "weight_decay": 0.0}))
        p = torch.nn.Parameter(torch.zeros(1024, 1024))
        opt = cls([p], **kwargs)
        p.grad = torch.ones_like(p)
        opt.step()
        sizes[bits] = optimizer_state_bytes(opt)
    assert sizes[32] == 4 * n
    # uint8 codes + one float32 absmax per 256-element block + the shared 256-entry float32 quantization map.
    assert sizes[8] == n + 4 * (n // 256) + 256 * 4
    assert 0.25 < sizes[8] / sizes[32] < 0.26


def test_8bit_lion_trains_with_stock_trainer(tiny):
    bnb = pytest.importorskip("bitsandbytes")
    tech = LionTechnique(bits=8, lr=3e-3, weight_decay=0.1)
    tech.validate(None, BNB)
    args = tech.training_args(tiny.args(max_steps=8))
    model = tiny.model()
    trainer = tiny.train(model, args, optimizer_cls_and_kwargs=tech.optimizer_cls_and_kwargs(args))
    opt = trainer.optimizer.optimizer
    assert type(opt) is bnb.optim.Lion and opt.args.optim_bits == 8
    dtypes = {name: opt.state[p]["state1"].dtype for name, p in model.named_parameters()}
    assert dtypes["model.layers.0.mlp.up_proj.weight"] == torch.uint8  # 8192 elements
    assert dtypes["model.layers.0.self_attn.k_proj.weight"] == torch.float32  # 2048 < min_8bit_size
    assert dtypes["model.embed_tokens.weight"] == torch.float32  # the Trainer keeps embeddings in 32 bits
    losses = tiny.losses(trainer)
    assert losses[-1] < losses[0] - 0.1, losses
    assert tech.report()["state_bits"] == 8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [8, 32])
def test_paged_lion_on_cuda(bits):
    bnb = pytest.importorskip("bitsandbytes")
    tech = LionTechnique(bits=bits, paged=True)
    tech.validate(None, Env(cuda=True, installed=frozenset({"bitsandbytes"})))
    cls, kwargs = tech.optimizer_cls_and_kwargs(_args({"lr": 1e-3, "weight_decay": 0.1}))
    assert cls is bnb.optim.PagedLion and kwargs["optim_bits"] == bits
    p = torch.nn.Parameter(torch.randn(512, 512, device="cuda"))  # > 1e5 elements: really paged
    opt = cls([p], **kwargs)
    p.grad = torch.randn_like(p)
    opt.step()
    assert getattr(opt.state[p]["state1"], "is_paged", False)
    assert torch.isfinite(p).all()


# ---- one way to get Lion -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "optim, entry",
    [
        ("lion_32bit", "{name: lion}"),
        ("lion_8bit", "{name: lion, bits: 8}"),
        ("paged_lion_32bit", "{name: lion, paged: true}"),
        ("paged_lion_8bit", "{name: lion, bits: 8, paged: true}"),
    ],
)
def test_trainer_lion_names_in_training_optim_are_refused(tiny_recipe, optim, entry):
    from hf_efftrain import Recipe

    with pytest.raises(RecipeError) as err:
        Recipe.parse(tiny_recipe(training={"optim": optim}))
    assert str(err.value) == (
        f"training.optim: {optim!r} is Lion, which is the lion technique: remove this and add {entry} to techniques"
    )
    assert Recipe.parse(tiny_recipe(training={"optim": "adamw_torch"})).training["optim"] == "adamw_torch"


def test_8bit_lion_recipe_trains_end_to_end(tiny_recipe):
    bnb = pytest.importorskip("bitsandbytes")
    from hf_efftrain import Recipe
    from hf_efftrain.core.build import build

    recipe = Recipe.parse(tiny_recipe(training={"max_steps": 2}, techniques=[{"name": "lion", "bits": 8}]))
    built = build(recipe, BNB)
    built.trainer.train()
    opt = built.trainer.optimizer.optimizer
    assert type(opt) is bnb.optim.Lion and opt.args.optim_bits == 8
    assert any(s["state1"].dtype == torch.uint8 for s in opt.state.values())
    losses = [e["loss"] for e in built.trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
