"""hf_efftrain: the techniques of "A Survey on Efficient Training of Transformers" (Zhuang et al., 2023,
arXiv 2302.01107) for Hugging Face models, switched on by a recipe YAML or used by hand with ``Trainer``."""

from __future__ import annotations

from .core.recipe import Recipe, load_recipe
from .core.registry import all_techniques, get_technique, register_technique
from .core.technique import Technique, TechniqueConfig
from .errors import RecipeError

__version__ = "0.2.0"
__all__ = [
    "EffTrainer",
    "Recipe",
    "RecipeError",
    "Technique",
    "TechniqueConfig",
    "all_techniques",
    "get_technique",
    "list_techniques",
    "load_recipe",
    "register_technique",
    "train",
]


def list_techniques() -> list[str]:
    return list(all_techniques())


def __getattr__(name: str):
    # EffTrainer and train import transformers' Trainer: loaded on first use so `import hf_efftrain` stays light.
    if name == "EffTrainer":
        from .core.trainer import EffTrainer

        return EffTrainer
    if name == "train":
        from .core.run import train

        return train
    raise AttributeError(name)
