"""`adai-lightning report`: rendering from a synthetic metrics.csv with every contract key, from a run
without callbacks (only loss curves), and from a real short run of the default recipe."""

from __future__ import annotations

import base64
import csv
import math

import pytest

from adai_lightning import report
from adai_lightning.cli import main

STATS = ("mean", "std", "q05", "q25", "q50", "q75", "q95", "frac_zero", "frac_max", "ratio_mean")
LAYERS = ("backbone.0.weight", "backbone.0.bias", "backbone.3.weight", "head.weight")


def synthetic_rows(steps: int = 60) -> list[dict[str, float]]:
    """Rows in CSVLogger's layout: one metric group per row, blank cells elsewhere."""
    rows = []
    for step in range(steps):
        rows.append({"step": step, "train/loss_step": 2.0 * math.exp(-step / 20)})
        if step % 5 == 0:
            row = {"step": step}
            for i, layer in enumerate(LAYERS):
                center = 0.9 - 0.1 * i + 0.05 * math.sin(step / 10)
                for j, stat in enumerate(("q05", "q25", "q50", "q75", "q95")):
                    row[f"inertia/param/{layer}/{stat}"] = center + 0.04 * (j - 2)
                for stat in ("mean", "std", "frac_zero", "frac_max", "ratio_mean"):
                    row[f"inertia/param/{layer}/{stat}"] = 0.5
            for stat in STATS:
                row[f"inertia/module/backbone/{stat}"] = 0.8
                row[f"inertia/global/{stat}"] = 0.8
            row.update({"saddle/grad_norm": 1e-3 if 10 <= step < 30 else 1.0, "saddle/lambda_min": -0.1,
                        "saddle/negative_ratio": 0.2, "saddle/momentum_drift": 0.1, "saddle/update_drift": 0.1,
                        "saddle/plateau": float(10 <= step < 30), "saddle/escapes": float(step >= 30)})
            if step == 30:
                row["saddle/escape_steps"] = 20.0
            rows.append(row)
        if step % 10 == 0:
            rows.append({"step": step, "sharpness/lambda_max": 3.0 + step / 10, "sharpness/lambda_2": 2.0,
                         "sharpness/trace": 10.0, "sharpness/trace_stderr": 1.0,
                         "sharpness/lambda_max_x_lr": (3.0 + step / 10) * 0.5})
        if step % 20 == 19:
            rows.append({"step": step, "epoch": step // 20, "val/loss": 1.0 / (step + 1), "val/acc": 0.9,
                         "train/acc": 0.95, "train/loss_epoch": 0.3})
    rows.append({"step": steps - 1, "epoch": 2, "test/acc": 0.93, "test/loss": 0.2})
    return rows


def write_csv(path, rows) -> None:
    keys = sorted({k for row in rows for k in row})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def test_report_draws_every_panel_from_contract_keys(tmp_path):
    write_csv(tmp_path / "run" / "csv" / "version_0" / "metrics.csv", synthetic_rows())
    metrics = report.Metrics.read(report.find_metrics(tmp_path / "run"))
    prefix, names = report.band_scopes(metrics)
    assert prefix == "inertia/param/"
    assert names == ["backbone.0.weight", "backbone.3.weight", "head.weight"]  # biases left out
    assert metrics.xy("saddle/escape_steps") == ([30.0], [20.0])
    main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    png = (tmp_path / "out" / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    page = (tmp_path / "out" / "report.html").read_text()
    assert base64.b64encode(png).decode() in page  # self-contained
    assert "test/acc" in page and "0.93" in page


def test_report_without_callbacks_keeps_loss_curves(tmp_path):
    rows = [r for r in synthetic_rows() if not any(k.split("/")[0] in ("inertia", "sharpness", "saddle") for k in r)]
    write_csv(tmp_path / "metrics.csv", rows)
    metrics = report.Metrics.read([tmp_path / "metrics.csv"])
    assert report.band_scopes(metrics) == ("", [])
    assert report.summary(metrics) == {"test/acc": 0.93, "test/loss": 0.2, "val/acc": 0.9, "val/loss": 1 / 60}
    png, page = report.render(tmp_path)
    assert png.stat().st_size > 10_000 and page.exists()


def test_report_merges_a_later_test_only_csv_and_ignores_older_runs(tmp_path):
    old, fit, test = (tmp_path / "csv" / f"version_{i}" / "metrics.csv" for i in range(3))
    write_csv(old, [{"step": 0, "train/loss_step": 9.0}])
    write_csv(fit, [{"step": 0, "train/loss_step": 1.0}])
    write_csv(test, [{"step": 300, "epoch": 14, "test/acc": 0.97}])
    for age, path in enumerate((old, fit, test)):
        import os
        os.utime(path, (1_000_000 + age, 1_000_000 + age))
    assert report.find_metrics(tmp_path) == [fit, test]
    write_csv(test, [{"step": 0, "epoch": 14, "test/acc": 0.97}])  # Lightning's test logs at step 0
    assert report.Metrics.read([fit, test]).xy("test/acc") == ([0.0], [0.97])
    write_csv(fit, [{"step": 0, "train/loss_step": 1.0}, {"step": 299, "train/loss_step": 0.5}])
    assert report.Metrics.read([fit, test]).xy("test/acc") == ([299.0], [0.97])  # placed at the end of training
    with pytest.raises(FileNotFoundError, match="No metrics.csv"):
        report.find_metrics(tmp_path / "csv" / "nowhere")


def test_plateau_spans_end_at_the_next_sample():
    assert report.plateau_spans([0, 5, 10, 15, 20, 25], [0, 1, 1, 0, 1, 1]) == [(5, 15), (20, 25)]
    assert report.plateau_spans([], []) == []
