"""The offline built-ins: stdlib-docs corpus, synthetic SFT/classification sets, the BPE tokenizer, tiny configs."""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM, AutoTokenizer
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
)

from hf_efftrain.builtins import (
    BUILTIN_DATASETS,
    BUILTIN_MODELS,
    builtin_config,
    get_tokenizer,
    is_builtin,
    load_builtin_dataset,
    strip_builtin,
)
from hf_efftrain.builtins import data as data_mod
from hf_efftrain.builtins import tokenizer as tok_mod
from hf_efftrain.errors import RecipeError


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One fresh cache for the whole module: the first use of each built-in really builds it."""
    root = tmp_path_factory.mktemp("hf_efftrain_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_EFFTRAIN_CACHE", str(root))
        tok_mod._load.cache_clear()
        yield root
    tok_mod._load.cache_clear()


@pytest.fixture(scope="module")
def docs(cache: Path):
    start = time.perf_counter()
    ds = load_builtin_dataset("builtin:stdlib-docs")
    return ds, time.perf_counter() - start


def _words(text: str) -> list[str]:
    return text.split()


def test_prefix_helpers():
    assert is_builtin("builtin:tiny-llama") and not is_builtin("gpt2") and not is_builtin("./builtin:x")
    assert strip_builtin("builtin:stdlib-docs") == "stdlib-docs"
    assert strip_builtin("data/train.jsonl") == "data/train.jsonl"


# ------------------------------------------------------------------------------------------- stdlib-docs


def test_stdlib_docs_is_varied_english_text(docs):
    ds, _ = docs
    train, val = ds["train"], ds["validation"]
    assert set(train.column_names) == {"text", "source"}
    assert len(train) > 1000
    assert 0.02 < len(val) / (len(train) + len(val)) < 0.10  # ~5%

    texts = list(train["text"]) + list(val["text"])
    words = [w.lower() for t in texts for w in _words(t)]
    counts = Counter(words)
    # English function words are among the most frequent tokens of real prose
    assert counts["the"] / len(words) > 0.03 and counts["of"] > 0 and counts["to"] > 0 and counts["is"] > 0
    letters = sum(c.isascii() and c.isalpha() for t in texts for c in t)
    assert letters / sum(len(t) for t in texts) > 0.6

    lengths = sorted(len(_words(t)) for t in texts)
    assert lengths[0] >= data_mod.MIN_DOC_WORDS
    assert lengths[-1] / lengths[0] > 30  # packing benchmarks need short and long documents
    assert lengths[len(lengths) // 10] < 40 and lengths[9 * len(lengths) // 10] > 250

    normalised = [" ".join(t.split()) for t in texts]
    assert len(set(normalised)) == len(normalised)
    assert not set(train["text"]) & set(val["text"])

    sources = set(train["source"]) | set(val["source"])
    assert {"json", "collections", "email.message"} <= sources
    assert not any(part in {"test", "tests", "idle_test", "site-packages"} for s in sources for part in s.split("."))


def test_stdlib_docs_is_deterministic_and_cached(docs, cache: Path):
    ds, first_s = docs
    rebuilt = data_mod._build_stdlib_docs()  # a second full build, independent of the cache
    for split in ("train", "validation"):
        assert list(rebuilt[split]["text"]) == list(ds[split]["text"])
        assert list(rebuilt[split]["source"]) == list(ds[split]["source"])

    assert (cache / "data-v2" / "stdlib-docs").is_dir()
    start = time.perf_counter()
    again = load_builtin_dataset("stdlib-docs")
    cached_s = time.perf_counter() - start
    assert list(again["train"]["text"]) == list(ds["train"]["text"])
    assert first_s < 20 and cached_s < 1, (first_s, cached_s)


# ------------------------------------------------------------------------------------------ synthetic sets


def _sft_answer(prompt: str) -> str:
    """Recompute each template's answer from its prompt: the task is learnable only if every row is right."""
    head, _, rest = prompt.partition(": ")
    words = rest.split()
    if m := re.fullmatch(r"(?:Add|What is the sum of) (\d+) and (\d+)\.", prompt):
        return str(int(m[1]) + int(m[2]))
    if head in ("Reverse the words", "Write these words in reverse order"):
        return " ".join(reversed(words))
    if head == "Sort these numbers":
        return " ".join(map(str, sorted(map(int, words))))
    if head == "Uppercase":
        return rest.upper()
    if head == "How many words are in":
        return str(len(words))
    if head == "Repeat the last word":
        return words[-1]
    raise AssertionError(f"unknown template: {prompt!r}")


