"""Progressive layer dropping (PLD) and stochastic depth: skip whole transformer blocks at random while training.

Zhang & He, "Accelerating Training of Transformer-Based Language Models with Progressive Layer Dropping", NeurIPS
2020, arXiv 2010.13369; Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016, arXiv 1603.09382. With t the
optimizer step, L the number of blocks and l = 1..L the block's depth:

    theta(t) = (1 - theta_bar) * exp(-gamma * t) + theta_bar     (mode progressive: PLD's schedule, theta(0) = 1)
    theta(t) = theta_bar                                         (mode stochastic_depth: Huang et al.'s fixed p_L)
    p_l(t)   = 1 - (l / L) * (1 - theta(t))                      (keep probability, linear decay with depth)

Every training forward pass draws one Bernoulli(p_l) per block, shared by the whole batch (that is what saves the
compute). A dropped block is skipped: the identity on the residual stream. A kept block's residual branches are
scaled by 1/p_l, as in PLD's Switchable-Transformer block (x' = x + f_attn(LN(x)) / p, y = x' + f_ffn(LN(x')) / p):
the branch, not the block output, so the expectation over draws equals the full model's. Evaluation and saved
models run every block unscaled.

The branches of each block class are a registered policy (``register_branch_policy``): the modules whose outputs are
added to the residual stream (Llama-style ``self_attn`` / ``mlp``, Gemma2's post-norms, GPT-2's ``attn`` / ``mlp``,
BERT's two ``*.output.dense``). On post-LN BERT the branch is the dense output before its add & LayerNorm; PLD itself
moves BERT to Pre-LN, which this file does not do. Departure from DeepSpeed's reference code (bing_bert
``modelingpreln_layerdrop.py``), which draws block l with p_{l-1} and scales it by 1/p_l: here both use p_l.

Draws come from a generator seeded by (seed, step, forward pass within the step), so every DDP rank drops the same
blocks and a resumed run draws what the uninterrupted one did. Under DDP the skipped blocks' parameters get no
gradient: ``ddp_find_unused_parameters`` must be true (set by ``training_args``). Under DeepSpeed ZeRO-1/2 the engine
fills a missing gradient with zeros, so Adam's moments still move a skipped block slightly (not tested here: no
deepspeed on the CPU machine).

Under ``torch.compile`` (``training.torch_compile``) the draw and each block's decision run outside the graph
(``LayerDrop._kept``): a graph specialised on a Python value per block pattern or per theta(t) would recompile at
every step, past dynamo's recompile limit. Each block is one graph break, with two versions (kept, skipped), and its
compiled branches read 1/p from a tensor.

Functional core for the stock Trainer: ``drop = LayerDrop(model, mode="progressive", theta_bar=0.5, gamma=1e-3)``,
``Trainer(..., callbacks=[drop.callback()])``; or ``drop.apply()`` / ``drop.set_step(t)`` / ``drop.undo()`` by hand.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from transformers import TrainerCallback, TrainingArguments

from ..core.layers import layer_stacks
from ..core.patching import Patches, patch_attr
from ..core.registry import register_technique
from ..core.technique import Env, Technique, TechniqueConfig
from ..errors import RecipeError

logger = logging.getLogger(__name__)

# block class name -> dotted paths (relative to the block) of the modules whose output is a residual branch
_BRANCHES: dict[str, tuple[str, ...]] = {}


def register_branch_policy(block_class: str, branches: Sequence[str]) -> None:
    _BRANCHES[block_class] = tuple(branches)


for _name in ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
              "GemmaDecoderLayer", "PhiDecoderLayer", "Phi3DecoderLayer", "OlmoDecoderLayer"):  # fmt: skip
    register_branch_policy(_name, ("self_attn", "mlp"))
register_branch_policy("Gemma2DecoderLayer", ("post_attention_layernorm", "post_feedforward_layernorm"))
register_branch_policy("GPTNeoXLayer", ("attention", "mlp"))
register_branch_policy("GPT2Block", ("attn", "mlp"))
for _name in ("BertLayer", "RobertaLayer", "XLMRobertaLayer", "ElectraLayer"):
    register_branch_policy(_name, ("attention.output.dense", "output.dense"))


def branch_paths(block: nn.Module, path: str = "model.name_or_path") -> tuple[str, ...]:
    for cls in type(block).__mro__:
        if cls.__name__ in _BRANCHES:
            return _BRANCHES[cls.__name__]
    raise RecipeError(
        path,
        f"layer dropping has no branch policy for {type(block).__name__}; supported: {', '.join(sorted(_BRANCHES))}",
    )


def theta_at(step: int, theta_bar: float, gamma: float, mode: str = "progressive") -> float:
    """PLD's global keep ratio theta(t); stochastic depth keeps it at theta_bar."""
    if mode == "stochastic_depth":
        return theta_bar
    return (1.0 - theta_bar) * math.exp(-gamma * step) + theta_bar


