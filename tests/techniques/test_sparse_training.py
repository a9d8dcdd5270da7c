"""Sparse training (Zhu & Gupta 2017, arXiv 1710.01878; RigL, Evci et al. 2020, arXiv 1911.11134; 2:4 masks): the
schedules and mask rules by hand, exact sparsity, masks held through optimizer steps and resume, RigL's drop/grow."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainerControl, TrainerState

from hf_efftrain import Recipe
from hf_efftrain.core.build import build, make_techniques
from hf_efftrain.core.registry import get_technique
from hf_efftrain.core.technique import Env
from hf_efftrain.core.trainer import STATE_FILE
from hf_efftrain.errors import RecipeError
from hf_efftrain.techniques.sparse_training import (
    SparseTrainingCallback,
    SparseTrainingConfig,
    SparseTrainingTechnique,
    cubic_sparsity,
    erk_densities,
    global_magnitude_masks,
    magnitude_mask,
    n_m_mask,
    rigl_drop_fraction,
    rigl_update,
    to_semi_structured,
)


# ---- the math by hand -------------------------------------------------------------------------------------------
def test_cubic_schedule_by_hand():
    # t0 = 10, n*dt = 40: s_t = 0.8 + (0 - 0.8) * (1 - (t - 10) / 40)^3
    s = [cubic_sparsity(t, 0.8, 0.0, 10, 50) for t in (0, 10, 20, 30, 40, 50, 70)]
    assert s == pytest.approx([0.0, 0.0, 0.8 - 0.8 * 0.75**3, 0.7, 0.8 - 0.8 / 64, 0.8, 0.8])
    assert s[2] == pytest.approx(0.4625)
    assert cubic_sparsity(30, 0.8, 0.2, 10, 50) == pytest.approx(0.8 - 0.6 * 0.125)  # s_i = 0.2


def test_rigl_cosine_drop_fraction_by_hand():
    assert rigl_drop_fraction(0, 0.3, 100) == pytest.approx(0.3)
    assert rigl_drop_fraction(25, 0.3, 100) == pytest.approx(0.15 * (1 + math.sqrt(0.5)))
    assert rigl_drop_fraction(50, 0.3, 100) == pytest.approx(0.15)
    assert rigl_drop_fraction(100, 0.3, 100) == pytest.approx(0.0)


def test_magnitude_masks_by_hand():
    w = torch.tensor([[0.1, -0.5, 0.3], [-0.05, 2.0, -0.2]])
    assert magnitude_mask(w.abs(), 0.5).tolist() == [[False, True, True], [False, True, False]]
    # global: keep the 3 largest of all 6 values (10, 4, 3); per layer it would keep 2 + 1
    masks = global_magnitude_masks({"a": torch.tensor([1.0, 2, 3, 4]), "b": torch.tensor([0.5, 10])}, 0.5)
    assert masks["a"].tolist() == [False, False, True, True] and masks["b"].tolist() == [False, True]


def test_two_four_mask_by_hand():
    w = torch.tensor([[1.0, -3.0, 2.0, 0.5, 4.0, 3.0, -2.0, 1.0], [0.0, 0.1, -0.2, 0.3, 9.0, -8.0, 7.0, 6.0]])
    assert n_m_mask(w.abs()).int().tolist() == [[0, 1, 1, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0]]
    with pytest.raises(ValueError, match="multiple of 4"):
        n_m_mask(torch.ones(2, 6))


def test_erk_densities_by_hand():
    # raw density ~ (n_in + n_out) / (n_in * n_out): a 10x10 layer 0.2, a 100x10 layer 0.11; both sparse when eps
    # solves 100*0.2*eps + 1000*0.11*eps = 0.1 * 1100 -> eps = 110 / 130.
    d = erk_densities({"small": (10, 10), "wide": (100, 10)}, 0.1)
    eps = 110 / 130
    assert d == pytest.approx({"small": 0.2 * eps, "wide": 0.11 * eps})
    # with a 100x1 layer (raw 1.01) at density 0.5: eps = 600 / (20 + 110 + 101) makes it 2.6 > 1, so it stays dense
    # and the others share the remaining 600 - 100 kept weights: eps = 500 / (20 + 110)
    d = erk_densities({"small": (10, 10), "wide": (100, 10), "wider": (100, 1)}, 0.5)
    assert d == pytest.approx({"small": 0.2 * 500 / 130, "wide": 0.11 * 500 / 130, "wider": 1.0})
    assert 100 * d["small"] + 1000 * d["wide"] + 100 * d["wider"] == pytest.approx(0.5 * 1200)


def test_rigl_update_drops_smallest_and_grows_largest_gradient():
    weight = torch.tensor([0.9, 0.1, 0.5, 0.0, 0.0, 0.0, 0.0, -0.3])
    mask = torch.tensor([1, 1, 1, 0, 0, 0, 0, 1], dtype=torch.bool)
    grad = torch.tensor([0.0, 0.0, 0.0, 5.0, -1.0, 0.2, -3.0, 0.0])
    # k = floor(0.5 * 4) = 2: drop |0.1| and |-0.3|, grow the inactive with |grad| 5 and 3
    assert rigl_update(weight, mask, grad, 0.5).int().tolist() == [1, 0, 1, 1, 0, 0, 1, 0]
    # a just-dropped connection competes in the grow step too (reference implementation): |grad| 10 wins it back
    grad[1] = 10.0
    assert rigl_update(weight, mask, grad, 0.5).int().tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert rigl_update(weight, mask, grad, 0.2).equal(mask)  # floor(0.8) = 0 swaps


def test_rigl_step_in_the_callback_uses_the_dense_gradient_and_zero_inits():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.9, 0.1, 0.5, 0.7], [0.0, 0.0, 0.0, -0.3]]))
    model = nn.Sequential(lin)
    cb = SparseTrainingCallback(
        method="rigl", sparsity=0.375, update_every=4, end_step=8, drop_fraction=1.0, include=("0",)
    )
    mask0 = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)
    cb.load_state_dict({"masks": {"0": mask0}, "end_step": 8, "mask_updates": 0, "connections_changed": 0})
    cb.bind(model, max_steps=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)  # lr 0: magnitudes stay as set by hand
    state, control = TrainerState(), TrainerControl()
    grad = torch.tensor([[1.0, 0.05, 3.0, 4.0], [0.1, 4.0, 0.2, 0.0]])  # the dropped 0.1 has |grad| 0.05: stays out
    for step in range(5):  # steps 1..3 plain, step 4 updates the mask (4 % 4 == 0 and 4 < T_end), step 5 plain
        state.global_step = step
        cb.on_step_begin(None, state, control)
        (lin.weight * grad).sum().backward()  # dL/dW = grad
        if step == 3:
            opt.state[lin.weight]["momentum_buffer"] = torch.ones(2, 4)
        cb.on_pre_optimizer_step(None, state, control, optimizer=opt)
        if step < 3:
            assert cb.masks["0"].equal(mask0) and lin.weight.grad.equal(grad * mask0)  # masked in backward
        if step == 3:
            # f(4) = 1/2 * (1 + cos(pi * 4/8)) = 0.5, k = floor(0.5 * 5) = 2: drop |0.1| and |-0.3|; grow the two
            # largest |grad| outside the remaining set, from the DENSE gradient: 4.0 and 0.2 (row 1 was masked)
            assert cb.masks["0"].int().tolist() == [[1, 0, 1, 1], [0, 1, 1, 0]]
            assert lin.weight.grad.equal(grad * mask0 * cb.masks["0"])
            assert opt.state[lin.weight]["momentum_buffer"].tolist() == [[1, 1, 1, 1], [1, 0, 0, 1]]  # fresh
        if step == 4:
            assert lin.weight.grad[1, 1:3].tolist() == [4.0, pytest.approx(0.2)]  # grown connections learn
        opt.step()
        cb.on_optimizer_step(None, state, control)
        opt.zero_grad()
        if step == 3:  # dropped weights zeroed, grown ones start at zero
            assert lin.weight.tolist() == [[pytest.approx(0.9), 0.0, 0.5, pytest.approx(0.7)], [0.0] * 4]
    assert cb.mask_updates == 1 and cb.connections_changed == 4
    assert cb.report()["sparsity_global"] == 0.375


# ---- real Trainer steps ------------------------------------------------------------------------------------------
class MaskChecker(TrainerCallback):
    """After every step: weights exactly zero wherever the mask is off, and the mask's per-layer counts."""

    def __init__(self, cb: SparseTrainingCallback):
        self.cb = cb
        self.zero_counts: list[dict[str, int]] = []
        self.masks: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args, state, control, **kwargs):
        for name, m in self.cb.modules.items():
            assert m.weight[~self.cb.masks[name]].eq(0).all(), (state.global_step, name)
        self.zero_counts.append({n: int((~m).sum()) for n, m in self.cb.masks.items()})
        self.masks.append({n: m.clone() for n, m in self.cb.masks.items()})


