"""flop_count.py: the counted training FLOPs per token against PyTorch's own counter, the dense identity, and each
technique's ``compute_fraction``.

The cross-checks run real forward + backward steps of the built-in tiny llama (4 blocks, GQA) under
``torch.utils.flop_counter.FlopCounterMode``, which counts every aten matmul autograd really runs: the LM head, the
adapters, and only the input / weight gradients autograd needs. Causality: the count is PaLM's non-causal one
(4 d_attn s forward per layer). The models here use eager attention, whose Q K^T and A V matmuls are the full S x S
products (the causal mask is applied after), so the two agree exactly: the tolerance is the rounding of the
per-token figure, one FLOP per token. (SDPA would not compare: FlopCounterMode does not count the CPU SDPA kernel
at all, and counts a CUDA one's backward as 2.5x its forward, the recomputed scores included.)
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from hf_efftrain.builtins.models import builtin_config
from hf_efftrain.core.technique import Technique
from hf_efftrain.runtime.flop_count import (
    PARTS,
    ComputeFraction,
    Parts,
    count_flops,
    dense_flops_per_token,
    matmul_dtype,
    model_flops_per_token,
)
from hf_efftrain.techniques.layer_dropping import LayerDroppingTechnique
from hf_efftrain.techniques.layer_freezing import LayerFreezingTechnique
from hf_efftrain.techniques.peft import PeftTechnique
from hf_efftrain.techniques.progressive_stacking import ProgressiveStackingTechnique
from hf_efftrain.techniques.selective_backprop import SelectiveBackpropTechnique
from hf_efftrain.techniques.seqlen_warmup import SeqLenWarmupTechnique
from hf_efftrain.techniques.token_dropping import TokenDroppingTechnique

B, S, VOCAB = 4, 32, 256


class _Tokenizer:  # what builtin_config reads from a tokenizer (the real one is trained on first use: slow)
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self) -> int:
        return VOCAB


def tiny_llama() -> LlamaForCausalLM:
    """builtin:tiny-llama: 4 blocks, hidden 128, 4 heads / 2 KV heads, MLP 352."""
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(builtin_config("tiny-llama", _Tokenizer()), attn_implementation="eager")


def _batch(length: int = S) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (B, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def measured(model: torch.nn.Module, steps=None) -> float:
    """FlopCounterMode's FLOPs per token over training steps: ``steps`` yields ``(batch, loss_fn)`` per step."""
    model.train()
    steps = steps or [(_batch(), None)]
    flops = tokens = 0
    for batch, loss_fn in steps:
        with FlopCounterMode(display=False) as counter:
            loss = loss_fn(batch) if loss_fn else model(**batch).loss
            loss.backward()
        flops += counter.get_total_flops()
        tokens += batch["input_ids"].numel()
    model.zero_grad(set_to_none=True)
    return flops / tokens


def assert_matches(counted: float, measured_per_token: float) -> None:
    assert abs(counted - measured_per_token) <= 1.0, (counted, measured_per_token)


def fraction_of(technique: Technique, model: torch.nn.Module, steps: int, seq_len: int = S):
    return [(technique.name, technique.compute_fraction(model, steps, seq_len))]


# ------------------------------------------------------------------------------------------- dense identity


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=64, n_embd=32, n_layer=2, n_head=4))


def _bert():
    config = BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    return BertForMaskedLM(config)


def _t5():
    return T5ForConditionalGeneration(
        T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4)
    )


@pytest.mark.parametrize("make", [tiny_llama, _gpt2, _bert, _t5], ids=["llama", "gpt2", "bert", "t5"])
def test_the_parts_of_a_fully_trainable_model_sum_to_the_dense_count(make):
    model = make()
    count = count_flops(model, 16)
    n = count.matmul_params_trainable
    layers, d = count.attention_layers, count.d_attn
    assert count.matmul_params_frozen == count.matmul_params_without_input_grad == 0 and not count.notes
    assert count.parts == {
        "matmul_forward": 2 * n, "matmul_input_grad": 2 * n, "matmul_weight_grad": 2 * n,
        "attention_forward": 4 * layers * d * 16, "attention_backward": 8 * layers * d * 16,
    }  # fmt: skip
    assert count.total == count.dense == dense_flops_per_token(model, 16) == 6 * n + 12 * layers * d * 16
    assert model_flops_per_token(model, 16) == count.total


# ------------------------------------------------------------------------------ against FlopCounterMode


