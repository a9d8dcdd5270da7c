"""metrics.py / report.py: FLOPs by hand, optimizer bytes, peak FLOP/s cache, and a real tiny Trainer run."""

from __future__ import annotations

import json
import time
from typing import ClassVar

import pytest
import torch
from pydantic import Field
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
    Trainer,
    TrainingArguments,
)

from hf_efftrain.core.technique import Technique, TechniqueConfig
from hf_efftrain.runtime import flops
from hf_efftrain.runtime.flop_count import ComputeFraction, Parts
from hf_efftrain.runtime.metrics import (
    build_run_report,
    mfu,
    model_flops_per_token,
    optimizer_state_bytes,
    peak_flops,
    peak_memory,
    plot_loss,
    summary_table,
    versions,
    write_run_report,
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_EFFTRAIN_CACHE", str(tmp_path / "cache"))


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


# ------------------------------------------------------------------------------------------------------ FLOPs


def test_flops_tiny_llama_by_hand():
    # head_dim 16: q 64x64, k/v 64x32 (2 KV heads), o 64x64, gate/up 64x128, down 128x64; lm_head 64x100.
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128
    matmul = 2 * per_layer + 64 * 100
    assert matmul == 80128
    seq = 32
    expected = 6 * matmul + 12 * 2 * (4 * 16) * seq
    assert model_flops_per_token(tiny_llama(), seq) == expected == 529920


def test_flops_tiny_gpt2_by_hand():
    # Conv1D layers: c_attn 32->96, attn c_proj 32->32, mlp c_fc 32->128, c_proj 128->32; tied lm_head 32x50.
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=64, n_embd=32, n_layer=2, n_head=4))
    matmul = 2 * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32) + 32 * 50
    seq = 16
    assert model_flops_per_token(model, seq) == 6 * matmul + 12 * 2 * 32 * seq == 169344


def test_flops_attention_term_bert_and_t5():
    # The seq_len-dependent part is 12 * attention layers * d_attn per extra token of context.
    bert = BertModel(
        BertConfig(
            vocab_size=50,
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )
    assert model_flops_per_token(bert, 11) - model_flops_per_token(bert, 10) == 12 * 3 * 64
    # T5: 2 encoder layers + 3 decoder layers with self- and cross-attention = 8; d_attn = heads x d_kv = 4 x 8.
    t5 = T5ForConditionalGeneration(
        T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4)
    )
    assert model_flops_per_token(t5, 11) - model_flops_per_token(t5, 10) == 12 * 8 * 32


def test_mfu():
    assert mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)
    assert mfu(1000.0, 1e9, 1e13, world_size=4) == pytest.approx(0.025)


# ------------------------------------------------------------------------------------------------ peak FLOP/s


def test_peak_flops_measures_then_uses_cache(tmp_path):
    start = time.perf_counter()
    peak = flops.device_peak("cpu", torch.float32)
    assert time.perf_counter() - start < 3.0
    assert peak.flops > 1e8 and peak.measured_at  # ISO time of the measurement
    assert peak.source.startswith("measured:") and "float32" in peak.source
    assert peak.source.endswith(f":{torch.get_num_threads()} threads")

    path = tmp_path / "cache" / "peak_flops-v2.json"
    cached = json.loads(path.read_text())
    (key,) = cached
    assert cached[key]["flops"] == peak.flops and torch.__version__ in key
    assert cached[key]["reps"] >= flops._MEASURE_MIN_REPS  # best of several, not one disturbed rep

    # A planted value proves the second call reads the cache instead of measuring again.
    path.write_text(json.dumps({key: {**cached[key], "flops": 123.0}}))
    assert peak_flops(torch.device("cpu"), torch.float32) == (123.0, peak.source)

    value_bf16, source_bf16 = peak_flops("cpu", torch.bfloat16)
    assert value_bf16 > 0 and "bfloat16" in source_bf16
    assert len(json.loads(path.read_text())) == 2


def _planted_peak(tmp_path, value: float) -> float:
    peak = flops.device_peak("cpu", torch.float32)  # measures once, to learn the cache key
    path = tmp_path / "cache" / "peak_flops-v2.json"
    (key,) = json.loads(path.read_text())
    path.write_text(json.dumps({key: {"flops": value, "measured_at": "2026-01-01T00:00:00+00:00"}}))
    return peak.flops


