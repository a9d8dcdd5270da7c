"""Built-in model configs: small, randomly initialised members of real HF architecture families (llama, gpt2,
bert, t5), so every technique of arXiv 2302.01107 can be exercised offline on a CPU (docs/ARCHITECTURE.md, "Offline
built-ins").

Only configs are built here; the core calls ``AutoModelFor<Task>.from_config`` and infers the task from
``config.architectures``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import BertConfig, GPT2Config, LlamaConfig, PretrainedConfig, PreTrainedTokenizerBase, T5Config

from ..errors import RecipeError
from .data import PREFIX


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),  # len() counts added tokens; .vocab_size does not
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def _tiny_llama(tok: PreTrainedTokenizerBase) -> PretrainedConfig:
    return LlamaConfig(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in current llama models
        intermediate_size=352,
        max_position_embeddings=1024,
        architectures=["LlamaForCausalLM"],
        **_special_ids(tok),
    )


def _tiny_gpt2(tok: PreTrainedTokenizerBase) -> PretrainedConfig:
    return GPT2Config(
        n_embd=128,
        n_layer=4,
        n_head=4,
        n_positions=1024,
        architectures=["GPT2LMHeadModel"],
        **_special_ids(tok),
    )


def _tiny_bert(tok: PreTrainedTokenizerBase) -> PretrainedConfig:
    return BertConfig(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=1024,
        architectures=["BertForMaskedLM"],
        **_special_ids(tok),
    )


def _tiny_t5(tok: PreTrainedTokenizerBase) -> PretrainedConfig:
    return T5Config(
        d_model=128,
        d_kv=32,
        d_ff=512,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=tok.pad_token_id,  # T5 starts decoding from the pad token
        architectures=["T5ForConditionalGeneration"],
        **_special_ids(tok),
    )


_BUILDERS: dict[str, Callable[[PreTrainedTokenizerBase], PretrainedConfig]] = {
    "tiny-llama": _tiny_llama,
    "tiny-gpt2": _tiny_gpt2,
    "tiny-bert": _tiny_bert,
    "tiny-t5": _tiny_t5,
}
BUILTIN_MODELS: tuple[str, ...] = tuple(_BUILDERS)


def builtin_config(
    name: str, tokenizer: PreTrainedTokenizerBase, path: str = "model.name_or_path"
) -> PretrainedConfig:
    """The config of built-in model ``name`` (with or without ``builtin:``), sized to ``tokenizer``'s vocabulary.

    ``path`` is the recipe field named in the error for an unknown name.
    """
    key = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    if key not in _BUILDERS:
        allowed = ", ".join(PREFIX + n for n in BUILTIN_MODELS)
        raise RecipeError(path, f"unknown builtin model '{key}'; allowed: {allowed}")
    return _BUILDERS[key](tokenizer)
