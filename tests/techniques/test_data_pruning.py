"""Data pruning (Marion et al. 2023, arXiv 2309.04564; Paul et al. 2021, arXiv 2107.07075): exact keep counts and
their rounding, which end of the score each strategy keeps, EL2N by hand, perplexity against the model's own
loss, near-duplicate removal, scores reused from disk, and a pruned run through the real build."""

from __future__ import annotations

import json
import math

import datasets
import numpy as np
import pydantic
import pytest
import torch

from hf_efftrain import Recipe
from hf_efftrain.builtins import builtin_config, get_tokenizer
from hf_efftrain.core.build import build, make_techniques
from hf_efftrain.core.registry import get_technique
from hf_efftrain.errors import RecipeError
from hf_efftrain.techniques import data_pruning as dp
from hf_efftrain.techniques.data_pruning import (
    DataPruningConfig,
    DataPruningTechnique,
    el2n_from_logits,
    keep_count,
    near_duplicates,
    perplexity_batch,
    select_indices,
)


def test_keep_count_rounds_half_up_and_keeps_at_least_one():
    assert keep_count(10, 0.55) == 6  # 5.5 -> 6
    assert keep_count(10, 0.54) == 5
    assert keep_count(10, 0.7) == 7  # 7.000000000000001 is still 7
    assert keep_count(3, 0.1) == 1  # 0.3 rounds to 0: at least one
    assert keep_count(7, 1.0) == 7
    for n in (1, 9, 100, 1541):
        for f in (0.05, 0.3, 0.5, 0.6, 0.75, 1.0):
            assert len(select_indices(np.random.default_rng(n).random(n), f, "middle")) == keep_count(n, f)


SCORES = np.array([5, 1, 9, 3, 7, 2, 8, 6, 4, 0], dtype=float)  # index of value v: 9, 1, 5, 3, 8, 0, 7, 6, 4, 2


def test_strategies_pick_the_right_ends():
    assert select_indices(SCORES, 0.3, "top").tolist() == [2, 4, 6]  # 9, 7, 8
    assert select_indices(SCORES, 0.3, "bottom").tolist() == [1, 5, 9]  # 1, 2, 0
    # middle: ascending values 0..9, start (10 - 3) // 2 = 3 -> values 3, 4, 5 at indices 3, 8, 0
    assert select_indices(SCORES, 0.3, "middle").tolist() == [0, 3, 8]
    assert select_indices(SCORES, 0.4, "middle").tolist() == [0, 3, 7, 8]  # values 3..6
    r = select_indices(SCORES, 0.3, "random", seed=7)
    assert len(set(r.tolist())) == 3 and r.tolist() == select_indices(SCORES, 0.3, "random", seed=7).tolist()
    others = {tuple(select_indices(SCORES, 0.3, "random", seed=s).tolist()) for s in range(8)}
    assert len(others) > 1  # the seed matters


def test_ties_go_to_the_lower_index_and_nan_last():
    scores = np.array([1.0, np.nan, 1.0, 2.0])
    assert select_indices(scores, 0.5, "top").tolist() == [0, 3]
    assert select_indices(scores, 0.5, "bottom").tolist() == [0, 2]
    assert select_indices(scores, 1.0, "top").tolist() == [0, 1, 2, 3]  # NaN only when nothing else is left


def test_el2n_by_hand():
    # softmax([0, ln 3]) = [1/4, 3/4]; label 1 -> ||(1/4, -1/4)|| = sqrt(2)/4; label 0 -> ||(-3/4, 3/4)|| = 3 sqrt(2)/4
    logits = torch.tensor([[0.0, math.log(3)], [0.0, math.log(3)]])
    score, n = el2n_from_logits(logits, torch.tensor([1, 0]), shift=False)
    torch.testing.assert_close(score, torch.tensor([math.sqrt(2) / 4, 3 * math.sqrt(2) / 4]))
    assert n.tolist() == [1, 1]
    # Sequence, shifted: positions 0, 1 predict labels 1, 2; label 2 is -100, so only position 0 counts ...
    seq = torch.tensor([[[0.0, math.log(3)], [5.0, 0.0], [1.0, 1.0]]])
    score, n = el2n_from_logits(seq, torch.tensor([[7, 1, -100]]), shift=True)
    torch.testing.assert_close(score, torch.tensor([math.sqrt(2) / 4]))
    # ... and both count when it is a target: (sqrt(2)/4 + ||(1/2, -1/2)||) / 2 with uniform logits at position 1.
    score, _ = el2n_from_logits(seq[:, [0, 2, 1]], torch.tensor([[7, 1, 0]]), shift=True)
    torch.testing.assert_close(score, torch.tensor([(math.sqrt(2) / 4 + math.sqrt(2) / 2) / 2]))


