"""Token dropping benchmark (random-LTD, arXiv 2211.11586): the stock ``transformers.Trainer`` with and without
``TokenDropper`` at a constant keep of 0.5, on the same model, data, seed and batch order, in one run.

    python benchmarks/token_dropping.py          # ~3 min on 2 CPU cores -> benchmarks/results/token_dropping
    python benchmarks/token_dropping.py --quick  # smoke run (< 1 min) -> benchmarks/results/token_dropping/quick
    python benchmarks/token_dropping.py --hidden 1024 --layers 16 --seq-len 1024 --bf16   # e.g. on a GPU

Model: ``builtin:tiny-llama`` with ``--hidden``/``--layers``/``--seq-len`` overrides so the decoder layers dominate
the step (all but the first and last layer drop half their tokens). Data: ``builtin:stdlib-docs`` concatenated and
cut into fixed-length blocks (no padding), the last blocks held out. Both variants see the same batches, so "loss at
equal tokens" compares the train loss over the last steps and the held-out loss (full model, all tokens) after the
same number of training tokens. Variants run interleaved (A B, A B, ...); step time is the median after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from hf_efftrain.builtins import builtin_config, get_tokenizer, load_builtin_dataset
from hf_efftrain.techniques.token_dropping import TokenDropper, TokenDroppingCallback, kept_count

WARMUP_STEPS = 3


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t)


def blocks(tok, seq_len: int, n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    """Documents joined with EOS and cut into seq_len blocks: n_train for training, then n_eval held out."""
    texts = list(load_builtin_dataset("stdlib-docs")["train"]["text"])
    ids: list[int] = []
    for row in tok(texts, add_special_tokens=False)["input_ids"]:
        ids += row + [tok.eos_token_id]
    need = (n_train + n_eval) * seq_len
    ids = (ids * (need // len(ids) + 1))[:need]  # repeat the corpus only if a long run needs more tokens
    rows = [torch.tensor(ids[i : i + seq_len]) for i in range(0, need, seq_len)]
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in rows]
    return rows[:n_train], rows[n_train:]


def make_model(a: argparse.Namespace, tok):
    config = builtin_config("tiny-llama", tok)
    heads = max(4, a.hidden // 64)
    config.update({
        "hidden_size": a.hidden, "num_hidden_layers": a.layers, "num_attention_heads": heads,
        "num_key_value_heads": heads // 2, "intermediate_size": int(a.hidden * 8 / 3) // 32 * 32,
        "max_position_embeddings": max(1024, a.seq_len),
    })  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def run_variant(name: str, a: argparse.Namespace, tok, train_rows, eval_rows, out: Path) -> dict:
    model = make_model(a, tok)
    args = TrainingArguments(
        output_dir=str(out / name), max_steps=a.steps, per_device_train_batch_size=a.batch,
        per_device_eval_batch_size=a.batch, learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0,
        logging_steps=1, seed=0, report_to="none", save_strategy="no", disable_tqdm=True, bf16=a.bf16,
        dataloader_pin_memory=torch.cuda.is_available(),
    )  # fmt: skip
    callbacks: list[TrainerCallback] = []
    dropper = None
    if name == "token_dropping":
        dropper = TokenDropper(model, strategy="random", keep=a.keep, seed=0)
        callbacks.append(TokenDroppingCallback(dropper, keep_start=a.keep, schedule_steps=None))
    timer = StepTimer()
    trainer = Trainer(model=model, args=args, train_dataset=train_rows, eval_dataset=eval_rows, callbacks=callbacks)
    trainer.add_callback(timer)
    trainer.remove_callback(PrinterCallback)  # the summary table is the output
    trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"]  # model.eval(): every layer sees every token
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    tail = max(1, len(losses) // 4)
    return {
        "step_time_s": statistics.median(timer.times[WARMUP_STEPS:] or timer.times),
        "fastest_step_s": min(timer.times[WARMUP_STEPS:] or timer.times),  # load spikes only ever slow a step
        "train_loss_last_quarter": statistics.mean(losses[-tail:]),
        "eval_loss": eval_loss,
        "loss_curve": losses,
        "dropping_layers": dropper.layer_ids if dropper else [],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small model, few steps: a smoke run")
    p.add_argument("--steps", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    defaults = dict(steps=6, repeats=1, hidden=128, layers=6, seq_len=128) if a.quick else dict(
        steps=16, repeats=2, hidden=256, layers=8, seq_len=512)  # fmt: skip
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.out = a.out or Path("benchmarks/results/token_dropping") / ("quick" if a.quick else "")
    logging.getLogger("transformers").setLevel(logging.ERROR)

    tok = get_tokenizer()
    train_rows, eval_rows = blocks(tok, a.seq_len, a.steps * a.batch, 4 * a.batch)
    variants = ["plain_trainer", "token_dropping"]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    tmp = Path(tempfile.mkdtemp(prefix="token_dropping_"))
    load = [os.getloadavg()[0]]
    for _ in range(a.repeats):
        for v in variants:
            runs[v].append(run_variant(v, a, tok, train_rows, eval_rows, tmp))
    load.append(os.getloadavg()[0])
    summary = {}
    for v, rs in runs.items():
        times = [r["step_time_s"] for r in rs]
        summary[v] = {
            "step_time_s": statistics.median(times),
            "step_time_min_s": min(times),
            "step_time_max_s": max(times),
            "fastest_step_s": min(r["fastest_step_s"] for r in rs),
            **{k: rs[0][k] for k in ("train_loss_last_quarter", "eval_loss", "dropping_layers", "loss_curve")},
        }
    base, drop = summary["plain_trainer"], summary["token_dropping"]
    speedup = base["step_time_s"] / drop["step_time_s"]
    n_drop = len(drop["dropping_layers"])
    setup = {
        "model": f"builtin:tiny-llama, hidden {a.hidden}, {a.layers} layers, sdpa, {'bf16' if a.bf16 else 'fp32'}",
        "data": f"builtin:stdlib-docs packed into {a.seq_len}-token blocks, batch {a.batch}, {a.steps} steps",
        "keep": a.keep,
        "kept_tokens_per_row": kept_count(a.seq_len, a.keep),
        "dropping_layers": f"{n_drop} of {a.layers} (all but the first and last)",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "repeats": a.repeats,
        "tokens_trained": a.steps * a.batch * a.seq_len,
        "load_average_1min": load,  # other processes on the machine: a loaded machine makes step times noisy
    }
    ratios = {
        "speedup": speedup,
        "speedup_best_of_repeats": base["step_time_min_s"] / drop["step_time_min_s"],
        "speedup_fastest_steps": base["fastest_step_s"] / drop["fastest_step_s"],
        "target_speedup": 1.25,
        "meets_target": speedup >= 1.25,
        "eval_loss_delta": drop["eval_loss"] - base["eval_loss"],
        "train_loss_delta": drop["train_loss_last_quarter"] - base["train_loss_last_quarter"],
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps({"setup": setup, "summary": summary, "ratios": ratios}, indent=2))
    lines = [
        f"Token dropping (random-LTD, keep {a.keep}) vs the plain Trainer: {setup['model']}; {setup['data']} "
        f"({setup['tokens_trained']:,} tokens each); {setup['dropping_layers']} keep "
        f"{setup['kept_tokens_per_row']} of {a.seq_len} tokens; {setup['device']} (load average "
        f"{load[0]:.1f} at start, {load[1]:.1f} at end, {os.cpu_count()} cores); {a.repeats} interleaved repeat(s), "
        f"step time = median after {WARMUP_STEPS} warm-up steps (min..max of repeats).",
        "",
        "| variant | step time (ms) | speedup | fastest step (ms) | train loss (last quarter) | held-out loss |",
        "|---|---|---|---|---|---|",
    ]
    for v in variants:
        s = summary[v]
        spread = f"{1e3 * s['step_time_min_s']:.1f}..{1e3 * s['step_time_max_s']:.1f}"
        lines.append(
            f"| {v} | {1e3 * s['step_time_s']:.1f} ({spread}) | {base['step_time_s'] / s['step_time_s']:.2f}x | "
            f"{1e3 * s['fastest_step_s']:.1f} | {s['train_loss_last_quarter']:.4f} | {s['eval_loss']:.4f} |"
        )
    lines += [
        "",
        f"- Speedup {speedup:.2f}x by median step time (best repeats {ratios['speedup_best_of_repeats']:.2f}x, "
        f"fastest steps {ratios['speedup_fastest_steps']:.2f}x; target >= 1.25x: "
        f"{'met' if ratios['meets_target'] else 'NOT met'}).",
        "- Held-out loss: the full model (eval mode, all tokens) on the held-out blocks after both variants trained "
        "on the same batches.",
        f"- At equal training tokens, held-out loss {ratios['eval_loss_delta']:+.4f} and train loss "
        f"{ratios['train_loss_delta']:+.4f} vs the plain Trainer (the technique's default schedule ramps keep to 1.0 "
        "over training, as the paper does; this run holds it at keep).",
    ]
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
