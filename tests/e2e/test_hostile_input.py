"""Hostile input, end to end: every malformed recipe, data file or model folder gives `hf-efftrain validate|train`
exit code 2 and one ``error: <field path>: ...`` line (no traceback, no hang, no run report), or is a documented,
counted skip (null/empty rows, truncated rows). What `train` refuses before its first step, `validate` (a dry build,
core/dry_run.py) refuses with the same line (both_refuse). The table in docs/FAULTS.md ("Input faults") points here.

Runs go through ``hf_efftrain.cli.main`` in-process (fast); two subprocess tests show that nothing reaches a real
stderr but the one line. Nothing here trains more than one step.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hf_efftrain.cli import main

ROOT = Path(__file__).resolve().parents[2]
# A hang is a failure, not a stuck CI job; logging binds to each test's own stderr (tests/conftest.py).
pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("log_to_this_tests_stderr")]


# ---- helpers --------------------------------------------------------------------------------------------------
def write_recipe(tmp_path: Path, recipe: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def assert_user_error(code: int, err: str, expected: str, output_dir: Path | None = None) -> None:
    """Exit 2, exactly one ``error:`` line holding ``expected``, no traceback, and no run report written."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    if output_dir is not None:
        assert not (output_dir / "run_report.json").exists()


def both_refuse(tmp_path, capsys, tiny_recipe, expected: str, **sections) -> None:
    """`validate` (a dry build, core/dry_run.py) and `train` refuse the recipe with the same one line; neither
    leaves a run report, and `validate` leaves no output folder at all."""
    recipe = tiny_recipe(**sections)
    path, output_dir = write_recipe(tmp_path, recipe), Path(recipe["training"]["output_dir"])
    lines = {}
    for command in ("validate", "train"):
        code, err = run_cli(capsys, command, str(path))
        assert_user_error(code, err, expected, output_dir)
        lines[command] = [line for line in err.splitlines() if line.startswith("error: ")]
        if command == "validate":
            assert not output_dir.exists(), "validate wrote into the output folder"
    assert lines["validate"] == lines["train"]


def own_data(path: Path | str, **fields) -> dict:
    """data section for a local file, without the built-in corpus' sample limits."""
    return {"train": str(path), "max_train_samples": None, "max_eval_samples": None, **fields}


# ---- the recipe file itself -----------------------------------------------------------------------------------
BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")
)
RECIPE_FILES = [
    ("empty", b"", "recipe: {path} is empty"),
    ("comment_only", b"# nothing here\n", "recipe: {path} is empty"),
    ("list", b"- model\n- data\n", "recipe: {path}: a recipe is a mapping"),
    ("scalar", b"just words\n", "recipe: {path}: a recipe is a mapping"),
    ("not_utf8", b"model:\n  name_or_path: caf\xe9\n", "recipe: {path} is not UTF-8 text (byte 26: b'\\xe9')"),
    ("tabs", b"model:\n\tname_or_path: x\n", "recipe: {path} is not valid YAML: line 2, column 1: found character"),
    ("duplicate_key", b"model: {name_or_path: a}\nmodel: {name_or_path: b}\n", "duplicate key 'model'"),
    ("unclosed", b"model: [unclosed\n", "recipe: {path} is not valid YAML: line 2"),
    ("bad_date", b"model: {name_or_path: 2024-13-45}\n", "recipe: {path} is not valid YAML: ValueError month"),
    ("python_tag", b"model: !!python/object/apply:os.system [ls]\n", "could not determine a constructor"),
    ("alias_bomb", BOMB.encode(), "recipe: {path}: expands to"),
    ("self_reference", b"model: &m {name_or_path: x, again: *m}\n", "recipe: {path}: refers to itself"),
    ("deep_nesting", b"model: " + b"[" * 5000 + b"]" * 5000 + b"\n", "recipe: {path} is not valid YAML"),
    ("huge", b"# " + b"x" * 2_000_000 + b"\n", "bytes; a recipe is at most"),
]


@pytest.mark.parametrize(("name", "content", "expected"), RECIPE_FILES, ids=[c[0] for c in RECIPE_FILES])
@pytest.mark.parametrize("command", ["validate", "train"])
def test_malformed_recipe_file(tmp_path, capsys, command, name, content, expected):
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(content)
    code, err = run_cli(capsys, command, str(path))
    assert_user_error(code, err, expected.format(path=path), tmp_path / "runs")