def test_sft_synthetic(cache: Path):
    start = time.perf_counter()
    ds = load_builtin_dataset("sft-synthetic")
    first_s = time.perf_counter() - start
    train, val = ds["train"], ds["validation"]
    assert train.column_names == ["prompt", "response"] and val.column_names == ["prompt", "response"]
    assert 2000 < len(train) + len(val) < 10000 and 0.02 < len(val) / (len(train) + len(val)) < 0.10
    assert not set(train["prompt"]) & set(val["prompt"])
    rows = list(zip(list(train["prompt"]) + list(val["prompt"]), list(train["response"]) + list(val["response"])))
    assert all(_sft_answer(p) == r for p, r in rows)
    templates = Counter(p.partition(":")[0].split()[0] for p, _ in rows)
    assert len(templates) >= 6 and min(templates.values()) > 200
    assert first_s < 20


def test_cls_synthetic_is_learnable_but_not_trivial(cache: Path):
    ds = load_builtin_dataset("cls-synthetic")
    train, val = ds["train"], ds["validation"]
    assert train.column_names == ["text", "label"]
    names = train.features["label"].names
    assert 2 <= len(names) <= 4 and val.features["label"].names == names
    assert 2000 < len(train) + len(val) < 10000 and 0.02 < len(val) / (len(train) + len(val)) < 0.10
    assert not set(train["text"]) & set(val["text"])
    balance = Counter(train["label"])
    assert min(balance.values()) / len(train) > 0.5 / len(names)

    # counting each class's indicative words is a strong baseline, yet misleading words and noise keep it imperfect
    indicative = data_mod.cls_indicative_words()
    correct = 0
    for text, label in zip(train["text"], train["label"]):
        words = text.lower().rstrip(".").split()
        votes = [sum(w in indicative[n] for w in words) for n in names]
        correct += votes.index(max(votes)) == label
    accuracy = correct / len(train)
    assert 0.6 < accuracy < 0.97, accuracy


def test_pref_pointwise_is_pref_synthetic_one_answer_a_row_in_the_same_splits(cache: Path):
    pairs, rows = load_builtin_dataset("pref-synthetic"), load_builtin_dataset("pref-pointwise")
    for split in ("train", "validation"):
        assert rows[split].features["label"].names == ["0", "1"]
        expected = [(f"{p['prompt']}\n{p[side]}", int(side == "chosen")) for p in pairs[split]
                    for side in ("chosen", "rejected")]  # fmt: skip
        assert list(zip(rows[split]["text"], rows[split]["label"])) == expected


