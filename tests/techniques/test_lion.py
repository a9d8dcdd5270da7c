"""Lion (Chen et al. 2023, arXiv 2302.06675): the update against Algorithm 2, foreach == loop, state size, and
training with the stock Trainer."""

from __future__ import annotations

import pydantic
import pytest
import torch

from hf_efftrain.registry import get_technique
from hf_efftrain.techniques.lion import Lion, LionConfig, LionTechnique


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
