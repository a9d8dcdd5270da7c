"""Data sources (core/data/sources.py, core/data/mixture.py): a list in ``data.train`` interleaved by weight, seeded
and reproducible; ``data.eval`` lists, ``eval_split`` and ``eval_fraction``; local folders, ``data_files`` and hub
options passed to ``datasets.load_dataset``; every bad input one error naming its field."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import yaml

from hf_efftrain import Recipe, RecipeError
from hf_efftrain.cli import main
from hf_efftrain.core.build import build
from hf_efftrain.core.data import load_sources, task_columns
from hf_efftrain.core.sections import DataSection

MODEL = {"name_or_path": "builtin:tiny-llama", "config_overrides": {"num_hidden_layers": 2}}


def jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def texts(prefix: str, n: int) -> list[dict]:
    return [{"text": f"{prefix}{i}"} for i in range(n)]


def splits(data: dict, seed: int = 0, task: str = "causal_lm"):
    cfg = DataSection.model_validate(data)
    sources = load_sources(cfg)
    return sources.splits(task_columns(task, cfg, sources.columns), seed)


def parse_error(data: dict) -> str:
    with pytest.raises(RecipeError) as err:
        Recipe.parse({"model": MODEL, "data": data, "training": {"output_dir": "unused"}})
    return str(err.value)


def load_error(data: dict, task: str = "causal_lm") -> str:
    with pytest.raises(RecipeError) as err:
        splits(data, task=task)
    return str(err.value)


def share(rows: list[str], prefix: str) -> float:
    return sum(r.startswith(prefix) for r in rows) / len(rows)


# ---- the schema ------------------------------------------------------------------------------------------------
def test_a_string_stays_the_simple_form_and_a_list_round_trips():
    simple = Recipe.parse({"model": MODEL, "data": {"train": "builtin:stdlib-docs"}})
    assert simple.data.train == "builtin:stdlib-docs" and simple.data.eval is None
    listed = Recipe.parse({"model": MODEL, "data": {"train": [{"path": "a.jsonl", "weight": 3}, {"path": "b"}]}})
    assert [(s.path, s.split, s.weight) for s in listed.data.train] == [("a.jsonl", "train", 3), ("b", "train", 1)]
    assert Recipe.parse(listed.to_dict()) == listed


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"train": [{"path": "a"}, {"path": "b", "weight": -1}]}, "data.train[1].weight: must be > 0 (got -1)"),
        ({"train": [{"path": "a", "weight": 0}]}, "data.train[0].weight: must be > 0 (got 0)"),
        ({"train": [{"path": "a", "weight": float("inf")}]}, "data.train[0].weight: must be a finite number"),
        (
            {"train": [{"path": "a", "wieght": 2}]},
            "data.train[0].wieght: unknown field; allowed: path, name, split, data_files, revision, weight",
        ),
        ({"train": "a", "eval": [{"path": "b", "weight": 2}]}, "data.eval[0].weight: unknown field; allowed: path,"),
        ({"train": [{"split": "train"}]}, "data.train[0].path: required field is missing"),
        ({"train": [{"path": ""}]}, "data.train[0].path: String should have at least 1 character"),
        ({"train": []}, "data.train: give at least one source"),
        ({"train": {"path": "a"}}, "data.train: a source is a string, or a list of"),
        ({"train": None}, "data.train: Input should be a valid string (got None)"),
        ({"train": ["a.jsonl"]}, "data.train[0]: Input should be a valid dictionary or instance of Source"),
        ({"train": [{"path": "a", "data_files": 3}]}, "data.train[0].data_files: must be a file or glob, a list"),
        ({"train": [{"path": "a", "data_files": {"train": []}}]}, "data.train[0].data_files: must be a file"),
        ({"train": "a", "eval_fraction": 0}, "data.eval_fraction: must be > 0 (got 0)"),
        ({"train": "a", "eval_fraction": 1}, "data.eval_fraction: must be < 1 (got 1)"),
        (
            {"train": "a", "eval": "b", "eval_split": "validation"},
            "data.eval_split: cannot be combined with data.eval",
        ),
        ({"train": "a", "eval": "b", "eval_fraction": 0.1}, "data.eval_fraction: cannot be combined with data.eval;"),
        (
            {"train": "a", "eval_split": "validation", "eval_fraction": 0.1},
            "data.eval_fraction: cannot be combined with data.eval_split",
        ),
    ],
)
def test_bad_sections_name_the_field(data, expected):
    message = parse_error(data)
    assert message.startswith(expected), message
    assert "\n" not in message


# ---- mixing ----------------------------------------------------------------------------------------------------
def test_mixture_shares_follow_the_weights_and_the_seed_fixes_the_order(tmp_path):
    a, b = jsonl(tmp_path / "a.jsonl", texts("a", 600)), jsonl(tmp_path / "b.jsonl", texts("b", 600))
    data = {"train": [{"path": a, "weight": 3}, {"path": b, "weight": 1}]}
    train, held = splits(data, seed=0)
    rows = train["text"]
    se = (0.75 * 0.25 / len(rows)) ** 0.5  # the share of a weight-3:1 draw, within 4 standard errors
    assert abs(share(rows, "a") - 0.75) < 4 * se, share(rows, "a")
    head = rows[:400]  # interleaved, not one source after the other
    assert abs(share(head, "a") - 0.75) < 4 * (0.75 * 0.25 / len(head)) ** 0.5
    # all_exhausted: every row of both sources is drawn, the heavier source is repeated to keep its share
    assert set(rows) == {r["text"] for r in texts("a", 600) + texts("b", 600)}
    assert len(rows) > 1200 and held is None
    assert splits(data, seed=0)[0]["text"] == rows  # a resumed run rebuilds the same mixture
    assert splits(data, seed=1)[0]["text"] != rows
    reverse = splits({"train": [{"path": a, "weight": 1}, {"path": b, "weight": 3}]})[0]["text"]
    assert abs(share(reverse, "a") - 0.25) < 4 * (0.75 * 0.25 / len(reverse)) ** 0.5


def test_mixture_keeps_the_task_columns_and_aligns_their_storage(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}", "extra": i} for i in range(20)])
    b = tmp_path / "b"  # a save_to_disk folder whose text is large_string
    features = datasets.Features({"text": datasets.Value("large_string")})
    datasets.Dataset.from_dict({"text": [f"b{i}" for i in range(20)]}, features=features).save_to_disk(str(b))
    train, _ = splits({"train": [{"path": a}, {"path": str(b)}]})
    assert train.column_names == ["text"] and train.features["text"] == datasets.Value("string")
    assert {r[0] for r in train["text"]} == {"a", "b"}


def test_mixture_columns_that_do_not_line_up_name_the_source(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [{"text": "x", "label": i % 2} for i in range(8)])
    b = jsonl(tmp_path / "b.jsonl", [{"body": "y"}] * 4)
    c = jsonl(tmp_path / "c.jsonl", [{"text": "z", "label": "pos"}] * 4)
    message = load_error({"train": [{"path": a}, {"path": b}]})
    assert message.startswith(f"data.train[1]: column 'text' not in {b} (columns: body) (set by data.text_field)")
    message = load_error({"train": [{"path": a}, {"path": c}]}, task="classification")
    assert message.startswith(
        f"data.train[1]: column 'label' of {c} holds text, but the training data's holds integers"
    )


# ---- held-out rows ---------------------------------------------------------------------------------------------
def test_eval_fraction_holds_out_rows_of_each_source_before_mixing(tmp_path):
    a, b = jsonl(tmp_path / "a.jsonl", texts("a", 300)), jsonl(tmp_path / "b.jsonl", texts("b", 100))
    data = {"train": [{"path": a, "weight": 1}, {"path": b, "weight": 3}], "eval_fraction": 0.1}
    train, held = splits(data, seed=0)
    assert share(held["text"], "a") == 30 / 40 and len(held) == 40  # 10% of each source
    assert not set(held["text"]) & set(train["text"])  # oversampling never repeats a held-out row into training
    assert len(set(train["text"])) == 360
    again = splits(data, seed=0)
    assert again[0]["text"] == train["text"] and again[1]["text"] == held["text"]
    assert splits(data, seed=5)[1]["text"] != held["text"]
    simple_train, simple_held = splits({"train": a, "eval_fraction": 0.2})
    assert (len(simple_train), len(simple_held)) == (240, 60)
    assert not set(simple_train["text"]) & set(simple_held["text"])


def test_eval_fraction_too_small_for_a_source_is_an_error(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", texts("a", 1))  # the held-out side rounds up: nothing would be left to train
    message = load_error({"train": [{"path": a}], "eval_fraction": 0.5})
    assert message.startswith(f"data.eval_fraction: 0.5 of the 1 rows of data.train[0] ({a}):"), message


def test_eval_split_from_data_files_and_a_json_builder(tmp_path):
    folder = tmp_path / "set"
    jsonl(folder / "train.jsonl", texts("t", 12))
    jsonl(folder / "dev.jsonl", texts("d", 5))
    files = {"train": "train.jsonl", "validation": "dev.jsonl"}
    train, held = splits({"train": [{"path": str(folder), "data_files": files}], "eval_split": "validation"})
    assert train["text"] == [f"t{i}" for i in range(12)] and held["text"] == [f"d{i}" for i in range(5)]
    # a local json with several splits: the json builder with a mapping split -> file
    absolute = {k: str(folder / v) for k, v in files.items()}
    train, held = splits({"train": [{"path": "json", "data_files": absolute}]})  # validation is the default eval
    assert len(train) == 12 and held["text"] == [f"d{i}" for i in range(5)]
    other = jsonl(tmp_path / "other.jsonl", texts("o", 4))
    message = load_error({"train": [{"path": str(folder), "data_files": files}, {"path": other}], "eval_split": "dev"})
    assert (
        message == f"data.eval_split: 'dev' not in {{'train','validation'}} (the splits of data.train[0] ({folder}))"
    )
    message = load_error({"train": other, "eval_split": "train"})
    assert message == f"data.eval_split: 'train' is the split {other} trains on; name a held-out split"


def test_a_missing_split_names_the_splits_the_source_has(tmp_path):
    folder = tmp_path / "set"
    jsonl(folder / "train.jsonl", texts("t", 4))
    jsonl(folder / "dev.jsonl", texts("d", 4))
    files = {"train": "train.jsonl", "validation": "dev.jsonl"}
    message = load_error({"train": [{"path": str(folder), "data_files": files, "split": "test"}]})
    assert message.startswith("data.train[0].split: 'test' not in {'train','validation'}"), message
    train, _ = splits({"train": [{"path": str(folder), "data_files": files, "split": "validation"}]})
    assert train["text"] == [f"d{i}" for i in range(4)]


def test_a_folder_of_jsonl_files_with_a_glob(tmp_path):
    folder = tmp_path / "shards"
    jsonl(folder / "part-0.jsonl", texts("p", 3))
    jsonl(folder / "part-1.jsonl", texts("q", 2))
    jsonl(folder / "notes.jsonl", texts("n", 7))
    train, _ = splits({"train": [{"path": str(folder), "data_files": "part-*.jsonl"}]})
    assert sorted(train["text"]) == ["p0", "p1", "p2", "q0", "q1"]
    train, _ = splits({"train": [{"path": str(folder), "data_files": ["notes.jsonl"]}]})
    assert len(train) == 7


def test_an_eval_list_is_concatenated_and_validation_splits_are_the_default(tmp_path):
    a, b = jsonl(tmp_path / "a.jsonl", texts("a", 3)), jsonl(tmp_path / "b.jsonl", texts("b", 2))
    _, held = splits({"train": a, "eval": [{"path": a}, {"path": b}]})
    assert held["text"] == ["a0", "a1", "a2", "b0", "b1"]  # every held-out row once, in order
    # no eval named: the validation split of each train source that has one (the builtin's, not a.jsonl's)
    _, held = splits({"train": [{"path": "builtin:stdlib-docs"}, {"path": a}]})
    assert held is not None and not {"a0", "a1", "a2"} & set(held["text"])
    assert splits({"train": a})[1] is None


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ({"path": "builtin:stdlib-docs", "data_files": "x"}, "data.train[0].data_files: a builtin: dataset takes no"),
        ({"path": "builtin:stdlib-docs", "name": "x"}, "data.train[0].name: a builtin: dataset takes no name"),
        ({"path": "FILE", "data_files": "x"}, "data.train[0].data_files: a single file takes no data_files; give its"),
        ({"path": "FOLDER", "revision": "main"}, "data.train[0].revision: a local folder takes no revision"),
        ({"path": "FOLDER", "data_files": "none-*.jsonl"}, "data.train[0]: could not read"),
    ],
)
def test_options_a_source_cannot_use_are_refused(tmp_path, source, expected):
    folder = tmp_path / "f"
    file = jsonl(folder / "a.jsonl", texts("a", 2))
    source = {**source, "path": {"FILE": file, "FOLDER": str(folder)}.get(source["path"], source["path"])}
    message = load_error({"train": [source]})
    assert message.startswith(expected), message


def test_hub_sources_pass_name_data_files_and_revision_to_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        rows = datasets.Dataset.from_dict({"text": [f"{path}-{i}" for i in range(4)]})
        return datasets.DatasetDict(train=rows) if path != "org/only-test" else datasets.DatasetDict(test=rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    source = {"path": "org/data", "name": "en", "data_files": {"train": "x.parquet"}, "revision": "v1.0", "weight": 2}
    train, _ = splits({"train": [source, {"path": "org/other"}]})
    assert calls == [
        ("org/data", {"name": "en", "data_files": {"train": "x.parquet"}, "revision": "v1.0"}),
        ("org/other", {}),
    ]
    assert {r.split("-")[0] for r in train["text"]} == {"org/data", "org/other"}
    calls.clear()
    splits({"train": "org/data"})  # the simple form: load_dataset(path), as before
    assert calls == [("org/data", {})]
    assert (
        load_error({"train": "org/only-test"}) == "data.train: 'train' not in {'test'} (the splits of org/only-test)"
    )


# ---- through build and the CLI ---------------------------------------------------------------------------------
def test_a_mixture_recipe_builds_the_same_data_twice_and_trains(tiny_recipe, tmp_path):
    extra = jsonl(tmp_path / "extra.jsonl", [{"text": f"extra row {i} " * 4} for i in range(40)])
    data = {
        "train": [{"path": "builtin:stdlib-docs", "weight": 3}, {"path": extra, "weight": 1}],
        "eval_fraction": 0.1,
        "max_train_samples": 64,
        "max_eval_samples": 16,
    }
    recipe = Recipe.parse(
        tiny_recipe(data=data, training={"max_steps": 2, "eval_strategy": "steps", "eval_steps": 2, "seed": 3})
    )
    first, second = build(recipe), build(recipe)
    assert first.train_dataset["input_ids"] == second.train_dataset["input_ids"]
    assert first.eval_dataset["input_ids"] == second.eval_dataset["input_ids"] and len(first.eval_dataset) == 16
    first.trainer.train()
    assert any("eval_loss" in entry for entry in first.trainer.state.log_history)


@pytest.mark.usefixtures("log_to_this_tests_stderr")
@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"train": [{"path": "A"}, {"path": "A", "weight": -1}]}, "data.train[1].weight: must be > 0 (got -1)"),
        ({"train": [{"path": "DIR", "data_files": "FILES", "split": "test"}]}, "data.train[0].split: 'test' not in"),
        ({"train": [{"path": "A"}, {"path": "B"}]}, "data.train[1]: column 'text' not in"),
        ({"train": "A", "eval_split": "validation"}, "data.eval_split: 'validation' not in {'train'}"),
        ({"train": [{"path": "no-such-org/no-such-data", "revision": "v2"}]}, "data.train[0]: 'no-such-org/no-such"),
    ],
)
def test_bad_sources_exit_2_with_one_line(tiny_recipe, tmp_path, capsys, data, expected):
    names = {"A": jsonl(tmp_path / "a.jsonl", texts("a", 40)), "B": jsonl(tmp_path / "b.jsonl", [{"body": "x"}] * 4)}
    jsonl(tmp_path / "dir" / "train.jsonl", texts("t", 40))
    jsonl(tmp_path / "dir" / "dev.jsonl", texts("d", 4))
    names |= {"DIR": str(tmp_path / "dir"), "FILES": {"train": "train.jsonl", "validation": "dev.jsonl"}}
    if isinstance(data["train"], list):
        data["train"] = [
            {k: names.get(v, v) if isinstance(v, str) else v for k, v in s.items()} for s in data["train"]
        ]
    else:
        data["train"] = names[data["train"]]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(data=data)))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), err
    assert "Traceback" not in err and not (tmp_path / "run").exists()