@pytest.mark.parametrize("kind", ["missing", "folder", "fifo"])
def test_recipe_path_that_is_not_a_file(tmp_path, capsys, kind):
    path = tmp_path / "r.yaml"
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # reading it would block forever
    code, err = run_cli(capsys, "validate", str(path))
    expected = "file not found" if kind == "missing" else "is not a regular file"
    assert_user_error(code, err, f"recipe: {expected if kind == 'missing' else f'{path} {expected}'}")


# ---- fields: types, unknown keys, huge, negative, non-finite ----------------------------------------------------
FIELDS = [
    ({"training": {"max_steps": 10**30}}, "training.max_steps: out of range (got a 31-digit number)"),
    ({"training": {"max_steps": "many"}}, "training.max_steps: Input should be a valid integer"),
    ({"training": {"per_device_train_batch_size": 0}}, "training.per_device_train_batch_size: must be >= 1 (got 0)"),
    ({"training": {"gradient_accumulation_steps": -2}}, "training.gradient_accumulation_steps: must be >= 1"),
    ({"training": {"learning_rate": float("nan")}}, "training.learning_rate: must be a finite number (got nan)"),
    ({"training": {"learning_rate": float("inf")}}, "training.learning_rate: must be a finite number (got inf)"),
    ({"training": {"learning_rate": -1e-3}}, "training.learning_rate: must be >= 0"),
    ({"training": {"weight_decay": -0.1}}, "training.weight_decay: must be >= 0"),
    ({"training": {"max_grad_norm": -1.0}}, "training.max_grad_norm: must be >= 0"),
    ({"training": {"adam_beta1": 1.5}}, "training.adam_beta1: must be < 1 (got 1.5)"),
    ({"training": {"seed": -1}}, "training.seed: must be >= 0 (got -1)"),
    ({"training": {"seed": 2**40}}, "training.seed: must be < 4294967296 (got 1099511627776)"),
    ({"training": {"dataloader_num_workers": -1}}, "training.dataloader_num_workers: must be >= 0"),
    ({"training": {"no_such_arg": 1}}, "training.no_such_arg: not a transformers.TrainingArguments field"),
    ({"training": ["max_steps", 3]}, "training: must be a mapping"),
    ({"data": {"max_length": 10**9}}, "data.max_length: must be <= 1048576 (got 1000000000)"),
    ({"data": {"max_length": -5}}, "data.max_length: must be >= 8 (got -5)"),
    ({"data": {"max_train_samples": 0}}, "data.max_train_samples: must be >= 1 (got 0)"),
    ({"data": {"train": None}}, "data.train: Input should be a valid string (got None)"),
    ({"data": {"colour": "red"}}, "data.colour: unknown field; allowed: train, eval"),
    ({"model": {"name_or_path": ["a", "b"]}}, "model.name_or_path: Input should be a valid string"),
    ({"model": {"num_labels": 10**30}}, "model.num_labels: out of range"),
    (
        {"model": {"config_overrides": {"rope_theta": float("inf")}}},
        "model.config_overrides.rope_theta: must be a fin",
    ),
    ({"model": {"": 1}}, "model['']: unknown field; allowed: name_or_path"),
    ({"techniques": [{"name": ["lion"]}]}, "techniques[0].name: must be a technique name"),
    ({"techniques": [{"name": "lion", "lr": float("nan")}]}, "techniques[0].lr: must be a finite number"),
    ({"techniques": [{"name": "lion", "colour": 1}]}, "techniques[0].colour: unknown field; allowed: name"),
    ({"techniques": {"name": "lion"}}, "techniques: must be a list"),
    ({"surprise": {}}, "surprise: unknown field; allowed: model, data, training, techniques"),
]


@pytest.mark.parametrize(("change", "expected"), FIELDS, ids=[e.split(":")[0] for _, e in FIELDS])
def test_bad_field_is_named_by_validate_and_train(tmp_path, capsys, tiny_recipe, change, expected):
    recipe = tiny_recipe()
    output_dir = Path(recipe["training"]["output_dir"])
    for section, value in change.items():
        merge = isinstance(value, dict) and section in ("model", "data", "training")
        recipe[section] = {**recipe[section], **value} if merge else value
    path = write_recipe(tmp_path, recipe)
    for command in ("validate", "train"):
        code, err = run_cli(capsys, command, str(path))
        assert_user_error(code, err, expected, output_dir)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("training.max_steps", "--set: expected key.path=value"),
        ("=3", "--set: empty key"),
        ("training.max_steps=.nan", "training.max_steps: must be a finite number (got nan)"),
        ("training.learning_rate=.inf", "training.learning_rate: must be a finite number (got inf)"),
        ("model.name_or_path.x=1", "--set model.name_or_path.x: model.name_or_path is not a mapping"),
        ("techniques[3].lr=1", "--set techniques[3].lr: index out of range (got 3); the recipe has 0 techniques"),
        ("techniques.lion=1", "--set techniques.lion: set a technique's field"),
        ("training.seed=2024-13-45", "training.seed: Input should be a valid integer"),
    ],
)
def test_bad_set_override(tmp_path, capsys, tiny_recipe, override, expected):
    path = write_recipe(tmp_path, tiny_recipe())
    code, err = run_cli(capsys, "validate", str(path), "--set", override)
    assert_user_error(code, err, expected)


