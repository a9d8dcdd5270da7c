"""Token masking: BERT 80/10/10 masking statistics (arXiv 1810.04805), T5 span corruption invariants (arXiv
1910.10683), seeded masks that a resumed run reproduces, and real EffTrainer runs (tiny-bert mlm, tiny-t5 span)."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    PreTrainedTokenizerFast,
)

from hf_efftrain import Recipe, RecipeError, train
from hf_efftrain.builtins import get_tokenizer
from hf_efftrain.core.build import make_techniques
from hf_efftrain.core.registry import get_technique
from hf_efftrain.techniques.token_masking import (
    MaskingCollator,
    TokenMasker,
    TokenMaskingConfig,
    TokenMaskingTechnique,
    mlm_mask,
    random_spans_noise_mask,
    sentinel_ids,
    span_corrupt,
    span_reconstruct,
)

SENTINELS = list(range(7, 39))


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def _within(count: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def _text_batch(tok, rows: int = 64, seq: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(39, len(tok), (rows, seq), generator=g)
    ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
    ids[::4, seq // 3] = tok.unk_token_id  # specials inside the text, too
    attn = torch.ones_like(ids)
    attn[1::2, 3 * seq // 4 :] = 0
    ids[1::2, 3 * seq // 4 :] = tok.pad_token_id
    return ids, attn


def test_builtin_sentinels(tok):
    assert sentinel_ids(tok) == SENTINELS


def test_mlm_rate_split_and_specials(tok):
    ids, attn = _text_batch(tok)
    out, labels = mlm_mask(
        ids, torch.Generator().manual_seed(0), mask_token_id=tok.mask_token_id, special_ids=tok.all_special_ids,
        vocab_size=len(tok), attention_mask=attn,
    )  # fmt: skip
    special = torch.isin(ids, torch.tensor(tok.all_special_ids)) | (attn == 0)
    selected = labels != -100
    assert not selected[special].any() and torch.equal(out[special], ids[special])  # specials, padding untouched
    assert torch.equal(labels[selected], ids[selected])  # labels: the original id where selected, -100 elsewhere
    assert torch.equal(out[~selected], ids[~selected])
    n = int((~special).sum())
    assert _within(int(selected.sum()), n, 0.15)
    k = int(selected.sum())
    masked = selected & (out == tok.mask_token_id)
    kept = selected & (out == ids)
    random = selected & ~masked & ~kept
    assert _within(int(masked.sum()), k, 0.8) and _within(int(random.sum()), k, 0.1)
    assert _within(int(kept.sum()), k, 0.1, sigmas=5)  # includes random draws that hit the original (p ~ 1/4000)
    assert not torch.isin(out[random], torch.tensor(tok.all_special_ids)).any()  # random tokens are real tokens


def test_mlm_custom_split(tok):
    ids, attn = _text_batch(tok, rows=16)
    out, labels = mlm_mask(
        ids, torch.Generator().manual_seed(1), mask_token_id=tok.mask_token_id, special_ids=tok.all_special_ids,
        vocab_size=len(tok), mask_rate=0.5, mask_ratio=0.0, random_ratio=1.0, attention_mask=attn,
    )  # fmt: skip
    selected = labels != -100
    special = torch.isin(ids, torch.tensor(tok.all_special_ids)) | (attn == 0)
    assert not (out == tok.mask_token_id).any()
    assert int((out[selected] == ids[selected]).sum()) <= 3  # all selected replaced (a random draw may repeat)
    assert _within(int(selected.sum()), int((~special).sum()), 0.5)


def test_span_mask_counts_by_hand():
    g = torch.Generator().manual_seed(0)
    mask = random_spans_noise_mask(20, 0.15, 3.0, 32, g)
    # n_noise = round(3.0) = 3, n_spans = round(3 / 3) = 1: one run of 3 noise tokens, never at the start
    assert sum(mask) == 3 and not mask[0]
    assert "".join("x" if m else "." for m in mask).count("x" * 3) == 1
    long = random_spans_noise_mask(1000, 0.15, 3.0, 32, g)
    starts = sum(1 for i, m in enumerate(long) if m and (i == 0 or not long[i - 1]))
    assert sum(long) == 150 and starts == 32  # round(150 / 3) = 50 spans, capped at the 32 sentinels
    assert random_spans_noise_mask(1, 0.15, 3.0, 32, g) == [False]


def test_span_corrupt_reconstructs_and_density():
    g = torch.Generator().manual_seed(0)
    total = noise = spans = 0
    for length in list(range(2, 60)) + [100, 150, 250, 300] * 5:
        row = torch.randint(39, 4096, (length,), generator=g).tolist()
        inputs, targets = span_corrupt(row, g, SENTINELS)
        assert span_reconstruct(inputs, targets, SENTINELS) == row
        n_spans = sum(t in SENTINELS for t in targets)
        assert [t for t in inputs if t in SENTINELS] == SENTINELS[:n_spans]  # in order, one per span
        assert targets[0] == SENTINELS[0] and inputs[0] not in SENTINELS  # a non-noise run comes first
        assert len(inputs) + len(targets) == length + 2 * n_spans
        total, noise, spans = total + length, noise + len(targets) - n_spans, spans + n_spans
    assert abs(noise / total - 0.15) < 0.01
    assert 2.5 < noise / spans < 3.5  # mean span length ~ 3


def _masker(tok, mode="mlm", seed=5):
    return TokenMasker(tok, mode=mode, seed=seed)


def test_span_masker_batch_eos_padding_and_unmask(tok):
    rows = [[100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 2], [200, 201, 202, 203, 204, 2]]
    ids = torch.tensor([r + [0] * (12 - len(r)) for r in rows])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": ids.clone(), "decoder_input_ids": ids}
    masker = _masker(tok, "span")
    out = masker(batch)
    assert "decoder_input_ids" not in out  # T5 shifts the new labels itself
    for b, row in enumerate(rows):
        x = out["input_ids"][b][out["attention_mask"][b].bool()].tolist()
        y = out["labels"][b][out["labels"][b] != -100].tolist()
        assert x[-1] == 2 and y[-1] == 2 and y[0] == SENTINELS[0]
        assert span_reconstruct(x[:-1], y[:-1], SENTINELS) + [2] == row
    back = masker.unmask(out)
    assert torch.equal(back["input_ids"], ids) and torch.equal(back["attention_mask"], batch["attention_mask"])


@pytest.mark.parametrize("mode", ["mlm", "span"])
def test_same_masks_after_simulated_resume(tok, mode):
    ids, attn = _text_batch(tok, rows=4, seq=64)
    if mode == "span":
        ids[:, -1] = tok.eos_token_id
    batches = [{"input_ids": ids.roll(i, 0), "attention_mask": attn.roll(i, 0)} for i in range(6)]
    first = _masker(tok, mode)
    outs = [first(b) for b in batches[:3]]
    state = first.state_dict()
    outs += [first(b) for b in batches[3:]]
    resumed = _masker(tok, mode)
    resumed.load_state_dict(state)
    for b, expected in zip(batches[3:], outs[3:]):
        got = resumed(b)
        assert all(torch.equal(got[k], expected[k]) for k in ("input_ids", "labels"))
    assert not torch.equal(outs[0]["labels"], _masker(tok, mode, seed=6)(batches[0])["labels"])  # seed matters


def test_technique_resume_and_eval_collator(tok):
    features = [{"input_ids": [5, *range(100 + i, 140 + i), 6]} for i in range(8)]
    base = DataCollatorForLanguageModeling(tok, mlm=True)

    def technique():
        t = TokenMaskingTechnique(seed=3)
        t.on_dataset(None, tok)
        return t, t.collator(base)

    t1, collate = technique()
    assert isinstance(collate, MaskingCollator)
    a, b = collate(features), collate(features)
    assert torch.equal(a["input_ids"], b["input_ids"])  # evaluation masks depend on the batch content only
    assert (a["labels"] != -100).any()
    masked = [t1.on_batch(collate(features[i : i + 4]), step=i) for i in range(4)]
    state = t1.state_dict()
    assert state == {"counter": 4}
    more = [t1.on_batch(collate(features[i : i + 4]), step=i) for i in range(4, 6)]
    t2, collate2 = technique()
    t2.load_state_dict(state)
    for i, expected in zip(range(4, 6), more):
        got = t2.on_batch(collate2(features[i : i + 4]), step=i)
        assert torch.equal(got["input_ids"], expected["input_ids"]) and torch.equal(got["labels"], expected["labels"])
    padded = DataCollatorWithPadding(tok)(features[0:4])["input_ids"]
    assert torch.equal(t1.masker.unmask(masked[0])["input_ids"], padded)  # on_batch re-masks from the original
    assert not torch.equal(masked[0]["labels"], collate(features[0:4])["labels"])  # with its own generator


def test_efftrainer_mlm_on_tiny_bert_with_eval(tiny_recipe):
    recipe = tiny_recipe(
        model={"name_or_path": "builtin:tiny-bert", "config_overrides": {"num_hidden_layers": 2}},
        data={"max_train_samples": 16, "max_eval_samples": 8, "max_length": 32, "eval": "builtin:stdlib-docs"},
        training={"max_steps": 2, "eval_strategy": "steps", "eval_steps": 2, "per_device_train_batch_size": 4},
        techniques=[{"name": "token_masking", "mask_rate": 0.3}],
    )
    report = train(Recipe.parse(recipe))
    assert report["steps"] == 2 and math.isfinite(report["eval_loss"])


def test_efftrainer_span_on_tiny_t5(tiny_recipe):
    recipe = tiny_recipe(
        model={"name_or_path": "builtin:tiny-t5"},
        data={
            "max_train_samples": 16,
            "max_eval_samples": 8,
            "max_length": 32,
        },  # text-only data for a seq2seq model: input = target = the text; span masking rebuilds both
        training={"max_steps": 2, "per_device_train_batch_size": 4},
        techniques=[{"name": "token_masking", "mode": "span"}],
    )
    report = train(Recipe.parse(recipe))
    losses = [loss for _, loss in report["loss_history"]]
    assert report["steps"] == 2 and all(math.isfinite(x) for x in losses) and math.isfinite(report["eval_loss"])


def test_errors(tok, tiny_recipe):
    bad = tiny_recipe(techniques=[{"name": "token_masking", "mask_ratio": 0.5}])
    with pytest.raises(RecipeError, match=r"techniques\[0\]\.mask_ratio: .*sum to 1"):
        make_techniques(Recipe.parse(bad))
    task = tiny_recipe(model={"name_or_path": "builtin:tiny-llama", "task": "causal_lm"},
                       techniques=[{"name": "token_masking", "mode": "span"}])  # fmt: skip
    with pytest.raises(RecipeError, match=r"techniques\[0\]\.mode: .*seq2seq"):
        make_techniques(Recipe.parse(task))
    t = TokenMaskingTechnique()
    t.on_dataset(None, tok)
    with pytest.raises(RecipeError, match="masked-LM"):
        t.collator(DataCollatorForSeq2Seq(tok))
    with pytest.raises(RecipeError, match="encoder-decoder"):
        TokenMaskingTechnique(mode="span").collator(DataCollatorForSeq2Seq(tok))
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    plain = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"[PAD]": 0, "[UNK]": 1, "a": 2}, unk_token="[UNK]")),
        pad_token="[PAD]", unk_token="[UNK]",
    )  # fmt: skip
    assert sentinel_ids(plain) == []
    with pytest.raises(RecipeError, match="sentinel"):
        TokenMaskingTechnique(mode="span").make_masker(plain)
    with pytest.raises(RecipeError, match="mask token"):
        TokenMaskingTechnique(mode="mlm").make_masker(plain)


@pytest.mark.parametrize(
    "kwargs", [{"mask_rate": 0}, {"mask_rate": 1}, {"mask_ratio": 1.5}, {"mode": "x"}, {"mean_span_length": 0.5}]
)
def test_bad_config_rejected(kwargs):
    with pytest.raises(pydantic.ValidationError):
        TokenMaskingConfig(**kwargs)


def test_technique_contract():
    assert get_technique("token_masking") is TokenMaskingTechnique
    assert "1810.04805" in TokenMaskingTechnique.paper and "1910.10683" in TokenMaskingTechnique.paper
    for field_name, field in TokenMaskingConfig.model_fields.items():
        assert field_name == "name" or field.description
