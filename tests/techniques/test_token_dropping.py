"""Token dropping (random-LTD, arXiv 2211.11586; importance, arXiv 2203.13240): bitwise identity at keep 1.0 and in
eval, gather/scatter against a hand-built reference, the importance EMA by hand, undo, resume, real Trainer steps,
and dynamo compiling it with a moving kept count without a recompile per step."""

from __future__ import annotations

import io

import pydantic
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

from hf_efftrain import Recipe, RecipeError, train
from hf_efftrain.core.registry import get_technique
from hf_efftrain.techniques.token_dropping import (
    Selection,
    TokenDropper,
    TokenDroppingCallback,
    TokenDroppingConfig,
    TokenDroppingTechnique,
    TokenImportance,
    keep_fraction,
    kept_count,
    put,
    run_on_subset,
    segment_positions,
    take,
)

S = 16


def llama(tiny, attn="sdpa", layers=4):
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM._from_config(tiny.config(num_hidden_layers=layers), attn_implementation=attn)


def gpt2(attn="eager"):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=4, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg.bos_token_id = cfg.eos_token_id = 2
    return GPT2LMHeadModel._from_config(cfg, attn_implementation=attn)


def bert(attn="sdpa"):
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
    )  # fmt: skip
    return BertForMaskedLM._from_config(cfg, attn_implementation=attn)