# ---- data files -------------------------------------------------------------------------------------------------
def _parquet_rows(path: Path, rows: list[str]) -> None:
    import datasets

    datasets.Dataset.from_dict({"text": rows}, features=datasets.Features(text=datasets.Value("string"))).to_parquet(
        path
    )


DATA_FILES = [
    ("e.jsonl", b"", {}, "data.train: dataset '{path}' is empty"),
    ("blank.jsonl", b"\n  \n\n", {}, "data.train: dataset '{path}' is empty (no rows)"),
    ("e.json", b"[]", {}, "data.train: dataset '{path}' is empty (no rows)"),
    ("e.csv", b"text\n", {}, "data.train: dataset '{path}' is empty (no rows)"),
    ("e.txt", b"", {}, "data.train: dataset '{path}' is empty"),
    ("e.parquet", b"", {}, "data.train: dataset '{path}' is empty"),
    ("rows0.parquet", None, {}, "data.train: dataset '{path}' is empty"),
    ("g.parquet", b"PAR1 not really parquet", {}, "data.train: could not read {path}: ArrowInvalid"),
    ("blank.txt", b"\n\n   \n", {}, "data.train: no example left in {path}: all 3 rows are null or empty"),
    ("empty_strings.jsonl", b'{"text": ""}\n{"text": null}\n', {}, "data.train: no example left in {path}: all 2"),
    ("latin1.txt", b"fine words\ncaf\xe9 au lait\n", {}, "data.train: could not read {path}: line 2 is not UTF-8"),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', {}, "data.train: {path}: line 2 is not UTF-8 text"),
    ("broken.jsonl", b'{"text": "a b"}\n{"text": "c d\n{"text": "e"}\n', {}, "{path}: line 2 is not valid JSON"),
    ("broken.json", b'[{"text": "a"}, {"text": ]', {}, "data.train: could not read {path}: not valid JSON"),
    ("quote.csv", b'text\n"never closed\nmore\n', {}, "data.train: could not read {path}: ParserError"),
    ("ints.jsonl", b'{"text": 1}\n{"text": 2}\n', {}, "data.text_field: column 'text' in {path} must hold text"),
    ("mixed.jsonl", b'{"text": "a b"}\n{"text": 2}\n', {}, "data.text_field: column 'text' in {path} must hold text"),
    ("lists.jsonl", b'{"text": ["a"]}\n', {}, "data.text_field: column 'text' in {path} must hold text (strings)"),
    ("body.jsonl", b'{"body": "a b c"}\n', {}, "data.text_field: column 'text' not in {path} (columns: body)"),
    ("data.xml", b"<text>a</text>", {}, "data.train: unsupported file type '.xml'; allowed: .json"),
]


@pytest.mark.parametrize(("name", "content", "fields", "expected"), DATA_FILES, ids=[c[0] for c in DATA_FILES])
def test_malformed_data_file(tmp_path, capsys, tiny_recipe, name, content, fields, expected):
    path = tmp_path / name
    if content is None:
        _parquet_rows(path, [])
    else:
        path.write_bytes(content)
    both_refuse(tmp_path, capsys, tiny_recipe, expected.format(path=path), data=own_data(path, **fields))


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "link_to_dev_zero", "folder_with_fifo", "empty_folder"])
def test_data_path_that_would_hang_or_is_not_a_file(tmp_path, capsys, tiny_recipe, kind):
    """A FIFO never ends (or blocks on open), /dev/zero never ends: refused by file type, before any read."""
    path = {"fifo": tmp_path / "d.jsonl", "dev_zero": Path("/dev/zero"), "link_to_dev_zero": tmp_path / "z.txt"}.get(
        kind, tmp_path / "folder"
    )
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "link_to_dev_zero":
        path.symlink_to("/dev/zero")
    elif "folder" in kind:
        path.mkdir()
        if kind == "folder_with_fifo":
            (path / "a.jsonl").write_text('{"text": "a b c"}\n')
            os.mkfifo(path / "b.jsonl")
    expected = {
        "folder_with_fifo": f"data.train: {path / 'b.jsonl'} is not a regular file",
        "empty_folder": f"data.train: folder '{path}' holds no data files",
    }.get(kind, f"data.train: {path} is not a regular file (a FIFO, socket or device)")
    both_refuse(tmp_path, capsys, tiny_recipe, expected, data=own_data(path))


