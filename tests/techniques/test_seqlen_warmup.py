"""Sequence-length warmup: schedule values by hand, truncation and reshaping keep every tensor consistent, the loss
denominator is counted on shortened batches, and a resumed run gets the same lengths as an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import datasets
import pydantic
import pytest
import torch

from hf_efftrain import Recipe
from hf_efftrain.core.build import build
from hf_efftrain.core.registry import get_technique
from hf_efftrain.core.technique import Env
from hf_efftrain.errors import RecipeError
from hf_efftrain.techniques.packing import PackedCollator, flash_varlen_kwargs, pack_dataset
from hf_efftrain.techniques.seqlen_warmup import (
    SeqLenWarmup,
    SeqLenWarmupConfig,
    SeqLenWarmupTechnique,
    reshape_batch,
    truncate_batch,
    warmup_length,
)


def _len(step, schedule="linear", min_length=16, full=128, steps=10):
    return warmup_length(step, min_length=min_length, full_length=full, warmup_steps=steps, schedule=schedule)


def test_linear_schedule_by_hand():
    # raw = floor(16 + 112 * t / 10), rounded down to a multiple of 8
    assert [_len(t) for t in range(11)] == [16, 24, 32, 48, 56, 72, 80, 88, 104, 112, 128]
    # t=3: 16 + 33.6 = 49.6 -> 49 -> 48; t=9: 16 + 100.8 -> 116 -> 112; t >= T: full length
    assert _len(3) == 48 and _len(9) == 112 and _len(10) == _len(10_000) == 128


def test_root_schedule_by_hand():
    # raw = floor(16 + 112 * sqrt(t / 10)): t=1 -> 51.4 -> 48; t=4 -> 86.8 -> 80; t=9 -> 122.3 -> 120
    assert [_len(t, "root") for t in (0, 1, 4, 9, 10)] == [16, 48, 80, 120, 128]
    cube = warmup_length(1, min_length=16, full_length=128, warmup_steps=8, schedule="root", root_degree=3)
    assert cube == 72  # 16 + 112 * 0.5 = 72
    assert all(_len(t, "root") >= _len(t) for t in range(10))  # root grows faster early


def test_bounds_and_multiples_of_eight():
    lengths = [_len(t, min_length=20, full=100, steps=50) for t in range(50)]
    assert lengths[0] == 20  # raw 20 -> 16 is below min_length: clamped up
    assert all(n == 20 or n % 8 == 0 for n in lengths) and max(lengths) <= 100
    assert lengths == sorted(lengths)
    assert _len(49, min_length=20, full=100, steps=50) == 96 and _len(50, min_length=20, full=100, steps=50) == 100


def _packed_batch(flash: bool = True) -> dict:
    g = torch.Generator().manual_seed(0)
    lengths = [5, 9, 3, 7, 12, 4, 16, 2, 6, 11, 14, 8]
    ids = [torch.randint(3, 100, (n,), generator=g).tolist() for n in lengths]
    packed = pack_dataset(datasets.Dataset.from_dict({"input_ids": ids}), 24)
    collate = PackedCollator(attn_implementation="flash_attention_2" if flash else "sdpa")
    batch = collate([packed[i] for i in range(len(packed))])
    doc = (batch["position_ids"] == 0).cumsum(dim=1)  # an explicit block-diagonal causal mask, [B, 1, L, L]
    batch["attention_mask"] = torch.tril(doc.unsqueeze(-1) == doc.unsqueeze(-2)).unsqueeze(1)
    return batch


def test_truncate_keeps_every_tensor_consistent():
    batch = _packed_batch()
    out = truncate_batch(batch, 16)
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(out[key], batch[key][:, :16])
    assert torch.equal(out["attention_mask"], batch["attention_mask"][..., :16, :16])
    expected = flash_varlen_kwargs(out["position_ids"])
    assert out["cu_seq_lens_q"].tolist() == expected["cu_seq_lens_q"].tolist() != batch["cu_seq_lens_q"].tolist()
    assert out["cu_seq_lens_q"][-1] == out["input_ids"].numel() and out["max_length_q"] <= 16
    assert out["use_cache"] is False
    assert truncate_batch(out, 16) is out  # idempotent: already short enough


def test_reshape_keeps_real_tokens_and_restarts_positions():
    batch = _packed_batch()
    rows, full = batch["input_ids"].shape  # full = 24: cut into 16 + 8 (padded to 16)
    out = reshape_batch(batch, 16, pad_token_id=0)
    real = batch["input_ids"][batch["input_ids"] != 0]
    assert sorted(out["input_ids"][out["input_ids"] != 0].tolist()) == sorted(real.tolist())  # nothing lost
    assert out["input_ids"].shape[1] == 16 and out["input_ids"].shape[0] <= 2 * rows
    first, second = out["position_ids"][0], out["position_ids"][1]  # row 0 -> its tokens 0..15 and 16..23 + pad
    assert torch.equal(first, batch["position_ids"][0, :16])
    tail = batch["position_ids"][0, 16:]
    cut = int((tail == 0).nonzero()[0]) if (tail == 0).any() else 8  # the continued document restarts at 0
    assert second[:cut].tolist() == list(range(cut)) and second[8:].tolist() == list(range(8))
    assert torch.equal(out["input_ids"][1, :8], batch["input_ids"][0, 16:]) and out["labels"][1, 8:].eq(-100).all()
    # The 4D mask keeps its diagonal blocks; the padded tail attends only to itself (no fully masked row).
    assert torch.equal(out["attention_mask"][0], batch["attention_mask"][0, :, :16, :16])
    assert torch.equal(out["attention_mask"][1, 0, :8, :8], batch["attention_mask"][0, 0, 16:, 16:])
    assert out["attention_mask"][1, 0].any(dim=-1).all() and not out["attention_mask"][1, 0, 8:, :8].any()
    assert out["cu_seq_lens_q"].tolist() == flash_varlen_kwargs(out["position_ids"])["cu_seq_lens_q"].tolist()
    assert reshape_batch(out, 16) is out


def test_reshape_drops_rows_without_targets_and_handles_a_padding_mask():
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7, 0, 0, 0, 0, 0]])
    attention_mask = (input_ids != 0).long()
    labels = torch.where(attention_mask.bool(), input_ids, -100)
    out = reshape_batch({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}, 4)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 11, 12], [5, 6, 7, 0]]  # [0, 0, 0, 0] dropped
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]]
    assert out["labels"][2].tolist() == [5, 6, 7, -100]


def test_attach_counts_the_loss_denominator_on_shortened_batches(tiny):
    from transformers import Trainer

    trainer = Trainer(model=tiny.model(), args=tiny.args(), train_dataset=tiny.rows(8))
    original = trainer.get_batch_samples
    warmup = SeqLenWarmup(min_length=8, full_length=16, warmup_steps=4)
    patch = warmup.attach(trainer)
    labels = torch.arange(3, 35).reshape(2, 16)
    labels[1, 10:] = -100
    batches = [{"input_ids": labels.clamp(min=0), "labels": labels}]
    shortened, count = trainer.get_batch_samples(iter(batches), 1, torch.device("cpu"))
    assert shortened[0]["input_ids"].shape == (2, 8)
    assert int(count) == 2 * 7  # labels[:, 1:8], none masked; the full batch would have counted 15 + 9
    assert (warmup.targets_in, warmup.targets_out) == (24, 14)
    patch.undo()
    assert trainer.get_batch_samples == original and "get_batch_samples" not in vars(trainer)


def test_validate_and_config_errors(tiny_recipe):
    recipe = Recipe.parse(tiny_recipe())
    with pytest.raises(RecipeError, match="below the full length 64") as err:
        SeqLenWarmupTechnique(min_length=64, warmup_steps=5).validate(recipe, Env())
    assert err.value.path == "min_length"
    tech = SeqLenWarmupTechnique(min_length=8, warmup_steps=5, schedule="root")
    tech.validate(recipe, Env())
    assert tech.warmup.full_length == 64 and tech.warmup.length(0) == 8
    mlm = Recipe.parse(tiny_recipe(model={"name_or_path": "builtin:tiny-bert", "task": "masked_lm"}))
    with pytest.raises(RecipeError, match="causal LM"):
        SeqLenWarmupTechnique(min_length=8, warmup_steps=5).validate(mlm, Env())
    with pytest.raises(pydantic.ValidationError):
        SeqLenWarmupConfig(warmup_steps=5, schedule="cosine")
    with pytest.raises(pydantic.ValidationError):
        SeqLenWarmupConfig(min_length=8)  # warmup_steps is required
    assert get_technique("seqlen_warmup") is SeqLenWarmupTechnique and "2108.06084" in SeqLenWarmupTechnique.paper
    assert all(f.description for key, f in SeqLenWarmupConfig.model_fields.items() if key != "name")


def _run(tiny_recipe, out: Path, techniques, resume: str | None = None, **training) -> tuple[list[int], object]:
    recipe = tiny_recipe(
        model={"config_overrides": {"num_hidden_layers": 1}},
        data={"max_length": 64, "max_train_samples": 48},
        training={"output_dir": str(out), "per_device_train_batch_size": 4, "max_steps": 6, **training},
        techniques=techniques,
    )
    built = build(Recipe.parse(recipe))
    seen: list[int] = []
    built.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    built.trainer.train(resume_from_checkpoint=resume)
    return seen, built


def test_efftrainer_steps_and_resume_follow_the_schedule(tiny_recipe, tmp_path):
    techniques = [{"name": "seqlen_warmup", "min_length": 16, "warmup_steps": 6}]
    full, built = _run(tiny_recipe, tmp_path / "a", techniques, save_strategy="steps", save_steps=3)
    assert full == [16, 24, 32, 40, 48, 56]  # 16 + 48 t / 6, every batch being 64 tokens long
    state = torch.load(tmp_path / "a" / "checkpoint-3" / "efftrain_state.pt", weights_only=True)["seqlen_warmup"]
    assert state["targets_in"] > state["targets_out"] > 0
    resumed, again = _run(tiny_recipe, tmp_path / "b", techniques, resume=str(tmp_path / "a" / "checkpoint-3"))
    assert resumed == full[3:]
    w, w2 = built.techniques[0].warmup, again.techniques[0].warmup
    assert (w2.targets_in, w2.targets_out) == (w.targets_in, w.targets_out)  # counters restored, then the same steps
    losses = [[e["loss"] for e in b.trainer.state.log_history if "loss" in e] for b in (built, again)]
    assert losses[1][3:] == pytest.approx(losses[0][3:], rel=1e-4)  # same batches, same shortening, same losses


def test_efftrainer_steps_with_constant_tokens(tiny_recipe, tmp_path):
    techniques = [{"name": "seqlen_warmup", "min_length": 16, "warmup_steps": 6, "constant_tokens": True}]
    seen, built = _run(tiny_recipe, tmp_path, techniques, max_steps=3)
    assert seen == [16, 24, 32]
    w = built.techniques[0].warmup
    # Rows are cut, not truncated: only the one target at each cut is lost (64 / 16 - 1 = 3 cuts per row at most).
    assert 0 < w.targets_in - w.targets_out <= 3 * 4 * 3
    report = built.techniques[0].report()
    assert report["mode"] == "reshape" and report["targets_dropped_fraction"] < 0.1


@pytest.mark.parametrize("constant_tokens", [False, True])
def test_shortened_packed_rows_still_isolate_documents(tiny, constant_tokens):
    """After truncating or reshaping packed rows, every segment's logits equal the segment run alone."""
    batch = _packed_batch(flash=False)
    del batch["attention_mask"]  # the model builds the block mask from position_ids
    out = SeqLenWarmup(8, 24, 4, constant_tokens=constant_tokens)(batch, step=1)  # length 8 + 16 / 4 = 12 -> 8
    assert out["input_ids"].shape[1] == 8
    model = tiny.model(attn_implementation="sdpa").eval()
    with torch.no_grad():
        logits = model(**out).logits
        for r, pos in enumerate(out["position_ids"].tolist()):
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            for s, e in zip(starts, starts[1:]):
                alone = model(input_ids=out["input_ids"][r : r + 1, s:e]).logits[0]
                torch.testing.assert_close(logits[r, s:e], alone, rtol=0, atol=1e-5)
