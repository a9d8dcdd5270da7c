"""Named chat templates (builtins/chat_templates.py): each renders exactly the text of its family's published
template, its generation markers label the answer and its end-of-turn token, and a template whose control tokens the
tokenizer lacks is refused naming model.chat_template."""

from __future__ import annotations

import copy

import pytest

from hf_efftrain.builtins import CHAT_TEMPLATES, TEMPLATE_TOKENS, get_tokenizer
from hf_efftrain.core.data import with_chat_template
from hf_efftrain.core.data.chat import encode
from hf_efftrain.errors import RecipeError

# The published templates, as they ship in the instruct models' tokenizer_config.json (no generation markers).
OFFICIAL = {
    "llama3": (  # meta-llama/Meta-Llama-3-8B-Instruct
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
        "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0"
        " %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "gemma": (  # google/gemma-2-9b-it (no system turn; Gemma 3 prepends one to the first user turn)
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
        "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
    ),
}
TURNS = [
    {"role": "user", "content": " Add 2 and 40.\n"},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "Again?"},
    {"role": "assistant", "content": "Still 42. "},
]
SYSTEM = {"role": "system", "content": "Answer briefly."}
END_OF_TURN = {"llama3": "<|eot_id|>", "gemma": "<end_of_turn>\n"}


@pytest.fixture(scope="module")
def family_tok():
    """The built-in tokenizer with the llama3 and gemma control tokens added as special tokens."""
    tok = copy.deepcopy(get_tokenizer())
    tok.add_special_tokens({"additional_special_tokens": [t for ts in TEMPLATE_TOKENS.values() for t in ts]})
    return tok


def _render(tok, template: str, messages, **kwargs) -> str:
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


@pytest.mark.parametrize("name", ["llama3", "gemma"])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_a_named_template_renders_the_published_text(family_tok, name, generation_prompt):
    messages = TURNS[:3] if generation_prompt else TURNS
    ours = _render(family_tok, CHAT_TEMPLATES[name], messages, add_generation_prompt=generation_prompt)
    assert ours == _render(family_tok, OFFICIAL[name], messages, add_generation_prompt=generation_prompt)
    assert ours.startswith(family_tok.bos_token)


def test_system_turns_render_as_each_family_does(family_tok):
    llama = _render(family_tok, CHAT_TEMPLATES["llama3"], [SYSTEM, *TURNS[:2]])
    assert llama == _render(family_tok, OFFICIAL["llama3"], [SYSTEM, *TURNS[:2]])
    gemma = _render(family_tok, CHAT_TEMPLATES["gemma"], [SYSTEM, *TURNS[:2]])
    assert gemma == (  # Gemma 3: the system text opens the first user turn, after a blank line
        "<s><start_of_turn>user\nAnswer briefly.\n\nAdd 2 and 40.<end_of_turn>\n"
        "<start_of_turn>model\n42<end_of_turn>\n"
    )


@pytest.mark.parametrize("name", ["llama3", "gemma"])
def test_the_loss_covers_each_answer_and_its_end_of_turn_token(family_tok, name):
    tok = with_chat_template(family_tok, name)
    (ids,), (labels,) = encode(tok, [[SYSTEM, *TURNS]], "assistant_only")
    spans, current = [], []
    for i, label in zip(ids, labels):
        if label != -100:
            current.append(i)
        elif current:
            spans.append(current)
            current = []
    spans += [current] if current else []
    assert [tok.decode(s) for s in spans] == [f"42{END_OF_TURN[name]}", f"Still 42.{END_OF_TURN[name]}"]


@pytest.mark.parametrize("name", ["llama3", "gemma"])
def test_a_template_of_another_family_is_refused(name):
    with pytest.raises(RecipeError, match=rf"model.chat_template: {name} writes .* use chatml"):
        with_chat_template(get_tokenizer(), name)
    assert with_chat_template(get_tokenizer(), "chatml").chat_template == CHAT_TEMPLATES["chatml"]
