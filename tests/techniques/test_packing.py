"""Packing: bin assignment by hand, padding numbers, and the core claim: a packed document's logits equal those of
the document run alone (no attention across documents) on sdpa and eager, Llama and GPT-2, causal LM, SFT and
conversations (assistant-only labels)."""

from __future__ import annotations

import datasets
import pydantic
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from hf_efftrain import Recipe, train
from hf_efftrain.core.registry import get_technique
from hf_efftrain.core.technique import Env
from hf_efftrain.errors import RecipeError
from hf_efftrain.techniques.packing import (
    PackedCollator,
    PackingConfig,
    PackingTechnique,
    assign_bins,
    pack_dataset,
    pack_dataset_with_stats,
)

VOCAB = 128


def _model(kind: str, impl: str) -> torch.nn.Module:
    """Default configs (use_cache=True, the case where transformers' own packed detection is skipped), no dropout."""
    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        model = LlamaForCausalLM._from_config(config, attn_implementation=impl)
    else:
        config = GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
        )
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
        model = GPT2LMHeadModel._from_config(config, attn_implementation=impl)
    assert model.config.use_cache and model.config._attn_implementation == impl
    return model.train()  # training mode, as under the Trainer


def _docs(task: str, lengths=(5, 9, 3, 7, 12, 4, 16, 2, 6), seed: int = 0) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]
    labels = [list(x) for x in ids]
    if task == "sft":  # the first half of every document is a prompt: no loss there
        labels = [[-100] * (len(x) // 2) + x[len(x) // 2 :] for x in ids]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels})


def _segments(position_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of every segment (document or padding) of a collated batch."""
    out = []
    for r, pos in enumerate(position_ids.tolist()):
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        out += [(r, s, e) for s, e in zip(starts, starts[1:])]
    return out


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("task", ["causal_lm", "sft"])
def test_packed_documents_equal_documents_alone(kind, impl, task):
    docs = _docs(task)
    packed = pack_dataset(docs, 16)
    assert len(packed) < len(docs)
    batch = PackedCollator(pad_token_id=0, attn_implementation=impl)([packed[i] for i in range(len(packed))])
    model = _model(kind, impl)
    with torch.no_grad():
        out = model(**batch)
        by_content = {tuple(d["input_ids"]): d["labels"] for d in docs}
        loss_sum, targets, seen = 0.0, 0, 0
        for r, s, e in _segments(batch["position_ids"]):
            ids = batch["input_ids"][r, s:e]
            if batch["labels"][r, s:e].eq(-100).all() and ids.eq(0).all():
                continue  # row padding
            alone_labels = torch.tensor(by_content[tuple(ids.tolist())])
            alone = model(input_ids=ids[None], labels=alone_labels[None])
            torch.testing.assert_close(out.logits[r, s:e], alone.logits[0], rtol=0, atol=1e-5)
            n = int((alone_labels[1:] != -100).sum())
            loss_sum += float(alone.loss) * n
            targets += n
            seen += 1
    assert seen == len(docs)
    # No target crosses a boundary: the packed loss is exactly the token-weighted mean of the documents' losses.
    assert abs(float(out.loss) - loss_sum / targets) < 1e-5


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_conversations_leak_nothing(impl):
    """Chat data (builtin:chat-synthetic through the ChatML template, assistant-only labels): every packed
    conversation has its own logits and its own labels, and the packed loss is the mean over assistant tokens."""
    from hf_efftrain.builtins import get_tokenizer, load_builtin_dataset
    from hf_efftrain.core.data import tokenize
    from hf_efftrain.core.sections import DataSection

    tok = get_tokenizer()
    rows = load_builtin_dataset("chat-synthetic")["train"].select(range(12))
    convs = tokenize(rows, "sft", tok, DataSection(train="builtin:chat-synthetic", max_length=256))
    packed = pack_dataset(convs, 256)
    assert len(packed) < len(convs)
    batch = PackedCollator(pad_token_id=tok.pad_token_id, attn_implementation=impl)(list(packed))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    model = LlamaForCausalLM._from_config(config, attn_implementation=impl).train()
    own = {tuple(c["input_ids"]): c["labels"] for c in convs}
    with torch.no_grad():
        out = model(**batch)
        loss_sum, targets, seen = 0.0, 0, 0
        for r, s, e in _segments(batch["position_ids"]):
            ids = batch["input_ids"][r, s:e]
            if tuple(ids.tolist()) not in own:
                assert batch["labels"][r, s:e].eq(-100).all() and ids.eq(tok.pad_token_id).all()  # row padding
                continue
            labels = own[tuple(ids.tolist())]
            assert labels[0] == -100 and batch["labels"][r, s:e].tolist() == labels  # masks kept, nothing added
            alone = model(input_ids=ids[None], labels=torch.tensor(labels)[None])
            torch.testing.assert_close(out.logits[r, s:e], alone.logits[0], rtol=0, atol=1e-5)
            n = sum(t != -100 for t in labels[1:])
            loss_sum, targets, seen = loss_sum + float(alone.loss) * n, targets + n, seen + 1
    assert seen == len(convs)
    assert abs(float(out.loss) - loss_sum / targets) < 1e-5


def test_without_use_cache_false_the_second_document_sees_the_first():
    """Why the collator sends use_cache=False (transformers 5.24.0): with the config default use_cache=True the
    model builds a cache, create_causal_mask skips packed-sequence detection and the mask is plain causal."""
    docs = _docs("causal_lm", lengths=(8, 8))
    batch = PackedCollator()([pack_dataset(docs, 16)[0]])
    del batch["use_cache"]
    model = _model("llama", "sdpa")
    with torch.no_grad():
        leaked = model(**batch).logits[0, 8:]
        alone = model(input_ids=batch["input_ids"][:, 8:]).logits[0]
    assert (leaked - alone).abs().max() > 1e-2


def test_labels_mask_every_document_start_and_keep_prompt_masks():
    docs = _docs("sft", lengths=(6, 4, 5))
    row = pack_dataset(docs, 16)[0]
    batch = PackedCollator(pad_token_id=0)([row, {"input_ids": [9, 9, 9], "labels": [9, 9, 9]}])
    labels, pos = batch["labels"], batch["position_ids"]
    assert pos[0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 0, 1, 2, 3]  # BFD: 6, 5, 4 in a row of 16
    assert (labels[pos == 0] == -100).all()  # no document's first token is the previous one's target
    expected = []
    for n in (6, 5, 4):
        d = next(d for d in docs if len(d["input_ids"]) == n)
        expected += [-100] + d["labels"][1:]
    assert labels[0].tolist() == expected  # prompt -100s preserved, response labels untouched
    # An unpacked row (no position_ids) is one document; its padding is its own segment with label -100.
    assert pos[1].tolist() == [0, 1, 2] + list(range(12)) and batch["input_ids"][1, 3:].eq(0).all()
    assert labels[1].tolist() == [-100, 9, 9] + [-100] * 12
    assert batch["use_cache"] is False and "attention_mask" not in batch


def test_best_fit_decreasing_and_greedy_by_hand():
    # BFD: 7 -> row0 (room 3); 5 -> row1 (room 5); 4 -> row1 (room 1); 1 -> the tightest room: row1, not row0
    # (first-fit decreasing would give [[0, 3], [1, 2]]).
    assert assign_bins([7, 5, 4, 1], 10) == [[0], [1, 2, 3]]
    lengths = [7, 5, 4, 3, 3, 2]
    # BFD: 7|r3, 5|r5, 4 -> row1 r1, 3 -> row0 r0, 3 -> new row2 r7, 2 -> row2 r5.
    assert assign_bins(lengths, 10) == [[0, 3], [1, 2], [4, 5]]
    # Greedy (next fit, data order): 7 | 5 4 | 3 3 2.
    assert assign_bins(lengths, 10, "greedy") == [[0], [1, 2], [3, 4, 5]]
    # Ties in length keep data order; ties in room go to the row opened first.
    assert assign_bins([3, 3, 3, 3], 5) == [[0], [1], [2], [3]]
    assert assign_bins([4, 4, 1], 5) == [[0, 2], [1]]
    with pytest.raises(ValueError, match=r"\[1, 10\]"):
        assign_bins([11], 10)


def test_padding_fraction_numbers_and_row_contents():
    lengths = [7, 5, 4, 3, 3, 2]  # 24 tokens
    docs = datasets.Dataset.from_dict({"input_ids": [[10 + i] * n for i, n in enumerate(lengths)]})
    packed, stats = pack_dataset_with_stats(docs, 10)
    assert (stats.rows_before, stats.rows_after, stats.tokens) == (6, 3, 24)
    assert stats.padding_fraction_before == pytest.approx(1 - 24 / 60)  # 0.6: each document alone in 10 tokens
    assert stats.padding_fraction_after == pytest.approx(1 - 24 / 30)  # 0.2
    assert packed["input_ids"] == [[10] * 7 + [13] * 3, [11] * 5 + [12] * 4, [14] * 3 + [15] * 2]
    assert packed["position_ids"][2] == [0, 1, 2, 0, 1]
    assert packed["labels"][0] == [-100] + [10] * 6 + [-100, 13, 13]  # labels default to input_ids
    _, greedy = pack_dataset_with_stats(docs, 10, "greedy")
    assert greedy.rows_after == 3 and greedy.padding_fraction_after == pytest.approx(0.2)


def test_long_documents_are_cut_into_row_length_pieces():
    docs = datasets.Dataset.from_dict({"input_ids": [list(range(3, 28)), [5, 6]]})  # 25 and 2 tokens
    packed, stats = pack_dataset_with_stats(docs, 10)
    assert stats.split_documents == 1 and stats.tokens == 27 and stats.rows_after == 3 == stats.rows_before - 1
    assert stats.padding_fraction_before == pytest.approx(1 - 27 / 40)  # 25 -> 3 rows alone, 2 -> 1 row
    assert sorted(len(r) for r in packed["input_ids"]) == [7, 10, 10]
    flat = sorted(t for r in packed["input_ids"] for t in r)
    assert flat == sorted(list(range(3, 28)) + [5, 6])
    for pos in packed["position_ids"]:
        assert pos[0] == 0 and all(b == a + 1 or b == 0 for a, b in zip(pos, pos[1:]))


def test_flash_varlen_kwargs_mark_every_segment():
    docs = _docs("causal_lm")
    packed = pack_dataset(docs, 16)
    features = [packed[i] for i in range(len(packed))]
    batch = PackedCollator(attn_implementation="flash_attention_2")(features)
    assert "cu_seq_lens_q" not in PackedCollator(attn_implementation="sdpa")(features)
    pos = batch["position_ids"]
    (cu, _), (longest, _) = prepare_fa_kwargs_from_position_ids(pos)  # transformers' own reading of position_ids
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["cu_seq_lens_q"].tolist() == cu.tolist() == batch["cu_seq_lens_k"].tolist()
    assert batch["max_length_q"] == batch["max_length_k"] == int(longest) == 16
    segments = _segments(pos)
    assert len(cu) == len(segments) + 1 and cu[-1] == pos.numel()


def test_validate_and_config_errors(tiny_recipe):
    recipe = Recipe.parse(tiny_recipe(techniques=[{"name": "packing"}]))
    tech = PackingTechnique()
    tech.validate(recipe, Env())
    assert tech.length == 64  # data.max_length
    mlm = Recipe.parse(tiny_recipe(model={"name_or_path": "builtin:tiny-bert", "task": "masked_lm"}))
    with pytest.raises(RecipeError, match="causal LM"):
        PackingTechnique().validate(mlm, Env())
    with pytest.raises(RecipeError, match="no packed path") as err:
        PackingTechnique().validate(Recipe.parse(tiny_recipe(model={"attn_implementation": "paged|sdpa"})), Env())
    assert err.value.path == ""
    with pytest.raises(pydantic.ValidationError):
        PackingConfig(strategy="first_fit")
    with pytest.raises(pydantic.ValidationError):
        PackingConfig(length=4)
    assert get_technique("packing") is PackingTechnique and "2107.02027" in PackingTechnique.paper
    assert all(f.description for key, f in PackingConfig.model_fields.items() if key != "name")


@pytest.mark.parametrize(
    ("data", "model"),
    [
        ({"train": "builtin:stdlib-docs", "max_length": 128}, "builtin:tiny-llama"),
        ({"train": "builtin:sft-synthetic", "max_length": 64}, "builtin:tiny-gpt2"),
    ],
)
def test_efftrainer_steps_through_a_recipe(tiny_recipe, data, model):
    recipe = tiny_recipe(
        model={"name_or_path": model},  # 2 layers (tiny_recipe's override)
        data={**data, "max_train_samples": 96, "max_eval_samples": 8},
        training={"max_steps": 3, "per_device_train_batch_size": 4},
        techniques=[{"name": "packing"}],
    )
    report = train(Recipe.parse(recipe))
    facts = next(t["report"] for t in report["techniques"] if t["name"] == "packing")
    assert facts["rows_after"] < facts["rows_before"] == 96
    assert facts["padding_fraction_after"] < facts["padding_fraction_before"]
    assert len(report["loss_history"]) == 3 and torch.isfinite(torch.tensor(report["train_loss_final"]))
    assert 0 < report["tokens_seen"] <= 3 * 4 * facts["length"]  # real (non-padding) tokens of 3 batches of 4 rows


def test_functional_core_with_the_stock_trainer(tiny):
    from transformers import Trainer

    packed = pack_dataset(_docs("sft", lengths=(5, 9, 3, 7, 12, 4, 16, 2, 6) * 4), 32, strategy="greedy")
    model = tiny.model(attn_implementation="eager")
    args = tiny.args(max_steps=3, per_device_train_batch_size=4, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=packed, data_collator=PackedCollator(0, "eager"))
    trainer.train()
    losses = tiny.losses(trainer)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