def test_a_run_beating_a_low_cached_peak_measures_again(tmp_path):
    real = _planted_peak(tmp_path, 1e6)  # as if measured on a very busy machine
    run_mfu, peak, note = flops.mfu_for_run(1000.0, 1e4, "cpu", torch.float32, world_size=1)  # 1e7 FLOP/s
    assert note is None and peak.flops > 1e7 and peak.measured_at != "2026-01-01T00:00:00+00:00"
    assert run_mfu == pytest.approx(1e7 / peak.flops) and run_mfu < 1
    assert flops.device_peak("cpu", torch.float32).flops == peak.flops >= 0.2 * real  # the cache now holds it


def test_a_suspiciously_high_mfu_measures_again_and_keeps_the_higher_peak(tmp_path, monkeypatch):
    _planted_peak(tmp_path, 1e7)
    monkeypatch.setattr(flops, "_measure_matmul_flops", lambda device, dtype: (2e7, 256, 5))
    run_mfu, peak, note = flops.mfu_for_run(600.0, 1e4, "cpu", torch.float32, world_size=1)  # 6e6: 60% of 1e7
    assert note is None and peak.flops == 2e7 and run_mfu == pytest.approx(0.3)
    monkeypatch.setattr(flops, "_measure_matmul_flops", lambda device, dtype: pytest.fail("measured again"))
    run_mfu, peak, _ = flops.mfu_for_run(400.0, 1e4, "cpu", torch.float32, world_size=1)  # 20%: trusted
    assert peak.flops == 2e7 and run_mfu == pytest.approx(0.2)


def test_mfu_over_100_percent_is_never_reported(tmp_path, monkeypatch):
    _planted_peak(tmp_path, 1e6)
    monkeypatch.setattr(flops, "_measure_matmul_flops", lambda device, dtype: (2e6, 256, 5))
    run_mfu, peak, note = flops.mfu_for_run(1000.0, 1e4, "cpu", torch.float32, world_size=1)
    assert run_mfu is None and peak.flops == 2e6  # re-measured (the higher value kept), still beaten
    assert "exceed the peak" in note and "no MFU" in note
    # Two processes share the work: per device the run does half, which 2e6 FLOP/s covers.
    run_mfu, _, note = flops.mfu_for_run(100.0, 1e4, "cpu", torch.float32, world_size=2)
    assert note is None and run_mfu == pytest.approx(0.25)


def test_a_refresh_keeps_the_highest_measurement(tmp_path, monkeypatch):
    _planted_peak(tmp_path, 5e12)
    monkeypatch.setattr(flops, "_measure_matmul_flops", lambda device, dtype: (1e9, 256, 5))
    assert flops.device_peak("cpu", torch.float32, refresh=True).flops == 5e12