def test_unknown_dataset_names_the_allowed_ones():
    with pytest.raises(RecipeError) as err:
        load_builtin_dataset("builtin:nope", path="data.eval")
    assert err.value.path == "data.eval"
    assert "'nope'" in str(err.value)
    assert all(f"builtin:{n}" in err.value.message for n in BUILTIN_DATASETS)


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer(docs, cache: Path):
    tok = get_tokenizer()
    assert len(tok) == 4096 and tok.model_max_length == 2048
    named = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>", "cls": "<cls>"}
    for role, token in {**named, "sep": "<sep>"}.items():
        assert getattr(tok, f"{role}_token") == token
        assert tok.convert_tokens_to_ids(token) == getattr(tok, f"{role}_token_id")
    assert tok.pad_token_id == 0
    sentinels = [f"<extra_id_{i}>" for i in range(32)]
    assert tok.extra_special_tokens == sentinels + tok_mod.CHAT_TOKENS  # ChatML's <|im_start|>, <|im_end|>
    assert set(sentinels) <= set(tok.all_special_tokens)
    assert tok.convert_tokens_to_ids("<extra_id_31>") in tok("x <extra_id_31> y")["input_ids"]  # never split

    val = list(docs[0]["validation"]["text"])
    samples = [*val[:20], "Ünïcode, emoji 😀 and\ttabs\n\n  indented code: x = f(a, b)", " leading space"]
    for text in samples:
        ids = tok(text)["input_ids"]
        assert tok.bos_token_id not in ids and tok.eos_token_id not in ids  # no automatic specials
        assert tok.decode(ids) == text
    # merges were learned: real prose takes well under two tokens per word
    n_tokens = sum(len(ids) for ids in tok(val)["input_ids"])
    assert n_tokens / sum(len(_words(t)) for t in val) < 2.0

    assert get_tokenizer() is tok  # in-process cache


def test_tokenizer_loads_from_disk_cache(cache: Path):
    get_tokenizer()
    folder = cache / tok_mod.CACHE_KEY
    before = (folder / "tokenizer.json").stat().st_mtime_ns
    tok_mod._load.cache_clear()
    start = time.perf_counter()
    tok = get_tokenizer()
    assert time.perf_counter() - start < 1
    assert (folder / "tokenizer.json").stat().st_mtime_ns == before  # read, not retrained
    plain = AutoTokenizer.from_pretrained(folder)  # an ordinary local tokenizer folder
    text = "Return a new view of the dictionary's keys."
    assert plain(text)["input_ids"] == tok(text)["input_ids"]


# ------------------------------------------------------------------------------------------------- models

TASKS = {
    "tiny-llama": (AutoModelForCausalLM, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
    "tiny-gpt2": (AutoModelForCausalLM, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
    "tiny-bert": (AutoModelForMaskedLM, MODEL_FOR_MASKED_LM_MAPPING_NAMES),
    "tiny-t5": (AutoModelForSeq2SeqLM, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
}


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_builtin_model_builds_and_runs(name: str, cache: Path):
    tok = get_tokenizer()
    config = builtin_config(f"builtin:{name}", tok)
    auto_cls, mapping = TASKS[name]
    assert config.architectures[0] in mapping.values()  # the core infers the task from architectures
    assert (config.vocab_size, config.pad_token_id, config.bos_token_id, config.eos_token_id) == (
        len(tok),
        tok.pad_token_id,
        tok.bos_token_id,
        tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = auto_cls.from_config(config)
    assert type(model).__name__ == config.architectures[0]
    assert sum(p.numel() for p in model.parameters()) < 3_000_000

    batch = tok(["Return the number of leap years in a range.", "Hello"], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    inputs = batch["input_ids"]
    if name == "tiny-bert":
        inputs = inputs.clone()
        inputs[:, 1] = tok.mask_token_id
    if name == "tiny-t5":
        assert config.decoder_start_token_id == tok.pad_token_id
    with torch.no_grad():
        out = model(input_ids=inputs, attention_mask=batch["attention_mask"], labels=labels)
    assert out.logits.shape[-1] == len(tok)
    assert abs(out.loss.item() - math.log(len(tok))) < 1.5  # untrained: close to uniform over the vocabulary


def test_unknown_model_names_the_allowed_ones(cache: Path):
    with pytest.raises(RecipeError) as err:
        builtin_config("builtin:tiny-mamba", get_tokenizer())
    assert err.value.path == "model.name_or_path"
    assert all(f"builtin:{n}" in err.value.message for n in BUILTIN_MODELS)