def test_full_training_matches_flop_counter_and_the_dense_formula():
    model = tiny_llama()
    per_token = measured(model)
    assert count_flops(model, S).total == dense_flops_per_token(model, S) == per_token == 4_816_896


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["gate_proj"], "all-linear"])
def test_lora_counts_weight_gradients_of_the_adapters_only(targets):
    model = PeftTechnique(method="lora", r=4, lora_alpha=8, target_modules=targets).on_model(tiny_llama())
    count = count_flops(model, S)
    assert_matches(count.total, measured(model))
    adapters = sum(m.in_features * m.out_features for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and ".lora_" in n)  # fmt: skip
    assert count.matmul_params_trainable == adapters
    # the first adapted projection reads the frozen embedding: nothing below it needs an input gradient
    assert count.matmul_params_without_input_grad > 0
    assert count.total < 0.8 * count.dense


def test_modules_to_save_counts_the_trained_copy_once():
    model = PeftTechnique(method="lora", r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]).on_model(
        tiny_llama()
    )
    count = count_flops(model, S)
    assert_matches(count.total, measured(model))
    assert count.matmul_params_trainable == 128 * VOCAB + 4 * (128 + 128) * 4  # the head copy + 4 adapters


def test_frozen_lower_layers_need_no_backward_below_the_lowest_trainable_one():
    model = tiny_llama()
    for module in (model.model.embed_tokens, *model.model.layers[:2]):
        module.requires_grad_(False)
    count = count_flops(model, S)
    assert_matches(count.total, measured(model))
    per_block = 2 * (128 * 128 + 2 * 128 * 64 + 128 * 128 + 3 * 128 * 352)
    assert count.matmul_params_without_input_grad == per_block  # blocks 0 and 1 (per_block = their 2 x matmuls)
    assert count.parts["attention_backward"] == 2 * 8 * 128 * S  # blocks 2 and 3 only


def test_layer_freezing_schedule_matches_flop_counter_step_by_step():
    model = tiny_llama()
    technique = LayerFreezingTechnique(final_fraction=0.5, start_step=0, end_step=4)
    technique.on_model(model)
    freezer = technique.freezer
    freezer.max_steps = 4

    def steps():
        for t in range(4):  # n(t) = floor(2 t / 4): 0, 0, 1, 1 blocks frozen
            freezer.set_step(t)
            yield _batch(), None

    per_token = measured(model, steps())
    frozen_static = count_flops(model, S).total  # requires_grad as in the last step (one block frozen)
    freezer.undo()  # as at train end: every flag restored, so only the technique's fraction says what froze
    counted = count_flops(model, S, fraction_of(technique, model, 4))
    assert_matches(counted.total, per_token)
    assert counted.total == (count_flops(model, S).total + frozen_static) / 2
    shares = [technique.compute_fraction(model, 4, S).blocks[b].weight_grad for b in freezer.blocks]
    assert shares == [0.5, 1.0, 1.0, 1.0]
    assert sum(shares) / 4 == freezer.layer_step_fraction(4)  # the report's backward_layer_step_fraction


def test_layer_dropping_matches_flop_counter():
    model = tiny_llama()
    technique = LayerDroppingTechnique(mode="stochastic_depth", theta_bar=0.5, seed=0)
    technique.on_model(model)
    drop = technique.drop
    drop.apply()

    def steps():
        for t in range(3):
            drop.set_step(t)
            yield _batch(), None

    per_token = measured(model, steps())
    drop.undo()
    keep = drop.mean_keep_fraction()
    assert 0 < keep < 1  # some blocks were dropped
    counted = count_flops(model, S, fraction_of(technique, model, 3))
    assert_matches(counted.total, per_token)
    assert counted.techniques[0]["name"] == "layer_dropping" and f"{keep:.4g}" in counted.techniques[0]["note"]


def test_token_dropping_matches_flop_counter_over_its_schedule():
    model = tiny_llama()
    technique = TokenDroppingTechnique(keep_start=0.5, schedule_steps=4, multiple_of=8)
    technique.on_model(model)

    def steps():
        for t in range(4):  # keep 0.5, 0.625, 0.75, 0.875 of 32 -> kept 16, 16, 24, 32 (multiples of 8)
            yield technique.on_batch(_batch(), t), None

    per_token = measured(model, steps())
    technique.dropper.undo()
    fraction = technique.compute_fraction(model, 4, S)
    parts = fraction.blocks[model.model.layers[1]]
    assert parts.forward == (0.5 + 0.5 + 0.75 + 1) / 4 and parts.attention_forward == (0.25 + 0.25 + 0.5625 + 1) / 4
    assert set(fraction.blocks) == {model.model.layers[1], model.model.layers[2]}  # full_first / full_last 1
    assert_matches(count_flops(model, S, [("token_dropping", fraction)]).total, per_token)


