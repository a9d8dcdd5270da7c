"""Progressive layer freezing (FreezeOut / AutoFreeze style): the schedule by hand, no gradients and unchanged weights
in frozen blocks and the embeddings below them, backward never entering them, tied embeddings, restore, resume."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
)

from hf_efftrain import Recipe
from hf_efftrain.core.build import build, make_techniques
from hf_efftrain.core.registry import get_technique
from hf_efftrain.core.technique import Env
from hf_efftrain.errors import RecipeError
from hf_efftrain.techniques.layer_freezing import (
    LayerFreezer,
    LayerFreezingConfig,
    LayerFreezingTechnique,
    frozen_count,
)


def test_schedule_by_hand():
    # L = 4, f = 0.5, ramp from step 2 to 6: n = floor(2 * (t - 2) / 4)
    assert [frozen_count(t, 4, 0.5, 2, 6) for t in range(9)] == [0, 0, 0, 0, 1, 1, 2, 2, 2]
    assert [frozen_count(t, 4, 1.0, 0, 4) for t in range(6)] == [0, 1, 2, 3, 4, 4]
    assert [frozen_count(t, 6, 0.5, 3, 3) for t in (2, 3, 10)] == [0, 3, 3]  # a step at start == end
    assert frozen_count(7, 12, 0.75, 0, 10) == 6  # floor(9 * 0.7)


class Probe(TrainerCallback):
    """Per optimizer step: frozen count, which blocks / embeddings have gradients; and whether autograd entered each
    block (a block whose output does not require grad is never visited by backward)."""

    def __init__(self, freezer):
        self.freezer, self.steps, self.entered = freezer, [], []
        for block in freezer.blocks:
            block.register_forward_hook(
                lambda m, a, out: self.entered.append(out.requires_grad) if m.training else None
            )

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        blocks = [any(p.grad is not None for p in b.parameters()) for b in self.freezer.blocks]
        emb = model.get_input_embeddings().weight.grad is not None
        entered = self.entered[-len(blocks) :]
        self.steps.append((self.freezer.frozen, blocks, emb, entered))


def _run(tiny, max_steps=8, resume=None, **args):
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(tiny.config(num_hidden_layers=4))
    freezer = LayerFreezer(model, final_fraction=0.5, start_step=2, end_step=6)
    probe = Probe(freezer)
    trainer = Trainer(
        model=model, args=tiny.args(max_steps=max_steps, **args), train_dataset=tiny.rows(64),
        callbacks=[freezer.callback(), probe],
    )  # fmt: skip
    snapshots = {}

    class Snap(TrainerCallback):  # weights right after each block froze
        def on_step_begin(self, args, state, control, **kw):
            for i in range(freezer.frozen):
                snapshots.setdefault(i, {k: v.clone() for k, v in freezer.blocks[i].state_dict().items()})
            if freezer.frozen:
                snapshots.setdefault("emb", model.get_input_embeddings().weight.detach().clone())

    trainer.add_callback(Snap())
    trainer.train(resume_from_checkpoint=resume)
    return trainer, freezer, probe, snapshots


def test_frozen_blocks_get_no_gradient_keep_their_weights_and_cost_no_backward(tiny, tmp_path):
    trainer, freezer, probe, snaps = _run(tiny, save_strategy="steps", save_steps=1)
    assert [s[0] for s in probe.steps] == [0, 0, 0, 0, 1, 1, 2, 2]  # n(t) for t = 0..7
    for n, blocks, emb, entered in probe.steps:
        assert blocks == [i >= n for i in range(4)]
        assert emb == (n == 0)  # the embedding freezes with the first block
        assert entered == [i >= n for i in range(4)]  # backward starts at block n
    for i in (0, 1):
        for k, v in freezer.blocks[i].state_dict().items():
            assert torch.equal(v, snaps[i][k]), (i, k)
    assert torch.equal(trainer.model.get_input_embeddings().weight, snaps["emb"])
    # train end restores every flag; the optimizer kept all parameters (checkpoints look alike in every stage)
    assert all(p.requires_grad for p in trainer.model.parameters())
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(list(trainer.model.parameters()))
    assert freezer.layer_step_fraction(8) == pytest.approx((4 * 4 + 3 * 2 + 2 * 2) / (4 * 8))

    losses = tiny.losses(trainer)
    for ckpt in (2, 5):  # before freezing, with one block frozen
        resumed, _, probe2, _ = _run(tiny, resume=str(tmp_path / f"checkpoint-{ckpt}"), save_strategy="no")
        assert tiny.losses(resumed) == losses, ckpt  # restored history + the new steps, bitwise
        assert [s[0] for s in probe2.steps] == [0, 0, 0, 0, 1, 1, 2, 2][ckpt:]


def _gpt2():
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=4, bos_token_id=1, eos_token_id=2)
    model = GPT2LMHeadModel(cfg)
    return model, model.transformer.h, model.transformer.wte, [model.transformer.wpe.weight]


def _bert():
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64)
    model = BertForMaskedLM(cfg)
    emb = model.bert.embeddings
    frozen = [emb.position_embeddings.weight, emb.token_type_embeddings.weight, emb.LayerNorm.weight]
    return model, model.bert.encoder.layer, emb.word_embeddings, frozen


@pytest.mark.parametrize("make", [_gpt2, _bert], ids=["gpt2", "bert"])
def test_tied_embedding_keeps_training_through_the_head_but_backward_stops(make):
    model, blocks, wte, others = make()
    assert model.get_output_embeddings().weight is wte.weight
    freezer = LayerFreezer(model, final_fraction=0.5, start_step=0, end_step=0)
    freezer.freeze(2)
    assert wte.weight.requires_grad and not any(p.requires_grad for p in others)
    outs = []
    hook = blocks[1].register_forward_hook(lambda m, a, out: outs.append(out))
    ids = torch.randint(3, 64, (2, 10))
    model(input_ids=ids, labels=ids).loss.backward()
    assert not outs[0].requires_grad  # nothing below block 2 is differentiated
    assert wte.weight.grad is not None  # through the head
    assert all(p.grad is None for b in blocks[:2] for p in b.parameters())
    assert all(p.grad is not None for b in blocks[2:] for p in b.parameters())
    freezer.undo()
    hook.remove()
    assert "forward" not in vars(wte) and all(p.requires_grad for p in model.parameters())


def test_undo_keeps_parameters_that_were_frozen_before(tiny):
    model = LlamaForCausalLM(tiny.config(num_hidden_layers=4))
    model.model.layers[3].mlp.up_proj.weight.requires_grad_(False)  # e.g. frozen by the user or PEFT
    freezer = LayerFreezer(model, final_fraction=1.0, start_step=0, end_step=0)
    freezer.freeze(4)
    assert not any(p.requires_grad for b in model.model.layers for p in b.parameters())
    freezer.freeze(1)  # unfreezing blocks 1..3 must not unfreeze what was frozen before us
    assert not model.model.layers[3].mlp.up_proj.weight.requires_grad
    freezer.undo()
    assert not model.model.layers[3].mlp.up_proj.weight.requires_grad
    assert sum(not p.requires_grad for p in model.parameters()) == 1


def test_efftrainer_recipe_with_fractions(tiny_recipe):
    data = tiny_recipe(
        model={"config_overrides": {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128}},
        data={"max_length": 32, "max_train_samples": 32},
        training={"max_steps": 8, "per_device_train_batch_size": 4},
        techniques=[{"name": "layer_freezing", "final_fraction": 0.75, "start_fraction": 0.25, "end_fraction": 0.75}],
    )
    built = build(Recipe.parse(data))
    assert built.args.ddp_find_unused_parameters is True
    built.trainer.train()
    rep = built.techniques[0].report()
    # start 2, end 6; n = floor(3 (t - 2) / 4): 0 at t=2, 1 at t=4, 2 at t=5, 3 at t=6
    assert rep["start_step"] == 2 and rep["end_step"] == 6
    assert rep["frozen_history"] == [{"step": s, "frozen_layers": n} for s, n in ((4, 1), (5, 2), (6, 3))]


@pytest.mark.parametrize(
    "cfg,field",
    [
        ({"start_step": 1, "start_fraction": 0.1}, "start_step"),
        ({"end_step": 1, "end_fraction": 0.1}, "end_step"),
        ({"start_step": 5, "end_step": 3}, "end_step"),
        ({"start_fraction": 0.5, "end_fraction": 0.2}, "end_fraction"),
    ],
)
def test_bad_recipes_rejected(tiny_recipe, cfg, field):
    data = tiny_recipe(techniques=[{"name": "layer_freezing", **cfg}])
    with pytest.raises(RecipeError) as e:
        make_techniques(Recipe.parse(data), Env())
    assert e.value.path == f"techniques[0].{field}"


@pytest.mark.parametrize("kwargs", [{"final_fraction": 0}, {"final_fraction": 1.5}, {"start_step": -1}])
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        LayerFreezingConfig(**kwargs)


def test_technique_contract():
    assert get_technique("layer_freezing") is LayerFreezingTechnique
    assert "1706.04983" in LayerFreezingTechnique.paper
    for name, field in LayerFreezingConfig.model_fields.items():
        assert name == "name" or field.description