def test_perplexity_equals_the_models_own_loss(tiny, tmp_path):
    model = tiny.model().eval()
    model.save_pretrained(tmp_path / "ref")
    rows = [r["input_ids"].tolist() for r in tiny.rows(3, seq_len=12, seed=1)]
    labels = [list(r) for r in rows]
    labels[1][:6] = [-100] * 6  # SFT prompt: only the response counts
    rows[2], labels[2] = rows[2][:7], labels[2][:7]  # shorter: padded in the batch
    out = perplexity_batch({"input_ids": rows, "labels": labels}, model, torch.device("cpu"))["score"]
    for i in range(3):
        with torch.no_grad():
            direct = model(input_ids=torch.tensor([rows[i]]), labels=torch.tensor([labels[i]])).loss.exp()
        assert out[i] == pytest.approx(float(direct), rel=1e-5)
    # No token labels (masked LM, classification): the perplexity of the input ids themselves.
    plain = perplexity_batch({"input_ids": rows[:1]}, model, torch.device("cpu"))["score"][0]
    assert plain == pytest.approx(out[0], rel=1e-6)
    seq2seq = perplexity_batch({"input_ids": rows[:1], "labels": [[5, 6, 2]]}, model, torch.device("cpu"))["score"]
    assert seq2seq[0] == pytest.approx(out[0], rel=1e-6)  # labels not aligned with the inputs: inputs scored


def _ids(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(10, 4000, n).tolist()


def test_dedup_removes_exact_and_near_duplicates_only():
    rng = np.random.default_rng(0)
    a = _ids(rng, 200)
    near = list(a)
    near[100] = 5  # one token changed: 5 of 196 5-grams differ, Jaccard 191/201 = 0.95
    half = a[:100] + _ids(rng, 100)  # shares half its 5-grams: Jaccard ~ 96/300, kept
    short = [11, 12, 13]  # shorter than an n-gram: only exact copies match
    rows = [a, list(a), near, _ids(rng, 200), half, short, list(short), [11, 12, 14]]
    keep = near_duplicates(rows, threshold=0.8, ngram=5, num_perm=128)
    assert keep.tolist() == [True, False, False, True, True, True, False, True]
    assert near_duplicates([a, near], threshold=0.96).tolist() == [True, True]  # 0.95 is below 0.96


def _reference_model(path) -> str:
    from transformers import AutoModelForCausalLM

    config = builtin_config("tiny-llama", get_tokenizer())
    config.num_hidden_layers = 1
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


def _technique(recipe: dict) -> DataPruningTechnique:
    return make_techniques(Recipe.parse(recipe))[0]


def _tokenized(n: int = 40, dup: bool = False) -> datasets.Dataset:
    rng = np.random.default_rng(1)
    rows = [_ids(rng, int(rng.integers(8, 40))) for _ in range(n)]
    if dup:
        rows += [list(rows[0]), list(rows[1])]
    return datasets.Dataset.from_dict(
        {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows], "labels": rows}
    )


def test_perplexity_scores_are_reused_from_disk(tiny_recipe, tmp_path):
    ref = _reference_model(tmp_path / "ref")
    tech = {"name": "data_pruning", "score": "perplexity", "reference_model": ref, "keep_fraction": 0.5}
    ds, tok = _tokenized(), get_tokenizer()
    loads = dp.COUNTERS["reference_model_loads"]
    first = _technique(tiny_recipe(techniques=[tech]))
    kept = first.on_dataset(ds, tok)
    assert dp.COUNTERS["reference_model_loads"] == loads + 1 and not first.report()["scores_reused"]
    out = tmp_path / "run" / "data_pruning"
    meta = json.loads((out / "scores.json").read_text())
    assert meta["source_fingerprint"] == ds._fingerprint and meta["examples"] == 40
    assert json.loads((out / "kept_indices.json").read_text())["indices"] == first.kept_indices.tolist()

    # A second run (fresh technique, other strategy) loads the scores: the reference model is not loaded again.
    second = _technique(tiny_recipe(techniques=[{**tech, "strategy": "top", "keep_fraction": 0.25}]))
    top = second.on_dataset(ds, tok)
    assert dp.COUNTERS["reference_model_loads"] == loads + 1 and second.report()["scores_reused"]
    scores = np.load(out / "scores.npz")["scores"]
    assert len(top) == 10 and sorted(scores[second.kept_indices]) == sorted(scores)[-10:]
    assert len(kept) == 20 and first.report()["strategy"] == "middle"
    # Other data: other key, scored again.
    _technique(tiny_recipe(techniques=[tech])).on_dataset(ds.select(range(30)), tok)
    assert dp.COUNTERS["reference_model_loads"] == loads + 2


