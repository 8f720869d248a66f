"""The benchmark scripts run and print their tables (timings themselves are not asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import callback_overhead  # noqa: E402


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, timeout=240, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_callback_configurations():
    assert callback_overhead.configurations(["none", "each", "all"], ["A", "B"]) == {
        "none": [], "A": ["A"], "B": ["B"], "all (A + B)": ["A", "B"],
    }
    assert callback_overhead.configurations(["each", "all"], ["A"]) == {"A": ["A"]}


@pytest.mark.slow
def test_callback_overhead_runs_without_callbacks():
    out = _run("callback_overhead.py", "--configs", "none", "--repeats", "1", "--max-epochs", "1")
    assert "| none |" in out and "1.000" in out


@pytest.mark.slow
def test_hvp_cost_runs_and_reused_products_agree():
    out = _run("hvp_cost.py", "--models", "small", "--rounds", "1")
    rows = [line for line in out.splitlines() if line.startswith("| small |")]
    assert len(rows) == 2  # eval and train mode
    for row in rows:
        assert float(row.strip(" |").split("|")[-1]) < 1e-6  # the kept graph gives the from-scratch product
