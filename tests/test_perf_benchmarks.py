"""The benchmark scripts run and print their tables (timings themselves are not asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import callback_overhead  # noqa: E402


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, timeout=240, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_callback_configurations():
    assert callback_overhead.configurations(["none", "each", "all"], ["A", "B"]) == {
        "none": [], "A": ["A"], "B": ["B"], "all (A + B)": ["A", "B"],
    }
    assert callback_overhead.configurations(["each", "all"], ["A"]) == {"A": ["A"]}


def test_callback_hooks_are_timed_and_only_the_overridden_ones():
    class Slow(callback_overhead.Callback):
        def on_train_start(self, trainer, pl_module):
            time.sleep(0.02)
            return "started"

    callback, own = Slow(), [0.0]
    callback_overhead.time_hooks(callback, own)
    assert callback.on_train_start(None, None) == "started" and own[0] >= 0.02
    assert "on_train_start" in vars(callback) and "on_train_end" not in vars(callback)


@pytest.mark.slow
def test_callback_overhead_runs_with_and_without_callbacks():
    out = _run("callback_overhead.py", "--configs", "none", "all", "--repeats", "1", "--max-epochs", "1")
    none = next(line for line in out.splitlines() if line.startswith("| none |"))
    assert none.endswith("| 1.000 |")  # no callback, no own time
    assert any(line.startswith("| all (InertiaMonitor") for line in out.splitlines())


@pytest.mark.slow
def test_hvp_accuracy_runs_and_bf16_mixed_finite_differences_are_the_float32_ones():
    out = _run("hvp_accuracy.py", "--models", "small", "--iters", "4", "--trace-samples", "2")
    rows = {line.split("|")[2].strip(): [cell.strip() for cell in line.strip(" |").split("|")]
            for line in out.splitlines() if line.startswith("| small")}
    assert set(rows) == {"fp32", "bf16-mixed"}
    assert rows["fp32"][3] == rows["fp32"][6] == rows["fp32"][9] == rows["fp32"][11] == "ref"
    assert 0 < float(rows["bf16-mixed"][11]) < 0.1  # exact products under autocast: bfloat16 rounding
    fd = [4, 7, 10, 12]  # finite differences run with autocast off: the float32 ones
    assert [rows["fp32"][i] for i in fd] == [rows["bf16-mixed"][i] for i in fd]
    sweep = _run("hvp_accuracy.py", "--models", "small", "--rel-steps", "1e-3")
    assert sum(line.startswith("| small |") for line in sweep.splitlines()) == 2
    assert "(default)" in sweep


@pytest.mark.slow
def test_hvp_cost_runs_and_reused_products_agree():
    out = _run("hvp_cost.py", "--models", "small", "--rounds", "1")
    rows = [line for line in out.splitlines() if line.startswith("| small |")]
    assert len(rows) == 2  # eval and train mode
    for row in rows:
        assert float(row.strip(" |").split("|")[-1]) < 1e-6  # the kept graph gives the from-scratch product


@pytest.mark.slow
def test_lanczos_warm_start_compares_guarded_runs_against_the_reference():
    out = _run("lanczos_warm_start.py", "--max-epochs", "1", "--every", "10", "--guards", "0", "1",
               "--reference-iters", "40")
    rows = [line.split() for line in out.splitlines() if line.startswith(("warm tol", "cold tol"))]
    assert len(rows) == 8  # {cold, warm} x guard {0, 1} x {sharpness, saddle}
    for row in rows:
        points, err_lambda_max = int(row[3]), float(row[6])
        assert points == 2 and err_lambda_max < 1e-3  # against a 40-iteration cold run
    assert "products warm/cold (tol=0.0001 guard=1)" in out


@pytest.mark.slow
def test_curve_cost_prints_each_curve_and_setting_against_the_references():
    out = _run("curve_cost.py", "--max-epochs", "1", "--every", "10", "--reference-every", "20",
               "--trace-reference", "20")
    rows = {" ".join(line.split()[:3]): line.split() for line in out.splitlines()
            if line.startswith(("top-2 ", "ratio ", "ends ", "trace "))}
    assert len(rows) == 15  # 4 settings of each Lanczos curve, 3 of the trace
    assert rows["top-2 tol 0.0001"][3] == "2" and rows["trace 30 samples"][3] == "1"  # points (steps 10, 20; 20)
    assert float(rows["top-2 tol 0.0001"][8].rstrip(",")) < 1e-3  # lambda_max against 100 cold iterations
    assert int(rows["trace 30 samples"][4]) == 30 and int(rows["trace 15 samples"][4]) == 15  # products


@pytest.mark.slow
def test_main_job_time_counts_each_callbacks_points_and_products_per_variant():
    out = _run("main_job_time.py", "--max-epochs", "1", "--variants", "recipe", "before")
    recipe, before = out.split("before:")
    # 20 steps: the recipe's sharpness at steps 1-5 only, no saddle point; before: also step 20, saddle at 10, 20
    assert "HessianSharpness" in recipe and ", 5 points, " in recipe.split("HessianSharpness")[1].splitlines()[0]
    assert ", 6 points, " in before.split("HessianSharpness")[1].splitlines()[0]
    assert ", 2 points, " in before.split("SaddleEscapeMonitor")[1].splitlines()[0]
    assert "main job / training = " in recipe and "last values: lambda_max" in before