def _train(tiny, model, cb, steps, rows=None, **args):
    checker = MaskChecker(cb)
    trainer = Trainer(
        model=model,
        args=tiny.args(max_steps=steps, learning_rate=3e-3, weight_decay=0.1, **args),
        train_dataset=rows or tiny.rows(32),
        callbacks=[cb, checker],
    )
    trainer.train()
    return trainer, checker


def test_gradual_magnitude_pruning_with_stock_trainer_reaches_exact_layer_sparsity(tiny):
    model = tiny.model()
    cb = SparseTrainingCallback(sparsity=0.75, start_step=0, end_step=4, update_every=2)
    trainer, checker = _train(tiny, model, cb, steps=6)
    assert set(cb.modules) == {f"model.layers.{i}.{p}" for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}  # fmt: skip
    # schedule: pruned after steps 2 and 4 (s = 0.75 - 0.75/8, then 0.75), constant after
    n = {name: m.weight.numel() for name, m in cb.modules.items()}
    for step, expected in ((1, 0.0), (2, 0.75 - 0.75 / 8), (4, 0.75), (6, 0.75)):
        assert checker.zero_counts[step - 1] == {k: round(expected * v) for k, v in n.items()}, step
    for name, m in cb.modules.items():
        assert int(m.weight.eq(0).sum()) == round(0.75 * m.weight.numel()), name
    assert model.lm_head.weight.ne(0).all() and model.model.embed_tokens.weight[1:].ne(0).all()  # row 0: padding
    report = cb.report()
    assert report["sparsity_global"] == pytest.approx(0.75, abs=1e-4) and report["mask_updates"] == 3
    assert report["weights_zero_fraction"] == report["sparsity_global"]
    assert all(v == pytest.approx(0.75, abs=1e-3) for v in report["sparsity_per_layer"].values())
    assert all(math.isfinite(x) for x in tiny.losses(trainer))