def batch(pad: bool = False, b: int = 3):
    ids = torch.randint(8, 128, (b, S), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if pad:
        mask[1, 11:] = 0
        ids[1, 11:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_kept_count_and_schedule():
    assert kept_count(512, 0.5) == 256
    assert kept_count(100, 0.5) == 48  # 50 -> nearest multiple of 8
    assert kept_count(10, 0.3) == 3  # below 8: plain rounding
    assert kept_count(5, 0.01) == 1 and kept_count(16, 1.0) == 16 and kept_count(16, 0.99) == 16
    assert keep_fraction(0, 0.5, 100, 10) == 0.5 and keep_fraction(10, 0.5, 100, 10) == 0.5
    assert keep_fraction(60, 0.5, 100, 10) == pytest.approx(0.75)
    assert keep_fraction(500, 0.5, 100, 10) == 1.0 and keep_fraction(500, 0.5, None) == 0.5


def test_segment_positions_for_packed_rows():
    # Three packed documents; flash attention finds them from restarts of the (renumbered) position ids.
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    assert segment_positions(pos, torch.tensor([[0, 2, 3, 5, 6, 8, 9]])).tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert segment_positions(pos, torch.tensor([[1, 2, 7]])).tolist() == [[0, 1, 0]]  # doc 2 dropped entirely
    assert segment_positions(torch.arange(10)[None], torch.tensor([[1, 4, 9]])).tolist() == [[0, 1, 2]]


def test_take_and_put_are_row_copies_of_the_flat_view():
    # One index_select / index_copy on (B*S, H) rows b*S + idx[b]: the same values as the element-wise gather and
    # scatter by hand, a batch of 1 (rotary cos/sin, position ids) shared by every row, gradients to both paths.
    x = torch.arange(30.0).view(3, 5, 2).requires_grad_()
    idx = torch.tensor([[0, 3], [1, 2], [2, 4]])
    sel = Selection.of(idx, 5)
    assert sel.flat.tolist() == [0, 3, 6, 7, 12, 14]
    sub = take(x, sel)
    assert torch.equal(sub, torch.stack([x[b, idx[b]] for b in range(3)]))
    assert torch.equal(take(x[:1], sel), torch.stack([x[0, idx[b]] for b in range(3)]))
    out = put(x, sub * 10, sel)
    expected = x.detach().clone()
    for b in range(3):
        expected[b, idx[b]] *= 10
    assert torch.equal(out, expected)
    out.sum().backward()
    grad = torch.ones(3, 5, 2)
    for b in range(3):
        grad[b, idx[b]] = 10.0  # kept rows: through the layer (x10); dropped rows: the identity
    assert torch.equal(x.grad, grad)


def test_packed_flash_kwargs_follow_the_kept_tokens():
    # What the packing technique sends for flash attention: position ids restarting per document + cu_seq_lens.
    seen = {}

    def layer(hidden_states, attention_mask=None, position_ids=None, **kwargs):  # records what the kernel would get
        seen.update(kwargs, position_ids=position_ids, mask=attention_mask)
        return hidden_states * 2

    import inspect

    from hf_efftrain.techniques.token_dropping import DropPolicy

    h = torch.arange(20.0).view(2, 5, 2)
    pos = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])
    idx = torch.tensor([[0, 2, 3], [1, 3, 4]])
    full = {"cu_seq_lens_q": torch.tensor([0, 3, 5, 7, 10]), "max_length_q": 3}
    policy = DropPolicy(position_ids="position_ids")
    out = run_on_subset(layer, inspect.signature(layer), policy, idx, (h,), {"position_ids": pos, **full})
    assert seen["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]
    assert seen["cu_seq_lens_q"].tolist() == [0, 2, 3, 4, 6]  # [0 2] [3] [1] [3 4]
    assert seen["max_length_q"] == 3  # an upper bound, min(full rows' 3, K = 3): no host sync to find the 2
    assert seen["mask"] is None
    expected = h.clone()
    for b in range(2):
        expected[b, idx[b]] *= 2
    assert torch.equal(out, expected)
    # Segment [5, 7) (row 1's first document) fully dropped: it stays, with length 0, so no count leaves the device.
    run_on_subset(layer, inspect.signature(layer), policy, torch.tensor([[0, 1, 3], [2, 3, 4]]), (h,),
                  {"position_ids": pos, **full, "max_length_q": 2})  # fmt: skip
    assert seen["cu_seq_lens_q"].tolist() == [0, 2, 3, 3, 6] and seen["max_length_q"] == 2
    assert seen["position_ids"].tolist() == [[0, 1, 0], [0, 1, 2]]


@pytest.mark.parametrize("make", ["llama-sdpa", "llama-eager", "gpt2", "bert"])
def test_identity_at_keep_one_and_in_eval(tiny, make):
    model = {"llama-sdpa": lambda: llama(tiny), "llama-eager": lambda: llama(tiny, "eager"), "gpt2": gpt2,
             "bert": bert}[make]()  # fmt: skip
    inputs = batch(pad=True)
    model.train()
    with torch.no_grad():
        expected = model(**inputs).logits
        dropper = TokenDropper(model, keep=1.0)
        assert torch.equal(model(**inputs).logits, expected)  # bitwise: the original forward runs
        dropper.keep = 0.5
        assert not torch.equal(model(**inputs).logits, expected)
        model.eval()
        dropper.last_indices.clear()
        assert torch.equal(model(**inputs).logits, expected)  # eval: every layer sees every token
        assert dropper.last_indices == {}


def _causal_reference_mask(idx, attn, kind, dtype):
    """Hand-built mask of the kept subsequence: kept query i sees kept key j iff pos_j <= pos_i and j is no pad."""
    allowed = (idx[:, None, :] <= idx[:, :, None]) & torch.gather(attn, 1, idx).bool()[:, None, :]
    allowed = allowed[:, None]
    return allowed if kind == "sdpa" else torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pad", [False, True])
def test_llama_gather_scatter_matches_reference(tiny, attn, pad):
    model = llama(tiny, attn)
    dropper = TokenDropper(model, keep=0.5)
    assert dropper.layer_ids == [1, 2]
    seen = {}
    layer = model.model.layers[1]
    layer.register_forward_hook(lambda m, a, kw, out: seen.update(h=a[0], out=out), with_kwargs=True)
    inputs = batch(pad)
    model.train()
    with torch.no_grad():
        model(**inputs)
        idx = dropper.last_indices[1]
        assert idx.shape == (3, 8) and torch.all(idx[:, 1:] > idx[:, :-1])  # K = 8 sorted, distinct
        assert not torch.equal(idx, dropper.last_indices[2])  # layers draw independently
        h, out = seen["h"], seen["out"]
        dropped = torch.ones(3, S, dtype=torch.bool).scatter(1, idx, False)
        assert torch.equal(out[dropped], h[dropped])  # dropped tokens pass through unchanged
        sub = torch.gather(h, 1, idx[..., None].expand(-1, -1, h.shape[-1]))
        cos_sin = model.model.rotary_emb(sub, position_ids=idx)  # rotary at the kept tokens' original positions
        mask = _causal_reference_mask(idx, inputs["attention_mask"], attn, h.dtype)
        ref = type(layer).forward(layer, sub, attention_mask=mask, position_embeddings=cos_sin)
        kept = torch.gather(out, 1, idx[..., None].expand(-1, -1, h.shape[-1]))
        torch.testing.assert_close(kept, ref, rtol=1e-5, atol=1e-5)


def test_gpt2_gather_scatter_matches_reference():
    model = gpt2()
    dropper = TokenDropper(model, keep=0.5)
    seen = {}
    block = model.transformer.h[2]
    block.register_forward_hook(lambda m, a, kw, out: seen.update(h=a[0], out=out), with_kwargs=True)
    inputs = batch(pad=True)
    model.train()
    with torch.no_grad():
        model(**inputs)
        idx, h, out = dropper.last_indices[2], seen["h"], seen["out"]
        dropped = torch.ones(3, S, dtype=torch.bool).scatter(1, idx, False)
        assert torch.equal(out[dropped], h[dropped])
        sub = torch.gather(h, 1, idx[..., None].expand(-1, -1, h.shape[-1]))
        ref = type(block).forward(
            block, sub, None, _causal_reference_mask(idx, inputs["attention_mask"], "e", h.dtype)
        )
        torch.testing.assert_close(torch.gather(out, 1, idx[..., None].expand(-1, -1, h.shape[-1])), ref)


def test_gradients_flow_through_kept_and_dropped_tokens(tiny):
    model = llama(tiny)
    TokenDropper(model, keep=0.5)
    model.train()
    ids = batch()["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.model.layers[1].mlp.up_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_recomputes_the_same_subset(tiny, use_reentrant):
    # The gather/scatter wraps the (checkpointed) layer forward, so the backward replay sees the same tokens.
    ids = batch()["input_ids"]
    grads = []
    for checkpointing in (False, True):
        model = llama(tiny)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
        TokenDropper(model, keep=0.5, seed=1)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_undo_restores_and_saved_model_is_plain(tiny, tmp_path):
    model = llama(tiny)
    inputs = batch()
    model.train()
    with torch.no_grad():
        expected = model(**inputs).logits
    keys = set(model.state_dict())
    dropper = TokenDropper(model, keep=0.5)
    assert all("forward" in vars(model.model.layers[i]) for i in (1, 2))
    dropper.undo()
    assert all("forward" not in vars(layer) for layer in model.model.layers)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)
    assert set(model.state_dict()) == keys
    model.save_pretrained(tmp_path / "m")
    reloaded = type(model).from_pretrained(tmp_path / "m")
    assert all("forward" not in vars(layer) for layer in reloaded.model.layers)


def test_resume_reproduces_random_indices(tiny):
    model = llama(tiny)
    dropper = TokenDropper(model, keep=0.5, seed=3)
    model.train()
    inputs = batch()
    with torch.no_grad():
        model(**inputs)
        state = {k: v.clone() for k, v in dropper.state_dict().items()}
        model(**inputs)
        expected = {i: t.clone() for i, t in dropper.last_indices.items()}
    dropper.undo()
    resumed = TokenDropper(model, keep=0.5, seed=999)
    resumed.load_state_dict(state)
    with torch.no_grad():
        model(**inputs)
    assert all(torch.equal(resumed.last_indices[i], expected[i]) for i in (1, 2))


def test_importance_ema_and_selection_by_hand():
    imp = TokenImportance(vocab_size=10, special_ids=[0, 1, 2], pad_id=0, init=10.0, beta=0.9)
    imp.update(torch.tensor([5, 5, 7]), torch.tensor([1.0, 3.0, 5.0]))
    # id 5: 0.9 * 10 + 0.1 * mean(1, 3) = 9.2; id 7: 0.9 * 10 + 0.1 * 5 = 9.5; others untouched
    assert imp.scores[5].item() == pytest.approx(9.2) and imp.scores[7].item() == pytest.approx(9.5)
    assert imp.scores[6].item() == 10.0
    imp.scores[8] = 1.0
    ids = torch.tensor([[1, 5, 7, 8, 6, 2, 0, 0], [1, 8, 8, 8, 8, 8, 8, 2]])
    attn = (ids != 0).long()
    kept = imp.select(ids, 4, attn)
    # row 0: CLS(1) and SEP(2) always, then id 6 (10.0) and id 7 (9.5); id 8 (1.0) and padding dropped
    assert kept[0].tolist() == [0, 2, 4, 5]
    assert kept[1].tolist() == [0, 1, 2, 7]  # ties broken by position; specials kept
    assert imp.select(ids, 7, attn)[0].tolist() == [0, 1, 2, 3, 4, 5, 6]  # only when K > real tokens is pad kept


def test_importance_strategy_on_bert_skips_middle_layers():
    model = bert()
    imp = TokenImportance(128, special_ids=[1, 2, 3], pad_id=0, beta=0.5)
    dropper = TokenDropper(model, strategy="importance", keep=0.5, importance=imp)
    assert dropper.layer_ids == [2]  # layers 0-1 full (L // 2), layer 3 full: dropped tokens rejoin before it
    inputs = batch(pad=True)
    inputs["input_ids"][:, 0], inputs["input_ids"][:, -1] = 1, 2
    inputs["input_ids"][1, 10], inputs["input_ids"][1, 11:] = 2, 0  # row 1: SEP, then padding
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, 4] = inputs["input_ids"][:, 4]
    seen = {}
    layer = model.bert.encoder.layer[2]
    layer.register_forward_hook(lambda m, a, kw, out: seen.update(h=a[0], out=out), with_kwargs=True)
    model.train()
    with torch.no_grad():
        model(**inputs, labels=labels)
    idx = dropper.last_indices[2]
    assert idx.shape == (3, 8)
    for row in range(3):
        specials = torch.isin(inputs["input_ids"][row], torch.tensor([1, 2])).nonzero().flatten().tolist()
        assert len(specials) == 2 and set(specials) <= set(idx[row].tolist())
    assert not set(range(11, S)) & set(idx[1].tolist())  # padding never kept
    dropped = torch.ones(3, S, dtype=torch.bool).scatter(1, idx, False)
    assert torch.equal(seen["out"][dropped], seen["h"][dropped])
    touched = set(labels[labels != -100].tolist())
    assert all(imp.scores[t] < 10.0 for t in touched)  # EMA moved from 10 towards the (smaller) loss
    assert (imp.scores == 10.0).sum() == 128 - len(touched)
    model.eval()  # no update, no dropping in evaluation
    before = imp.scores.clone()
    with torch.no_grad():
        model(**inputs, labels=labels)
    assert torch.equal(imp.scores, before)