def test_known_cuda_peaks_table():
    assert flops._known_peak("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert flops._known_peak("NVIDIA H200", torch.float16) == 989e12
    assert flops._known_peak("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312e12
    assert flops._known_peak("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert flops._known_peak("NVIDIA GeForce RTX 3090", torch.bfloat16) is None  # measured instead


# ------------------------------------------------------------------------------------------------ memory


def test_optimizer_state_bytes_adamw():
    model = torch.nn.Linear(64, 64)  # weight + bias
    numel = 64 * 64 + 64
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert optimizer_state_bytes(opt) == 0  # nothing allocated before the first step
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    steps = [s["step"] for s in opt.state.values()]
    assert all(s.dtype == torch.float32 and s.numel() == 1 for s in steps)
    # exp_avg + exp_avg_sq in fp32, plus one 4-byte step tensor per parameter.
    assert optimizer_state_bytes(opt) == 2 * 4 * numel + 4 * len(steps)
    assert optimizer_state_bytes(None) == 0


def test_optimizer_state_bytes_bnb_8bit_is_smaller():
    bnb = pytest.importorskip("bitsandbytes")
    numel = 256 * 256  # above bitsandbytes' min_8bit_size (4096), so the states really are 8-bit

    def stepped(cls) -> torch.optim.Optimizer:
        p = torch.nn.Parameter(torch.randn(numel))
        opt = cls([p], lr=1e-3)
        p.grad = torch.randn(numel)
        opt.step()
        return opt

    full = optimizer_state_bytes(stepped(torch.optim.AdamW))
    eight = optimizer_state_bytes(stepped(bnb.optim.AdamW8bit))
    assert full == 2 * 4 * numel + 4
    # state1/state2 are 1 byte per element; absmax and the qmaps add a little on top.
    assert 2 * numel < eight < 0.3 * full


def test_peak_memory_and_versions():
    mem = peak_memory()
    assert mem["cpu_rss"] > 50 * 2**20  # torch alone is bigger than 50 MiB
    v = versions()
    assert v["torch"] == torch.__version__.split("+")[0] or v["torch"] == torch.__version__
    assert v["python"] and v["transformers"] and "deepspeed" in v and "bitsandbytes" in v


# ------------------------------------------------------------------------------------------------ real run


class _NoteConfig(TechniqueConfig):
    name: str = "note_for_test"
    level: int = Field(3, description="A value to see in the report.")


class _NoteTechnique(Technique):
    name: ClassVar[str] = "note_for_test"
    Config: ClassVar[type[TechniqueConfig]] = _NoteConfig
    survey_section: ClassVar[str] = "test"
    paper: ClassVar[str] = "none"

    def report(self) -> dict:
        return {"chose": "nothing"}


class _HalfBlocksTechnique(_NoteTechnique):
    def compute_fraction(self, model, steps, seq_len):
        assert steps == 4 and seq_len == 16
        return ComputeFraction("blocks did half", {b: Parts.uniform(0.5) for b in model.model.layers})


class _BrokenTechnique(_NoteTechnique):
    def compute_fraction(self, model, steps, seq_len):
        raise ValueError("boom")


def _dataset(n: int, seq: int, real: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, 100, (seq,), generator=g)
        mask = torch.zeros(seq, dtype=torch.long)
        mask[:real] = 1
        ids[real:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return rows


def test_run_report_from_real_trainer(tmp_path):
    torch.manual_seed(0)
    seq, real = 16, 12
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=tiny_llama(), args=args, train_dataset=_dataset(16, seq, real), eval_dataset=_dataset(4, seq, real)
    )
    output = trainer.train()
    trainer.evaluate()

    report = build_run_report(trainer, output, [_NoteTechnique(level=5)], seq_len=seq, extra={"recipe": "t.yaml"})
    for key in (
        "tokens_per_second", "samples_per_second", "wall_time_s", "steps", "train_loss_first", "train_loss_final",
        "eval_loss", "params_total", "params_trainable", "optimizer_state_bytes", "peak_memory_bytes",
        "model_flops_per_token", "mfu", "peak_flops", "peak_flops_source", "world_size", "distributed_type",
        "techniques", "versions", "loss_history", "model_flops_per_token_dense", "mfu_dense", "flops_counted",
    ):  # fmt: skip
        assert key in report, key

    assert report["steps"] == 4 and report["world_size"] == 1
    assert report["distributed_type"] == "NO"
    assert report["tokens_seen"] == 4 * 4 * real  # non-padding tokens only
    assert report["tokens_per_second"] == pytest.approx(report["tokens_seen"] / report["wall_time_s"])
    assert report["samples_per_second"] > 0 and report["wall_time_s"] > 0
    assert [s for s, _ in report["loss_history"]] == [1, 2, 3, 4]
    assert report["train_loss_first"] == report["loss_history"][0][1]
    assert report["train_loss_final"] == report["loss_history"][-1][1]
    assert 3.0 < report["train_loss_first"] < 6.0  # ~ln(100) for a random 100-token model
    assert report["eval_loss"] is not None and report["eval_loss"] > 0

    n_params = sum(p.numel() for p in trainer.model.parameters())
    assert report["params_total"] == report["params_trainable"] == n_params
    # trainer.optimizer is Accelerate's wrapper: AdamW fp32 moments plus a step tensor per parameter.
    n_tensors = len(list(trainer.model.parameters()))
    assert report["optimizer_state_bytes"] == 2 * 4 * n_params + 4 * n_tensors
    # Everything trains: the counted work is PaLM's dense 6N + 12 L d s, and both MFUs agree.
    dense = 6 * 80128 + 12 * 2 * 64 * seq
    assert report["model_flops_per_token"] == report["model_flops_per_token_dense"] == dense
    assert report["mfu_dense"] == report["mfu"]
    counted = report["flops_counted"]
    assert counted["total"] == dense and counted["matmul_params_trainable"] == 80128
    assert counted["matmul_params_frozen"] == 0 and counted["techniques"] == []
    assert counted["matmul_weight_grad"] == 2 * 80128 and counted["attention_backward"] == 8 * 2 * 64 * seq
    assert report["peak_flops_source"].startswith("measured:") and "float32" in report["peak_flops_source"]
    assert 0 < report["mfu"] < 1
    assert report["mfu"] == pytest.approx(
        report["tokens_per_second"] * report["model_flops_per_token"] / report["peak_flops"]
    )
    assert report["peak_memory_bytes"]["cpu_rss"] > 0
    assert report["techniques"] == [
        {"name": "note_for_test", "config": {"name": "note_for_test", "level": 5}, "report": {"chose": "nothing"}}
    ]
    assert report["recipe"] == "t.yaml" and report["notes"] == []

    path = write_run_report(tmp_path / "run", report)
    assert path.name == "run_report.json"
    assert json.loads(path.read_text())["steps"] == 4

    png = plot_loss(trainer.state.log_history, tmp_path / "run" / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000

    table = summary_table(report)
    assert f"{report['train_loss_first']:.4f} -> {report['train_loss_final']:.4f}" in table
    assert "MFU" in table and "tokens/s" in table and "peak RSS" in table
    assert "MFU (work counted)" in table and "MFU (dense 6N+12Lds)" in table

    # A technique's compute_fraction scales what it names (the blocks, not the LM head); a failing one is noted.
    report = build_run_report(trainer, output, [_HalfBlocksTechnique(), _BrokenTechnique()], seq_len=seq)
    head = 6 * 64 * 100
    assert report["model_flops_per_token"] == head + (dense - head) / 2
    assert report["model_flops_per_token_dense"] == dense
    assert report["mfu"] == pytest.approx(report["mfu_dense"] * report["model_flops_per_token"] / dense)
    assert report["flops_counted"]["techniques"] == [
        {"name": "note_for_test", "note": "blocks did half", "fraction_of_total": round((head + dense) / 2 / dense, 6)}
    ]
    assert any("compute_fraction failed (ValueError: boom)" in n for n in report["notes"])

    # LoRA-like: the frozen base does no weight gradient, and no backward below the first trainable weight.
    trainer.model.requires_grad_(False)
    trainer.model.lm_head.requires_grad_(True)
    report = build_run_report(trainer, output, [], seq_len=seq)
    assert report["model_flops_per_token"] == 2 * 80128 + 2 * 64 * 100 + 4 * 2 * 64 * seq
    assert report["flops_counted"]["matmul_params_frozen"] == 80128 - 64 * 100
    assert report["mfu"] < report["mfu_dense"]
    trainer.model.requires_grad_(True)

    # Weights that are bf16 themselves (pure bf16, model.dtype bfloat16) compute in bf16: that peak, not fp32's.
    assert report["compute_dtype"] == "float32"
    trainer.model.to(torch.bfloat16)
    report = build_run_report(trainer, output, [], seq_len=seq)
    assert report["compute_dtype"] == "bfloat16" and "bfloat16" in report["peak_flops_source"]
    assert report["peak_flops"] == flops.device_peak("cpu", torch.bfloat16).flops
    trainer.model.to(torch.float32)

    # Without token counting the report says so instead of inventing a throughput.
    trainer.state.num_input_tokens_seen = 0
    trainer._initial_num_input_tokens_seen = 0
    report = build_run_report(trainer, output, [], seq_len=seq)
    assert report["tokens_per_second"] is None and report["mfu"] is None
    assert report["notes"] and "tokens_per_second" in report["notes"][0]
    assert "n/a" in summary_table(report)


def test_plot_loss_without_any_loss(tmp_path):
    png = plot_loss([{"step": 1, "learning_rate": 0.1}], tmp_path / "empty.png")
    assert png.exists() and png.stat().st_size > 0