def test_rigl_keeps_sparsity_constant_and_changes_the_mask(tiny):
    model = tiny.model()
    cb = SparseTrainingCallback(method="rigl", sparsity=0.8, distribution="erk", update_every=2, end_step=6)
    _, checker = _train(tiny, model, cb, steps=6, gradient_accumulation_steps=2, rows=tiny.rows(96))
    assert len({tuple(c.values()) for c in checker.zero_counts}) == 1  # the same per-layer counts every step
    n_total = sum(m.numel() for m in cb.masks.values())
    assert sum(checker.zero_counts[0].values()) == pytest.approx(0.8 * n_total, abs=len(cb.masks))
    counts = checker.zero_counts[0]
    assert len(set(round(counts[k] / cb.masks[k].numel(), 2) for k in counts)) > 1  # ERK: layers differ
    changed = [any(not a[k].equal(b[k]) for k in a) for a, b in zip(checker.masks, checker.masks[1:])]
    assert changed == [True, False, True, False, False]  # updates at steps 2 and 4, none at T_end = 6
    assert cb.connections_changed > 0 and cb.mask_updates == 2


def test_two_four_trains_on_cpu_with_valid_masks_for_linear_and_conv1d(tiny):
    llama = tiny.model()
    cb = SparseTrainingCallback(pattern="2:4", start_step=2)
    _, checker = _train(tiny, llama, cb, steps=3)
    n_total = sum(m.numel() for m in cb.masks.values())
    assert [sum(c.values()) for c in checker.zero_counts] == [0, n_total // 2, n_total // 2]  # from start_step 2
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=32))
    cb_gpt2 = SparseTrainingCallback(pattern="2:4")
    _train(tiny, gpt2, cb_gpt2, steps=2)
    assert "transformer.h.0.attn.c_attn" in cb_gpt2.modules  # transformers' Conv1D, weight [in, out]
    for cb_, rows_are_outputs in ((cb, True), (cb_gpt2, False)):
        for name, m in cb_.modules.items():
            w = m.weight if rows_are_outputs else m.weight.t()  # groups of 4 along the input dimension
            assert w.reshape(-1, 4).ne(0).sum(1).eq(2).all(), name
        assert cb_.report()["sparsity_global"] == 0.5


