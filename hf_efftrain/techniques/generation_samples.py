"""Generation samples: at each evaluation and at the end of training, greedy completions of a few held-out prompts,
appended to ``output_dir/samples.jsonl`` (one ``{step, prompt, completion}`` line per prompt) and logged through
the Trainer's ``log`` (so every ``report_to`` integration gets them, as text).

Loss and token accuracy score next-token prediction under teacher forcing; a model left to continue its own output
can still fail (exposure bias, Ranzato et al. 2016, arXiv 1511.06732), so the samples show what it writes. Decoding
is transformers' ``generate(do_sample=False, num_beams=1, max_new_tokens=N)``: greedy, bounded, reproducible.

The prompts are the first ``num_prompts`` rows of the tokenized evaluation set that have one (``prompt_of``):

- a row whose labels start with -100: the input ids before its last supervised span. For SFT that is the prompt
  column in the SFT template; for a conversation labelled on its assistant turns it is the conversation up to the
  last assistant turn with the template's generation prompt, which is what ``apply_chat_template(messages[:-1],
  add_generation_prompt=True)`` renders.
- plain text (labels = input ids): the row's first ``prompt_tokens`` tokens, when the row goes on after them.
- an encoder-decoder (seq2seq): the whole encoder input.

Functional core: ``GenerationSamples(num_prompts, max_new_tokens, prompt_tokens, output_dir)`` works with the stock
Trainer: ``samples.attach(trainer)`` before ``train()``. Every process generates (a sharded model, FSDP or ZeRO-3,
needs all of them in each forward; under DDP it costs no wall time, the others would wait anyway); the main process
writes the file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from transformers import TrainerCallback

from ..core.evaluation import IGNORE_INDEX
from ..core.registry import register_technique
from ..core.technique import Env, Technique, TechniqueConfig
from ..errors import RecipeError

logger = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
NO_GENERATION_TASKS = ("masked_lm", "classification", "reward")


def _ints(values: Any) -> list[int]:
    return [int(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]


def last_span_start(labels: list[int]) -> int | None:
    """Index of the first token of the last run of supervised labels (label != -100); None when there is none."""
    start = None
    for i, label in enumerate(labels):
        if label != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX):
            start = i
    return start


def prompt_of(row: dict[str, Any], prompt_tokens: int, encoder_decoder: bool = False) -> list[int] | None:
    """The held-out prompt (token ids) of one tokenized evaluation row (see the module docstring), or None when
    the row has nothing to continue."""
    ids = _ints(row["input_ids"])
    if encoder_decoder:
        return ids or None
    labels = _ints(row["labels"]) if row.get("labels") is not None else []
    if labels and labels[0] == IGNORE_INDEX:
        start = last_span_start(labels)
        return ids[:start] if start else None
    return ids[:prompt_tokens] if len(ids) > prompt_tokens else None


def select_prompts(dataset: Any, num_prompts: int, prompt_tokens: int, encoder_decoder: bool = False) -> list:
    """The first ``num_prompts`` prompts of ``dataset``, in row order (the same on every process)."""
    prompts: list[list[int]] = []
    for i in range(len(dataset)):
        if len(prompts) == num_prompts:
            break
        prompt = prompt_of(dataset[i], prompt_tokens, encoder_decoder)
        if prompt:
            prompts.append(prompt)
    return prompts


def generate_ids(model: Any, prompts: list[list[int]], max_new_tokens: int, pad_token_id: int | None) -> list:
    """Greedy continuations (new token ids only) of each prompt, one prompt at a time (no padding to get wrong)."""
    was_training = model.training
    model.eval()
    device = getattr(model, "device", None) or next(model.parameters()).device
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    out = []
    try:
        for prompt in prompts:
            input_ids = torch.tensor([prompt], device=device)
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_token_id,
            )
            # A decoder-only output repeats the prompt; an encoder-decoder one is the decoder side alone.
            new = generated[0] if encoder_decoder else generated[0, len(prompt) :]
            out.append(_ints(new))
    finally:
        model.train(was_training)
    return out


class GenerationSamples:
    """Samples a Trainer's model at each evaluation and at the end; see the module docstring."""

    def __init__(self, num_prompts: int = 4, max_new_tokens: int = 32, prompt_tokens: int = 16, path: str = ""):
        self.num_prompts, self.max_new_tokens, self.prompt_tokens = num_prompts, max_new_tokens, prompt_tokens
        self.path = path  # recipe field path for errors
        self.trainer: Any = None
        self.prompts: list[list[int]] = []
        self.rounds: list[int] = []  # steps sampled by this process
        self._last_step: int | None = None

    def attach(self, trainer: Any, add_callback: bool = True) -> None:
        model = trainer.model
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the HF model
        if not inner.can_generate():
            raise RecipeError(
                "model.task",
                f"{type(inner).__name__} does not generate text; generation_samples "
                "needs a causal_lm, sft or seq2seq model",
            )
        if getattr(trainer.processing_class, "decode", None) is None:
            raise RecipeError("model.tokenizer", "generation_samples decodes with the Trainer's processing_class")
        dataset = trainer.eval_dataset
        if isinstance(dataset, dict):  # several named evaluation sets: prompts from the first
            dataset = next(iter(dataset.values()), None)
        if dataset is None:
            raise RecipeError(
                "data.eval",
                "generation_samples needs held-out prompts: set data.eval, "
                "data.eval_split or data.eval_fraction, or use a source with a validation split",
            )
        encoder_decoder = bool(getattr(inner.config, "is_encoder_decoder", False))
        self.prompts = select_prompts(dataset, self.num_prompts, self.prompt_tokens, encoder_decoder)
        if not self.prompts:
            raise RecipeError(
                self._field("prompt_tokens"),
                f"no evaluation row has a prompt: plain-text rows need "
                f"more than prompt_tokens={self.prompt_tokens} tokens",
            )
        if len(self.prompts) < self.num_prompts:
            logger.warning(
                "generation_samples: %d prompts in the evaluation set (num_prompts=%d)",
                len(self.prompts),
                self.num_prompts,
            )
        positions = getattr(inner.config, "max_position_embeddings", None) or getattr(inner.config, "n_positions", 0)
        longest = max(len(p) for p in self.prompts)
        if not encoder_decoder and isinstance(positions, int) and 0 < positions < longest + self.max_new_tokens:
            raise RecipeError(
                self._field("max_new_tokens"),
                f"{self.max_new_tokens} after a prompt of {longest} "
                f"tokens passes the model's {positions} positions; at most {positions - longest}",
            )
        self.trainer = trainer
        if add_callback:
            trainer.add_callback(self.callback())

    def _field(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def callback(self) -> GenerationSamplesCallback:
        return GenerationSamplesCallback(self)

    def file(self, args: Any) -> Path:
        return Path(args.output_dir) / SAMPLES_FILE

    def start(self, args: Any, state: Any) -> None:
        """A fresh run replaces an old file; a resumed one keeps the lines up to the step it resumes from."""
        self._last_step = None
        path = self.file(args)
        if not state.is_world_process_zero or not path.exists():
            return
        kept = [] if state.global_step == 0 else path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in kept if line.strip() and json.loads(line)["step"] <= state.global_step]
        path.write_text("".join(kept), encoding="utf-8")

    def sample(self, args: Any, state: Any) -> list[dict[str, Any]]:
        """Generate, write and log one round at ``state.global_step``; none twice at the same step (the end of
        training and an evaluation right after it see the same weights)."""
        if self.trainer is None or state.global_step == self._last_step:
            return []
        tokenizer = self.trainer.processing_class
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        completions = generate_ids(self.trainer.model, self.prompts, self.max_new_tokens, pad)
        lines = [
            {
                "step": state.global_step,
                "prompt": tokenizer.decode(p),
                "completion": tokenizer.decode(c, skip_special_tokens=True),
            }
            for p, c in zip(self.prompts, completions)
        ]
        text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        if state.is_world_process_zero:
            path = self.file(args)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                f.write(text)
        self.trainer.log({"generation_samples": text})  # to log_history and every report_to integration
        self._last_step = state.global_step
        self.rounds.append(state.global_step)
        return lines