def test_stock_trainer_with_callback(tiny):
    model = llama(tiny)
    dropper = TokenDropper(model, keep=0.5, seed=0)
    args = tiny.args(max_steps=4)
    from transformers import Trainer

    trainer = Trainer(model=model, args=args, train_dataset=tiny.rows(32), callbacks=[])
    trainer.add_callback(TokenDroppingCallback(dropper, keep_start=0.5, schedule_steps=2))
    trainer.train()
    assert dropper.keep == 1.0  # steps 0, 1 dropped; schedule reached 1.0 at step 2
    losses = tiny.losses(trainer)
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_efftrainer_run_with_technique(tiny_recipe):
    recipe = tiny_recipe(
        model={"name_or_path": "builtin:tiny-llama", "config_overrides": {"num_hidden_layers": 4}},
        data={"max_train_samples": 32},
        training={"max_steps": 3},
        techniques=[{"name": "token_dropping", "keep_start": 0.5, "schedule": "constant"}],
    )
    report = train(Recipe.parse(recipe))
    assert report["steps"] == 3 and all(torch.isfinite(torch.tensor([loss for _, loss in report["loss_history"]])))
    (entry,) = report["techniques"]
    assert entry["name"] == "token_dropping" and entry["report"]["dropping_layers"] == [1, 2]