def test_stock_trainer_resume_rebuilds_the_masks_from_the_zeros(tiny, tmp_path):
    kwargs = {"sparsity": 0.6, "start_step": 0, "end_step": 2, "update_every": 1}
    cb = SparseTrainingCallback(**kwargs)
    _train(tiny, tiny.model(), cb, steps=2, save_strategy="steps", save_steps=2)
    resumed = SparseTrainingCallback(**kwargs)  # no load_state_dict: the stock Trainer does not save ours
    checker = MaskChecker(resumed)
    trainer = Trainer(
        model=tiny.model(seed=1),
        args=tiny.args(max_steps=4, learning_rate=3e-3, weight_decay=0.1),
        train_dataset=tiny.rows(32),
        callbacks=[resumed, checker],
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert all(checker.masks[0][n].equal(cb.masks[n]) for n in cb.masks)  # zeros after steps 3 and 4 as well
    assert all(resumed.masks[n].equal(cb.masks[n]) for n in cb.masks)


# ---- through the recipe: EffTrainer, checkpoints, report --------------------------------------------------------
def test_masks_saved_with_checkpoints_and_restored_on_resume(tiny_recipe, tmp_path):
    technique = {"name": "sparse_training", "method": "rigl", "sparsity": 0.7, "update_every": 2, "end_step": 6}
    data = tiny_recipe(techniques=[technique], training={"max_steps": 6, "save_strategy": "steps", "save_steps": 2})
    full = build(Recipe.parse(data))
    full.trainer.train()
    saved = torch.load(tmp_path / "run" / "checkpoint-2" / STATE_FILE, weights_only=True)["sparse_training"]

    data["training"]["output_dir"] = str(tmp_path / "resumed")
    resumed = build(Recipe.parse(data))
    cb = resumed.techniques[0].callback
    seen = {}

    class AtBegin(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen["masks"] = {n: m.clone() for n, m in cb.masks.items()}
            for name, m in cb.modules.items():
                assert m.weight[~cb.masks[name]].eq(0).all()

    resumed.trainer.add_callback(AtBegin())
    checker = MaskChecker(cb)
    resumed.trainer.add_callback(checker)
    resumed.trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert all(seen["masks"][n].equal(saved["masks"][n]) for n in saved["masks"])
    assert cb.mask_updates == 2 and len(checker.masks) == 4  # 1 restored + 1 at step 4; steps 3..6 ran
    final = full.techniques[0].callback
    assert all(cb.masks[n].equal(final.masks[n]) for n in final.masks)  # same run as without the interruption


def test_run_report_has_global_sparsity(tiny_recipe):
    import hf_efftrain

    technique = {"name": "sparse_training", "sparsity": 0.6, "distribution": "global", "update_every": 1}
    report = hf_efftrain.train(Recipe.parse(tiny_recipe(techniques=[technique], training={"max_steps": 4})))
    facts = report["techniques"][0]["report"]
    assert facts["end_step"] == 3  # 75% of max_steps
    assert facts["sparsity_global"] == pytest.approx(0.6, abs=1e-6)
    per_layer = facts["sparsity_per_layer"]
    assert len({round(v, 3) for v in per_layer.values()}) > 1  # one threshold, different layer sparsities


@pytest.mark.parametrize(
    "fields, path",
    [
        ({"method": "rigl", "pattern": "2:4"}, "pattern"),
        ({"pattern": "2:4", "sparsity": 0.8}, "sparsity"),
        ({"method": "rigl", "distribution": "global"}, "distribution"),
        ({"sparsity": 0.5, "initial_sparsity": 0.6}, "initial_sparsity"),
        ({"start_step": 4, "end_step": 4}, "end_step"),
        ({"end_step": 10}, "end_step"),  # max_steps is 6
        ({"start_step": 6}, "start_step"),
        ({"include": ["("]}, "include"),
    ],
)
def test_bad_recipes_rejected_with_the_field(tiny_recipe, fields, path):
    with pytest.raises(RecipeError) as err:
        make_techniques(Recipe.parse(tiny_recipe(techniques=[{"name": "sparse_training", **fields}])), Env())
    assert err.value.path == f"techniques[0].{path}"


def test_empty_selection_is_a_recipe_error(tiny):
    tech = SparseTrainingTechnique(include=["lm_head"], exclude=["lm_head"])
    with pytest.raises(RecipeError, match="no nn.Linear"):
        tech.on_model(tiny.model())
    tech = SparseTrainingTechnique(include=["lm_head"])
    assert list(tech.callback.select(tiny.model())) == ["lm_head"]


@pytest.mark.parametrize("kwargs", [{"sparsity": 1.0}, {"update_every": 0}, {"drop_fraction": 0}, {"pattern": "1:4"}])
def test_bad_config_rejected(kwargs):
    with pytest.raises(pydantic.ValidationError):
        SparseTrainingConfig(**kwargs)


def test_technique_contract():
    assert get_technique("sparse_training") is SparseTrainingTechnique
    assert "1710.01878" in SparseTrainingTechnique.paper and "1911.11134" in SparseTrainingTechnique.paper
    for field_name, field in SparseTrainingConfig.model_fields.items():
        assert field_name == "name" or field.description


def test_semi_structured_kernels_refuse_cpu_or_fp32_weights():
    # the real 2:4 path is CUDA-only (tests/gpu/test_sparse_gpu.py); on a CPU the masks are the whole story
    lin = nn.Linear(64, 32)
    with pytest.raises(ValueError, match="CUDA fp16/bf16"):
        to_semi_structured({"lin": lin}, {"lin": n_m_mask(lin.weight.abs())})
    assert type(lin.weight) is nn.Parameter