class GenerationSamplesCallback(TrainerCallback):
    def __init__(self, samples: GenerationSamples):
        self.samples = samples

    def on_train_begin(self, args, state, control, **kwargs):
        self.samples.start(args, state)
        return control

    def on_evaluate(self, args, state, control, **kwargs):
        self.samples.sample(args, state)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.samples.sample(args, state)
        return control


class GenerationSamplesConfig(TechniqueConfig):
    name: Literal["generation_samples"] = "generation_samples"
    num_prompts: int = Field(4, ge=1, description="Held-out prompts: the first evaluation rows that have one.")
    max_new_tokens: int = Field(32, ge=1, description="Greedy decoding stops after this many new tokens (or EOS).")
    prompt_tokens: int = Field(
        16, ge=1, description="Plain-text rows (causal_lm): the prompt is the row's first prompt_tokens tokens."
    )


@register_technique
class GenerationSamplesTechnique(Technique):
    """Greedy samples from held-out prompts at each evaluation and at the end, in samples.jsonl and the logs."""

    name = "generation_samples"
    Config = GenerationSamplesConfig
    survey_section = "Evaluation (qualitative monitoring)"
    paper = 'Ranzato et al. 2016, "Sequence Level Training with Recurrent Neural Networks", arXiv 1511.06732'

    config: GenerationSamplesConfig

    def __init__(self, config=None, **kwargs: Any):
        super().__init__(config, **kwargs)
        c = self.config
        self.samples = GenerationSamples(c.num_prompts, c.max_new_tokens, c.prompt_tokens, f"techniques.{self.name}")

    def validate(self, recipe: Any, env: Env) -> None:
        task = recipe.model.task
        if task in NO_GENERATION_TASKS:
            raise RecipeError(
                "",
                f"generation_samples needs a model that generates text (model.task causal_lm, sft "
                f"or seq2seq), not model.task {task}",
            )
        if task == "causal_lm" and self.config.prompt_tokens >= recipe.data.max_length:
            raise RecipeError(
                "prompt_tokens",
                f"must be less than data.max_length ({recipe.data.max_length}), so "
                "that a row goes on after its prompt",
            )
        self.samples.path = f"techniques[{recipe.technique_names().index(self.name)}]"

    def on_trainer(self, trainer: Any) -> None:
        self.samples.attach(trainer, add_callback=False)

    def callbacks(self) -> list[TrainerCallback]:
        return [self.samples.callback()]

    def report(self) -> dict[str, Any]:
        return {"file": SAMPLES_FILE, "prompts": len(self.samples.prompts), "sampled_at_steps": self.samples.rounds}
