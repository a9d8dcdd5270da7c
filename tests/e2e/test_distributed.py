"""Scaling out: one recipe under every accelerate config, changing nothing but the config file.

The slow tests run real 2-process ``accelerate launch`` jobs on the CPU (DDP over gloo, DeepSpeed ZeRO-2 and ZeRO-3
with CPU offload on DeepSpeed's CPU accelerator) through ``tests/e2e/distributed_probe.py``, which runs the real
``train()`` and records, per rank, a hash of every training row the model was given and a digest of the final
(gathered) weights. Data parallelism is correct when the ranks read different rows of one epoch, end with
bitwise-identical weights, and the loss goes down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "accelerate_configs"
PROBE = ROOT / "tests" / "e2e" / "distributed_probe.py"
LAUNCH_HEADER = "# accelerate launch --config_file accelerate_configs/{name} "

MICRO_BATCH, GRAD_ACCUM, STEPS, CLIP = 4, 2, 4, 0.5


def test_every_accelerate_config_loads_and_says_how_to_launch_it():
    from accelerate.commands.config.config_args import load_config_from_file

    files = sorted(CONFIGS.glob("*.yaml"))
    names = {f.stem for f in files}
    for required in (
        "cpu_ddp", "ddp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero2_offload",
        "deepspeed_zero3_offload", "fsdp", "fsdp_offload", "cpu_deepspeed_zero2", "cpu_deepspeed_zero3_offload",
    ):  # fmt: skip
        assert required in names
    assert any(n.startswith("multi_node_") for n in names)
    for f in files:
        first = f.read_text().splitlines()[0]
        assert first.startswith(LAUNCH_HEADER.format(name=f.name)), f.name
        assert "-m hf_efftrain train recipes/" in first, f.name
        config = load_config_from_file(str(f))  # accelerate's own loader: unknown keys or bad enums raise here
        assert config.num_processes >= 2, f.name
        ds_file = (config.deepspeed_config or {}).get("deepspeed_config_file")
        assert ds_file is None or (ROOT / ds_file).is_file(), f.name
    for f in sorted((CONFIGS / "deepspeed").glob("*.json")):
        ds = json.loads(f.read_text())
        # Batch, accumulation, clipping and precision come from the recipe through "auto".
        for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps"):
            assert ds[key] == "auto", (f.name, key)
        assert ds["gradient_clipping"] == "auto" and ds["bf16"]["enabled"] == ds["fp16"]["enabled"] == "auto"
        assert "optimizer" not in ds, "the recipe's optimizer must be the one DeepSpeed wraps"
        if "offload_optimizer" in ds["zero_optimization"]:
            assert ds["zero_force_ds_cpu_optimizer"] is False  # else Accelerate swaps it for DeepSpeedCPUAdam


def _accelerate_launch(config: str, port: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file accelerate_configs/<config> ...`` from the repository root, 1 thread each."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"accelerate_configs/{config}"]
    return subprocess.run(
        [*command, "--main_process_port", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _launch(config: str, tmp_path: Path, tiny_recipe, port: int, techniques: list | None = None) -> tuple:
    recipe = tiny_recipe(
        techniques=techniques or [],
        training={
            "output_dir": str(tmp_path / "run"),
            "max_steps": STEPS,
            "per_device_train_batch_size": MICRO_BATCH,
            "gradient_accumulation_steps": GRAD_ACCUM,
            "max_grad_norm": CLIP,
        },
    )
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "probe"
    res = _accelerate_launch(config, port, str(PROBE), str(path), str(out))
    assert res.returncode == 0, res.stderr[-4000:]
    probes = [json.loads((out / f"probe_rank{r}.json").read_text()) for r in (0, 1)]
    report = json.loads((tmp_path / "run" / "run_report.json").read_text())
    return probes, report


def _check_data_parallel(probes: list[dict], report: dict, distributed_type: str) -> None:
    rank0, rank1 = probes
    assert [p["rank"] for p in probes] == [0, 1]
    assert report["world_size"] == 2 and report["distributed_type"] == distributed_type
    assert all(p["report"]["distributed_type"] == distributed_type for p in probes)
    # Each rank saw its own micro-batches: STEPS x GRAD_ACCUM of MICRO_BATCH rows ...
    for p in probes:
        assert len(p["rows"]) == STEPS * GRAD_ACCUM * MICRO_BATCH
    # ... and together no row more often than the dataset holds it (one epoch, so the shards are disjoint;
    # counting copies keeps duplicate texts in the corpus from failing the test).
    available = Counter(rank0["dataset_rows"])
    seen = Counter(rank0["rows"]) + Counter(rank1["rows"])
    assert all(seen[h] <= available[h] for h in seen), "a row was read by both ranks"
    assert rank0["rows"] != rank1["rows"]
    # Same weights at the start and at the end, bitwise, on both ranks; and training changed them.
    for when in ("weights_before", "weights_after"):
        assert rank0[when] == rank1[when]
    assert rank0["weights_after"]["sha256"] != rank0["weights_before"]["sha256"]
    assert rank0["weights_after"]["numel"] == report["params_total"]
    losses = rank0["losses"]
    assert len(losses) == STEPS and losses[-1] < losses[0]
    assert report["train_loss_final"] < report["train_loss_first"]
    assert report["optimizer_state_bytes"] > 0 and report["peak_memory_bytes"]["cpu_rss"] > 0


def _check_deepspeed_config_filled(probes: list[dict], stage: int, optimizer: str = "AdamW", bf16: bool = False):
    ds = probes[0]["deepspeed_config"]
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_micro_batch_size_per_gpu"] == MICRO_BATCH
    assert ds["gradient_accumulation_steps"] == GRAD_ACCUM
    assert ds["train_batch_size"] == MICRO_BATCH * GRAD_ACCUM * 2
    assert ds["gradient_clipping"] == CLIP
    assert ds["bf16"]["enabled"] is bf16 and ds["fp16"]["enabled"] is False  # what the recipe asks for
    assert probes[0]["param_dtype"] == ("torch.bfloat16" if bf16 else "torch.float32")  # DeepSpeed's bf16 mode
    assert probes[0]["optimizers"][-1] == optimizer  # the recipe's optimizer, wrapped by ZeRO (not swapped)


_DDP_RUN: dict[str, tuple[list[dict], dict]] = {}


def _ddp_run(tmp_path_factory, tiny_recipe) -> tuple[list[dict], dict]:
    """The 2-process DDP run, launched once per session: its own test checks it, ZeRO-2 is compared with it."""
    if "run" not in _DDP_RUN:
        _DDP_RUN["run"] = _launch("cpu_ddp.yaml", tmp_path_factory.mktemp("ddp"), tiny_recipe, 29541)
    return _DDP_RUN["run"]


@pytest.mark.slow
def test_ddp_two_cpu_processes_shard_data_and_agree_on_weights(tmp_path_factory, tiny_recipe):
    probes, report = _ddp_run(tmp_path_factory, tiny_recipe)
    _check_data_parallel(probes, report, "MULTI_CPU")
    # DDP keeps the whole optimizer state on each rank: AdamW's two fp32 moments of every parameter.
    assert report["optimizer_state_bytes"] >= 2 * 4 * report["params_total"]


@pytest.mark.slow
def test_deepspeed_zero2_cpu_shards_data_and_optimizer_state(tmp_path, tmp_path_factory, tiny_recipe):
    probes, report = _launch("cpu_deepspeed_zero2.yaml", tmp_path, tiny_recipe, 29543)
    _check_data_parallel(probes, report, "DEEPSPEED")
    _check_deepspeed_config_filled(probes, stage=2)
    assert probes[0]["optimizers"][1] == "DeepSpeedZeroOptimizer"
    # ZeRO-2: each rank keeps AdamW state for its half of the flat fp32 partition only.
    full = 2 * 4 * report["params_total"]
    assert full / 2 <= report["optimizer_state_bytes"] < 0.6 * full
    # ZeRO-2 is data parallelism with sharded state: same start, same rows, same updates as DDP, up to the order
    # of floating-point reductions.
    ddp, _ = _ddp_run(tmp_path_factory, tiny_recipe)
    assert probes[0]["weights_before"] == ddp[0]["weights_before"]
    assert sorted(probes[0]["rows"] + probes[1]["rows"]) == sorted(ddp[0]["rows"] + ddp[1]["rows"])
    assert probes[0]["losses"] == pytest.approx(ddp[0]["losses"], rel=1e-4)
    assert probes[0]["weights_after"]["sum"] == pytest.approx(ddp[0]["weights_after"]["sum"], rel=1e-4)


@pytest.mark.slow
def test_deepspeed_zero3_cpu_offload_shards_data_and_gathers_identical_weights(tmp_path, tiny_recipe):
    # Lion (under optimizer offload Accelerate would swap it for DeepSpeedCPUAdam unless the JSON says not to) and
    # bf16 (the JSON's "auto" becomes DeepSpeed's bf16 mode: bf16 weights, fp32 master copy in the optimizer).
    techniques = [{"name": "lion"}, {"name": "bf16"}]
    probes, report = _launch("cpu_deepspeed_zero3_offload.yaml", tmp_path, tiny_recipe, 29545, techniques)
    _check_data_parallel(probes, report, "DEEPSPEED")
    _check_deepspeed_config_filled(probes, stage=3, optimizer="Lion", bf16=True)
    assert probes[0]["optimizers"][1] == "DeepSpeedZeroOptimizer_Stage3"
    assert probes[0]["deepspeed_config"]["zero_optimization"]["offload_param"]["device"] == "cpu"
    # Lion keeps one fp32 state tensor per parameter; each rank holds half of them.
    full = 4 * report["params_total"]
    assert full / 2 <= report["optimizer_state_bytes"] < 0.6 * full


def _ds_env(tmp_path: Path, ds: dict, name: str = "ds.json") -> dict[str, str]:
    path = tmp_path / name
    path.write_text(json.dumps(ds))
    return {"LOCAL_RANK": "0", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)}


@pytest.mark.parametrize(
    "technique",
    [
        {"name": "lion"},
        {"name": "lion", "bits": 8},
        {"name": "optimizer", "type": "adamw_bnb_8bit"},
        {"name": "lamb"},
        {"name": "peft", "method": "loraplus"},
    ],
    ids=["lion", "lion8", "adamw_bnb_8bit", "lamb", "loraplus"],
)
def test_optimizer_techniques_refuse_deepspeed_configs_that_would_replace_them(tmp_path, tiny_recipe, technique):
    from hf_efftrain.core.build import make_techniques
    from hf_efftrain.core.recipe import Recipe
    from hf_efftrain.core.technique import Env
    from hf_efftrain.errors import RecipeError
    from hf_efftrain.runtime.distributed import deepspeed_config_of, engine_of

    recipe = Recipe.parse(tiny_recipe(techniques=[technique]))

    def env_for(ds: dict) -> Env:
        variables = _ds_env(tmp_path, ds)
        return Env(
            installed=frozenset({"bitsandbytes", "deepspeed", "peft"}),
            world_size=2,
            distributed_type=engine_of(variables),
            deepspeed_config=deepspeed_config_of(variables),
        )

    shipped = {n: json.loads((CONFIGS / "deepspeed" / f"{n}.json").read_text()) for n in ("zero2", "zero3_offload")}
    for ds in shipped.values():  # what accelerate_configs/ ships: the recipe's optimizer runs as written
        assert make_techniques(recipe, env_for(ds))
    forced = {k: v for k, v in shipped["zero3_offload"].items() if k != "zero_force_ds_cpu_optimizer"}
    with pytest.raises(
        RecipeError, match=r"techniques\[0\]\.(name|type|method): .*DeepSpeedCPUAdam.*zero_force_ds_cpu"
    ):
        make_techniques(recipe, env_for(forced))
    own = {**shipped["zero2"], "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}
    with pytest.raises(RecipeError, match="'optimizer' section"):
        make_techniques(recipe, env_for(own))


def test_engine_and_deepspeed_config_come_from_the_launch_environment(tmp_path):
    from hf_efftrain.runtime.distributed import deepspeed_config_of, engine_of, launch_training_defaults

    assert engine_of({}) is None and deepspeed_config_of({}) is None
    assert engine_of({"ACCELERATE_USE_FSDP": "true"}) == "FSDP"
    env = _ds_env(tmp_path, {"zero_optimization": {"stage": 3}})
    assert engine_of(env) == "DEEPSPEED" and deepspeed_config_of(env) == {"zero_optimization": {"stage": 3}}
    inline = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
              "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}  # fmt: skip
    assert deepspeed_config_of(inline) == {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert launch_training_defaults(cuda=False) == ({"ddp_backend": "gloo"} if "LOCAL_RANK" in os.environ else {})


def test_tensor_parallel_launch_loads_a_saved_model_sharded_and_refuses_what_cannot_work():
    from transformers.distributed import DistributedConfig

    from hf_efftrain.errors import RecipeError
    from hf_efftrain.runtime.distributed import launch_model_kwargs, tensor_parallel_size

    config = CONFIGS / "tp.yaml"
    from accelerate.commands.config.config_args import load_config_from_file

    tp = load_config_from_file(str(config)).parallelism_config["parallelism_config_tp_size"]
    env = {"ACCELERATE_USE_PARALLELISM_CONFIG": "true", "PARALLELISM_CONFIG_TP_SIZE": str(tp)}
    assert tensor_parallel_size(env) == tp == 2 and tensor_parallel_size({}) == 1
    assert launch_model_kwargs("builtin:tiny-llama", {}) == {}
    kwargs = launch_model_kwargs("runs/quickstart", env, cuda=True)
    assert isinstance(kwargs["distributed_config"], DistributedConfig) and kwargs["distributed_config"].tp_size == 2
    with pytest.raises(RecipeError, match="model.name_or_path: .*builtin"):
        launch_model_kwargs("builtin:tiny-llama", env, cuda=True)
    with pytest.raises(RecipeError, match="model.from_scratch: .*from its config"):
        launch_model_kwargs("runs/quickstart", env, cuda=True, from_config=True)
    with pytest.raises(RecipeError, match="needs GPUs"):
        launch_model_kwargs("runs/quickstart", env, cuda=False)


@pytest.mark.gpu
@pytest.mark.slow
def test_tensor_parallel_two_gpus_trains_a_sharded_model(tmp_path, tiny_recipe):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    from transformers import AutoModelForCausalLM

    from hf_efftrain.core.build import load_tokenizer
    from hf_efftrain.core.model_loading import load_config
    from hf_efftrain.core.recipe import Recipe

    recipe = Recipe.parse(tiny_recipe())
    tokenizer = load_tokenizer(recipe)
    model_dir = tmp_path / "model"
    AutoModelForCausalLM.from_config(load_config(recipe, tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(model={"name_or_path": str(model_dir), "config_overrides": {}})))
    res = _accelerate_launch("tp.yaml", 29547, "-m", "hf_efftrain", "train", str(path))
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads((tmp_path / "run" / "run_report.json").read_text())
    assert report["world_size"] == 2 and report["train_loss_final"] < report["train_loss_first"]


@pytest.mark.slow
def test_fsdp_launch_on_a_cpu_machine_stops_with_a_clear_error(tmp_path, tiny_recipe):
    import torch

    if torch.cuda.is_available():
        pytest.skip("with CUDA FSDP runs; this test checks the refusal on a CPU-only machine")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe()))
    res = _accelerate_launch("fsdp.yaml", 29549, "--num_processes", "2", "-m", "hf_efftrain", "train", str(path))
    assert res.returncode != 0
    assert "error: training: the accelerate launch asks for FSDP but this run would use MULTI_CPU" in res.stderr
    assert not (tmp_path / "run" / "run_report.json").exists()


_DPO_RUNS: dict[str, dict] = {}


def _dpo_run(config: str, port: int, tmp_path_factory, tiny_recipe, loss_type: str = "sigmoid") -> dict:
    """A 2-process DPO run (60 pairs, 2 x 4 pairs per process and step, 3 steps), launched once per config."""
    if config not in _DPO_RUNS:
        tmp = tmp_path_factory.mktemp(config.split(".")[0])
        recipe = tiny_recipe(
            data={"train": "builtin:pref-synthetic", "max_train_samples": 60, "max_eval_samples": 15},
            training={
                "output_dir": str(tmp / "run"), "max_steps": 3, "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 2, "eval_strategy": "steps", "eval_steps": 3,
            },
            techniques=[{"name": "dpo", "beta": 0.5, "loss_type": loss_type}],
        )  # fmt: skip
        path = tmp / "r.yaml"
        path.write_text(yaml.safe_dump(recipe))
        res = _accelerate_launch(config, port, "-m", "hf_efftrain", "train", str(path))
        assert res.returncode == 0, res.stderr[-4000:]
        _DPO_RUNS[config] = json.loads((tmp / "run" / "run_report.json").read_text())
    return _DPO_RUNS[config]


@pytest.mark.slow
def test_dpo_ddp_shards_the_reference_pass_and_keeps_each_pair_with_its_reference(tmp_path_factory, tiny_recipe):
    import math

    report = _dpo_run("cpu_ddp.yaml", 29551, tmp_path_factory, tiny_recipe)
    assert report["world_size"] == 2
    facts = next(t["report"] for t in report["techniques"] if t["name"] == "dpo")
    # Train and eval pairs scored once in all, half by each process (the shards gathered in the dataset's order).
    rows = [report["data"][f"data.{split}"]["rows"] for split in ("train", "eval")]
    assert rows == [60, 15] and facts["reference_pairs"] == 75
    assert facts["reference_pairs_per_process"] == 30 + 8
    # Dropout off, so the policy scores each pair exactly as its stored reference: the first loss is log 2 on both
    # processes only if no pair met another pair's reference in the gather.
    losses = [loss for _, loss in report["loss_history"]]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4) and all(map(math.isfinite, losses))
    assert 0 <= report["eval_rewards/accuracies"] <= 1 and "eval_rewards/margins" in report


@pytest.mark.slow
def test_dpo_deepspeed_zero2_trains_as_ddp(tmp_path_factory, tiny_recipe):
    report = _dpo_run("cpu_deepspeed_zero2.yaml", 29553, tmp_path_factory, tiny_recipe)
    ddp = _dpo_run("cpu_ddp.yaml", 29551, tmp_path_factory, tiny_recipe)
    assert report["distributed_type"] == "DEEPSPEED"
    # The same pairs, references and updates: DeepSpeed averages the accumulated micro-batches as DDP does.
    ours, theirs = ([loss for _, loss in r["loss_history"]] for r in (report, ddp))
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert report["eval_loss"] == pytest.approx(ddp["eval_loss"], rel=1e-4)


@pytest.mark.slow
def test_reference_free_orpo_trains_under_deepspeed_zero3(tmp_path_factory, tiny_recipe):
    import math

    report = _dpo_run("cpu_deepspeed_zero3_offload.yaml", 29555, tmp_path_factory, tiny_recipe, "orpo")
    assert report["distributed_type"] == "DEEPSPEED"
    facts = next(t["report"] for t in report["techniques"] if t["name"] == "dpo")
    assert facts["reference_pairs"] == 0 and facts["reference"].startswith("none")
    losses = [loss for _, loss in report["loss_history"]]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]  # the NLL term falls from step 1
    assert "eval_nll_loss" in report and "eval_log_odds_ratio" in report


def _reward_recipe(tmp_path, tiny_recipe) -> Path:
    recipe = tiny_recipe(
        data={"train": "builtin:pref-synthetic", "max_train_samples": 64, "max_eval_samples": 16},
        training={"output_dir": str(tmp_path / "run"), "max_steps": 4, "per_device_train_batch_size": 4,
                  "per_device_eval_batch_size": 8, "eval_strategy": "steps", "eval_steps": 4},
        techniques=[{"name": "reward_model"}],
    )  # fmt: skip
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_reward_model_trains_under_deepspeed_zero3_offload(tmp_path, tiny_recipe):
    import math

    path = _reward_recipe(tmp_path, tiny_recipe)
    res = _accelerate_launch("cpu_deepspeed_zero3_offload.yaml", 29559, "-m", "hf_efftrain", "train", str(path))
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads((tmp_path / "run" / "run_report.json").read_text())
    assert report["distributed_type"] == "DEEPSPEED" and report["task"] == "reward"
    assert all(math.isfinite(loss) for _, loss in report["loss_history"]) and 0 <= report["eval_accuracy"] <= 1


@pytest.mark.slow
def test_reward_model_ddp_logs_the_accuracy_of_all_processes(tmp_path, tiny_recipe):
    import torch
    from transformers import AutoModelForSequenceClassification

    from hf_efftrain import Recipe
    from hf_efftrain.core.build import build
    from hf_efftrain.techniques.reward_model import pair_rewards

    path = _reward_recipe(tmp_path, tiny_recipe)
    recipe = yaml.safe_load(path.read_text())
    res = _accelerate_launch("cpu_ddp.yaml", 29557, "-m", "hf_efftrain", "train", str(path))
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads((tmp_path / "run" / "run_report.json").read_text())
    assert report["world_size"] == 2 and report["task"] == "reward"
    # 8 held-out pairs per process: the logged accuracy is the saved model's over all 16, not one rank's half
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run").eval()
    built = build(Recipe.parse(recipe))
    pairs = built.eval_dataset
    with torch.no_grad():
        rewards = pair_rewards(model, built.collator(list(pairs)))
    assert len(pairs) == 16
    assert report["eval_accuracy"] == pytest.approx((rewards[:, 0] > rewards[:, 1]).float().mean().item(), abs=1e-4)
    assert report["eval_margin"] == pytest.approx((rewards[:, 0] - rewards[:, 1]).mean().item(), abs=2e-4)
