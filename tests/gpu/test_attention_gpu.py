"""On CUDA: the fast attention kernel (flash_attention_2 when flash-attn is installed, else sdpa) against eager,
in bf16, forward and backward, with padding. Skipped without CUDA."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_efftrain.core.recipe_checks import check_attention_env
from hf_efftrain.core.technique import Env

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

FAST = "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else "sdpa"


def _model(implementation: str) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,  # head dim 64
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, attn_implementation=implementation, dtype=torch.bfloat16).cuda()
    assert model.config._attn_implementation == implementation
    return model


def test_fast_attention_matches_eager_bf16():
    env = Env.detect()
    check_attention_env(FAST, env)

    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 256, (4, 128), generator=g).cuda()
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :32] = 0  # left padding (the varlen path for flash-attn)
    labels = input_ids.clone()
    labels[1, :33] = -100

    out = {}
    for impl in (FAST, "eager"):
        model = _model(impl)
        result = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        result.loss.backward()
        grad = model.model.layers[0].self_attn.q_proj.weight.grad
        assert torch.isfinite(result.loss) and torch.isfinite(grad).all()
        out[impl] = (result.loss.float(), result.logits.float(), grad.float())

    keep = attention_mask.bool()
    torch.testing.assert_close(out[FAST][0], out["eager"][0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out[FAST][1][keep], out["eager"][1][keep], rtol=3e-2, atol=3e-2)
    rel = (out[FAST][2] - out["eager"][2]).norm() / out["eager"][2].norm()
    assert rel < 5e-2, f"{FAST} grad differs from eager by {rel:.3g} (relative norm)"
