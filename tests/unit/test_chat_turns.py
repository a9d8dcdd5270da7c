"""Conversation data in the shapes TRL and OpenAI write it: prompt / completion columns of ``{role, content}`` turns
(TRL's conversational prompt-completion: the completion's assistant turns carry the loss, a few-shot history in the
prompt does not), content given as parts (``[{type: text, text}]``), and the tokenization cache, which must not
return what older code tokenized."""

from __future__ import annotations

import json

import datasets
import pytest

from hf_efftrain import RecipeError
from hf_efftrain.builtins import get_tokenizer
from hf_efftrain.core.data import tokenization as tokenization_mod
from hf_efftrain.core.data import tokenize, with_chat_template
from hf_efftrain.core.sections import DataSection

# Vicuna style: role prefixes, no {% generation %} markers (labels found by prefix renders).
NO_MARKERS = (
    "{%- for m in messages %}{{- m['role'].upper() + ': ' + m['content'] + '\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'ASSISTANT: ' }}{%- endif %}"
)

SYSTEM = {"role": "system", "content": "Answer with a number."}
SHOT_Q, SHOT_A = {"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}
QUESTION, ANSWER = {"role": "user", "content": "2 + 40?"}, {"role": "assistant", "content": "42"}


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def _tokenize(rows, tokenizer, task: str = "sft", **data) -> datasets.Dataset:
    cfg = DataSection(train="x.jsonl", max_length=512, **data)
    return tokenize(datasets.Dataset.from_list(rows), task, tokenizer, cfg, "data.train")


def _trained(tokenizer, row) -> str:
    return tokenizer.decode([t for t in row["labels"] if t != -100])


@pytest.mark.parametrize("template", ["builtin", "no_markers"])
def test_conversational_prompt_completion_trains_the_completion_only(tok, template):
    """Same tokens as the whole conversation in ``messages`` form; labels only on the completion's assistant turn,
    with the template's generation markers and with the prefix fallback alike."""
    tokenizer = tok if template == "builtin" else with_chat_template(tok, NO_MARKERS)
    prompt = [SYSTEM, SHOT_Q, SHOT_A, QUESTION]
    got = _tokenize([{"prompt": prompt, "completion": [ANSWER]}], tokenizer)[0]
    whole = _tokenize([{"messages": [*prompt, ANSWER]}], tokenizer)[0]
    assert got["input_ids"] == whole["input_ids"]
    last_turn = _trained(tokenizer, _tokenize([{"messages": [QUESTION, ANSWER]}], tokenizer)[0])
    assert _trained(tokenizer, got) == last_turn and "42" in last_turn
    assert _trained(tokenizer, whole) != last_turn  # messages: every assistant turn, the few-shot one too
    # Without assistant turns in the prompt it equals the messages form exactly; loss_on: all labels every token.
    plain = _tokenize([{"prompt": [QUESTION], "completion": [ANSWER]}], tokenizer)[0]
    assert plain == _tokenize([{"messages": [QUESTION, ANSWER]}], tokenizer)[0]
    every = _tokenize([{"prompt": prompt, "completion": [ANSWER]}], tokenizer, loss_on="all")[0]
    assert every["labels"] == every["input_ids"]


def test_conversational_prompt_completion_errors_name_the_field(tok):
    with pytest.raises(RecipeError, match=r"data.response_field: row 1: the completion has no assistant turn"):
        _tokenize([{"prompt": [QUESTION], "completion": [QUESTION]}], tok)
    with pytest.raises(RecipeError, match=r"data.response_field: holds text while the other column holds turns"):
        _tokenize([{"prompt": [QUESTION], "completion": "42"}], tok)
    with pytest.raises(RecipeError, match=r"data.prompt_field: row 1, turn 1: role 'robot'"):
        _tokenize([{"prompt": [{"role": "robot", "content": "hi"}], "completion": [ANSWER]}], tok)
    with pytest.raises(RecipeError, match=r"data.prompt_field: turns \(role, content\) train a chat model"):
        _tokenize([{"prompt": [QUESTION], "completion": [ANSWER]}], tok, task="seq2seq")
    with pytest.raises(RecipeError, match=r"data.input_field: column 'input' is for text prompts"):
        _tokenize([{"prompt": [QUESTION], "input": "x", "completion": [ANSWER]}], tok)


def test_text_content_parts_are_joined_and_other_parts_refused(tok):
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "2 + "}, {"type": "text", "text": "40?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "42"}]},
    ]
    expected = _tokenize([{"messages": [{"role": "user", "content": "2 + 40?"}, ANSWER]}], tok)[0]
    assert _tokenize([{"messages": parts}], tok)[0] == expected
    image = {"type": "image", "text": None, "image": "cat.png"}
    with_image = [
        {"role": "user", "content": [image, {"type": "text", "text": "What is it?", "image": None}]},
        parts[1],
    ]
    with pytest.raises(RecipeError, match=r"data.messages_field: row 2, turn 1: a content part of type 'image'"):
        _tokenize([{"messages": parts}, {"messages": with_image}], tok)


def test_a_changed_hf_efftrain_never_gets_the_old_tokenization_from_the_cache(tok, tmp_path, monkeypatch):
    """datasets caches map results of a file-backed dataset by a fingerprint that hashes the map function by
    reference: an edit of the code it calls (or an upgrade) would be served the old result. The fingerprint holds
    the source digest of the data code, so the same code hits the cache and changed code re-tokenizes."""
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": [QUESTION, ANSWER]}) + "\n")
    cfg = DataSection(train=str(path), max_length=64)

    def load():
        return datasets.load_dataset("json", data_files=str(path), cache_dir=str(tmp_path / "cache"))["train"]

    first = tokenize(load(), "sft", tok, cfg)
    again = tokenize(load(), "sft", tok, cfg)
    assert again._fingerprint == first._fingerprint and again.cache_files  # cached, and reused as such
    import hf_efftrain.core.data.chat as chat

    real = chat.to_messages
    monkeypatch.setattr(chat, "to_messages", lambda *a: [*real(*a)[:-1], {"role": "assistant", "content": "41"}])
    stale = tokenize(load(), "sft", tok, cfg)  # the same source files: the cache answers, as it should
    assert stale["input_ids"] == first["input_ids"]
    monkeypatch.setattr(tokenization_mod, "_code_digest", lambda: "the next release")
    fresh = tokenize(load(), "sft", tok, cfg)
    assert fresh["input_ids"] != first["input_ids"] and "41" in tok.decode(fresh["input_ids"][0])
