"""Conversation data: formats, chat-template rendering and assistant-only labels, checked token by token against
hand renders (the built-in ChatML template with generation markers, and a template without them), the formats that
must render alike (messages, sharegpt, alpaca, prompt/completion), templates that cannot be masked, and the
techniques that must keep working on conversation data. Bad inputs through the CLI: tests/e2e/test_chat_errors.py."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import datasets
import pytest

from hf_efftrain import Recipe, RecipeError, train
from hf_efftrain.builtins import get_tokenizer, load_builtin_dataset
from hf_efftrain.builtins.tokenizer import CHATML_TEMPLATE
from hf_efftrain.core.build import build
from hf_efftrain.core.data import SFT_TEMPLATE, data_format, tokenize, with_chat_template
from hf_efftrain.core.data.chat import GENERATION_MARKER, encode
from hf_efftrain.core.sections import DataSection

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant. Answer in capital letters."},
    {"role": "user", "content": "Uppercase: open file"},
    {"role": "assistant", "content": "OPEN FILE"},
    {"role": "user", "content": "Add 2 and 40."},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "Repeat your last answer."},
    {"role": "assistant", "content": "42"},
]
# Llama-2 style: no role header for the answer, no {% generation %} markers, add_generation_prompt ignored.
NO_MARKERS = (
    "{%- for m in messages %}"
    "{%- if m['role'] == 'system' %}{{- '<s>[SYS] ' + m['content'] + ' [/SYS]\\n' }}"
    "{%- elif m['role'] == 'user' %}{{- '[INST] ' + m['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' ' + m['content'] + '</s>\\n' }}{%- endif %}"
    "{%- endfor %}"
)


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def _tokenize(rows: list[dict], tokenizer, stats: dict | None = None, **data) -> datasets.Dataset:
    cfg = DataSection(train="x.jsonl", max_length=data.pop("max_length", 512), **data)
    return tokenize(datasets.Dataset.from_list(rows), "sft", tokenizer, cfg, "data.train", stats)


def _pieces(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """A hand render: each (text, labelled) piece tokenized on its own; its ids are the labels where labelled."""
    ids, labels = [], []
    for text, labelled in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if labelled else [-100] * len(piece)
    assert ids == tokenizer("".join(t for t, _ in pieces), add_special_tokens=False)["input_ids"]  # same tokens
    return ids, labels


def test_builtin_template_labels_exactly_the_assistant_tokens(tok):
    assert GENERATION_MARKER.search(tok.chat_template) and tok.chat_template == CHATML_TEMPLATE
    pieces = []
    for m in CONVERSATION:
        if m["role"] == "assistant":
            pieces += [("<|im_start|>", False), ("assistant\n", False), (m["content"], True)]
            pieces += [("<|im_end|>", True), ("\n", True)]
        else:
            pieces += [("<|im_start|>", False), (f"{m['role']}\n{m['content']}", False), ("<|im_end|>\n", False)]
    ids, labels = _pieces(tok, pieces)
    row = _tokenize([{"messages": CONVERSATION}], tok)[0]
    assert row["input_ids"] == ids and row["labels"] == labels and row["attention_mask"] == [1] * len(ids)
    for t in ("<|im_start|>", "<|im_end|>"):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1  # a control token, never split
    assert tok.decode([t for t in labels if t != -100]) == "OPEN FILE<|im_end|>\n42<|im_end|>\n42<|im_end|>\n"


def test_template_without_markers_is_masked_by_prefix_renders(tok):
    plain = with_chat_template(tok, NO_MARKERS)
    assert not GENERATION_MARKER.search(plain.chat_template) and tok.chat_template == CHATML_TEMPLATE  # a copy
    system, turns = CONVERSATION[0], CONVERSATION[1:]
    pieces = [("<s>", False), (f"[SYS] {system['content']} [/SYS]\n", False)]
    for user, answer in zip(turns[::2], turns[1::2]):
        pieces += [(f"[INST] {user['content']} [/INST]", False), (" " + answer["content"], True)]
        pieces += [("</s>", True), ("\n", True)]
    ids, labels = _pieces(plain, pieces)
    row = _tokenize([{"messages": CONVERSATION}], plain)[0]
    assert row["input_ids"] == ids and row["labels"] == labels


def test_prefix_masks_equal_the_generation_markers_on_real_conversations(tok):
    """The same ChatML template with its markers removed: the prefix fallback finds the same tokens, row by row."""
    stripped = with_chat_template(
        tok, CHATML_TEMPLATE.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    )
    assert not GENERATION_MARKER.search(stripped.chat_template)
    rows = load_builtin_dataset("chat-synthetic")["train"].select(range(64)).to_list()
    marked, plain = _tokenize(rows, tok), _tokenize(rows, stripped)
    assert marked["input_ids"] == plain["input_ids"] and marked["labels"] == plain["labels"]
    masked = sum(t == -100 for r in marked["labels"] for t in r)
    assert 0 < masked < sum(len(r) for r in marked["labels"])


def test_sharegpt_alpaca_and_prompt_completion_render_like_messages(tok):
    prompt, extra, answer = "Reverse the words: open file", "and be quick", "file open"
    user = f"{prompt}\n\n{extra}"
    expected = _tokenize(
        [{"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}], tok
    )
    forms = {
        "sharegpt": {"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]},
        "alpaca": {"instruction": prompt, "input": extra, "output": answer},
        "trl": {"prompt": user, "completion": answer},
        "default": {"prompt": prompt, "input": extra, "response": answer},
    }
    for name, row in forms.items():
        got = _tokenize([row], tok)
        assert got["input_ids"] == expected["input_ids"] and got["labels"] == expected["labels"], name
    system = {"role": "system", "content": "Be brief."}
    with_system = _tokenize(
        [{"messages": [system, *[{"role": "user", "content": user}, {"role": "assistant", "content": answer}]]}], tok
    )
    sharegpt = _tokenize(
        [{"conversations": [{"from": "system", "value": "Be brief."}, *forms["sharegpt"]["conversations"]]}], tok
    )
    assert sharegpt["input_ids"] == with_system["input_ids"] and sharegpt["labels"] == with_system["labels"]
    # An empty alpaca input adds nothing to the prompt.
    alone = _tokenize([{"instruction": prompt, "input": "", "output": answer}], tok)
    assert alone["input_ids"] == _tokenize([{"prompt": prompt, "completion": answer}], tok)["input_ids"]


def test_formats_are_inferred_from_the_columns():
    cfg = DataSection(train="x")
    assert data_format(cfg, ["messages"]) == "messages" and data_format(cfg, ["conversations"]) == "sharegpt"
    assert (
        data_format(cfg, ["prompt", "response"]) == "prompt_completion" == data_format(cfg, ["instruction", "output"])
    )
    assert data_format(cfg, ["text"]) == "text" and data_format(cfg, ["messages"], "causal_lm") == "text"
    turns = datasets.Dataset.from_list([{"chat": [{"from": "human", "value": "hi"}]}]).features
    assert data_format(DataSection(train="x", messages_field="chat"), turns) == "sharegpt"
    with pytest.raises(RecipeError, match="data.format: messages data does not fit model.task seq2seq"):
        data_format(cfg, ["messages"], "seq2seq")


def test_loss_on_all_and_completion_only(tok):
    rows = [{"messages": CONVERSATION}]
    everything = _tokenize(rows, tok, loss_on="all")[0]
    assert everything["labels"] == everything["input_ids"]
    pc = [{"prompt": "Add 2 and 3.", "response": "5"}]
    full = _tokenize(pc, tok, loss_on="all")[0]
    only = _tokenize(pc, tok)[0]  # default completion_only: the assistant turn
    assert full["input_ids"] == only["input_ids"] and full["labels"] == full["input_ids"]
    assert tok.decode([t for t in only["labels"] if t != -100]) == "5<|im_end|>\n"


def test_without_a_chat_template_prompt_completion_keeps_the_instruction_template(tok):
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    row = _tokenize([{"instruction": "Add 2 and 3.", "input": "Quickly.", "output": "5"}], bare)[0]
    prompt = [bare.bos_token_id] + bare(SFT_TEMPLATE.format(prompt="Add 2 and 3.\n\nQuickly."))["input_ids"]
    response = bare("5")["input_ids"] + [bare.eos_token_id]
    assert row["input_ids"] == prompt + response and row["labels"] == [-100] * len(prompt) + response
    with pytest.raises(RecipeError, match=r"model.chat_template: the tokenizer has no chat template"):
        _tokenize([{"messages": CONVERSATION}], bare)


def test_truncation_and_skips_are_counted(tok):
    no_answer = [{"role": "user", "content": "Hi."}]
    long = [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "yes"}]
    rows = [{"messages": CONVERSATION}, {"messages": no_answer}, {"messages": None}, {"messages": long}]
    stats: dict = {}
    out = _tokenize(rows, tok, stats, max_length=48)
    # The system prompt and three turns do not fit 48 tokens (cut, kept); the long user turn leaves no answer within
    # 48 tokens, like the row without an assistant turn and the null row: skipped.
    assert stats["data.train"] == {"rows": 4, "skipped_empty": 3, "truncated": 2, "max_length": 48}
    assert len(out) == 1 and len(out[0]["input_ids"]) == 48


def test_num_proc_gives_the_same_rows_and_errors(tok):
    rows = load_builtin_dataset("chat-synthetic")["train"].select(range(40)).to_list()
    assert _tokenize(rows, tok, num_proc=2).to_dict() == _tokenize(rows, tok).to_dict()
    bad = rows + [{"messages": [{"role": "robot", "content": "beep"}]}]
    with pytest.raises(RecipeError, match=r"data.messages_field: row 41, turn 1: role 'robot'"):
        _tokenize(bad, tok, num_proc=2)


BAD_TEMPLATES = [
    # Drops the reasoning of earlier turns (as Qwen3 does): the turns before an answer render differently later.
    (
        "{%- for m in messages %}{%- set c = m['content'] if loop.last else m['content'].split('</think>')[-1] %}"
        "{{- '<|im_start|>' + m['role'] + '\\n' + c + '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
        "renders the turns before it differently",
    ),
    # A role header that add_generation_prompt does not write: it would be trained on.
    ("{%- for m in messages %}{{- m['role'] + ': ' + m['content'] + '\\n' }}{%- endfor %}", "writes 'assistant:'"),
    # Rewrites the answer: its text is not where the prefix renders say.
    (
        "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] | upper + '<|im_end|>\\n' }}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
        "does not write the assistant's answer as given",
    ),
    # Markers that mark nothing.
    ("{% generation %}{% endgeneration %}{%- for m in messages %}{{- m['content'] }}{%- endfor %}", "cover no token"),
    ("{{ raise_exception('Assistant role not supported') }}", "Assistant role not supported"),
]


@pytest.mark.parametrize(("template", "message"), BAD_TEMPLATES)
def test_templates_that_cannot_be_masked_are_errors(tok, template, message):
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>r</think>A"}] * 2
    with pytest.raises(RecipeError) as e:
        _tokenize([{"messages": messages}], with_chat_template(tok, template))
    assert e.value.path == "model.chat_template" and message in e.value.message


def test_chat_template_by_name_file_or_inline(tok, tmp_path):
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    assert with_chat_template(bare, "chatml").chat_template == CHATML_TEMPLATE and bare.chat_template is None
    (tmp_path / "llama2.jinja").write_text(NO_MARKERS)
    from_file = with_chat_template(bare, str(tmp_path / "llama2.jinja"))
    assert encode(from_file, [CONVERSATION], "assistant_only") == encode(
        with_chat_template(bare, NO_MARKERS), [CONVERSATION], "assistant_only"
    )
    assert with_chat_template(tok, None) is tok


def test_chat_synthetic_answers_follow_from_the_conversation():
    from hf_efftrain.builtins.data import CHAT_FOLLOW_UPS

    data = load_builtin_dataset("chat-synthetic")
    assert {"train", "validation"} <= set(data) and len(data["train"]) > 10 * len(data["validation"]) > 0
    turns, follow_ups = set(), 0
    for messages in data["train"].select(range(500))["messages"]:
        shouting = messages[0]["role"] == "system" and "capital letters" in messages[0]["content"]
        dialog = messages[1:] if messages[0]["role"] == "system" else messages
        assert [m["role"] for m in dialog] == ["user", "assistant"] * (len(dialog) // 2)
        turns.add(len(dialog) // 2)
        for k in range(1, len(dialog), 2):
            answer = dialog[k]["content"]
            assert answer and (not shouting or answer == answer.upper())
            if dialog[k - 1]["content"] in CHAT_FOLLOW_UPS:  # about the previous answer
                assert answer == CHAT_FOLLOW_UPS[dialog[k - 1]["content"]](dialog[k - 2]["content"])
                follow_ups += 1
    assert turns == {1, 2, 3, 4} and follow_ups > 50


def test_saved_tokenizer_keeps_its_chat_template(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == CHATML_TEMPLATE and len(loaded) == len(tok) == 4096
    assert encode(loaded, [CONVERSATION], "assistant_only") == encode(tok, [CONVERSATION], "assistant_only")


# ---- training on conversation data -----------------------------------------------------------------------------
def _chat_recipe(tiny_recipe, techniques=(), **data) -> Recipe:
    return Recipe.parse(
        tiny_recipe(
            model={"name_or_path": "builtin:tiny-llama", "config_overrides": {"num_hidden_layers": 3}},
            data={"train": "builtin:chat-synthetic", "max_length": 128, "max_train_samples": 64, **data},
            training={"max_steps": 3, "per_device_train_batch_size": 8},
            techniques=list(techniques),
        )
    )


TECHNIQUES = {
    "packing": {"name": "packing"},
    "seqlen_warmup": {"name": "seqlen_warmup", "min_length": 16, "warmup_steps": 2},
    "data_pruning": {"name": "data_pruning", "score": "el2n", "proxy_steps": 2, "keep_fraction": 0.5},
    "token_dropping": {"name": "token_dropping", "keep_start": 0.5},
    "selective_backprop": {"name": "selective_backprop", "beta": 1.0},
}


@pytest.mark.parametrize("name", TECHNIQUES)
def test_techniques_train_on_conversations_with_their_masks(tiny_recipe, tok, name):
    recipe = _chat_recipe(tiny_recipe, [TECHNIQUES[name]])
    built = build(recipe)
    assert built.task == "sft"
    rows = load_builtin_dataset("chat-synthetic")["train"].select(range(64))  # max_train_samples
    targets = {tuple(r["input_ids"]): r["labels"] for r in tokenize(rows, "sft", tok, recipe.data)}
    if name == "packing":  # each packed conversation keeps its labels; its first token (<|im_start|>) has none anyway
        for row in built.train_dataset:
            starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
            for s, e in zip(starts, starts[1:]):
                assert row["labels"][s:e] == targets[tuple(row["input_ids"][s:e])]
    else:  # rows kept (pruning: half of them) with their labels untouched
        assert all(r["labels"] == targets[tuple(r["input_ids"])] for r in built.train_dataset)
    built.trainer.train()
    losses = [h["loss"] for h in built.trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses)


def test_chat_sft_recipe_lowers_the_assistant_loss(tmp_path):
    from hf_efftrain import load_recipe

    recipe = load_recipe(
        Path(__file__).resolve().parents[2] / "recipes" / "chat_sft.yaml",
        [
            "model.name_or_path=builtin:tiny-llama",
            "data.max_train_samples=256",
            "data.max_eval_samples=16",
            "training.max_steps=10",
            "training.warmup_steps=2",
            "training.per_device_train_batch_size=4",
        ],
        output_dir=str(tmp_path / "chat"),
    )
    report = train(recipe)
    assert report["task"] == "sft" and report["train_loss_final"] < report["train_loss_first"]


def test_a_weighted_list_of_conversation_sources_keeps_the_turns(tiny_recipe, tmp_path):
    # A listed source keeps only the task's columns (data/mixture.py): for conversations, the turns column. It used to
    # keep none, and interleave_datasets failed on empty sources.
    rows = [
        {"messages": m, "source": "other"}
        for m in load_builtin_dataset("builtin:chat-synthetic")["train"][:40]["messages"]
    ]
    path = tmp_path / "more.jsonl"
    datasets.Dataset.from_list(rows).to_json(path)
    recipe = tiny_recipe(
        data={"train": [{"path": "builtin:chat-synthetic", "weight": 1}, {"path": str(path), "weight": 2}],
              "max_length": 64, "max_train_samples": 48, "max_eval_samples": 8},
    )  # fmt: skip
    built = build(Recipe.parse(recipe))
    assert built.task == "sft" and len(built.train_dataset) == 48
    assert all(any(t != -100 for t in row) for row in built.train_dataset["labels"])  # assistant tokens learnt
    with pytest.raises(RecipeError, match=r"^data.train\[1\]: column 'messages' not in"):
        bad = tmp_path / "bad.jsonl"
        datasets.Dataset.from_list([{"turns": r["messages"]} for r in rows]).to_json(bad)
        recipe["data"]["train"][1]["path"] = str(bad)
        build(Recipe.parse(recipe))
