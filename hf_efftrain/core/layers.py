"""Where each architecture keeps its stacks of transformer blocks: a registered policy per HF base-model class.

Techniques that work per layer (initialization scaling, token and layer dropping, stacking, freezing) ask
``layer_stacks(model)`` instead of testing ``model_type``. A new architecture is one ``register_layer_policy``
call; an unsupported one gets a RecipeError naming the supported ones.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import RecipeError

# base-model class name -> {role: dotted path of the nn.ModuleList of blocks, relative to the base model}
_POLICIES: dict[str, dict[str, str]] = {}


def register_layer_policy(base_model_class: str, stacks: dict[str, str]) -> None:
    """``stacks`` maps a role ("encoder" or "decoder") to the attribute path of its block list."""
    _POLICIES[base_model_class] = dict(stacks)


for _name in ("LlamaModel", "MistralModel", "Qwen2Model", "Qwen3Model", "GemmaModel", "Gemma2Model",
              "PhiModel", "Phi3Model", "GPTNeoXModel", "OlmoModel"):  # fmt: skip
    register_layer_policy(_name, {"decoder": "layers"})
register_layer_policy("GPT2Model", {"decoder": "h"})
for _name in ("BertModel", "RobertaModel", "XLMRobertaModel", "ElectraModel"):
    register_layer_policy(_name, {"encoder": "encoder.layer"})
for _name in ("T5ForConditionalGeneration", "T5Model", "MT5ForConditionalGeneration", "MT5Model"):
    register_layer_policy(_name, {"encoder": "encoder.block", "decoder": "decoder.block"})
register_layer_policy("T5EncoderModel", {"encoder": "encoder.block"})
register_layer_policy("BartModel", {"encoder": "encoder.layers", "decoder": "decoder.layers"})


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside PEFT and DDP / DeepSpeed wrappers (the one with the head and the config)."""
    while True:
        if hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / DeepSpeed engine
            model = model.module
        else:
            return model


def base_model(model: nn.Module) -> nn.Module:
    """The transformer body: unwraps PEFT and DDP wrappers, then the task head (``PreTrainedModel.base_model``)."""
    model = unwrap_model(model)
    return getattr(model, "base_model", model)


def layer_stacks(model: nn.Module, path: str = "model.name_or_path") -> dict[str, nn.ModuleList]:
    """``{"decoder": ModuleList, ...}`` for a supported model; ``path`` names the recipe field for errors."""
    body = base_model(model)
    for cls in type(body).__mro__:
        if cls.__name__ in _POLICIES:
            return {role: _get(body, dotted) for role, dotted in _POLICIES[cls.__name__].items()}
    raise RecipeError(path, f"{type(body).__name__} is not supported here; supported: {', '.join(supported())}")


def supported() -> list[str]:
    return sorted(_POLICIES)


def _get(obj: Any, dotted: str) -> nn.ModuleList:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
