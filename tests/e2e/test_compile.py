"""``training.torch_compile`` with the techniques that patch forwards (token_dropping, layer_dropping) and packing's
masks, on the CPU with inductor: the run trains, its losses match the eager run's for the same seed, and dynamo
compiles a bounded number of graphs (no recompile per step: random keep patterns, a moving kept count K and moving
1/p scales are all absorbed); the combinations we refuse are refused before anything loads."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from hf_efftrain import Recipe, RecipeError
from hf_efftrain.core.build import build

# Inductor's fused kernels round differently from eager ATen (a few ulps per op); over a handful of steps at
# lr 3e-3 the logged losses stay within this relative tolerance. A mask or a token selection that differed would
# move them by 1e-2 or more.
LOSS_RTOL = 1e-4


class GraphCounter(TrainerCallback):
    """Dynamo's count of compiled graphs after each optimizer step."""

    def __init__(self):
        self.graphs: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        from torch._dynamo.utils import counters

        self.graphs.append(counters["stats"]["unique_graphs"])


def losses(trainer) -> list[float]:
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def run(recipe: dict, compiled: bool) -> tuple[list[float], list[int], object]:
    import torch._dynamo

    training = {**recipe["training"], "torch_compile": compiled}
    if not compiled:  # a backend or mode alone turns TrainingArguments.torch_compile on
        training = {k: v for k, v in training.items() if k not in ("torch_compile_backend", "torch_compile_mode")}
    recipe = {**recipe, "training": training}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    built = build(Recipe.parse(recipe))
    counter = GraphCounter()
    built.trainer.add_callback(counter)
    # Hitting the per-function recompile limit would make dynamo fall back to eager silently: fail instead, with a
    # limit below dynamo's default 8 (each patched function here needs at most 3 versions).
    with torch._dynamo.config.patch(recompile_limit=4, fail_on_recompile_limit_hit=True):
        built.trainer.train()
    assert (counter.graphs[-1] > 0) == compiled, counter.graphs  # the eager run compiled nothing
    return losses(built.trainer), counter.graphs, built


@pytest.mark.slow
def test_packing_token_and_layer_dropping_compile_like_eager(tiny_recipe):
    # Packed rows (block-diagonal masks from position ids), random-LTD with K growing from 16 to 64 over 6 steps,
    # then keep 1.0 (the layers' own forward again), PLD with theta(t) moving every step, and the chunked loss (a
    # data-dependent count of labelled rows: recompiled at every step if dynamo traced it).
    recipe = tiny_recipe(
        model={"name_or_path": "builtin:tiny-llama", "config_overrides": {"num_hidden_layers": 4}},
        data={"max_train_samples": 128},
        training={"max_steps": 10, "torch_compile_backend": "inductor"},
        techniques=[
            {"name": "packing"},
            {"name": "token_dropping", "keep_start": 0.25, "schedule_steps": 6, "multiple_of": 8},
            {"name": "layer_dropping", "theta_bar": 0.5, "gamma": 0.3},
            {"name": "fused_kernels", "backend": "torch"},  # its chunked loss runs eagerly inside the compiled head
        ],
    )
    eager, _, _ = run(recipe, compiled=False)
    compiled, graphs, built = run(recipe, compiled=True)
    assert len(compiled) == len(eager) == 10
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=LOSS_RTOL, atol=0)
    assert eager[-1] < eager[0]
    assert graphs[0] > 0 and graphs[-1] == graphs[6], graphs  # compiled; nothing new once K stopped moving
    td = next(t for t in built.techniques if t.name == "token_dropping")
    assert td.dropper.keep == 1.0 and td.dropper.last_indices  # dropped tokens in the first steps, none at the end
    ld = next(t for t in built.techniques if t.name == "layer_dropping")
    assert 0 < ld.drop.mean_keep_fraction() < 1  # some blocks were skipped, under compile too
    assert next(t for t in built.techniques if t.name == "fused_kernels").report()["loss_calls"] == 10


@pytest.mark.slow
def test_masked_lm_importance_dropping_and_token_masking_compile_like_eager(tiny_recipe):
    # Hou et al.'s importance dropping on BERT: the selection (a forward pre-hook) and the loss bookkeeping (a forward
    # hook: boolean indexing, bincount) run outside the graph; token_masking re-masks every batch. Dropout off: the
    # compiled dropout draws its own random numbers, so losses would differ from eager for that reason alone.
    recipe = tiny_recipe(
        model={"name_or_path": "builtin:tiny-bert", "config_overrides": {
            "num_hidden_layers": 4, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}},
        data={"max_train_samples": 64, "max_length": 32},
        training={"max_steps": 8, "torch_compile_backend": "inductor"},
        techniques=[
            {"name": "token_masking", "mask_rate": 0.3},
            {"name": "token_dropping", "strategy": "importance", "keep_start": 0.5, "schedule_steps": 4},
        ],
    )  # fmt: skip
    eager, _, _ = run(recipe, compiled=False)
    compiled, graphs, built = run(recipe, compiled=True)
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=LOSS_RTOL, atol=0)
    assert graphs[0] > 0 and graphs[-1] == graphs[4], graphs
    td = next(t for t in built.techniques if t.name == "token_dropping")
    assert td.dropper.keep == 1.0 and td.dropper.last_indices  # dropped in the first steps
    assert (td.dropper.importance.scores < 10.0).any()  # the EMA was updated by the compiled run's forward hook