def test_progressive_stacking_matches_flop_counter_as_the_model_grows():
    model = tiny_llama()
    technique = ProgressiveStackingTechnique(start_layers=1, grow_at_steps=[2, 3])
    technique.on_model(model)
    stacker = technique.stacker

    def steps():
        for t in range(4):  # depth 1, 1, 2, 4
            stacker.maybe_grow(t, None)
            yield _batch(), None

    per_token = measured(model, steps())
    assert len(model.model.layers) == 4
    counted = count_flops(model, S, fraction_of(technique, model, 4))
    assert_matches(counted.total, per_token)
    assert counted.techniques[0]["note"] == "progressive stacking: 0.5"  # (1 + 1 + 2 + 4) / (4 x 4)
    assert stacker.layer_step_fraction(4) == 0.5


def test_selective_backprop_counts_the_extra_forward_and_the_kept_backward():
    model = tiny_llama()
    technique = SelectiveBackpropTechnique(beta=1.0, seed=0)
    loss_fn = lambda batch: technique.loss(model, batch, lambda m, b, **kw: m(**b).loss)  # noqa: E731
    per_token = measured(model, [(_batch(), loss_fn)])
    kept = technique.report()["token_fraction_backpropagated"]
    assert 0 < kept < 1
    counted = count_flops(model, S, fraction_of(technique, model, 1))
    assert_matches(counted.total, per_token)
    parts = technique.compute_fraction(model, 1, S).rest
    assert (parts.forward, parts.weight_grad) == (1 + kept, kept)
    # before start_step nothing is selected: half the steps at full cost
    technique.config = technique.Config(beta=1.0, start_step=1)
    parts = technique.compute_fraction(model, 2, S).rest
    assert (parts.forward, parts.input_grad) == (1 + kept / 2, 0.5 + kept / 2)


def test_seqlen_warmup_scales_attention_by_the_token_weighted_length():
    model = tiny_llama()
    technique = SeqLenWarmupTechnique(min_length=8, full_length=S, warmup_steps=4)

    def steps():
        for t in range(5):  # truncated to 8, 8, 16, 24, then 32
            yield technique.on_batch(_batch(), t), None

    per_token = measured(model, steps())
    fraction = technique.compute_fraction(model, 5, S)
    mean_length = (8 * 8 + 8 * 8 + 16 * 16 + 24 * 24 + 32 * 32) / (8 + 8 + 16 + 24 + 32)
    assert fraction.rest == Parts(attention_forward=mean_length / S, attention_backward=mean_length / S)
    assert_matches(count_flops(model, S, [("seqlen_warmup", fraction)]).total, per_token)


# ------------------------------------------------------------------------------------------ composition


def test_fractions_compose_and_are_reported_per_technique():
    model = tiny_llama()
    full = count_flops(model, S)
    head = 6 * 128 * VOCAB
    half = ComputeFraction("half the blocks' work", {b: Parts.uniform(0.5) for b in model.model.layers})
    backward_free = ComputeFraction("no backward", rest=Parts(input_grad=0, weight_grad=0, attention_backward=0))
    count = count_flops(model, S, [("a", half), ("b", backward_free)])
    assert count.before_techniques == full.parts
    assert count.parts["matmul_forward"] == head / 3 + (full.parts["matmul_forward"] - head / 3) / 2
    assert count.parts["matmul_input_grad"] == count.parts["attention_backward"] == 0
    assert [t["name"] for t in count.techniques] == ["a", "b"]
    assert count.techniques[0]["fraction_of_total"] == pytest.approx((head + (full.total - head) / 2) / full.total)
    report = count.as_dict()
    assert report["total"] == count.total and report["dense_6N_12Lds"] == full.total
    assert set(PARTS) <= set(report) and set(report["before_techniques"]) == set(PARTS)
    assert "non-causal" in report["rules"] and "recomputation" in report["not_counted"]


def test_the_default_hook_changes_nothing():
    assert Technique.compute_fraction(LayerDroppingTechnique(), tiny_llama(), 10, S) is None
    assert LayerDroppingTechnique().compute_fraction(tiny_llama(), 10, S) is None  # no drops drawn yet


# ------------------------------------------------------------------------------------------- compute dtype


def test_matmul_dtype_is_the_weights_own_or_a_quantized_layers_compute_dtype():
    """MFU's peak follows the dtype the matmuls run in: pure bf16 weights are bf16 work, not fp32 work."""
    model = tiny_llama()
    assert matmul_dtype(model) == torch.float32
    assert matmul_dtype(model.to(torch.bfloat16)) == torch.bfloat16
    model = tiny_llama()
    model.lm_head.to(torch.bfloat16)  # the LM head alone is less than half of the matmul FLOPs here
    assert matmul_dtype(model) == torch.float32

    bnb = pytest.importorskip("bitsandbytes")
    from hf_efftrain.techniques.quantized_base import bnb_config, quantize_model

    for compute in (torch.float32, torch.bfloat16):
        model = quantize_model(tiny_llama(), bnb_config(4, compute_dtype=compute))
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        assert matmul_dtype(model) == compute  # the packed uint8 weights are not the compute dtype
