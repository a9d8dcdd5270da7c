"""Running one recipe under any ``accelerate launch`` config: CPU process groups, and engine checks.

The survey (Zhuang et al. 2023, arXiv 2302.01107, "Memory efficiency / Parallelism") covers data parallelism and
ZeRO (Rajbhandari et al., arXiv 1910.02054) with offloading (ZeRO-Offload, arXiv 2101.06840); here they come
from Accelerate, DeepSpeed and FSDP, chosen by ``accelerate launch --config_file accelerate_configs/<x>.yaml``.
Distributed settings never live in a recipe. This module holds the little glue around that: making the same launch
files run on a machine without CUDA (a gloo group, DeepSpeed's CPU accelerator), reading the engine and DeepSpeed
config a launch asks for (``engine_of``, ``deepspeed_config_of``, used by ``Env``), refusing combinations that would
quietly do something else (an optimizer DeepSpeed would replace, a ZeRO/FSDP launch that would run as DDP), and
the ``from_pretrained`` arguments of a tensor-parallel launch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

DEEPSPEED = "DEEPSPEED"
FSDP = "FSDP"


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "false").strip().lower() in ("1", "true", "yes")


def launched(env: Mapping[str, str] | None = None) -> bool:
    """True inside a process started by ``accelerate launch`` / ``torchrun`` (they set LOCAL_RANK)."""
    return "LOCAL_RANK" in (os.environ if env is None else env)


def engine_of(env: Mapping[str, str] | None = None) -> str | None:
    """The sharding engine ``accelerate launch`` chose for this process: ``"DEEPSPEED"``, ``"FSDP"`` or None.

    Read from the variables the launcher sets (ACCELERATE_USE_DEEPSPEED, ACCELERATE_USE_FSDP), so recipes can be
    validated before any process group or Accelerator exists.
    """
    env = os.environ if env is None else env
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        return DEEPSPEED
    if _flag(env, "ACCELERATE_USE_FSDP"):
        return FSDP
    return None


def prepare_launch_env(cuda: bool | None = None) -> None:
    """Under ``accelerate launch`` on a machine without CUDA, make the processes a CPU group.

    Accelerate's launcher starts the processes, but they only form a CPU (gloo) group when told it is a CPU run:
    plain data parallelism gets ``ACCELERATE_USE_CPU=true``. DeepSpeed ignores that flag (Accelerate turns
    DeepSpeed off on ``cpu``), so a DeepSpeed launch gets ``DS_ACCELERATOR=cpu`` instead (DeepSpeed's CPU
    accelerator, gloo collectives; its CPU ops are compiled once into ~/.cache/torch_extensions). One launch file
    then serves both GPU and CPU machines. Existing values are kept.
    """
    if not launched():
        return
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if cuda:
        return
    if engine_of() == DEEPSPEED:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def launch_training_defaults(cuda: bool | None = None) -> dict[str, Any]:
    """TrainingArguments defaults for this launch: ``ddp_backend="gloo"`` for a launched run without CUDA.

    Transformers hands ``ddp_backend`` to Accelerate's PartialState. A DeepSpeed run on the CPU needs it named:
    without it Accelerate finds no device backend and counts one process, so every rank would read the whole
    dataset. For a plain CPU run it pins the collective library to gloo (not MPI).
    """
    if not launched():
        return {}
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    return {} if cuda else {"ddp_backend": "gloo"}


def deepspeed_config_of(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The DeepSpeed config this launch will use, as far as it can be known before the Trainer exists.

    The JSON named by ``deepspeed_config_file`` (ACCELERATE_DEEPSPEED_CONFIG_FILE), or, for an accelerate config
    with inline ``deepspeed_config`` fields, the parts that matter here (stage, optimizer offload device). None
    when this is not a DeepSpeed launch or the file cannot be read.
    """
    env = os.environ if env is None else env
    if engine_of(env) != DEEPSPEED:
        return None
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if path and path.lower() != "none":
        import json

        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            logger.warning("Could not read the DeepSpeed config %s: %s", path, e)
            return None
    zero: dict[str, Any] = {"stage": int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))}
    device = env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")
    if device != "none":
        zero["offload_optimizer"] = {"device": device}
    return {"zero_optimization": zero}