def test_dedup_before_scoring(tiny_recipe):
    tech = {"name": "data_pruning", "score": "length", "dedup": True, "keep_fraction": 0.5, "strategy": "bottom"}
    t = _technique(tiny_recipe(techniques=[tech]))
    ds = _tokenized(dup=True)
    out = t.on_dataset(ds, get_tokenizer())
    r = t.report()
    assert (r["examples_before"], r["duplicates_removed"], r["examples_after_dedup"]) == (42, 2, 40)
    assert len(out) == r["examples_after"] == 20
    lengths = sorted(len(x) for x in ds.select(range(40))["input_ids"])
    assert sorted(len(x) for x in out["input_ids"]) == lengths[:20]
    again = _technique(tiny_recipe(techniques=[{**tech, "reuse_scores": False}]))
    again.on_dataset(ds, get_tokenizer())
    assert not again.report()["scores_reused"] and again.kept_indices.tolist() == t.kept_indices.tolist()
    none = _technique(
        tiny_recipe(techniques=[{"name": "data_pruning", "score": "none", "dedup": True, "keep_fraction": 1}])
    )
    assert len(none.on_dataset(ds, get_tokenizer())) == 40


def test_el2n_run_prunes_without_touching_the_model_init(tiny_recipe, tmp_path):
    tech = {"name": "data_pruning", "score": "el2n", "proxy_steps": 3, "proxy_runs": 2, "keep_fraction": 0.6}
    tech["proxy_config_overrides"] = {"num_hidden_layers": 1}  # a smaller proxy than the run's 2 layers
    base = tiny_recipe(data={"max_train_samples": 30, "max_length": 32})
    runs = dp.COUNTERS["proxy_trainings"]
    pruned = build(Recipe.parse({**base, "techniques": [tech]}))
    plain = build(Recipe.parse(base))
    assert dp.COUNTERS["proxy_trainings"] == runs + 2
    assert len(pruned.train_dataset) == 18 and len(plain.train_dataset) == 30
    report = pruned.techniques[0].report()
    assert report["strategy"] == "top" and 0 < report["score_stats"]["min"] <= report["score_stats"][
        "max"
    ] < math.sqrt(2)
    scores = np.load(tmp_path / "run" / "data_pruning" / "scores.npz")["scores"]
    kept = pruned.techniques[0].kept_indices
    assert scores[kept].min() >= np.delete(scores, kept).max()  # top: every kept score above every dropped one
    for a, b in zip(pruned.model.parameters(), plain.model.parameters()):
        assert torch.equal(a, b)  # scoring restored every RNG


@pytest.mark.parametrize(
    ("tech", "path"),
    [
        ({"score": "perplexity"}, "techniques[0].reference_model"),
        ({"score": "perplexity", "reference_model": "/nonexistent/model"}, "techniques[0].reference_model"),
        ({"score": "length", "reference_model": "/tmp"}, "techniques[0].reference_model"),
        ({"score": "none", "dedup": True}, "techniques[0].score"),
        ({"score": "none", "keep_fraction": 1.0}, "techniques[0].score"),
    ],
)
def test_bad_recipes_fail_in_validate(tiny_recipe, tech, path):
    with pytest.raises(RecipeError) as e:
        make_techniques(Recipe.parse(tiny_recipe(techniques=[{"name": "data_pruning", **tech}])))
    assert e.value.path == path


def test_reference_with_another_vocabulary_is_refused(tiny, tiny_recipe, tmp_path):
    tiny.model().save_pretrained(tmp_path / "small")  # vocabulary of 128: our token ids go up to 4000
    t = _technique(
        tiny_recipe(
            techniques=[{"name": "data_pruning", "score": "perplexity", "reference_model": str(tmp_path / "small")}]
        )
    )
    with pytest.raises(RecipeError, match="vocabulary") as e:
        t.on_dataset(_tokenized(), get_tokenizer())
    assert e.value.path == "techniques[0].reference_model"


def test_unknown_proxy_config_field_is_refused(tiny_recipe):
    tech = {"name": "data_pruning", "score": "el2n", "proxy_config_overrides": {"num_layerz": 1}}
    with pytest.raises(RecipeError) as e:
        _technique(tiny_recipe(techniques=[tech])).on_dataset(_tokenized(), get_tokenizer())
    assert e.value.path == "techniques[0].proxy_config_overrides.num_layerz"


def test_config_and_contract():
    assert get_technique("data_pruning") is DataPruningTechnique
    assert "2309.04564" in DataPruningTechnique.paper and "2107.07075" in DataPruningTechnique.paper
    for field_name, field in DataPruningConfig.model_fields.items():
        assert field_name == "name" or field.description
    for bad in ({"keep_fraction": 0}, {"keep_fraction": 1.5}, {"strategy": "best"}, {"score": "loss"}, {"x": 1}):
        with pytest.raises(pydantic.ValidationError):
            DataPruningConfig(**{"score": "length", **bad})
