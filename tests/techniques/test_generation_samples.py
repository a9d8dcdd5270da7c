"""generation_samples: the held-out prompt of each kind of row, greedy decoding against a hand-written greedy loop,
samples.jsonl with num_prompts lines at each evaluation and at the end (main process only), the logs, resume, and
every bad config value or task as a RecipeError naming the field."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from transformers import Trainer

from hf_efftrain import Recipe
from hf_efftrain.builtins import get_tokenizer, load_builtin_dataset
from hf_efftrain.core.build import build, make_techniques
from hf_efftrain.errors import RecipeError
from hf_efftrain.techniques.generation_samples import (
    SAMPLES_FILE,
    GenerationSamples,
    generate_ids,
    last_span_start,
    prompt_of,
    select_prompts,
)

# ChatML with {% generation %} around each answer, so transformers returns the assistant mask.
CHATML = (
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- m['content'] + '<|im_end|>\\n' }}{%- endgeneration %}"
    "{%- else %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---- which prompt ---------------------------------------------------------------------------------------------


def test_last_span_start():
    assert last_span_start([-100, -100, 5, 6, -100, 7, 8]) == 5
    assert last_span_start([1, 2, 3]) == 0
    assert last_span_start([-100, -100]) is None


def test_plain_text_prompt_is_the_first_prompt_tokens():
    row = {"input_ids": list(range(10, 20)), "labels": list(range(10, 20))}
    assert prompt_of(row, 4) == [10, 11, 12, 13]
    assert prompt_of(row, 10) is None  # nothing left to continue
    assert prompt_of({"input_ids": [10, 11, 12], "labels": [-100, 11, 12]}, 2, encoder_decoder=True) == [10, 11, 12]


def test_sft_prompt_is_the_unlabelled_prefix():
    row = {"input_ids": [1, 40, 41, 42, 50, 51, 2], "labels": [-100, -100, -100, -100, 50, 51, 2]}
    assert prompt_of(row, 2) == [1, 40, 41, 42]  # prompt_tokens is for plain text only


def test_conversation_prompt_is_the_chat_template_with_a_generation_prompt():
    """For a conversation labelled on its assistant turns, the prompt is what apply_chat_template renders for the
    turns before the last answer with add_generation_prompt=True, earlier answers included."""
    tokenizer = copy.deepcopy(get_tokenizer())
    tokenizer.chat_template = CHATML
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What does os.path.join do?"},
        {"role": "assistant", "content": "It joins path parts."},
        {"role": "user", "content": "And os.path.split?"},
        {"role": "assistant", "content": "It splits a path in two."},
    ]
    enc = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    labels = [t if m else -100 for t, m in zip(enc["input_ids"], enc["assistant_masks"])]
    expected = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, return_dict=True)
    prompt = prompt_of({"input_ids": enc["input_ids"], "labels": labels}, 4)
    assert prompt == list(expected["input_ids"])
    assert "It joins path parts." in tokenizer.decode(prompt) and "splits" not in tokenizer.decode(prompt)


def test_select_prompts_takes_the_first_rows_that_have_one():
    rows = datasets.Dataset.from_dict(
        {
            "input_ids": [[5, 6], [5, 6, 7, 8], [9, 9, 9], [4, 4, 4, 4, 4]],
            "labels": [[5, 6], [5, 6, 7, 8], [9] * 3, [4] * 5],
        }
    )
    assert select_prompts(rows, 2, 2) == [[5, 6], [9, 9]]
    assert select_prompts(rows, 9, 2) == [[5, 6], [9, 9], [4, 4]]


# ---- greedy decoding --------------------------------------------------------------------------------------------


def test_generate_ids_is_greedy_and_bounded(tiny):
    model = tiny.model().train()
    eos = model.config.eos_token_id
    prompts = [[5, 9, 17], [40, 41, 42, 43, 44]]
    got = generate_ids(model, prompts, max_new_tokens=6, pad_token_id=0)
    assert model.training  # put back as it was
    with torch.no_grad():
        for prompt, new in zip(prompts, got):
            ids, expected = list(prompt), []
            for _ in range(6):  # greedy by hand: the argmax of the last position, until EOS
                nxt = int(model.eval()(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
                ids.append(nxt)
                expected.append(nxt)
                if nxt == eos:
                    break
            assert new == expected and len(new) <= 6


# ---- with the stock Trainer -------------------------------------------------------------------------------------


def test_with_the_stock_trainer_each_eval_and_the_end_main_process_only(tiny):
    args = tiny.args(max_steps=3, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=8)
    rows = tiny.rows(16)
    trainer = Trainer(model=tiny.model(), args=args, train_dataset=rows, eval_dataset=rows[:6],
                      processing_class=get_tokenizer())  # fmt: skip
    samples = GenerationSamples(num_prompts=2, max_new_tokens=3, prompt_tokens=4)
    samples.attach(trainer)
    trainer.train()
    path = Path(args.output_dir) / SAMPLES_FILE
    lines = _lines(path)
    assert [line["step"] for line in lines] == [2, 2, 3, 3]  # the evaluation at 2, the end at 3
    tokenizer = get_tokenizer()
    assert [line["prompt"] for line in lines[:2]] == [tokenizer.decode(r["input_ids"][:4]) for r in rows[:2]]
    logged = [e for e in trainer.state.log_history if "generation_samples" in e]
    assert [e["step"] for e in logged] == [2, 3]
    assert [json.loads(x) for x in logged[-1]["generation_samples"].splitlines()] == lines[2:]

    # another process generates and logs too (a sharded model needs them all), but does not write the file
    other = SimpleNamespace(global_step=4, is_world_process_zero=False)
    assert len(samples.sample(args, other)) == 2
    assert _lines(path) == lines
    assert len([e for e in trainer.state.log_history if "generation_samples" in e]) == 3


def test_resume_keeps_the_lines_up_to_the_checkpoint(tmp_path):
    samples = GenerationSamples()
    args = SimpleNamespace(output_dir=str(tmp_path))
    path = tmp_path / SAMPLES_FILE
    path.write_text("".join(json.dumps({"step": s, "prompt": "p", "completion": "c"}) + "\n" for s in (2, 4, 6)))
    samples.start(args, SimpleNamespace(global_step=4, is_world_process_zero=True))
    assert [line["step"] for line in _lines(path)] == [2, 4]
    samples.start(args, SimpleNamespace(global_step=0, is_world_process_zero=True))  # a fresh run
    assert path.read_text() == ""


# ---- recipes ----------------------------------------------------------------------------------------------------


def test_recipe_run_writes_num_prompts_lines_per_evaluation_and_at_the_end(tiny_recipe):
    recipe = tiny_recipe(
        training={"max_steps": 5, "eval_strategy": "steps", "eval_steps": 2},
        techniques=[{"name": "generation_samples", "num_prompts": 3, "max_new_tokens": 5, "prompt_tokens": 6}],
    )
    out = Path(recipe["training"]["output_dir"])
    out.mkdir(parents=True)
    (out / SAMPLES_FILE).write_text('{"step": 99, "prompt": "stale", "completion": "stale"}\n')
    built = build(Recipe.parse(recipe))
    built.trainer.train()
    built.trainer.evaluate()  # as run.py does after training: same step, same weights, no second round
    lines = _lines(out / SAMPLES_FILE)
    assert [line["step"] for line in lines] == [2] * 3 + [4] * 3 + [5] * 3
    assert all(set(line) == {"step", "prompt", "completion"} for line in lines)
    tok = built.tokenizer
    prompts = [tok.decode(built.eval_dataset[i]["input_ids"][:6]) for i in range(3)]
    assert [line["prompt"] for line in lines] == prompts * 3
    final = generate_ids(built.model, [built.eval_dataset[i]["input_ids"][:6] for i in range(3)], 5, tok.pad_token_id)
    assert [line["completion"] for line in lines[-3:]] == [tok.decode(c, skip_special_tokens=True) for c in final]
    technique = next(t for t in built.techniques if t.name == "generation_samples")
    assert technique.report() == {"file": SAMPLES_FILE, "prompts": 3, "sampled_at_steps": [2, 4, 5]}


def test_sft_prompts_are_the_prompt_column(tiny_recipe):
    recipe = tiny_recipe(
        data={"train": "builtin:sft-synthetic", "max_length": 128},
        training={"max_steps": 1},
        techniques=[{"name": "generation_samples", "num_prompts": 2, "max_new_tokens": 4}],
    )
    built = build(Recipe.parse(recipe))
    assert built.task == "sft"
    built.trainer.train()
    lines = _lines(Path(recipe["training"]["output_dir"]) / SAMPLES_FILE)
    raw = load_builtin_dataset("sft-synthetic")["validation"]
    assert [line["step"] for line in lines] == [1, 1]
    for line, row, tokenized in zip(lines, raw, built.eval_dataset):
        answer = next(i for i, label in enumerate(tokenized["labels"]) if label != -100)  # the response starts
        assert line["prompt"] == built.tokenizer.decode(tokenized["input_ids"][:answer])
        assert row["prompt"] in line["prompt"]


def test_conversation_prompts_are_the_chat_template_up_to_the_last_answer(tiny_recipe):
    recipe = tiny_recipe(
        data={"train": "builtin:chat-synthetic", "format": "messages", "max_length": 512},
        training={"max_steps": 1},
        techniques=[{"name": "generation_samples", "num_prompts": 5, "max_new_tokens": 4}],
    )
    built = build(Recipe.parse(recipe))
    built.trainer.train()
    lines = _lines(Path(recipe["training"]["output_dir"]) / SAMPLES_FILE)
    raw = load_builtin_dataset("chat-synthetic")["validation"].select(range(5))
    assert max(len(row["messages"]) for row in raw) > 3  # multi-turn rows: earlier answers are in the prompt
    for line, row in zip(lines, raw, strict=True):
        messages = row["messages"][:-1]
        assert line["prompt"] == built.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )


# ---- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["num_prompts", "max_new_tokens", "prompt_tokens"])
def test_bad_config_values_name_the_field(tiny_recipe, field):
    with pytest.raises(RecipeError) as e:
        Recipe.parse(tiny_recipe(techniques=[{"name": "generation_samples", field: 0}]))
    assert str(e.value).startswith(f"techniques[0].{field}: must be >= 1")


@pytest.mark.parametrize("task", ["masked_lm", "classification"])
def test_tasks_that_cannot_generate_are_refused(tiny_recipe, task):
    recipe = tiny_recipe(model={"task": task}, techniques=[{"name": "generation_samples"}])
    with pytest.raises(RecipeError) as e:
        make_techniques(Recipe.parse(recipe))
    assert e.value.path == "techniques[0]" and f"model.task {task}" in e.value.message


def test_prompt_tokens_must_leave_a_continuation(tiny_recipe):
    recipe = tiny_recipe(model={"task": "causal_lm"}, techniques=[{"name": "generation_samples", "prompt_tokens": 64}])
    with pytest.raises(RecipeError) as e:
        make_techniques(Recipe.parse(recipe))
    assert e.value.path == "techniques[0].prompt_tokens" and "data.max_length (64)" in e.value.message


def test_an_inferred_classifier_is_refused_at_build(tiny_recipe):
    recipe = tiny_recipe(
        model={"name_or_path": "builtin:tiny-bert", "config_overrides": {"num_hidden_layers": 1}},
        data={"train": "builtin:cls-synthetic"},
        techniques=[{"name": "generation_samples"}],
    )
    with pytest.raises(RecipeError) as e:
        build(Recipe.parse(recipe))
    assert e.value.path == "model.task" and "does not generate" in e.value.message


def test_no_held_out_data_is_refused(tiny_recipe, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i} " * 12}) + "\n" for i in range(16)))
    recipe = tiny_recipe(data={"train": str(data)}, techniques=[{"name": "generation_samples"}])
    with pytest.raises(RecipeError) as e:
        build(Recipe.parse(recipe))
    assert e.value.path == "data.eval"


def test_max_new_tokens_past_the_model_positions_is_refused(tiny_recipe):
    recipe = tiny_recipe(
        model={"config_overrides": {"num_hidden_layers": 1, "max_position_embeddings": 64}},
        techniques=[{"name": "generation_samples", "max_new_tokens": 60}],
    )
    with pytest.raises(RecipeError) as e:
        build(Recipe.parse(recipe))
    assert e.value.path == "techniques[0].max_new_tokens" and "at most 48" in e.value.message