def recipe_optimizer_problem(distributed_type: str | None, ds_config: Mapping[str, Any] | None) -> str | None:
    """Why the optimizer a recipe chooses would not be the one that runs under this engine, or None.

    Two DeepSpeed cases replace it silently (checked on DeepSpeed 0.19 / Accelerate 1.15 with Lion and
    adamw_bnb_8bit): an ``optimizer`` section in the DeepSpeed config (DeepSpeed builds its own), and optimizer
    offload without ``"zero_force_ds_cpu_optimizer": false`` (Accelerate's ``map_pytorch_optim_to_deepspeed``
    swaps any client optimizer for DeepSpeedCPUAdam, keeping only lr and weight decay: Lion becomes Adam, an
    8-bit AdamW becomes a 32-bit Adam with L2 decay). 8-bit bitsandbytes optimizers themselves run (checked on
    the CPU: ZeRO-2, and ZeRO-3 with offload) when that flag is false, as in accelerate_configs/deepspeed/*.json.
    """
    if distributed_type != DEEPSPEED or not ds_config:
        return None
    if "optimizer" in ds_config:
        return (
            "the DeepSpeed config has an 'optimizer' section, so DeepSpeed builds its own optimizer and ignores "
            "this one; remove that section (as in accelerate_configs/deepspeed/*.json) or this technique"
        )
    offload = (ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    forced = str(ds_config.get("zero_force_ds_cpu_optimizer", True)).lower() != "false"
    if str(offload.get("device", "none")).lower() in ("cpu", "nvme") and forced:
        return (
            "with ZeRO optimizer offload, Accelerate replaces this optimizer by DeepSpeedCPUAdam unless the DeepSpeed "
            'config sets "zero_force_ds_cpu_optimizer": false (as accelerate_configs/deepspeed/*_offload.json do); '
            "set it, or leave the optimizer to the Trainer's default AdamW, or use a config without offload_optimizer"
        )
    return None


def check_engine(trainer: Any) -> None:
    """Raise RecipeError when the launch asked for DeepSpeed or FSDP but the built Trainer would run without it.

    Accelerate falls back quietly (FSDP has no CPU form: a CPU run becomes MULTI_CPU), so such a run would train
    as plain data parallelism under a ZeRO/FSDP launch line. Called after ``build()``, before training.
    """
    from ..errors import RecipeError

    wanted = engine_of()
    actual = getattr(trainer.accelerator.distributed_type, "value", str(trainer.accelerator.distributed_type))
    if wanted is None or actual == wanted:
        return
    if wanted == FSDP and getattr(trainer.args.device, "type", "cpu") != "cuda":
        why = "Accelerate runs FSDP on GPUs only; on a CPU machine launch with cpu_ddp.yaml or cpu_deepspeed_*.yaml"
    else:
        why = "check the accelerate config and training.use_cpu"
    raise RecipeError("training", f"the accelerate launch asks for {wanted} but this run would use {actual}: {why}")


def tensor_parallel_size(env: Mapping[str, str] | None = None) -> int:
    """The tensor-parallel degree an accelerate config asks for (``parallelism_config_tp_size``), else 1."""
    env = os.environ if env is None else env
    if not _flag(env, "ACCELERATE_USE_PARALLELISM_CONFIG"):
        return 1
    return max(1, int(env.get("PARALLELISM_CONFIG_TP_SIZE", "1") or 1))


def launch_model_kwargs(
    name_or_path: str, env: Mapping[str, str] | None = None, cuda: bool | None = None, from_config: bool = False
) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments this launch needs: ``distributed_config`` for tensor parallelism.

    Tensor parallelism (Megatron-LM style, Shoeybi et al. 2019, arXiv 1909.08053) comes from the model's own
    ``base_model_tp_plan`` through ``from_pretrained(distributed_config=DistributedConfig(tp_size=N))``, which
    shards each weight as it loads; the Trainer then sets up Accelerate's ParallelismConfig from ``model.tp_size``.
    Randomly initialised models (``builtin:``, ``model.from_scratch``: ``from_config``) have no such path.
    """
    from ..builtins import is_builtin
    from ..errors import RecipeError

    tp = tensor_parallel_size(env)
    if tp <= 1:
        return {}
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:  # tried: the TP model loads and runs on gloo, but Accelerate refuses ParallelismConfig on MULTI_CPU
        raise RecipeError(
            "model",
            f"tensor parallelism (tp_size {tp}) needs GPUs: Accelerate's ParallelismConfig does not run on "
            "the CPU; use cpu_ddp.yaml or cpu_deepspeed_*.yaml here",
        )
    if is_builtin(name_or_path) or from_config:
        raise RecipeError(
            "model.from_scratch" if from_config and not is_builtin(name_or_path) else "model.name_or_path",
            f"tensor parallelism (tp_size {tp}) shards weights while from_pretrained loads them; a builtin: or "
            "from_scratch model is built from its config. Save it first (e.g. runs/quickstart after `hf-efftrain "
            "train recipes/quickstart.yaml`) and point name_or_path at that folder",
        )
    from transformers.distributed import DistributedConfig

    return {"distributed_config": DistributedConfig(tp_size=tp)}
