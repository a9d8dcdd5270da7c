"""Every bad conversation-data input through the CLI (formats, turns, roles, loss_on, chat templates): exit 2, one
``error:`` line naming the field, no traceback, no output dir."""

from __future__ import annotations

import copy
import json

import yaml

from hf_efftrain.builtins import get_tokenizer
from hf_efftrain.cli import main

GOOD = [{"messages": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]}] * 8


def _write(tmp_path, name: str, rows: list[dict]) -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _bad_inputs(tmp_path) -> dict[str, tuple[dict, str]]:
    """name -> (recipe sections merged into a good recipe, what the one error line says)."""
    bare = tmp_path / "bare_tokenizer"
    plain = copy.deepcopy(get_tokenizer())
    plain.chat_template = None
    plain.save_pretrained(bare)
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}")

    def data(name: str, row: dict, **fields) -> dict:  # a data section on a file of 8 copies of ``row``
        return {"data": {"train": _write(tmp_path, f"{name}.jsonl", [row] * 8), **fields}}

    user = {"role": "user", "content": "hi"}
    bert = {"name_or_path": "builtin:tiny-bert", "task": "masked_lm"}
    return {
        "format_value": (
            {"data": {"format": "chatml"}},
            "data.format: must be one of 'auto', 'text', 'prompt_completion'",
        ),
        "loss_on_value": (
            {"data": {"loss_on": "assistant"}},
            "data.loss_on: must be one of 'assistant_only', 'completion_only' or 'all'",
        ),
        "missing_column": (
            data("t", {"text": "a"}, format="messages"),
            "data.messages_field: column 'messages' not in",
        ),
        "not_turns": (data("s", {"messages": "hi"}), "data.messages_field: column 'messages'"),
        "role": (
            data("r", {"messages": [{"role": "bot", "content": "x"}]}),
            "data.messages_field: row 1, turn 1: role 'bot'; allowed: system, developer, user, assistant, tool",
        ),
        "content": (
            data("c", {"messages": [{"role": "user", "content": 3}]}),
            "data.messages_field: row 1, turn 1: content must be text, not int",
        ),
        "sharegpt_from": (
            data("g", {"conversations": [{"from": "bot", "value": "x"}]}),
            "data.messages_field: row 1, turn 1: 'from' is 'bot'",
        ),
        "loss_on_format": (
            {"data": {"loss_on": "completion_only"}},
            "data.loss_on: completion_only does not apply to messages data; allowed: assistant_only, all",
        ),
        "loss_on_task": (
            {**data("x", {"text": "a b c"}, loss_on="all"), "model": bert},
            "data.loss_on: applies to causal_lm and sft data",
        ),
        "format_task": (
            {"data": {"format": "messages"}, "model": {"task": "causal_lm"}},
            "data.format: messages data does not fit model.task causal_lm",
        ),
        "template_file": ({"model": {"chat_template": str(tmp_path / "nope.jinja")}}, "model.chat_template: "),
        "template_broken": (
            {"model": {"chat_template": str(tmp_path / "broken.jinja")}},
            "model.chat_template: not a usable chat template",
        ),
        "no_template": (
            {"model": {"tokenizer": str(bare)}},
            "model.chat_template: the tokenizer has no chat template",
        ),
        "num_proc": ({"data": {"num_proc": 0}}, "data.num_proc: "),
        "no_answers": (data("e", {"messages": [user]}), "data.train: no example left"),
    }


def test_every_bad_input_is_one_line_naming_the_field(tmp_path, tiny_recipe, capsys):
    wrong = []
    for name, (sections, expected) in _bad_inputs(tmp_path).items():
        recipe = tiny_recipe(data={"train": _write(tmp_path, "good.jsonl", GOOD), "max_train_samples": None})
        for key, value in sections.items():
            recipe[key] = {**recipe[key], **value}
        recipe["training"]["output_dir"] = str(tmp_path / name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        code = main(["train", str(path)])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        if not (code == 2 and len(lines) == 1 and expected in lines[0] and "Traceback" not in err):
            wrong.append((name, code, err[-300:]))
        assert not (tmp_path / name).exists(), name  # no half-written output dir
    assert wrong == []
