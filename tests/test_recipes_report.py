"""`adai-lightning report`: rendering from a synthetic metrics.csv with every contract key, from a run
without callbacks (only loss curves), multi-optimizer and foreign key styles, resumed runs, and the
placement of plateaus, escapes, the negative-curvature ratio and the stability ratio."""

from __future__ import annotations

import base64
import csv
import json
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adai_lightning import Adai, report
from adai_lightning.callbacks import InertiaMonitor
from adai_lightning.cli import AdaiCLI, ConfigurationError, main

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
            if step == 30:  # the loss left the plateau at step 25; the escape was confirmed at 30
                row.update({"saddle/escape_steps": 15.0, "saddle/escape_start": 10.0, "saddle/escape_end": 25.0})
            rows.append(row)
        if step % 10 == 0:
            rows.append({"step": step, "lr-Adai": 0.5 * (1 + math.cos(math.pi * step / steps)) + 1e-3})
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
    assert report.escapes(metrics) == [report.Escape(logged=30.0, start=10.0, end=25.0)]
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


def test_escaped_plateau_is_shaded_to_the_escape_and_marked_there():
    """The issue's run: a plateau from step 150, flagged from the cadence point at 200, left by the loss at
    step 353, the escape confirmed and logged at 387 while the flag was still on at 380. Before, the span
    was cut at 387 and both halves drawn, with the marker at 387; now one span 150-353, the marker at 353.
    A later plateau that ends without an escape (the loss went up) keeps its flagged span."""
    steps = list(range(0, 600, 10))
    flags = [float(200 <= s <= 380 or 450 <= s < 500) for s in steps]
    rows = [(387.0, {"saddle/escape_steps": 203.0, "saddle/escape_start": 150.0, "saddle/escape_end": 353.0})]
    metrics = report.Metrics({"saddle/grad_norm": [(s, 1.0) for s in steps],
                              "saddle/plateau": list(zip(steps, flags)),
                              **{key: [(step, row[key])] for step, row in rows for key in row},
                              "saddle/lambda_min": [(s, -0.5) for s in steps],
                              "saddle/negative_ratio": [(s, 0.2) for s in steps]})
    events = report.escapes(metrics)
    assert events == [report.Escape(387.0, 150.0, 353.0)]
    assert report.plateau_spans(*metrics.xy("saddle/plateau"), events) == [(150.0, 353.0), (450, 500)]
    fig, ax = _axes()
    report.plot_saddle(ax, metrics)
    shaded = [(p.get_x(), p.get_x() + p.get_width()) for p in ax.patches]  # axvspan rectangles
    assert shaded == [(150.0, 353.0), (450, 500)]
    (marker,) = [line for line in ax.lines if line.get_label() == "escape"]
    assert list(marker.get_xdata()) == [353.0, 353.0]
    drawn = [line.get_label() for axis in fig.axes for line in axis.lines]
    assert "lambda_min" in drawn and "|lambda_min| / lambda_max" not in drawn  # the ratio has its own panel
    fig2, ax2 = _axes()
    report.plot_negative_ratio(ax2, metrics)
    assert [line.get_label() for line in ax2.lines] == ["|lambda_min| / lambda_max"] and len(fig2.axes) == 1


def test_escapes_of_runs_logged_before_their_start_and_end_keys():
    """Only ``escape_steps`` (the length) at the step the escape was logged: placed there, the plateau
    that long before; the flagged span it confirmed ends there, and a new plateau flagged after starts again."""
    steps = list(range(0, 110, 10))
    flags = [0, 1, 1, 1, 0, 0, 1, 1, 0, 1, 1]
    metrics = report.Metrics({"saddle/escape_steps": [(35.0, 30.0), (75.0, 20.0)]})
    events = report.escapes(metrics)
    assert events == [report.Escape(35.0, 5.0, 35.0), report.Escape(75.0, 55.0, 75.0)]
    spans = report.plateau_spans(steps, flags, events)
    assert spans == [(5.0, 35.0), (55.0, 75.0), (90, 100)]
    assert not any(a < e.end < b for a, b in spans for e in events)


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