def test_missing_text_column_in_the_eval_file(tmp_path, capsys, tiny_recipe):
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps({"text": f"row {i} of words"}) + "\n" for i in range(16)))
    evaluation.write_text('{"body": "x"}\n')
    expected = f"data.text_field: column 'text' not in {evaluation} (columns: body)"
    both_refuse(tmp_path, capsys, tiny_recipe, expected, data=own_data(train, eval=str(evaluation)))


def test_sft_without_a_response_column(tmp_path, capsys, tiny_recipe):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "say hi"}\n')
    expected = f"data.response_field: column 'response' not in {path} (columns: prompt)"
    both_refuse(tmp_path, capsys, tiny_recipe, expected, data=own_data(path), model={"task": "sft"})


CLASSIFICATION = [
    ([{"text": "a b", "label": 1}] * 4, {}, "data.label_field: classification needs at least 2 classes in the "),
    ([{"text": "a b", "label": "pos"}] * 4, {}, "training set; column 'label' has pos"),
    (
        [{"text": "a b", "label": 0.5}, {"text": "c", "label": 1.5}],
        {},
        "must hold class ids (integers) or class names",
    ),
    (
        [{"text": "a", "label": 0}, {"text": "b", "label": 10**6}],
        {},
        "data.label_field: class id 1000000 is too large",
    ),
    ([{"text": "a", "label": -1}, {"text": "b", "label": 1}], {}, "data.label_field: labels must be >= 0"),
    (
        [{"text": "a", "label": 0}, {"text": "b", "label": 5}],
        {"num_labels": 2},
        "model.num_labels: 2 but the data has 6",
    ),
]


@pytest.mark.parametrize(("rows", "model", "expected"), CLASSIFICATION)
def test_bad_classification_labels(tmp_path, capsys, tiny_recipe, rows, model, expected):
    path = tmp_path / "cls.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = {"name_or_path": "builtin:tiny-bert", "task": "classification", **model}
    both_refuse(tmp_path, capsys, tiny_recipe, expected, data=own_data(path), model=model)


def test_batch_of_a_billion_fails_before_allocating(tmp_path, capsys, tiny_recipe):
    expected = "training.per_device_train_batch_size: 1000000000 x 1 processes is more than the 256 training examples"
    both_refuse(tmp_path, capsys, tiny_recipe, expected, training={"per_device_train_batch_size": 10**9})


def test_rows_longer_than_the_model_positions(tmp_path, capsys, tiny_recipe):
    path = tmp_path / "long.txt"
    path.write_text(("word " * 1500 + "\n") * 8)
    expected = (
        "but the model takes at most 1024 positions (config.max_position_embeddings); set data.max_length <= 1024"
    )
    model = {"name_or_path": "builtin:tiny-gpt2"}
    both_refuse(tmp_path, capsys, tiny_recipe, expected, data=own_data(path, max_length=2048), model=model)


BUILD_ONLY = [  # caught by building what train builds: TrainingArguments, Trainer.__init__, the built-ins
    (
        {"training": {"load_best_model_at_end": True, "save_strategy": "no", "eval_strategy": "steps"}},
        "training: --load_best_model_at_end requires the save and eval strategy to match",
    ),
    (
        {"training": {"save_strategy": "best", "eval_strategy": "steps", "eval_steps": 1}},
        "training: `args.metric_for_best_model` must be provided when using 'best' save_strategy",
    ),
    (
        {
            "training": {
                "gradient_accumulation_steps": 2,
                "accelerator_config": {"gradient_accumulation_kwargs": {"num_steps": 2}},
            }
        },
        "training: The `AcceleratorConfig`'s `num_steps` is set but `gradient_accumulation_steps` is greater than 1",
    ),
    ({"model": {"name_or_path": "builtin:tiny-nope"}}, "model.name_or_path: unknown builtin model 'tiny-nope'"),
    ({"data": {"train": "builtin:nope"}}, "data.train: unknown builtin dataset 'nope'; allowed: builtin:"),
    ({"training": {"resume_from_checkpoint": "no/such/checkpoint"}}, "resume: no checkpoint folder at no/such/chec"),
]