def test_technique_state_and_schedule(tiny):
    t = TokenDroppingTechnique(keep_start=0.25, start_step=2)
    t.training_args(tiny.args(max_steps=12, seed=7))
    assert t._steps == 10 and t._seed == 7
    t.on_model(llama(tiny))
    assert t.on_batch({}, 7) == {} and t.dropper.keep == pytest.approx(0.25 + 0.75 * 0.5)
    state = t.state_dict()
    assert set(state) == {"generator"}
    buf = io.BytesIO()
    torch.save({"token_dropping": state}, buf)  # what EffTrainer writes into each checkpoint
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["token_dropping"]
    t.load_state_dict(loaded)
    assert torch.equal(t.dropper.generator.get_state(), state["generator"])
    assert TokenDroppingTechnique(schedule="constant").keep_at(10**6) == 0.5


def test_importance_technique_wiring():
    from hf_efftrain.builtins import get_tokenizer

    t = TokenDroppingTechnique(strategy="importance", keep_start=0.5, importance_beta=0.9, importance_init=5.0)
    t.on_dataset(None, get_tokenizer())
    t.on_model(bert())
    imp = t.dropper.importance
    special = sorted(set(get_tokenizer().all_special_ids) - {0})  # bos/eos/unk/mask/cls/sep, sentinels, chat markers
    assert special == list(range(1, special[-1] + 1)) and special[-1] >= 38
    assert imp.special[special].all() and not imp.special[0] and not imp.special[special[-1] + 1 :].any()
    assert imp.pad_id == 0 and imp.beta == 0.9 and torch.all(imp.scores == 5.0)
    assert t.dropper.layer_ids == [2] and set(t.state_dict()) == {"generator", "importance"}