def test_report_of_a_folder_without_metrics_is_one_error_line(tmp_path, capsys, monkeypatch):
    """Before: a 15-line FileNotFoundError traceback and exit 1. Now ``error: <one line>``, exit 2, as
    every other CLI error; ``--debug`` still shows the traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "nothing-here")])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [f"error: No metrics.csv under {tmp_path / 'nothing-here'}: point report at a run's "
                     "default_root_dir (a run logged with lightning's CSVLogger)"]
    monkeypatch.setenv("ADAI_LIGHTNING_DEBUG", "0")  # restored after the test: --debug sets it
    with pytest.raises(ConfigurationError, match="No metrics.csv"):
        main(["report", str(tmp_path), "--debug"])


def test_final_values_read_underscore_keys_and_one_point_series_get_markers():
    """Lightning's ``val_loss`` / ``val_acc`` style reaches the final values (before: only ``val/acc``);
    a series logged once is drawn as a marker in every panel (before: an invisible one-point line)."""
    metrics = report.Metrics({"train_loss": [(0.0, 2.0), (9.0, 1.0)], "val_loss": [(9.0, 0.7)], "val_acc": [(9.0, 0.8)],
                              "test_acc_epoch": [(9.0, 0.75)], "saddle/grad_norm": [(9.0, 0.1)],
                              "saddle/negative_ratio": [(9.0, 0.3)], "saddle/lambda_min": [(9.0, -0.2)],
                              "sharpness/lambda_max": [(9.0, 4.0)], "sharpness/stability_ratio": [(9.0, 0.4)],
                              "inertia/global/q50": [(9.0, 0.9)]})
    assert list(report.summary(metrics).items()) == [("test_acc_epoch", 0.75), ("val_acc", 0.8), ("val_loss", 0.7),
                                                     ("sharpness/lambda_max", 4.0),
                                                     ("sharpness/stability_ratio", 0.4)]
    for panel in (report.plot_saddle, report.plot_negative_ratio, report.plot_sharpness, report.plot_stability,
                  report.plot_inertia):
        fig, ax = _axes()
        panel(ax, metrics)
        series = [line for axis in fig.axes for line in axis.lines if len(line.get_xdata()) == 1]
        assert series and all(line.get_marker() == "o" for line in series), panel.__name__


def test_learning_rate_is_drawn_beside_beta1_and_the_stability_ratio():
    """``LearningRateMonitor``'s ``lr-Adai`` on a right axis of both panels (log when it decays over
    more than a factor 10); no lr logged, no extra axis."""
    lr = [(float(s), 1.0 * 0.1 ** (s // 50)) for s in range(0, 150, 10)]
    metrics = report.Metrics({"lr-Adai": lr, "sharpness/stability_ratio": [(s, 0.5) for s, _ in lr],
                              "inertia/global/q50": [(s, 0.9) for s, _ in lr]})
    for panel in (report.plot_inertia, report.plot_stability):
        fig, ax = _axes()
        panel(ax, metrics)
        (twin,) = [axis for axis in fig.axes if axis is not ax]
        (line,) = twin.lines
        assert line.get_label() == "lr-Adai" and list(line.get_ydata()) == [v for _, v in lr]
        assert twin.get_yscale() == "log"
        fig, ax = _axes()
        panel(ax, report.Metrics({k: v for k, v in metrics.series.items() if k != "lr-Adai"}))
        assert fig.axes == [ax]


def test_beta1_axis_spreads_the_values_near_one():
    """0, 0.9, 0.99 and 0.999 are equally spaced on the beta1 panel (before: a linear 0..1 axis put
    0.9-0.999 into its top tenth); the axis ends just above the highest value drawn, at least 0.99."""
    metrics = report.Metrics({"inertia/global/q50": [(0.0, 0.95), (1.0, 0.999)],
                              "inertia/global/q25": [(0.0, 0.9), (1.0, 0.99)], "inertia/global/q75": [(0.0, 0.99), (1.0, 0.999)],
                              "inertia/global/q05": [(0.0, 0.0), (1.0, 0.5)], "inertia/global/q95": [(0.0, 0.999), (1.0, 0.999)]})
    fig, ax = _axes()
    report.plot_inertia(ax, metrics)
    ticks = list(ax.get_yticks())
    assert ticks == [0.0, 0.5, 0.9, 0.99, 0.999]
    pixels = [ax.transData.transform((0.0, t))[1] for t in (0.0, 0.9, 0.99, 0.999)]
    gaps = [b - a for a, b in zip(pixels, pixels[1:])]
    assert max(gaps) == pytest.approx(min(gaps), rel=1e-6)
    low, high = ax.get_ylim()
    assert low == 0.0 and 0.999 < high < 0.9995
    assert [label.get_text() for label in ax.get_yticklabels()] == ["0", "0.5", "0.9", "0.99", "0.999"]


def test_layers_are_ordered_as_the_model_holds_them(tmp_path):
    """With ``parameter_order.json`` (written by InertiaMonitor beside metrics.csv) layers and modules
    follow the model's order, here stem, layer1, layer2, fc; before, by name: fc came before layer1.
    Names the file does not list come after, in natural order."""
    order = ["stem.weight", "layers.2.weight", "layers.2.bias", "layers.10.weight", "fc.weight"]
    names = ["fc.weight", "layers.10.weight", "layers.2.weight", "stem.weight", "extra.weight"]
    rows = [{"step": 0, "train/loss_step": 1.0, **{f"inertia/param/{n}/q50": 0.9 for n in names},
             **{f"inertia/module/{m}/q50": 0.9 for m in ("fc", "layers", "stem")}}]
    write_csv(tmp_path / "csv" / "version_0" / "metrics.csv", rows)
    (tmp_path / "csv" / "version_0" / report.PARAMETER_ORDER_FILE).write_text(json.dumps(order))
    metrics = report.Metrics.read(report.find_metrics(tmp_path))
    assert metrics.scopes("inertia/param/") == ["stem.weight", "layers.2.weight", "layers.10.weight", "fc.weight",
                                                "extra.weight"]
    assert metrics.scopes("inertia/module/") == ["stem", "layers", "fc"]
    assert report.Metrics(metrics.series).scopes("inertia/module/") == ["fc", "layers", "stem"]  # without the file


class CompiledSubmodule(LightningModule):
    """A compiled body registered before an eager classifier (by name, "classifier" sorts first)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.compile(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)), backend="eager")
        self.classifier = nn.Linear(4, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.classifier(self.net(x)), y)

    def configure_optimizers(self):
        return Adai(self.parameters(), lr=0.1)


