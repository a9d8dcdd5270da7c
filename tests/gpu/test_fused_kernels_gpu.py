"""On CUDA: the chunked linear + cross-entropy matches torch's in fp32 and under bf16 autocast, without a
[tokens, vocab] allocation (peak CUDA memory), and, with liger-kernel installed, a recipe with backend liger trains
with Liger's fused loss active and its first loss equal to the stock Trainer's. Skipped without CUDA."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from hf_efftrain import Recipe
from hf_efftrain.core.build import build
from hf_efftrain.techniques.fused_kernels import ChunkedCausalLMLoss, chunked_linear_cross_entropy
from hf_efftrain.techniques.fused_kernels.liger import liger_forward_active

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
needs_liger = pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel")


def test_chunked_ce_matches_torch_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(300, 64, device="cuda", generator=g, requires_grad=True)
    w = (torch.randn(5000, 64, device="cuda", generator=g) * 0.1).requires_grad_()
    y = torch.randint(0, 5000, (300,), device="cuda", generator=g)
    y[::3] = -100
    total, count = chunked_linear_cross_entropy(h, w, None, y, chunk_size=64)
    (total / count).backward()
    got = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    F.cross_entropy(h @ w.t(), y).backward()
    torch.testing.assert_close(got[0], h.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], w.grad, atol=1e-5, rtol=1e-4)


def _model(vocab: int = 32768) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        use_cache=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).cuda().train()


def test_peak_memory_below_one_logits_tensor_under_bf16_autocast():
    model = _model()
    ids = torch.randint(3, 32768, (8, 512), device="cuda")
    batch = {"input_ids": ids, "labels": ids}
    full = ids.numel() * 32768 * 4  # one fp32 [tokens, vocab]: 512 MiB
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = model(**batch).loss
    core = ChunkedCausalLMLoss(model, chunk_size=256)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = core.loss(model, batch)
    loss.backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < full / 2
    torch.testing.assert_close(loss, ref.float(), atol=0.0, rtol=2e-2)


@needs_liger
def test_liger_backend_trains_with_its_fused_loss(tmp_path):
    def recipe(techniques):
        return {
            "model": {"name_or_path": "builtin:tiny-llama", "config_overrides": {"num_hidden_layers": 2}},
            "data": {"train": "builtin:stdlib-docs", "max_length": 64, "max_train_samples": 64},
            "training": {"output_dir": str(tmp_path), "max_steps": 3, "per_device_train_batch_size": 8,
                         "logging_steps": 1, "seed": 0},
            "techniques": techniques,
        }  # fmt: skip

    stock = build(Recipe.parse(recipe([])))
    stock.trainer.train()
    built = build(Recipe.parse(recipe([{"name": "fused_kernels", "backend": "liger"}])))
    [tech] = built.techniques
    assert built.args.use_liger_kernel and tech.core is None
    built.trainer.train()
    assert liger_forward_active(built.model) and tech.report()["liger_fused_loss_active"]

    def first_loss(b):
        return next(e["loss"] for e in b.trainer.state.log_history if "loss" in e)

    assert first_loss(built) == pytest.approx(first_loss(stock), rel=1e-3)  # same init and batch, fp32