def keep_probs(theta: float, num_layers: int) -> list[float]:
    """p_l = 1 - (l / L)(1 - theta) for l = 1..L."""
    return [1.0 - (depth / num_layers) * (1.0 - theta) for depth in range(1, num_layers + 1)]


def _scaled(out: Any, scale: float) -> Any:
    if isinstance(out, tuple):  # attention modules return (output, weights)
        return (out[0] * scale, *out[1:])
    return out * scale


class LayerDrop:
    """Per-block Bernoulli skipping with 1/p branch scaling, installed as instance patches (``apply``/``undo``)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        mode: Literal["progressive", "stochastic_depth"] = "progressive",
        theta_bar: float = 0.5,
        gamma: float = 1e-3,
        seed: int = 0,
    ):
        self.model = model
        self.mode, self.theta_bar, self.gamma, self.seed = mode, theta_bar, gamma, seed
        self.stacks = list(layer_stacks(model).values())
        for stack in self.stacks:
            for block in stack:
                branch_paths(block)  # unsupported block classes fail here, before training
        self.step = 0
        self._draw_index = 0
        self.keep: list[list[bool]] = [[True] * len(s) for s in self.stacks]
        self.scale: list[list[float]] = [[1.0] * len(s) for s in self.stacks]
        self.scale_tensors: list[torch.Tensor | None] = [None] * len(self.stacks)  # under torch.compile: see _kept
        self.current_scale: torch.Tensor | None = None
        self.kept_blocks = 0
        self.drawn_blocks = 0
        self._patches: Patches | None = None

    # ---- schedule ---------------------------------------------------------------------------------------------
    def theta(self, step: int | None = None) -> float:
        return theta_at(self.step if step is None else step, self.theta_bar, self.gamma, self.mode)

    def set_step(self, step: int) -> None:
        if step != self.step:
            self.step, self._draw_index = step, 0

    def draw(self, stack_index: int) -> list[bool]:
        """New keep/drop decisions for one stack (called when its first block runs in a training forward)."""
        probs = keep_probs(self.theta(), len(self.stacks[stack_index]))
        seed = ((self.seed * 1_000_003 + self.step) * 1_009 + self._draw_index) * 7 + stack_index
        g = torch.Generator().manual_seed(seed % (2**63))
        u = torch.rand(len(probs), generator=g, dtype=torch.float64).tolist()
        if stack_index == len(self.stacks) - 1:
            self._draw_index += 1
        keep = [ui < p for ui, p in zip(u, probs)]
        self.keep[stack_index] = keep
        self.scale[stack_index] = [1.0 / p for p in probs]
        self.kept_blocks += sum(keep)
        self.drawn_blocks += len(keep)
        return keep

    # ---- patches ----------------------------------------------------------------------------------------------
    @property
    def applied(self) -> bool:
        return self._patches is not None

    def apply(self) -> LayerDrop:
        if self._patches is not None:
            return self
        patches = Patches()
        for s, stack in enumerate(self.stacks):
            for i, block in enumerate(stack):
                patches.add(patch_attr(block, "forward", self._block_forward(s, i, block, block.forward)))
                for dotted in branch_paths(block):
                    module = block.get_submodule(dotted)
                    patches.add(patch_attr(module, "forward", self._branch_forward(s, i, module, module.forward)))
        self._patches = patches
        return self

    def undo(self) -> None:
        if self._patches is not None:
            self._patches.undo()
            self._patches = None

    def _block_forward(self, s: int, i: int, block: nn.Module, original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if not block.training:
                return original(*args, **kwargs)
            hidden = args[0] if args else kwargs["hidden_states"]
            if not self._kept(s, i, hidden, torch.compiler.is_compiling()):
                return hidden  # identity on the residual stream
            return original(*args, **kwargs)

        return forward

    # Under torch.compile the draw and the decision run outside the graph (one break per block); the graph after the
    # break is specialised on the returned bool, so each block has at most two versions, not one per pattern of kept
    # blocks. A compiled branch reads its scale from a tensor (``scale_tensors``): a Python float would be a constant
    # of the graph, recompiled whenever theta(t) moves.
    @torch.compiler.disable
    def _kept(self, s: int, i: int, hidden: torch.Tensor, compiling: bool = False) -> bool:
        if i == 0:
            self.draw(s)
            if compiling:  # the float32 values a Python float gives a float32 product; an async copy, no host sync
                scales = torch.tensor(self.scale[s], dtype=torch.float32)
                self.scale_tensors[s] = scales.to(hidden.device, non_blocking=True)
        if compiling:  # what the block's compiled branches read (the block runs next, after this break)
            self.current_scale = self.scale_tensors[s][i]
        return self.keep[s][i]

    def _branch_forward(self, s: int, i: int, module: nn.Module, original: Callable[..., Any]) -> Callable[..., Any]:
        # Also runs inside gradient-checkpointing recomputation, so it reads the scale stored at draw time.
        def forward(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            if not module.training:
                return out
            if torch.compiler.is_compiling():
                return _scaled(out, self.current_scale)
            return _scaled(out, self.scale[s][i]) if self.scale[s][i] != 1.0 else out

        return forward

    def mean_keep_fraction(self) -> float | None:
        return self.kept_blocks / self.drawn_blocks if self.drawn_blocks else None

    def callback(self) -> LayerDropCallback:
        return LayerDropCallback(self)


class LayerDropCallback(TrainerCallback):
    """Patches at train begin, follows the optimizer step, and undoes the patches at train end."""

    def __init__(self, drop: LayerDrop):
        self.drop = drop

    def on_train_begin(self, args, state, control, **kwargs):
        self.drop.apply()
        self.drop.set_step(state.global_step)
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        self.drop.set_step(state.global_step)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.drop.undo()
        return control


class LayerDroppingConfig(TechniqueConfig):
    name: Literal["layer_dropping"] = "layer_dropping"
    mode: Literal["progressive", "stochastic_depth"] = Field(
        "progressive",
        description="progressive: PLD's theta(t) falling from 1 to theta_bar; stochastic_depth: theta = theta_bar.",
    )
    theta_bar: float = Field(
        0.5, gt=0, le=1, description="Limit of the global keep ratio theta(t); the last block's keep probability."
    )
    gamma: float = Field(
        1e-3, ge=0, description="Decay rate of theta(t) per optimizer step (PLD; unused by stochastic_depth)."
    )
    seed: int | None = Field(None, ge=0, description="Seed of the drop decisions; default: training.seed.")


@register_technique
class LayerDroppingTechnique(Technique):
    """Validates the architecture in ``on_model``; a callback applies the patches for the duration of training."""

    name = "layer_dropping"
    Config = LayerDroppingConfig
    survey_section = "Computation efficiency / Incremental learning"
    paper = (
        'Zhang & He 2020, "Accelerating Training of Transformer-Based Language Models with Progressive Layer '
        'Dropping", arXiv 2010.13369; Huang et al. 2016, "Deep Networks with Stochastic Depth", arXiv 1603.09382'
    )

    config: LayerDroppingConfig

    def __init__(self, config: LayerDroppingConfig | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.drop: LayerDrop | None = None
        self.seed = 0

    def validate(self, recipe: Any, env: Env) -> None:
        if recipe.training.get("ddp_find_unused_parameters") is False:
            raise RecipeError(
                "", "needs training.ddp_find_unused_parameters true (skipped blocks get no gradient under DDP)"
            )

    def training_args(self, args: TrainingArguments) -> TrainingArguments:
        args.ddp_find_unused_parameters = True  # a plain field: read when the model is wrapped in DDP
        self.seed = args.seed if self.config.seed is None else self.config.seed
        return args

    def on_model(self, model: nn.Module) -> nn.Module:
        c = self.config
        seed = self.seed if c.seed is None else c.seed
        self.drop = LayerDrop(model, mode=c.mode, theta_bar=c.theta_bar, gamma=c.gamma, seed=seed)
        return model

    def on_trainer(self, trainer: Any) -> None:
        args = trainer.args
        reentrant = (args.activation_checkpointing_kwargs or {}).get("use_reentrant", False)
        if args.world_size > 1 and args.activation_checkpointing and reentrant:
            raise RecipeError("", "under DDP needs non-reentrant gradient checkpointing (use_reentrant: false)")

    def callbacks(self) -> list[TrainerCallback]:
        if self.drop is None:
            raise RuntimeError("layer_dropping: on_model(model) must run before training")
        return [self.drop.callback()]

    def state_dict(self) -> dict[str, Any]:
        # the draws need no state (seeded by the step); the counters behind the report's mean keep fraction do
        d = self.drop
        return {"kept_blocks": d.kept_blocks, "drawn_blocks": d.drawn_blocks} if d is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.drop is not None and state:
            self.drop.kept_blocks, self.drop.drawn_blocks = int(state["kept_blocks"]), int(state["drawn_blocks"])

    def report(self) -> dict[str, Any]:
        d = self.drop
        if d is None:
            return {}
        return {"theta_final": d.theta(), "keep_probs_final": keep_probs(d.theta(), len(d.stacks[0])),
                "mean_keep_fraction": d.mean_keep_fraction()}  # fmt: skip

    def compute_fraction(self, model: nn.Module, steps: int, seq_len: int) -> Any:
        """Each block ran (forward and backward) in ``mean_keep_fraction`` of the training forwards: the mean over
        all blocks, given to each (the deeper ones are dropped more often; the total is the same for equal blocks)."""
        from ..runtime.flop_count import uniform_blocks

        keep = self.drop.mean_keep_fraction() if self.drop is not None else None
        if keep is None:
            return None
        blocks = [b for stack in self.drop.stacks for b in stack]
        return uniform_blocks(blocks, keep, "layer dropping: blocks kept in this share of training forwards")