def test_a_compiled_submodule_logs_the_eager_names_in_the_model_order(tmp_path):
    """Before: ``inertia/param/net._orig_mod.0.weight/...``, so compiled and eager runs did not line up
    in loggers or the report. Now the names are the eager module's, and ``parameter_order.json`` beside
    metrics.csv gives the report the model's order."""
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 6, generator=generator), torch.randint(0, 3, (32,), generator=generator))
    trainer = Trainer(max_steps=2, accelerator="cpu", logger=CSVLogger(tmp_path, name="csv"),
                      callbacks=[InertiaMonitor(every_n_train_steps=1, per_parameter=True, histograms=False)],
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(CompiledSubmodule(), DataLoader(data, batch_size=16))
    eager = ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias", "classifier.weight", "classifier.bias"]
    assert [name for name, _ in CompiledSubmodule().net._orig_mod.named_parameters(prefix="net")] == eager[:4]
    metrics = report.Metrics.read(report.find_metrics(tmp_path))
    assert metrics.parameter_order == eager
    assert sorted(metrics.scopes("inertia/param/")) == sorted(eager)
    assert metrics.scopes("inertia/module/") == ["net", "classifier"]
    assert [label for _, label in report.band_scopes(metrics)] == ["net.0.weight", "net.2.weight", "classifier.weight"]
    assert not [key for key in metrics.series if "_orig_mod" in key]


def test_the_default_recipe_logs_its_lr_and_runs_without_a_logger(tmp_path):
    """``LearningRateMonitor`` in the recipe logs ``lr-Adai`` (drawn beside beta1 and the stability ratio);
    with ``--trainer.logger false`` the CLI drops it (Lightning refuses the combination), as it drops the
    checkpoint callbacks with ``--trainer.enable_checkpointing false``."""
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "default.yaml")
    quick = ["fit", "--config", recipe, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
             "--trainer.enable_progress_bar", "false", "--test_after_fit", "false", "--trainer.log_every_n_steps", "1",
             "--trainer.enable_checkpointing", "false"]
    cli = AdaiCLI(args=[*quick, "--trainer.default_root_dir", str(tmp_path / "logged")])
    assert any(isinstance(c, LearningRateMonitor) for c in cli.trainer.callbacks)
    metrics = report.Metrics.read(report.find_metrics(tmp_path / "logged"))
    assert report.lr_keys(metrics) == ["lr-Adai"] and metrics.last("lr-Adai") == 0.5
    cli = AdaiCLI(args=[*quick, "--trainer.default_root_dir", str(tmp_path / "bare"), "--trainer.logger", "false"])
    assert not any(isinstance(c, LearningRateMonitor) for c in cli.trainer.callbacks) and cli.trainer.global_step == 2