def test_errors(tiny, tiny_recipe):
    with pytest.raises(RecipeError, match="no layer left"):
        TokenDropper(llama(tiny, layers=2), keep=0.5)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(RecipeError, match="decoder-only or encoder-only"):
        TokenDropper(t5)
    with pytest.raises(RecipeError, match="masked-LM encoder"):
        TokenDropper(llama(tiny), strategy="importance", importance=TokenImportance(128))
    from hf_efftrain.core.build import make_techniques

    flex = tiny_recipe(model={"name_or_path": "builtin:tiny-llama", "attn_implementation": "flex_attention"},
                       techniques=[{"name": "token_dropping"}])  # fmt: skip
    with pytest.raises(RecipeError, match=r"techniques\[0\]: .*flex"):
        make_techniques(Recipe.parse(flex))
    causal = tiny_recipe(model={"name_or_path": "builtin:tiny-llama", "task": "causal_lm"},
                         techniques=[{"name": "token_dropping", "strategy": "importance"}])  # fmt: skip
    with pytest.raises(RecipeError, match=r"techniques\[0\]\.strategy"):
        make_techniques(Recipe.parse(causal))


@pytest.mark.parametrize(
    "kwargs", [{"keep_start": 0}, {"keep_start": 1.5}, {"full_last": 0}, {"strategy": "x"}, {"typo": 1}]
)
def test_bad_config_rejected(kwargs):
    with pytest.raises(pydantic.ValidationError):
        TokenDroppingConfig(**kwargs)


def test_technique_contract():
    assert get_technique("token_dropping") is TokenDroppingTechnique
    assert "2211.11586" in TokenDroppingTechnique.paper and "2203.13240" in TokenDroppingTechnique.paper
    for field_name, field in TokenDroppingConfig.model_fields.items():
        assert field_name == "name" or field.description


def test_compiles_with_a_moving_keep_and_no_recompile_per_step(tiny):
    # Dynamo alone (backend "eager": no inductor, seconds): the draw and the kept count run outside the graph, one
    # break per dropping layer, nothing else breaks it; a K that moves every step is a dynamic dimension after one
    # recompile, and the compiled forward and backward compute exactly what eager does.
    import torch._dynamo
    from torch._dynamo.utils import counters

    ids = batch(b=2)["input_ids"]
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = llama(tiny, layers=5)
        dropper = TokenDropper(model, keep=0.25, seed=0, multiple_of=1)
        model.train()
        run = torch.compile(model, backend="eager") if compiled else model
        losses, graphs = [], []
        with torch._dynamo.config.patch(recompile_limit=3, fail_on_recompile_limit_hit=True):
            for step in range(6):
                dropper.keep = keep_fraction(step, 0.25, 4)  # K = 4, 7, 10, 13, 16 (keep 1: no dropping)
                loss = run(input_ids=ids, labels=ids).loss
                loss.backward()
                losses.append(loss.detach())
                graphs.append(counters["stats"]["unique_graphs"])
        grads = [p.grad for p in model.parameters()]
        runs.append((torch.stack(losses), grads, graphs, dict(counters["graph_break"])))
    (eager, eager_grads, _, _), (comp, comp_grads, graphs, breaks) = runs
    assert torch.equal(eager, comp) and all(torch.equal(a, b) for a, b in zip(eager_grads, comp_grads))
    assert graphs[1] == graphs[2] == graphs[3] > 0, graphs  # K = 10 and 13 reuse the dynamic-K graph of K = 7
    assert graphs[4] == graphs[5], graphs  # keep 1: the layers' own forward, compiled once
    assert len(breaks) == 1 and "TokenDropper._selection" in next(iter(breaks)), breaks
