"""Progressive stacking (Gong et al. 2019): the copy rule against hand-built models, optimizer groups and state after
growth, the lr schedule continuing, and resume inside every stage (bitwise on CPU fp32)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    Trainer,
)

from hf_efftrain import Recipe
from hf_efftrain.core.build import build, make_techniques
from hf_efftrain.core.registry import get_technique
from hf_efftrain.core.technique import Env
from hf_efftrain.errors import RecipeError
from hf_efftrain.techniques.progressive_stacking import (
    STATE_FILE,
    ProgressiveStacking,
    ProgressiveStackingConfig,
    ProgressiveStackingTechnique,
    extend_optimizer,
    stack_layers,
    stage_depths,
    truncate_layers,
)

SMALL = {"vocab_size": 64, "num_attention_heads": 4}


def _models():
    yield "llama", lambda tiny: LlamaForCausalLM(tiny.config(num_hidden_layers=4)), "model.layers"
    gpt2 = GPT2Config(
        n_embd=32, n_layer=4, scale_attn_by_inverse_layer_idx=True, bos_token_id=1, eos_token_id=2, **SMALL
    )
    yield "gpt2", lambda tiny: GPT2LMHeadModel(gpt2), "transformer.h"
    bert = BertConfig(hidden_size=32, num_hidden_layers=4, intermediate_size=64, **SMALL)
    yield "bert", lambda tiny: BertForMaskedLM(bert), "bert.encoder.layer"


@pytest.mark.parametrize("make,prefix", [(m, p) for _, m, p in _models()], ids=[n for n, _, _ in _models()])
def test_grown_model_equals_hand_built_copy(tiny, make, prefix):
    torch.manual_seed(0)
    model = make(tiny).eval()
    truncate_layers(model, 2)
    assert model.config.num_hidden_layers == 2
    with torch.no_grad():  # "trained" shallow weights: nothing like the fresh init of a 4-layer model
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    shallow = {k: v.clone() for k, v in model.state_dict().items()}

    sources = stack_layers(model)
    stack = model.get_submodule(prefix)
    assert list(sources) == list(stack[2:].parameters()) and list(sources.values()) == list(stack[:2].parameters())
    assert model.config.num_hidden_layers == 4

    # By hand: a fresh 4-layer model whose layers i and i+2 both hold the trained layer i.
    torch.manual_seed(123)
    reference = make(tiny).eval()
    state = {}
    for key, value in shallow.items():
        state[key] = value
        if key.startswith(prefix + "."):
            i, rest = key[len(prefix) + 1 :].split(".", 1)
            state[f"{prefix}.{int(i) + 2}.{rest}"] = value
    reference.load_state_dict(state, strict=True)
    ids = torch.randint(5, 64, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    # per-layer indices follow the new positions (caches index by them)
    for j, block in enumerate(model.get_submodule(prefix)):
        idx = {m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)}
        assert idx == {j}


def test_partial_last_growth_copies_bottom_layers(tiny):
    assert stage_depths(1, 4) == [1, 2, 4] and stage_depths(2, 6) == [2, 4, 6] and stage_depths(3, 4) == [3, 4]
    model = LlamaForCausalLM(tiny.config(num_hidden_layers=6))
    stacker = ProgressiveStacking(model, start_layers=2, grow_at_steps=[1, 2])
    layers = model.model.layers
    stacker.grow()  # 2 -> 4: layer i -> i + 2
    assert [torch.equal(layers[i + 2].mlp.up_proj.weight, layers[i].mlp.up_proj.weight) for i in (0, 1)] == [1, 1]
    with torch.no_grad():  # training in between makes every layer different
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    before = [layer.mlp.up_proj.weight.clone() for layer in layers]
    stacker.grow()  # 4 -> 6: only layers 0, 1 -> 4, 5 (i -> i + L, L = 4)
    assert len(layers) == 6 and model.config.num_hidden_layers == 6
    after = [layer.mlp.up_proj.weight for layer in layers]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert torch.equal(after[4], before[0]) and torch.equal(after[5], before[1])
    assert after[4] is not after[0]  # copies, not ties


def _adam_after_one_step(model):
    trainer = Trainer(model=model, args=None)
    opt = trainer.create_optimizer()
    model(**{k: v[None] for k, v in _row().items()}).loss.backward()
    opt.step()
    return trainer, opt


def _row():
    ids = torch.arange(3, 19)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


@pytest.mark.parametrize("mode", ["copy", "reset"])
def test_optimizer_groups_like_a_fresh_trainer_optimizer(tiny, tmp_path, mode, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Trainer(args=None) writes to ./tmp_trainer
    model = LlamaForCausalLM(tiny.config(num_hidden_layers=4))
    truncate_layers(model, 2)
    trainer, opt = _adam_after_one_step(model)
    sources = stack_layers(model)
    assert extend_optimizer(opt, model, sources, copy_state=mode == "copy") == len(sources)

    fresh = Trainer(model=model, args=trainer.args).create_optimizer()
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [
        [id(p) for p in g["params"]] for g in fresh.param_groups
    ]
    for new, src in sources.items():
        if mode == "copy":
            assert set(opt.state[new]) == set(opt.state[src])
            for key, value in opt.state[src].items():
                assert torch.equal(opt.state[new][key], value) and opt.state[new][key] is not value
        else:
            assert not opt.state.get(new)
    fresh.load_state_dict(opt.state_dict())  # what resuming a checkpoint taken after growth does


def _stock_run(tiny, out, max_steps, resume=None, **args):
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(tiny.config(num_hidden_layers=4))
    stacker = ProgressiveStacking(model, start_layers=1, grow_at_steps=[2, 4])
    targs = tiny.args(**{"max_steps": max_steps, "save_strategy": "steps", "save_steps": 1, **args})
    targs.output_dir = str(out)
    trainer = Trainer(model=model, args=targs, train_dataset=tiny.rows(64), callbacks=[stacker.callback()])
    if resume:
        stacker.prepare_resume(resume)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, stacker


def test_stock_trainer_grows_on_schedule_and_resumes_in_every_stage(tiny, tmp_path):
    full, stacker = _stock_run(tiny, tmp_path / "full", 6)
    assert [h["depth"] for h in stacker.history] == [1, 2, 4] and [h["step"] for h in stacker.history] == [0, 2, 4]
    assert len(full.model.model.layers) == 4
    losses = tiny.losses(full)
    assert json.loads((tmp_path / "full" / "checkpoint-3" / STATE_FILE).read_text())["stage"] == 1
    for ckpt in (1, 2, 5):  # stage 0, right after the first growth, stage 2 (the EffTrainer test covers 3 and 4)
        resumed, st = _stock_run(tiny, tmp_path / "full", 6, resume=str(tmp_path / "full" / f"checkpoint-{ckpt}"))
        assert tiny.losses(resumed) == losses, ckpt  # restored history + the new steps, bitwise
        assert st.history == stacker.history


def test_lr_schedule_continues_across_growth(tiny, tmp_path):
    sched = {"lr_scheduler_type": "linear", "warmup_steps": 2, "save_strategy": "no"}
    grown, _ = _stock_run(tiny, tmp_path / "a", 7, **sched)
    plain = Trainer(
        model=LlamaForCausalLM(tiny.config(num_hidden_layers=4)),
        args=tiny.args(max_steps=7, **sched),
        train_dataset=tiny.rows(64),
    )
    plain.train()

    def lrs(t):
        return [e["learning_rate"] for e in t.state.log_history if "learning_rate" in e]

    assert lrs(grown) == lrs(plain) and len(set(lrs(grown))) > 3
    assert grown.lr_scheduler.last_epoch == 7
    # every group, copies included, is at the scheduler's current lr
    assert {g["lr"] for g in grown.optimizer.param_groups} == {plain.optimizer.param_groups[0]["lr"]}


def _recipe(tiny_recipe, **training):
    return tiny_recipe(
        model={"config_overrides": {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128}},
        data={"max_length": 32, "max_train_samples": 64},
        training={
            "max_steps": 6,
            "save_strategy": "steps",
            "save_steps": 1,
            "per_device_train_batch_size": 4,
            **training,
        },
        techniques=[{"name": "progressive_stacking", "start_layers": 1, "grow_at_fractions": [0.3, 0.6]}],
    )


def test_efftrainer_resume_restores_stage_before_weights(tiny_recipe, tmp_path):
    data = _recipe(tiny_recipe)
    first = build(Recipe.parse(data))
    first.trainer.train()
    baseline = [e["loss"] for e in first.trainer.state.log_history if "loss" in e]
    (stacking,) = first.techniques
    assert [h["depth"] for h in stacking.stacker.history] == [1, 2, 4]
    assert stacking.stacker.resolved_steps() == [2, 4]  # round(0.3 * 6), round(0.6 * 6)
    for ckpt in (3, 4):
        again = build(Recipe.parse(data))
        assert len(again.model.model.layers) == 1
        again.trainer.train(resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{ckpt}"))
        resumed = [e["loss"] for e in again.trainer.state.log_history if "loss" in e]
        assert resumed == baseline, ckpt  # restored history + the new steps, bitwise
        assert len(again.model.model.layers) == 4
    rep = stacking.report()
    assert rep["depths"] == [1, 2, 4] and rep["grow_at_steps"] == [2, 4]
    assert rep["layer_step_fraction"] == pytest.approx((1 * 2 + 2 * 2 + 4 * 2) / (4 * 6))


def test_gradient_checkpointing_follows_the_copies(tiny, tmp_path):
    plain, _ = _stock_run(tiny, tmp_path / "a", 5, save_strategy="no")
    ckpt, _ = _stock_run(tiny, tmp_path / "b", 5, save_strategy="no", activation_checkpointing=True)
    assert all(layer.gradient_checkpointing for layer in ckpt.model.model.layers)
    assert tiny.losses(plain) == tiny.losses(ckpt)


@pytest.mark.parametrize(
    "cfg,field",
    [
        ({"start_layers": 1, "start_fraction": 0.5}, "start_layers"),
        ({"grow_at_steps": [3, 3]}, "grow_at_steps"),
        ({"grow_at_steps": [2], "grow_at_fractions": [0.5]}, "grow_at_steps"),
        ({"grow_at_fractions": [0.5, 1.0]}, "grow_at_fractions"),
    ],
)
def test_bad_config_is_a_recipe_error(tiny_recipe, cfg, field):
    data = tiny_recipe(techniques=[{"name": "lion"}, {"name": "progressive_stacking", **cfg}])
    with pytest.raises(RecipeError) as e:
        make_techniques(Recipe.parse(data), Env())
    assert e.value.path == f"techniques[1].{field}"


def test_wrong_number_of_growths_and_multi_process_rejected(tiny_recipe):
    data = tiny_recipe(
        model={"config_overrides": {"num_hidden_layers": 4}},
        techniques=[{"name": "progressive_stacking", "start_layers": 1, "grow_at_steps": [2]}],
    )
    with pytest.raises(RecipeError, match=r"needs 2 values.*\[1, 2, 4\]") as e:
        build(Recipe.parse(data))
    assert e.value.path == "techniques[0].grow_at_steps"
    with pytest.raises(RecipeError, match="single-process"):
        make_techniques(Recipe.parse(data), Env(world_size=2))
    with pytest.raises(RecipeError, match="start_layers"):
        ProgressiveStacking(
            LlamaForCausalLM(LlamaForCausalLM.config_class(num_hidden_layers=2, **_tiny_dims())), start_layers=2
        )


def _tiny_dims():
    return {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4}


def test_technique_contract():
    assert get_technique("progressive_stacking") is ProgressiveStackingTechnique
    assert "PMLR 97" in ProgressiveStackingTechnique.paper
    for name, field in ProgressiveStackingConfig.model_fields.items():
        assert name == "name" or field.description


def test_refuses_to_copy_blocks_patched_by_another_technique(tiny):
    from hf_efftrain.techniques.layer_dropping import LayerDrop

    model = LlamaForCausalLM(tiny.config(num_hidden_layers=4))
    truncate_layers(model, 2)
    drop = LayerDrop(model).apply()
    with pytest.raises(RecipeError, match=r"cannot copy block 0: its forward is patched"):
        stack_layers(model)
    drop.undo()
    assert len(stack_layers(model)) > 0
