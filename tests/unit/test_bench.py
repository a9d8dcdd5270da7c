"""``hf-efftrain bench`` and ``hf-efftrain report``: a real tiny matrix run (stock Trainer baseline, a Lion row, a
row that fails at run time, one that fails validation, and one that fine-tunes the model of a prepare run), the
target-loss arithmetic on synthetic curves, prepare runs that fail, the matrix's user errors, and every matrix in
``benchmarks/`` composing into valid recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hf_efftrain.bench import runner
from hf_efftrain.bench.compare import (
    FIGURES,
    compare,
    field_value,
    first_reach,
    smooth,
    step_time,
    value_at,
    warmup_times,
)
from hf_efftrain.bench.matrix import compose_prepare, compose_rows, load_matrix
from hf_efftrain.cli import main
from hf_efftrain.core.recipe import Recipe
from hf_efftrain.errors import RecipeError
from hf_efftrain.runtime.flops import cpu_description

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[2]
FIELDS = ["params_trainable", "techniques.lion.config.lr"]


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    matrix = {
        "recipe": {
            "model": {"name_or_path": "builtin:tiny-llama", "config_overrides": {"num_hidden_layers": 2}},
            "data": {"train": "builtin:stdlib-docs", "max_length": 32, "max_train_samples": 64, "max_eval_samples": 8},
            "training": {"max_steps": 4, "per_device_train_batch_size": 8, "learning_rate": 3e-3, "seed": 0},
        },
        "smoothing_window": 2,
        "prepare": [{"name": "pre", "set": ["training.max_steps=2"]}],
        "report_fields": FIELDS,
        "variants": [
            {"name": "lion", "techniques": [{"name": "lion", "lr": 1e-3}]},
            {"name": "from_prepared", "set": ["model.name_or_path={prepare.pre}"]},  # fine-tunes the prepared model
            {"name": "no_data", "set": ["data.train=/nonexistent/train.jsonl"]},  # fails inside its run
            {"name": "unknown", "techniques": [{"name": "no_such_technique"}]},  # fails validation
        ],
    }
    path = tmp / "matrix.yaml"
    path.write_text(yaml.safe_dump(matrix))
    out = tmp / "out"
    assert main(["bench", str(path), "--out", str(out)]) == 0
    return out


def test_bench_writes_rows_table_and_plots(bench_out):
    results = json.loads((bench_out / "results.json").read_text())
    rows = results["rows"]
    assert set(rows) == {"baseline", "lion", "from_prepared", "no_data", "unknown"}
    for name in ("baseline", "lion", "from_prepared"):
        run = rows[name]["runs"][0]
        assert set(run) == {*FIGURES, *FIELDS}
        for key in ("tokens_per_second", "step_time_s", "peak_rss_bytes", "planned_peak_bytes", "mfu",
                    "optimizer_state_bytes", "loss_at_equal_steps", "loss_at_equal_time", "final_loss"):  # fmt: skip
            assert isinstance(run[key], (int, float)) and run[key] > 0, (name, key, run[key])
        assert run["rss_added_bytes"] >= 0  # this tiny model adds next to nothing to an idle process's RSS
    base = rows["baseline"]
    assert base["ratios"]["tokens_per_second"] == 1.0
    # The target is the baseline's own final smoothed loss, so the baseline reaches it, at the latest at its end.
    assert results["target_loss"] == base["runs"][0]["final_loss"]
    assert base["runs"][0]["time_to_target_s"] is not None
    assert results["equal_step"] == 4 and base["runs"][0]["loss_at_equal_steps"] == base["runs"][0]["final_loss"]
    # Lion keeps one moment where AdamW keeps two (plus a 4-byte step per tensor): half the state, a bit less.
    assert 0.49 < rows["lion"]["ratios"]["optimizer_state_bytes"] < 0.5

    # The baseline ran the stock Trainer with no technique; the Lion row ran EffTrainer through `train`.
    baseline_report = json.loads((bench_out / "runs/baseline/r0/run_report.json").read_text())
    lion_report = json.loads((bench_out / "runs/lion/r0/run_report.json").read_text())
    assert baseline_report["trainer"] == "transformers.trainer.Trainer" and baseline_report["techniques"] == []
    assert [t["name"] for t in lion_report["techniques"]] == ["lion"]
    assert len(baseline_report["loss_curve"]) == 4 and baseline_report["loss_curve"][-1]["tokens"] > 0

    # The prepare run trained once, its model saved in a folder the row loaded; its report is kept, its model not.
    assert results["prepare"]["pre"]["error"] is None and results["prepare"]["pre"]["steps"] == 2
    assert (bench_out / "prepare/pre/run_report.json").is_file() and set(results["errors"]) == {"no_data", "unknown"}
    prepared_report = json.loads((bench_out / "runs/from_prepared/r0/run_report.json").read_text())
    assert Path(prepared_report["recipe"]["model"]["name_or_path"]).parts[-2:] == ("_prepare", "pre")
    assert prepared_report["params_total"] == baseline_report["params_total"]
    # report_fields: read from each run's report; a technique's entry by its name, None where a row has none.
    assert rows["lion"]["runs"][0]["techniques.lion.config.lr"] == 1e-3 and base["runs"][0][FIELDS[1]] is None
    assert rows["lion"]["runs"][0]["params_trainable"] == baseline_report["params_trainable"] > 0
    assert not any(rows[n]["same_losses_as_baseline"] for n in ("lion", "from_prepared"))  # other optimizer / start

    assert "data.train" in results["errors"]["no_data"]
    assert "no_such_technique" in results["errors"]["unknown"]
    md = (bench_out / "results.md").read_text()
    baseline_line = next(line for line in md.splitlines() if line.startswith("| baseline |"))
    assert "[1.00x]" in baseline_line
    header = md.splitlines()[2]
    assert "| eval loss |" in header and header.endswith("| params_trainable | lr |")
    assert "- Prepared once before the rows (not in the table): `pre`, 2 steps" in md
    # The CPU is named with torch's SIMD level and whether bf16 is native: bf16 rows mean little without it.
    assert results["machine"]["cpu"] == cpu_description() and f"CPUs ({cpu_description()})" in md
    assert "| no_data | failed |" in md and "| unknown | failed |" in md and "`no_data` failed:" in md
    for name in ("loss_vs_time.png", "loss_vs_tokens.png", "memory.png"):
        assert (bench_out / name).read_bytes()[:8] == PNG_MAGIC


def test_report_renders_two_run_dirs(bench_out, tmp_path, capsys):
    dirs = [str(bench_out / "runs/baseline/r0"), str(bench_out / "runs/lion/r0")]
    assert main(["report", *dirs, "--out", str(tmp_path / "rep"), "--window", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[2].startswith("| baseline/r0 | ok | ")  # both are r0: the parent disambiguates
    md = (tmp_path / "rep/results.md").read_text()
    assert "| lion/r0 | ok |" in md
    results = json.loads((tmp_path / "rep/results.json").read_text())
    bench = json.loads((bench_out / "results.json").read_text())
    # The same runs give the same loss figures as the bench's own table (shared code).
    assert results["rows"]["lion/r0"]["runs"][0]["final_loss"] == bench["rows"]["lion"]["runs"][0]["final_loss"]
    # A bench's row folder (its repeats one level down) is one row.
    assert (
        main(["report", str(bench_out / "runs/baseline"), str(bench_out / "runs/lion"), "--out", str(tmp_path)]) == 0
    )
    assert "| lion | ok |" in (tmp_path / "results.md").read_text()
    assert results["target_loss"] == bench["target_loss"]
    for name in ("loss_vs_time.png", "loss_vs_tokens.png", "memory.png"):
        assert (tmp_path / "rep" / name).read_bytes()[:8] == PNG_MAGIC
    capsys.readouterr()
    assert main(["report", str(tmp_path / "rep")]) == 2
    assert "RUN_DIR[0]" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- synthetic curves


def _curve(losses, seconds_per_step, tokens_per_step=100):
    return [
        {"step": s, "loss": loss, "time_s": s * seconds_per_step, "tokens": s * tokens_per_step}
        for s, loss in enumerate(losses, start=1)
    ]


def test_first_step_and_warm_up_are_kept_apart_from_the_steady_step_time():
    # A compiled run: step 1 takes 5 s (compilation), a recompile adds 2 s at step 3, else 0.25 s per step.
    times = [5.0, 5.25, 7.5, 7.75, 8.0, 8.25]
    curve = [{"step": s, "loss": 1.0, "time_s": t} for s, t in enumerate(times, start=1)]
    assert step_time(curve) == 0.25  # the median ignores the recompile
    assert warmup_times(curve, 0.25) == (5.0, 8.25 - 6 * 0.25)  # first step; everything beyond 6 steady steps
    every_other = [p for p in curve if p["step"] % 2 == 0]  # logs at steps 2, 4, 6: step 2's share is left out
    assert warmup_times(every_other, 0.25) == (5.25 - 0.25, 8.25 - 1.5)
    assert warmup_times(curve, None) == (None, None) and warmup_times([], 0.25) == (None, None)


def test_smoothing_is_a_trailing_mean():
    curve = smooth(_curve([4.0, 2.0, 6.0, 0.0], 1.0), window=2)
    assert [p["loss"] for p in curve] == [4.0, 3.0, 4.0, 3.0]
    assert [p["raw"] for p in curve] == [4.0, 2.0, 6.0, 0.0]


def test_target_time_tokens_and_equal_points_on_synthetic_curves():
    losses = [10.0 - s for s in range(10)]  # 10, 9, ..., 1
    baseline = {"loss_curve": _curve(losses, 1.0), "peak_memory_bytes": {"cpu_rss": 1000}}
    fast = {"loss_curve": _curve(losses, 0.25, tokens_per_step=200), "peak_memory_bytes": {"cpu_rss": 400}}
    never = {"loss_curve": _curve([10.0] * 10, 0.5), "peak_memory_bytes": {"cpu_rss": 500}}
    c = compare({"base": [baseline], "fast": [fast], "never": [never]}, "base", window=1, rss_base=100)

    assert c["target_loss"] == 1.0 and "median of 1 repeats" in c["target_source"]
    base, fast_row, never_row = (c["rows"][n] for n in ("base", "fast", "never"))
    assert base["runs"][0]["time_to_target_s"] == 10.0 and fast_row["runs"][0]["time_to_target_s"] == 2.5
    assert fast_row["ratios"]["time_to_target_s"] == 4.0  # baseline time / row time: 4x faster
    assert fast_row["runs"][0]["tokens_to_target"] == 2000 and fast_row["ratios"]["tokens_to_target"] == 0.5
    assert never_row["runs"][0]["time_to_target_s"] is None and never_row["ratios"]["time_to_target_s"] is None
    # Equal wall time is the shortest run (2.5 s): the baseline is between its logs at 2 s (9.0) and 3 s (8.0).
    assert c["equal_time_s"] == 2.5 and base["runs"][0]["loss_at_equal_time"] == pytest.approx(8.5)
    assert c["equal_step"] == 10 and fast_row["runs"][0]["loss_at_equal_steps"] == 1.0
    assert fast_row["runs"][0]["rss_added_bytes"] == 300
    assert fast_row["ratios"]["rss_added_bytes"] == pytest.approx(1 / 3)
    assert step_time(smooth(fast["loss_curve"])) == 0.25

    # Smoothing delays the reach: with a 4-log window the mean reaches 2.5 only at the last log.
    curve = smooth(baseline["loss_curve"], window=4)
    assert first_reach(curve, 2.5)["step"] == 10 and first_reach(curve, 0.5) is None
    assert value_at(curve, "step", 11) is None and value_at(curve, "step", 0) == 10.0
    # A given target wins over the baseline's; repeats give median and min..max.
    slow = {"loss_curve": _curve(losses, 2.0)}
    c = compare({"base": [baseline, slow]}, "base", window=1, target=5.0)
    spread = c["rows"]["base"]["summary"]["time_to_target_s"]
    assert c["target_source"] == "given" and (spread["min"], spread["median"], spread["max"]) == (6.0, 9.0, 12.0)


def test_same_losses_and_report_fields_on_synthetic_reports():
    base = {"loss_curve": _curve([3.0, 2.0, 1.0], 1.0), "techniques": [{"name": "lion", "report": {"bits": 8}}]}
    twin = {"loss_curve": _curve([3.0, 2.0, 1.0], 0.5)}  # the same losses at every step, faster
    other = {"loss_curve": _curve([3.0, 2.0, 1.5], 1.0)}
    c = compare(
        {"base": [base], "twin": [twin, twin], "other": [other]}, "base", fields=["techniques.lion.report.bits"]
    )
    assert [c["rows"][n]["same_losses_as_baseline"] for n in ("twin", "other")] == [True, False]
    assert c["rows"]["base"]["runs"][0]["techniques.lion.report.bits"] == 8
    assert c["rows"]["twin"]["summary"]["techniques.lion.report.bits"]["median"] is None
    assert field_value(base, "techniques.lion.report.bits") == 8 and field_value(base, "techniques.lion.x.y") is None
    assert field_value(base, "loss_curve.0") is None  # a list without names is not indexed


# ---------------------------------------------------------------------------------------------------- prepare runs


def _fake_report(losses):
    return {"loss_curve": _curve(losses, 1.0), "peak_memory_bytes": {"cpu_rss": 1000}, "steps": len(losses),
            "wall_time_s": float(len(losses)), "train_loss_final": losses[-1], "eval_loss": None}  # fmt: skip


def test_a_failed_prepare_run_fails_the_rows_that_need_it(tmp_path, monkeypatch, tiny_recipe):
    ran = []

    def run_row(row, work, keep, timeout_s):
        ran.append((row.name, str(work)))
        return (None, "exit 1: boom") if row.name == "broken" else (_fake_report([3.0, 2.0]), None)

    monkeypatch.setattr(runner, "run_row", run_row)
    monkeypatch.setattr(runner, "import_rss", lambda: 100)
    monkeypatch.setattr(runner, "planned_bytes", lambda row: None)
    scored_by_fine = {"score": "perplexity", "reference_model": "{prepare.fine}"}
    matrix = {
        "recipe": tiny_recipe(),
        "prepare": [
            {"name": "broken"},
            {"name": "after", "set": ["model.name_or_path={prepare.broken}"]},  # needs the failed one: not run
            {"name": "fine"},
        ],
        "variants": [
            {"name": "needs_broken", "set": ["model.name_or_path={prepare.broken}"]},
            {"name": "needs_fine", "techniques": [{"name": "data_pruning", **scored_by_fine}]},
            {"name": "typo", "set": ["model.name_or_path={prepare.nope}"]},
        ],
    }
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(matrix))
    results = runner.bench(path, out=tmp_path / "out")
    names = [name for name, _ in ran]
    assert names == ["broken", "fine", "baseline", "needs_fine"]  # prepare runs first, once each
    fine_dir = dict(ran)["fine"]  # the rows' {prepare.fine} is where that run trained
    assert results["recipes"]["needs_fine"]["techniques"][0]["reference_model"] == str(Path(fine_dir))
    assert results["prepare"]["after"]["error"] == "needs the failed prepare run 'broken'"
    errors = results["errors"]
    assert errors["needs_broken"] == "its prepare run 'broken' failed: exit 1: boom"
    assert "{prepare.nope}: no prepare run of that name before it (broken, after, fine)" in errors["typo"]
    assert set(errors) == {"needs_broken", "typo"}
    md = (tmp_path / "out/results.md").read_text()
    assert "- Prepare run `broken` failed: exit 1: boom" in md and "| needs_broken | failed |" in md
    assert "`fine`, 2 steps in 2.0 s, train loss final 2.0000" in md


def test_prepare_refers_only_to_earlier_runs_and_quick_reaches_it(tmp_path, tiny_recipe):
    matrix = {
        "recipe": tiny_recipe(),
        "quick": ["training.max_steps=1"],
        "prepare": [{"name": "a", "set": ["model.name_or_path={prepare.b}"]}, {"name": "b"}],
        "variants": [{"name": "v", "set": ["training.max_steps=9"], "quick": ["training.max_steps=2"]}],
    }
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(matrix))
    with pytest.raises(RecipeError, match=r"prepare\[0\] \(a\) prepare: \{prepare.b\}: no prepare run"):
        compose_prepare(load_matrix(path), path)
    second = {"name": "b", "recipe": tiny_recipe(), "set": ["model.name_or_path={prepare.a}"]}
    matrix["prepare"] = [{"name": "a"}, second]
    path.write_text(yaml.safe_dump(matrix))
    m = load_matrix(path)
    a, b = compose_prepare(m, path, quick=True, dirs={"a": "/x/a", "b": "/x/b"})
    assert b.recipe["model"]["name_or_path"] == "/x/a" and b.needs == ("a",) and a.recipe["training"]["max_steps"] == 1
    steps = {q: [r.recipe["training"]["max_steps"] for r in compose_rows(m, path, q)] for q in (False, True)}
    assert steps == {False: [6, 9], True: [1, 2]}  # a row's quick comes after the matrix's, only with --quick
    # bench --set comes after everything, prepare runs included
    over = ["training.max_steps=3"]
    rows = compose_prepare(m, path, True, {"a": "/x/a", "b": "/x/b"}, over) + compose_rows(m, path, True, None, over)
    assert [r.recipe["training"]["max_steps"] for r in rows] == [3, 3, 3, 3]


def test_baseline_runs_only_its_own_techniques(tmp_path, tiny_recipe):
    matrix = {
        "recipe": {**tiny_recipe(), "techniques": [{"name": "packing"}]},
        "baseline": {"techniques": [{"name": "bf16"}]},
        "variants": [{"name": "v", "techniques": [{"name": "lion"}]}],
    }
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(matrix))
    baseline, v = compose_rows(load_matrix(path), path)
    assert baseline.plain and [t["name"] for t in baseline.recipe["techniques"]] == ["bf16"]
    assert [t["name"] for t in v.recipe["techniques"]] == ["packing", "lion"]


@pytest.mark.parametrize("path", sorted((REPO / "benchmarks").glob("*.yaml")), ids=lambda p: p.name)
def test_every_benchmark_matrix_composes_into_valid_recipes(path, monkeypatch):
    monkeypatch.chdir(REPO)  # matrices name recipes relative to the repository root
    matrix = load_matrix(path)
    for quick in (False, True):
        rows = compose_prepare(matrix, path, quick) + compose_rows(matrix, path, quick)
        assert [(r.name, r.error) for r in rows if r.error] == []
        baseline = rows[len(matrix.prepare)]
        assert baseline.plain and baseline.recipe["techniques"] == matrix.baseline.techniques
        for row in rows:
            Recipe.parse(row.recipe)
            assert set(row.needs) <= {p.name for p in matrix.prepare}


# ---------------------------------------------------------------------------------------------------- user errors


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        ({"recipe": "r.yaml", "repeats": 0}, "repeats: must be >= 1 (got 0)"),
        ({"recipe": "r.yaml", "variants": [{"name": "a", "techniqes": []}]}, "variants[0].techniqes: unknown field"),
        ({"recipe": "r.yaml", "variants": [{"name": "a"}, {"name": "a"}]}, "variants[1].name: 'a' is used twice"),
        ({"recipe": "r.yaml", "variants": [{"name": "baseline"}]}, "variants[0].name: 'baseline' is used twice"),
        ({"variants": []}, "recipe: required field is missing"),
        ({"recipe": "r.yaml", "variants": [{"name": "a b"}]}, "variants[0].name: String should match pattern"),
        ({"recipe": "r.yaml", "prepare": [{"name": "p"}, {"name": "p"}]}, "prepare[1].name: 'p' is used twice"),
        ({"recipe": "r.yaml", "prepare": [{"name": "p", "sets": []}]}, "prepare[0].sets: unknown field"),
    ],
)
def test_bad_matrix_names_the_field(tmp_path, matrix, message):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(matrix))
    with pytest.raises(RecipeError) as e:
        load_matrix(path)
    assert message in str(e.value)


def test_bad_matrix_exits_2_before_running(tmp_path, capsys, tiny_recipe):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"recipe": "nope.yaml"}))
    assert main(["bench", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "recipe: recipe file not found: nope.yaml" in capsys.readouterr().err
    bad_base = tiny_recipe(training={"max_steps": "many"})
    path.write_text(yaml.safe_dump({"recipe": bad_base}))
    assert main(["bench", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "training.max_steps" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["bench", str(tmp_path / "missing.yaml")]) == 2
    assert main(["bench", str(path), "--repeats", "0"]) == 2
    assert "--repeats: must be >= 1" in capsys.readouterr().err
    assert not Path("runs/bench_m").exists()