BUILD_ONLY_IDS = [
    "best_model_without_saves",
    "best_without_metric",
    "accumulation_twice",
    "model",
    "data",
    "resume_folder",
]


@pytest.mark.parametrize(("change", "expected"), BUILD_ONLY, ids=BUILD_ONLY_IDS)
def test_a_combination_only_a_build_refuses(tmp_path, capsys, tiny_recipe, change, expected):
    both_refuse(tmp_path, capsys, tiny_recipe, expected, **change)


def test_eval_strategy_without_eval_data(tmp_path, capsys, tiny_recipe):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i} of words"}) + "\n" for i in range(16)))
    expected = "training.eval_strategy: needs an evaluation set: set data.eval"
    both_refuse(tmp_path, capsys, tiny_recipe, expected, data=own_data(path), training={"eval_strategy": "steps"})


# ---- counted skips: null / empty rows, truncation ------------------------------------------------------------------
def test_null_empty_and_long_rows_are_skipped_or_truncated_and_counted(tmp_path, capsys, caplog, tiny_recipe):
    good = [f"row {i} has a few ordinary words" for i in range(12)]
    rows = [*good, None, "", None, *["long " * 200] * 3]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    recipe = tiny_recipe(data=own_data(path, max_length=16), training={"max_steps": 1})
    caplog.set_level(logging.INFO, logger="hf_efftrain.core.data")
    code, err = run_cli(capsys, "train", str(write_recipe(tmp_path, recipe)))
    assert code == 0, err
    report = json.loads((Path(recipe["training"]["output_dir"]) / "run_report.json").read_text())
    assert report["data"]["data.train"] == {"rows": 18, "skipped_empty": 3, "truncated": 3, "max_length": 16}
    assert "data.train: 3 of 18 rows skipped (null or empty text" in caplog.text
    assert "3 truncated to data.max_length=16 tokens" in caplog.text


@pytest.mark.parametrize("task", ["causal_lm", "sft", "seq2seq", "masked_lm", "classification"])
def test_truncation_flags_match_a_reference_count(task):
    """Per task, ``truncated`` counts exactly the rows whose untruncated encoding (with specials) is longer than
    max_length, every kept row fits, and empty or null rows are the ones skipped."""
    import datasets

    from hf_efftrain.builtins import get_tokenizer
    from hf_efftrain.core.data import tokenize
    from hf_efftrain.core.recipe import DataSection

    tok = get_tokenizer()
    if task == "sft":  # SFT_TEMPLATE is the rendering for a tokenizer without a chat template (core/data/chat.py)
        import copy

        tok = copy.deepcopy(tok)
        tok.chat_template = None
    limit = 40 if task == "sft" else 12  # the SFT template alone takes a dozen tokens
    cfg = DataSection(train="x", max_length=limit)
    texts = ["a b", "word " * 5, "word " * 11, "word " * 30, "", None, "  ", "the quick brown fox jumps over it"]
    columns = {"text": texts, "prompt": texts, "response": list(reversed(texts)), "label": [0, 1] * 4}
    stats: dict = {}
    out = tokenize(datasets.Dataset.from_dict(columns), task, tok, cfg, "data.train", stats)
    assert max(len(r) for r in out["input_ids"]) <= limit

    def n(text):  # untruncated content tokens; blank text counts as empty
        return 0 if text is None or text.isspace() else len(tok(text, add_special_tokens=False)["input_ids"])

    if task in ("causal_lm", "masked_lm", "classification"):
        specials = 2  # bos+eos / cls+sep
        expected_trunc = sum(n(t) + specials > limit for t in texts)
        expected_skip = sum(n(t) == 0 for t in texts)
    elif task == "seq2seq":
        pairs = list(zip(texts, reversed(texts)))
        expected_trunc = sum(max(n(p), n(r)) + 1 > limit for p, r in pairs)
        expected_skip = sum(n(p) == 0 or n(r) == 0 for p, r in pairs)
    else:  # sft: bos + template(prompt), then response + eos
        from hf_efftrain.core.data import SFT_TEMPLATE

        pairs = list(zip(texts, reversed(texts)))
        lengths = [(1 + n(SFT_TEMPLATE.format(prompt=p)) if p is not None else 1, n(r) + 1) for p, r in pairs]
        expected_trunc = sum(a + b > limit for a, b in lengths)
        expected_skip = sum(p is None or n(r) == 0 or a >= limit for (p, r), (a, _) in zip(pairs, lengths))
    assert stats["data.train"]["truncated"] == expected_trunc
    assert stats["data.train"]["skipped_empty"] == expected_skip
    assert len(out) == len(texts) - expected_skip


