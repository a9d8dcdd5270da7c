"""Progressive layer dropping (Zhang & He 2020) and stochastic depth (Huang et al. 2016): the schedule by hand, the
patched forward against hand-built models (dropped blocks removed, kept branches scaled by 1/p), eval untouched, no
gradients in skipped blocks, resume, and a 2-process DDP run."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
    Trainer,
    TrainerCallback,
)

from hf_efftrain import Recipe
from hf_efftrain.core.build import build, make_techniques
from hf_efftrain.core.registry import get_technique
from hf_efftrain.core.technique import Env
from hf_efftrain.errors import RecipeError
from hf_efftrain.techniques.layer_dropping import (
    LayerDrop,
    LayerDroppingConfig,
    LayerDroppingTechnique,
    keep_probs,
    theta_at,
)

ROOT = Path(__file__).resolve().parents[2]


def test_schedule_by_hand():
    assert theta_at(0, 0.5, 1e-3) == 1.0
    assert theta_at(1000, 0.5, 1e-3) == pytest.approx(0.5 * math.exp(-1) + 0.5)  # 0.68394
    assert theta_at(10**6, 0.5, 1e-3) == pytest.approx(0.5)
    assert theta_at(1000, 0.3, 1e-3, mode="stochastic_depth") == 0.3
    assert keep_probs(0.6, 4) == pytest.approx([0.9, 0.8, 0.7, 0.6])  # 1 - (l/4)(0.4), l = 1..4
    assert keep_probs(1.0, 3) == [1.0, 1.0, 1.0]


# (name, model factory, block list path, residual-branch output projections whose weight (and bias) scale the branch)
def _llama(tiny):
    return LlamaForCausalLM(tiny.config(num_hidden_layers=4))


def _gpt2(tiny):
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=4, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    return GPT2LMHeadModel(cfg)


def _bert(tiny):
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                     hidden_dropout_prob=0, attention_probs_dropout_prob=0)  # fmt: skip
    return BertForMaskedLM(cfg)


CASES = {
    "llama": (_llama, "model.layers", ("self_attn.o_proj", "mlp.down_proj")),
    "gpt2": (_gpt2, "transformer.h", ("attn.c_proj", "mlp.c_proj")),
    "bert": (_bert, "bert.encoder.layer", ("attention.output.dense", "output.dense")),
}


@pytest.mark.parametrize("name", CASES)
def test_training_forward_equals_hand_built_model(tiny, name):
    make, path, projections = CASES[name]
    torch.manual_seed(0)
    model = make(tiny)
    original = copy.deepcopy(model).eval()
    drop = LayerDrop(model, mode="stochastic_depth", theta_bar=0.3, seed=1).apply()
    ids = torch.randint(5, 64, (2, 12))
    model.train()
    for step in range(50):  # a draw with some blocks dropped and some kept
        drop.set_step(step)
        with torch.no_grad():
            logits = model(ids).logits
        if 0 < sum(drop.keep[0]) < 4:
            break
    keep, scale = drop.keep[0], drop.scale[0]
    assert scale == pytest.approx([1 / p for p in keep_probs(0.3, 4)])

    # By hand: the dropped blocks removed, each kept block's branch projections multiplied by 1/p_l.
    reference = copy.deepcopy(original)
    blocks = reference.get_submodule(path)
    with torch.no_grad():
        for block, s in zip(blocks, scale):
            for proj in projections:
                for p in block.get_submodule(proj).parameters():
                    p.mul_(s)
    kept = [b for b, k in zip(blocks, keep) if k]
    parent, attr = path.rsplit(".", 1)
    setattr(reference.get_submodule(parent), attr, torch.nn.ModuleList(kept))
    reference.config.num_hidden_layers = len(kept)
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(ids).logits)

    # eval: every block, unscaled, bitwise the original model
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)
    drop.undo()
    assert all("forward" not in vars(m) for m in model.modules())


def test_theta_one_at_step_zero_changes_nothing(tiny):
    model = _llama(tiny)
    original = copy.deepcopy(model)
    drop = LayerDrop(model, theta_bar=0.5, gamma=1e-3).apply()
    drop.set_step(0)
    ids = torch.randint(5, 64, (2, 12))
    with torch.no_grad():
        assert torch.equal(model.train()(ids).logits, original.train()(ids).logits)
    assert drop.keep[0] == [True] * 4 and drop.scale[0] == [1.0] * 4


def test_keep_frequencies_match_p(tiny):
    drop = LayerDrop(_llama(tiny), mode="stochastic_depth", theta_bar=0.4, seed=3)
    n = 3000
    counts = [0] * 4
    for step in range(n):
        drop.set_step(step)
        for i, k in enumerate(drop.draw(0)):
            counts[i] += k
    for c, p in zip(counts, keep_probs(0.4, 4)):  # p = .85 .7 .55 .4; 4 sigma at n = 3000 is < 0.037
        assert abs(c / n - p) < 0.04
    assert drop.mean_keep_fraction() == pytest.approx(sum(counts) / (4 * n))


class GradProbe(TrainerCallback):
    """At each optimizer step: which blocks were kept in the forward, and which have gradients."""

    def __init__(self, drop):
        self.drop, self.seen = drop, []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        has_grad = [any(p.grad is not None for p in b.parameters()) for b in model.model.layers]
        self.seen.append((list(self.drop.keep[0]), has_grad))


def _stock_run(tiny, max_steps=8, resume=None, **args):
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(tiny.config(num_hidden_layers=4))
    drop = LayerDrop(model, theta_bar=0.3, gamma=0.5, seed=0)
    probe = GradProbe(drop)
    targs = tiny.args(max_steps=max_steps, **args)
    trainer = Trainer(model=model, args=targs, train_dataset=tiny.rows(64), callbacks=[drop.callback(), probe])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, drop, probe


def test_stock_trainer_skipped_blocks_get_no_gradient_and_resume_is_bitwise(tiny, tmp_path):
    trainer, drop, probe = _stock_run(tiny, save_strategy="steps", save_steps=1)
    assert all(keep == grads for keep, grads in probe.seen)
    assert any(not all(keep) for keep, _ in probe.seen)  # something was dropped
    assert probe.seen[0][0] == [True] * 4  # theta(0) = 1
    assert not drop.applied and all("forward" not in vars(m) for m in trainer.model.modules())
    losses = tiny.losses(trainer)
    resumed, _, _ = _stock_run(tiny, resume=str(tmp_path / "checkpoint-3"), save_strategy="steps", save_steps=1)
    assert tiny.losses(resumed) == losses  # restored history + steps 4..8, bitwise


def test_gradient_checkpointing_recompute_uses_the_same_draw(tiny):
    plain, _, p1 = _stock_run(tiny, max_steps=6)
    ckpt, _, p2 = _stock_run(tiny, max_steps=6, activation_checkpointing=True)
    assert tiny.losses(plain) == tiny.losses(ckpt) and p1.seen == p2.seen


def test_efftrainer_recipe_sets_ddp_flag_and_reports(tiny_recipe):
    data = tiny_recipe(
        model={"config_overrides": {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128}},
        data={"max_length": 32, "max_train_samples": 32},
        training={"max_steps": 4, "per_device_train_batch_size": 4},
        techniques=[{"name": "layer_dropping", "mode": "stochastic_depth", "theta_bar": 0.5}],
    )
    built = build(Recipe.parse(data))
    assert built.args.ddp_find_unused_parameters is True
    built.trainer.train()
    (tech,) = built.techniques
    rep = tech.report()
    assert rep["keep_probs_final"] == pytest.approx([0.875, 0.75, 0.625, 0.5])
    assert 0 < rep["mean_keep_fraction"] < 1
    assert not tech.drop.applied


def test_bad_recipes_rejected(tiny_recipe):
    data = tiny_recipe(training={"ddp_find_unused_parameters": False}, techniques=[{"name": "layer_dropping"}])
    with pytest.raises(RecipeError, match="ddp_find_unused_parameters") as e:
        make_techniques(Recipe.parse(data), Env())
    assert e.value.path == "techniques[0]"
    both = tiny_recipe(techniques=[{"name": "layer_dropping"}, {"name": "progressive_stacking"}])
    with pytest.raises(RecipeError, match="cannot be combined"):
        make_techniques(Recipe.parse(both), Env())
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))
    with pytest.raises(RecipeError, match="T5Block.*supported: .*LlamaDecoderLayer"):
        LayerDrop(t5)


@pytest.mark.parametrize("kwargs", [{"theta_bar": 0}, {"theta_bar": 1.5}, {"gamma": -1}, {"mode": "random"}])
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        LayerDroppingConfig(**kwargs)


def test_technique_contract():
    assert get_technique("layer_dropping") is LayerDroppingTechnique
    assert "2010.13369" in LayerDroppingTechnique.paper and "1603.09382" in LayerDroppingTechnique.paper
    for name, field in LayerDroppingConfig.model_fields.items():
        assert name == "name" or field.description


@pytest.mark.slow
def test_ddp_two_cpu_processes_with_layer_dropping_and_freezing(tmp_path, tiny_recipe):
    recipe = tiny_recipe(
        model={"config_overrides": {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128}},
        data={"max_length": 32, "max_train_samples": 64},
        training={"max_steps": 6, "per_device_train_batch_size": 4},
        techniques=[
            {"name": "layer_dropping", "theta_bar": 0.3, "gamma": 0.5},
            {"name": "layer_freezing", "final_fraction": 0.5, "start_step": 2, "end_step": 4},
        ],
    )
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu_ddp.yaml",
           "--main_process_port", "29531", "-m", "hf_efftrain", "train", str(path)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "run_report.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 6
    drop, freeze = (t["report"] for t in report["techniques"])
    assert drop["mean_keep_fraction"] < 1
    assert freeze["frozen_history"] == [{"step": 3, "frozen_layers": 1}, {"step": 4, "frozen_layers": 2}]
