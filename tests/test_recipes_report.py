"""`adai-lightning report`: rendering from a synthetic metrics.csv with every contract key, from a run
without callbacks (only loss curves), multi-optimizer and foreign key styles, resumed runs, and the
placement of plateaus, escapes, the negative-curvature ratio and the stability ratio."""

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
                         "sharpness/stability_ratio": (3.0 + step / 10) * 0.1})
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
    assert report.band_scopes(metrics) == [(f"inertia/param/{n}/", n) for n in  # biases left out
                                           ("backbone.0.weight", "backbone.3.weight", "head.weight")]
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
    assert report.band_scopes(metrics) == []
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


def _axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots()


def test_report_reads_per_optimizer_inertia_keys_and_any_loss_key_style(tmp_path):
    """A GAN's two optimizers log ``inertia/opt0/...`` and ``inertia/opt1/...``; its losses ``train/g_loss``,
    ``train/d_loss``; other modules ``train_loss`` / ``val_loss`` (Lightning's underscore style)."""
    rows = []
    for step in range(0, 40, 5):
        row = {"step": step, "train/g_loss": 1.0 / (step + 1), "train/d_loss": 0.7, "train_loss": 0.5, "val_loss": 0.6}
        for opt, module in (("opt0", "generator"), ("opt1", "discriminator")):
            for j, stat in enumerate(("q05", "q25", "q50", "q75", "q95")):
                row[f"inertia/{opt}/module/{module}/{stat}"] = 0.5 + 0.1 * j
                row[f"inertia/{opt}/global/{stat}"] = 0.5 + 0.1 * j
        rows.append(row)
    write_csv(tmp_path / "csv" / "version_0" / "metrics.csv", rows)
    metrics = report.Metrics.read(report.find_metrics(tmp_path))  # a fit log although no "train/loss" key
    assert report.optimizer_prefixes(metrics) == ["inertia/opt0/", "inertia/opt1/"]
    assert report.band_scopes(metrics) == [("inertia/opt0/module/generator/", "opt0: generator"),
                                           ("inertia/opt1/module/discriminator/", "opt1: discriminator")]
    assert list(report.stage_keys(metrics, "loss")) == ["train/d_loss", "train/g_loss", "train_loss", "val_loss"]
    png, _ = report.render(tmp_path)
    assert png.stat().st_size > 10_000


def test_report_orders_layers_naturally():
    names = ["layers.12.weight", "layers.5.weight", "layers.2.weight", "head.weight"]
    metrics = report.Metrics({f"inertia/param/{n}/q50": [(0.0, 0.5)] for n in names})
    assert metrics.scopes("inertia/param/") == ["head.weight", "layers.2.weight", "layers.5.weight", "layers.12.weight"]


def test_escape_markers_are_never_inside_a_plateau():
    steps = list(range(0, 100, 10))
    flags = [0, 1, 1, 1, 1, 0, 1, 1, 1, 1]
    escapes = [25.0, 40.0, 75.0]  # logged while the plateau flag was still on at the previous sample
    spans = report.plateau_spans(steps, flags, escapes)
    assert spans == [(10, 25.0), (25.0, 40.0), (40.0, 50), (60, 75.0), (75.0, 90)]
    assert not any(a < e < b for a, b in spans for e in escapes)
    fig, ax = _axes()
    metrics = report.Metrics({"saddle/grad_norm": [(s, 1.0) for s in steps],
                              "saddle/plateau": list(zip(steps, map(float, flags))),
                              "saddle/escape_steps": [(e, 10.0) for e in escapes],
                              "saddle/lambda_min": [(s, -0.5) for s in steps],
                              "saddle/negative_ratio": [(s, 0.2) for s in steps]})
    report.plot_saddle(ax, metrics)
    shaded = [(p.get_x(), p.get_x() + p.get_width()) for p in ax.patches]  # axvspan rectangles
    assert shaded and not any(a < e < b for a, b in shaded for e in escapes)
    drawn = [line.get_label() for axis in fig.axes for line in axis.lines]
    assert "lambda_min" in drawn and "|lambda_min| / lambda_max" not in drawn  # the ratio has its own panel
    fig2, ax2 = _axes()
    report.plot_negative_ratio(ax2, metrics)
    assert [line.get_label() for line in ax2.lines] == ["|lambda_min| / lambda_max"] and len(fig2.axes) == 1


def test_stability_ratio_is_drawn_against_one_and_old_runs_keep_their_sharpness_panel():
    fig, ax = _axes()
    ratio = report.Metrics({"sharpness/lambda_max": [(10.0, 30.0)], "sharpness/stability_ratio": [(10.0, 0.26)]})
    report.plot_stability(ax, ratio)
    (edge,) = [line for line in ax.lines if line.get_label().startswith("edge")]
    assert list(edge.get_ydata()) == [1.0, 1.0]
    fig, ax = _axes()
    old = report.Metrics({"sharpness/lambda_max": [(10.0, 30.0), (20.0, 41.0)],
                          "sharpness/lambda_max_x_lr": [(10.0, 15.0), (20.0, 20.5)]})
    report.plot_sharpness(ax, old)
    assert [line.get_label() for line in ax.lines] == ["lambda_max"]  # no 2/lr line
    fig, ax = _axes()
    report.plot_stability(ax, old)
    assert "not logged" in ax.texts[0].get_text()


def test_report_joins_a_resumed_fit_to_the_fit_it_continues(tmp_path):
    """``--ckpt_path last`` logs into a new CSV from its checkpoint's step (10); the killed fit's rows
    up to that step come from its own CSV, the rest (logged twice) from the resumed one."""
    first, resumed = (tmp_path / "csv" / f"version_{i}" / "metrics.csv" for i in range(2))
    write_csv(first, [{"step": s, "train/loss_step": 1.0} for s in range(0, 14, 2)])
    write_csv(resumed, [{"step": s, "train/loss_step": 2.0} for s in range(10, 20, 2)])
    import os
    os.utime(first, (1_000_000, 1_000_000))
    assert report.find_metrics(tmp_path) == [first, resumed]
    metrics = report.Metrics.read([first, resumed])
    assert metrics.series["train/loss_step"] == [(s, 1.0) for s in range(0, 10, 2)] + [(s, 2.0) for s in range(10, 20, 2)]