def test_rows_with_null_labels_are_skipped_and_logged(tmp_path, capsys, caplog, tiny_recipe):
    rows = [{"text": f"row {i} words", "label": [0, 1, None][i % 3]} for i in range(24)]
    path = tmp_path / "cls.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tiny_recipe(
        data=own_data(path),
        model={"name_or_path": "builtin:tiny-bert", "task": "classification"},
        training={"max_steps": 1},
    )
    caplog.set_level(logging.INFO, logger="hf_efftrain.core.data")
    code, err = run_cli(capsys, "train", str(write_recipe(tmp_path, recipe)))
    assert code == 0, err
    assert "data.train: 8 of 24 rows skipped (null label)" in caplog.text


# ---- model folders --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A one-layer tiny Llama saved with save_pretrained (config.json, model.safetensors, tokenizer files)."""
    import transformers

    from hf_efftrain.builtins import builtin_config, get_tokenizer

    tok = get_tokenizer()
    config = builtin_config("tiny-llama", tok)
    config.num_hidden_layers = 1
    folder = tmp_path_factory.mktemp("model") / "good"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    small = folder.parent / "small_vocab"  # an embedding smaller than the tokenizer it ships with
    config.vocab_size = 512
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(small)
    tok.save_pretrained(small)
    return folder


def _broken_copy(src: Path, dst: Path, kind: str) -> Path:
    import shutil

    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    if kind == "no_config":
        (dst / "config.json").unlink()
    elif kind == "bad_config":
        (dst / "config.json").write_text("{not json")
    elif kind == "corrupt_weights":
        weights.write_bytes(b"\x00garbage" * 16)
    elif kind == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "no_weights":
        weights.unlink()
    return dst


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("no_config", "model.name_or_path: {path} has no config.json"),
        ("bad_config", "model.name_or_path: could not read {path}/config.json"),
        ("corrupt_weights", "model.name_or_path: {path}/model.safetensors is not a readable safetensors file"),
        ("truncated_weights", "model.name_or_path: {path}/model.safetensors is not a readable safetensors file"),
        ("no_weights", "model.name_or_path: could not load the weights of {path}: OSError"),
        ("small_vocab", "model.tokenizer: tokenizer has 4096 tokens but the model's embedding has 512"),
    ],
)
def test_broken_model_folder(tmp_path, capsys, tiny_recipe, model_folder, kind, expected):
    if kind == "small_vocab":
        path = model_folder.parent / "small_vocab"
    else:
        path = _broken_copy(model_folder, tmp_path / kind, kind)
    model = {"name_or_path": str(path), "config_overrides": {}}
    both_refuse(tmp_path, capsys, tiny_recipe, expected.format(path=path), model=model)


def test_a_good_model_folder_still_trains(tmp_path, capsys, tiny_recipe, model_folder):
    """The checks above must not reject the real thing."""
    recipe = tiny_recipe(model={"name_or_path": str(model_folder), "config_overrides": {}}, training={"max_steps": 1})
    path = write_recipe(tmp_path, recipe)
    for command in ("validate", "train"):
        code, err = run_cli(capsys, command, str(path))
        assert code == 0, err


# ---- as a user runs it: a real process, a real stderr ------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "hf_efftrain", *args], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env
    )


def test_subprocess_non_utf8_recipe_prints_one_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"model:\n  name_or_path: \xff\xfe\n")
    res = _cli("validate", str(path))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: recipe: {path} is not UTF-8 text (byte 23: b'\\xff')"]


def test_subprocess_fifo_data_file_does_not_hang(tmp_path, tiny_recipe):
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    recipe = tiny_recipe(data=own_data(fifo))
    path = write_recipe(tmp_path, recipe)
    for command in ("validate", "train"):
        res = _cli(command, str(path))
        assert res.returncode == 2, res.stderr
        assert "Traceback" not in res.stderr
        errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
        assert errors == [
            f"error: data.train: {fifo} is not a regular file (a FIFO, socket or device); give a data file"
        ]
        assert not (tmp_path / "run" / "run_report.json").exists()
