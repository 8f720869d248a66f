"""benchmarks/stability_study.py: its spike, period-2 and divergence rules, and one real (slow) run."""

import json
import math
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import stability_study  # noqa: E402

ARGS = Namespace(diverged=0.95, converged=0.5, horizon=10, mode_share=0.1)


def point(step, ratio, along=1.0, along_before=1.0, share=0.5, share_before=0.5):
    return {"step": step, "sharpness/stability_ratio": ratio, "along": along, "along_before": along_before,
            "share": share, "share_before": share_before}


def test_spikes_are_jumps_above_the_recent_minimum():
    losses = [2.3 - 0.1 * i for i in range(12)] + [3.0, 1.0, float("nan")]
    # step 13 jumps to 3.0 > 1.5 x 1.2 + 0.2; step 15 is not finite; steps are 1-based
    assert stability_study.spikes(losses) == [13, 15]


def test_period_two_flips_need_opposite_signs_and_a_share_of_the_update():
    points = [point(1, 2.0, along_before=math.nan), point(2, 2.0, along=-1.0), point(3, 2.0, along=-1.0, share=0.01),
              point(4, 2.0)]
    assert stability_study.flips(points, 0.1) == (1, 3)


def test_divergence_needs_the_loss_to_rise_and_stay_at_chance():
    points = [point(1, 3.0), point(2, 0.5)]
    blown = stability_study.summarise({"points": points, "losses": [2.3, 9.0] + [2.3] * 10}, ARGS)
    slow = stability_study.summarise({"points": points, "losses": [2.3] + [2.2] * 11}, ARGS)
    settled = stability_study.summarise({"points": points, "losses": [2.3, 4.0] + [0.1] * 10}, ARGS)
    assert (blown["diverged"], blown["rose"], slow["diverged"], settled["diverged"]) == (True, 2, False, False)
    assert settled["first_above"] == 1 and settled["settled"] == 2 and blown["settled"] is None


@pytest.mark.slow
def test_a_short_study_runs_the_recipe_and_records_every_dense_step(tmp_path):
    out = tmp_path / "study.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stability_study.py"), "--optimizers", "SGD",
                           "--multipliers", "1", "--models", "noBN", "--steps", "6", "--dense", "3", "--every", "2",
                           "--num-samples", "32", "--lanczos-iters", "40", "--out", str(out),
                           "--workdir", str(tmp_path / "runs")], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert [p["step"] for p in run["points"]] == [1, 2, 3, 4, 6] and len(run["losses"]) == 6
    # SGD's S^2 is one scalar: the study's own Lanczos on S H S agrees with the product's ratio (both run to
    # convergence: the product's lambda_max is warm-started from the last point, the study's Lanczos is cold)
    for p in run["points"]:
        assert p["mode_ratio"] == pytest.approx(p["sharpness/stability_ratio"], rel=1e-3)
    assert "## without BatchNorm: 1 runs, 5 points" in done.stdout