@pytest.mark.slow
def test_dpo_compiles_like_eager(tiny_recipe):
    # Pairs of varying lengths (2B padded rows a step), the reference pass before the Trainer compiles the model,
    # the DPO loss on the compiled model's logits, and evaluations through the same loss.
    recipe = tiny_recipe(
        data={"train": "builtin:pref-synthetic", "max_train_samples": 64, "max_eval_samples": 16},
        training={"max_steps": 6, "per_device_train_batch_size": 4, "eval_strategy": "steps", "eval_steps": 3},
        techniques=[{"name": "dpo", "beta": 0.5}],
    )
    eager, _, _ = run(recipe, compiled=False)
    compiled, graphs, built = run(recipe, compiled=True)
    assert len(compiled) == len(eager) == 6
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=LOSS_RTOL, atol=0)
    assert graphs[0] > 0 and graphs[-1] <= graphs[1] + 1, graphs  # lengths go dynamic: no recompile per step
    evals = [e["eval_loss"] for e in built.trainer.state.log_history if "eval_loss" in e]
    assert len(evals) == 2 and all(0 < v < 1 for v in evals)


def test_layer_dropping_compiles_exactly_with_two_versions_per_block():
    # Dynamo alone (backend "eager", seconds): a new pattern of kept blocks every step, and theta(t) (hence the 1/p
    # scales) moving every step, reuse the same graphs; under gradient checkpointing too, with the eager losses and
    # gradients (the draws are seeded by the step, so both runs skip the same blocks).
    import torch._dynamo
    from torch._dynamo.utils import counters
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_efftrain.techniques.layer_dropping import LayerDrop

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                      num_key_value_heads=2, use_cache=False)  # fmt: skip
    ids = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        drop = LayerDrop(model, theta_bar=0.5, gamma=0.5, seed=0).apply()
        model.train()
        run = torch.compile(model, backend="eager") if compiled else model
        losses, patterns, graphs = [], set(), []
        with torch._dynamo.config.patch(recompile_limit=3, fail_on_recompile_limit_hit=True):
            for step in range(8):
                drop.set_step(step)
                model.zero_grad()
                loss = run(input_ids=ids, labels=ids).loss
                loss.backward()
                losses.append(loss.detach())
                patterns.add(tuple(drop.keep[0]))
                graphs.append(counters["stats"]["unique_graphs"])
        runs.append((torch.stack(losses), [p.grad for p in model.parameters()], patterns, graphs))
    (eager, eager_grads, _, _), (comp, comp_grads, patterns, graphs) = runs
    assert len(patterns) >= 5 and graphs[-1] == graphs[3] > 0, (patterns, graphs)  # new patterns, no new graphs
    torch.testing.assert_close(comp, eager, rtol=1e-6, atol=0)  # dynamo's graph: the same ops, a few ulps apart
    assert [g is None for g in comp_grads] == [g is None for g in eager_grads]  # the same blocks skipped (last step)
    for a, b in zip(comp_grads, eager_grads):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


# ---- refusals -------------------------------------------------------------------------------------------------
FREEZING = {"name": "layer_freezing", "final_fraction": 0.5}


@pytest.mark.parametrize(
    "training", [{"torch_compile": True}, {"torch_compile_backend": "inductor"}, {"torch_compile_mode": "default"}]
)
def test_gradual_layer_freezing_is_refused_before_training(tiny_recipe, training):
    # Each freeze state recompiles the whole model; past the recompile limit dynamo would silently run it eagerly.
    recipe = tiny_recipe(
        training=training, techniques=[{"name": "lion"}, {**FREEZING, "start_step": 2, "end_step": 6}]
    )
    with pytest.raises(RecipeError, match=r"techniques\[1\]\.name: layer_freezing .*training\.torch_compile") as e:
        Recipe.parse(recipe)
    assert "start_step == end_step" in str(e.value)  # says what would work
    for default_schedule in ({}, {"start_fraction": 0.2, "end_fraction": 0.8}, {"start_step": 2, "end_fraction": 0.5}):
        with pytest.raises(RecipeError, match="layer_freezing cannot run with training.torch_compile"):
            Recipe.parse(tiny_recipe(training=training, techniques=[{**FREEZING, **default_schedule}]))


def test_what_compiles_is_accepted(tiny_recipe):
    one_shot = [{**FREEZING, "start_step": 3, "end_step": 3}]  # one freeze state after step 3: one recompile
    Recipe.parse(tiny_recipe(training={"torch_compile": True}, techniques=one_shot))
    Recipe.parse(tiny_recipe(training={"torch_compile": True}, techniques=[{**FREEZING, "start_fraction": 0.5,
                                                                            "end_fraction": 0.5}]))  # fmt: skip
    Recipe.parse(tiny_recipe(training={"torch_compile": False}, techniques=[FREEZING]))  # eager: any schedule
    patched = [
        {"name": "packing"},
        {"name": "token_dropping"},
        {"name": "layer_dropping"},
        {"name": "seqlen_warmup", "warmup_steps": 4},
    ]
    Recipe.parse(tiny_recipe(training={"torch_compile": True}, techniques=patched))
