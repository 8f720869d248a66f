"""``adai-lightning report RUN_DIR``: one PNG and one self-contained HTML page from a run's ``metrics.csv``.

Panels: loss and accuracy curves (any ``train/loss``, ``train_loss``, ``val/g_loss``... key); beta1
quantile bands per layer over time, layers in the model's order (``inertia/...`` keys of
``InertiaMonitor``, per optimizer as ``inertia/opt0/...`` when there are several); sharpness lambda_max
and lambda_2, and the stability ratio against its edge at 1.0 (``HessianSharpness``); saddle
indicators with each escaped plateau shaded from its start to the step the loss left it, where the
escape is marked, and the negative-curvature ratio (``SaddleEscapeMonitor``). The learning rate
(``lr-...`` keys of Lightning's ``LearningRateMonitor``) is drawn on a right axis beside beta1 and the
stability ratio. A panel whose keys were not logged says so instead of failing, so a run without
callbacks still gets its loss curves. matplotlib is imported only when a report is drawn.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

#: At most this many layers get a beta1 band (more would be unreadable in one panel).
MAX_BAND_LAYERS = 6
QUANTILE_BANDS = (("q05", "q95", 0.15), ("q25", "q75", 0.35))
#: Written by ``InertiaMonitor`` next to each CSVLogger's ``metrics.csv``: the model's parameter names
#: in registration order (``named_parameters()``), which CSVLogger's alphabetical columns lose.
PARAMETER_ORDER_FILE = "parameter_order.json"
#: Ticks of the beta1 axis, drawn as ``-log10(1 - beta1)`` so that 0.9, 0.99 and 0.999 are equally apart.
BETA1_TICKS = (0.0, 0.5, 0.9, 0.99, 0.999, 0.9999)
#: Lightning's ``LearningRateMonitor`` logs ``lr-<optimizer>`` (``lr-Adai``, ``lr-Adai/pg1``, ``lr-SGD-1``).
LR_PREFIX = "lr-"


class Metrics:
    """The columns of one or more CSVLogger ``metrics.csv`` files as ``key -> [(step, value)]``."""

    def __init__(self, series: dict[str, list[tuple[float, float]]], parameter_order: Sequence[str] = ()) -> None:
        self.series = series
        self.parameter_order = list(parameter_order)

    @classmethod
    def read(cls, paths: Sequence[Path]) -> Metrics:
        """Read fit logs and, after them, test-only logs (placed at the end of training). A fit log
        that a later one resumed (``--ckpt_path last``) contributes its rows before the resumed one's
        first step: the rows it logged after its last checkpoint were logged again by the resumed fit."""
        tables = [_read_rows(path) for path in paths]
        fits = [rows for rows in tables if _is_fit(rows)]
        series: dict[str, list[tuple[float, float]]] = {}
        last_step = 0.0
        for rows in tables:
            if _is_fit(rows):
                later = fits[fits.index(rows) + 1:]
                end = later[0][0][0] if later and later[0] else math.inf
                rows = [(step, row) for step, row in rows if step < end]
            else:  # a later test of the final checkpoint: place it at the end of training
                rows = [(max(step, last_step), row) for step, row in rows]
            for step, row in rows:
                for key, value in row.items():
                    series.setdefault(key, []).append((step, value))
            last_step = max((p[-1][0] for p in series.values() if p), default=0.0)
        for points in series.values():
            points.sort()
        orders = [path.parent / PARAMETER_ORDER_FILE for path in paths]
        newest = next((order for order in reversed(orders) if order.is_file()), None)
        return cls(series, json.loads(newest.read_text()) if newest else ())

    def has(self, key: str) -> bool:
        return bool(self.series.get(key))

    def xy(self, key: str) -> tuple[list[float], list[float]]:
        points = self.series.get(key, [])
        return [p[0] for p in points], [p[1] for p in points]

    def last(self, key: str) -> float | None:
        points = self.series.get(key)
        return points[-1][1] if points else None

    def scopes(self, prefix: str) -> list[str]:
        """Names ``<n>`` of every ``<prefix><n>/q50`` key in the model's order: a parameter or module
        where its (first) parameter is in :data:`PARAMETER_ORDER_FILE`; names it does not list (or all,
        for a run logged without it) after those, in natural order (``layers.5`` before ``layers.12``)."""
        names = [k[len(prefix):-len("/q50")] for k in self.series if k.startswith(prefix) and k.endswith("/q50")]
        return sorted(names, key=lambda name: (self.model_position(name), natural_key(name)))

    def model_position(self, name: str) -> int:
        """Index of the first parameter that is ``name`` or lies in module ``name``; past the end if none."""
        inside = name + "."
        return next((i for i, p in enumerate(self.parameter_order) if p == name or p.startswith(inside)),
                    len(self.parameter_order))


def natural_key(name: str) -> list:
    """Sort key that orders the numbers inside ``name`` by value: ``layer.5`` < ``layer.12``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def _number(text: str | None) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _read_rows(path: Path) -> list[tuple[float, dict[str, float]]]:
    """``(step, {key: value})`` for each row of a CSVLogger file with a step, finite values only."""
    rows = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            step = _number(row.get("step"))
            if step is not None:
                values = {k: _number(t) for k, t in row.items() if k not in ("step", "epoch")}
                rows.append((step, {k: v for k, v in values.items() if v is not None}))
    return rows


def _stage(key: str) -> str | None:
    match = STAGE_KEY.match(key)
    return STAGES[match.group(1)] if match else None


def _is_fit(rows: list[tuple[float, dict[str, float]]]) -> bool:
    return any(_stage(key) == "train" for _, row in rows for key in row)


def find_metrics(run_dir: Path) -> list[Path]:
    """The newest ``metrics.csv`` under ``run_dir`` with training rows, the fits it resumed, and newer
    test-only ones.

    A fit resumed with ``--ckpt_path last`` logs into a new CSV whose first step is that of its
    checkpoint; the previous training CSVs it continues are taken too, oldest first. ``adai-lightning
    test --ckpt_path ...`` into the same run directory writes a CSV holding only test columns; it
    belongs to the same run and is merged in.
    """
    candidates = sorted(Path(run_dir).rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"No metrics.csv under {run_dir}: point report at a run's default_root_dir "
                                "(a run logged with lightning's CSVLogger)")
    header = {p: (p.read_text().splitlines() or [""])[0].split(",") for p in candidates}
    trained = [p for p in candidates if any(_stage(k) == "train" for k in header[p])]
    if not trained:
        return candidates[-1:]
    fits = [trained[-1]]
    while len(fits) < len(trained) and min((s for s, _ in _read_rows(fits[0])), default=0.0) > 0:
        fits.insert(0, trained[-1 - len(fits)])
    later_tests = [p for p in candidates[candidates.index(fits[-1]) + 1:]
                   if all(k in ("epoch", "step") or _stage(k) == "test" for k in header[p])]
    return [*fits, *later_tests]


def missing_panel(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"not logged:\n{what}", ha="center", va="center", color="0.45", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_series(ax, x: Sequence[float], y: Sequence[float], **style) -> None:
    """``ax.plot``, with round markers on a series too short to show as a line (one point draws nothing)."""
    if len(x) < 3:
        style["marker"] = "o"
    ax.plot(x, y, **style)


def _plot_keys(ax, metrics: Metrics, keys: dict[str, str], **style) -> bool:
    drawn = False
    for key, label in keys.items():
        if metrics.has(key):
            plot_series(ax, *metrics.xy(key), label=label, **style)
            drawn = True
    return drawn


def lr_keys(metrics: Metrics) -> list[str]:
    """The ``LearningRateMonitor`` keys logged (one per optimizer and param group)."""
    return sorted((key for key in metrics.series if key.startswith(LR_PREFIX) and metrics.has(key)), key=natural_key)


def plot_lr_beside(ax, metrics: Metrics) -> None:
    """The learning rate on a right axis of ``ax`` (grey), when one was logged; a log axis when it spans
    more than a factor 10 (a decay schedule)."""
    keys = lr_keys(metrics)
    if not keys:
        return
    twin = ax.twinx()
    for i, key in enumerate(keys):
        plot_series(twin, *metrics.xy(key), color="0.35", linestyle=("-", "--", ":", "-.")[i % 4], linewidth=1,
                    drawstyle="steps-post", label=key)
    values = [v for key in keys for v in metrics.xy(key)[1]]
    if min(values) > 0 and max(values) > 10 * min(values):
        twin.set_yscale("log")
    twin.set_ylabel("learning rate", color="0.35")
    twin.legend(fontsize=7, loc="upper right")


STAGES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
#: ``<stage>/<name>`` or ``<stage>_<name>``: ``train/loss``, ``train_loss_step``, ``val/g_loss``, ``test_acc``...
STAGE_KEY = re.compile(r"^(train|val|valid|validation|test)[/_](.+)$")


def stage_keys(metrics: Metrics, word: str) -> dict[str, str]:
    """The logged ``<stage>/<name>`` or ``<stage>_<name>`` keys whose name contains ``word`` (``loss``,
    ``acc``), train first, then val, then test, each labelled with itself."""
    order = ("train", "val", "test")
    found = sorted((order.index(_stage(key)), natural_key(key), key) for key in metrics.series
                   if _stage(key) and word in STAGE_KEY.match(key).group(2))
    return {key: key for *_, key in found}


def plot_loss(ax, metrics: Metrics) -> None:
    keys = stage_keys(metrics, "loss") or ({"loss": "loss"} if metrics.has("loss") else {})
    if not _plot_keys(ax, metrics, keys):
        return missing_panel(ax, "train/loss, val/loss (or train_loss, ...)")
    if all(v > 0 for key in keys for v in metrics.xy(key)[1]):
        ax.set_yscale("log")
    ax.set_title("Loss")
    ax.legend(fontsize=8)


def plot_accuracy(ax, metrics: Metrics) -> None:
    if not _plot_keys(ax, metrics, stage_keys(metrics, "acc")):
        return missing_panel(ax, "train/acc, val/acc")
    ax.set_title("Accuracy")
    ax.legend(fontsize=8)


def optimizer_prefixes(metrics: Metrics) -> list[str]:
    """``inertia/`` for one optimizer; ``inertia/<name>/`` (``opt0``, ...) for each of several."""
    levels = {k.split("/")[1] for k in metrics.series if k.startswith("inertia/") and k.count("/") >= 3}
    named = sorted(levels - {"param", "module", "global"}, key=natural_key)
    return [f"inertia/{name}/" for name in named] or ["inertia/"]


def band_scopes(metrics: Metrics) -> list[tuple[str, str]]:
    """``(key prefix, label)`` of the beta1 bands to draw: per optimizer, its weight parameters, else its
    modules, else its global distribution; at most ``MAX_BAND_LAYERS`` in all (first, last and evenly
    spaced ones between, in natural layer order)."""
    prefixes = optimizer_prefixes(metrics)
    share = max(1, MAX_BAND_LAYERS // len(prefixes))
    scopes = []
    for opt in prefixes:
        params = [n for n in metrics.scopes(opt + "param/") if not n.endswith("bias")]
        modules = metrics.scopes(opt + "module/")
        overall = ["global"] if metrics.has(opt + "global/q50") else []
        level, names = next(((lvl, n) for lvl, n in (("param/", params), ("module/", modules), ("", overall)) if n),
                            ("", []))
        if len(names) > share:
            names = [names[i] for i in sorted({round(i * (len(names) - 1) / max(share - 1, 1)) for i in range(share)})]
        tag = "" if opt == "inertia/" else opt.split("/")[1] + ": "
        scopes.extend((f"{opt}{level}{name}/", tag + name) for name in names)
    return scopes


def inertia_axis(beta1):
    """``-log10(1 - beta1)``: 0 at beta1 = 0, 1 at 0.9, 2 at 0.99, 3 at 0.999 (Adai's bound at eps 1e-3)."""
    import numpy as np

    return -np.log10(np.clip(1.0 - np.asarray(beta1, dtype=float), 1e-9, None))


def inertia_value(position):
    """The inverse of :func:`inertia_axis`."""
    import numpy as np

    return 1.0 - 10.0 ** -np.asarray(position, dtype=float)


def set_inertia_scale(ax, highest: float) -> None:
    """beta1 on the :func:`inertia_axis` scale, from 0 to just above ``highest`` (at least 0.99), ticked
    at :data:`BETA1_TICKS`: the values near 1 where momentum lives are spread out instead of squeezed."""
    from matplotlib.ticker import FixedLocator, FuncFormatter

    ax.set_yscale("function", functions=(inertia_axis, inertia_value))
    top = float(inertia_value(max(float(inertia_axis(highest)), 2.0) + 0.15))
    ax.set_ylim(0.0, top)
    ax.yaxis.set_major_locator(FixedLocator([t for t in BETA1_TICKS if t <= top]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_locator(FixedLocator([]))


def plot_inertia(ax, metrics: Metrics) -> None:
    scopes = band_scopes(metrics)
    if not scopes:
        return missing_panel(ax, "inertia/.../q05..q95 (InertiaMonitor)")
    bands = QUANTILE_BANDS[-1:] if len(scopes) > 2 else QUANTILE_BANDS
    highest = 0.0
    for i, (key, label) in enumerate(scopes):
        color = f"C{i}"
        for low, high, alpha in bands:
            if metrics.has(key + low) and metrics.has(key + high):
                x, lo = metrics.xy(key + low)
                _, hi = metrics.xy(key + high)
                ax.fill_between(x, lo, hi, color=color, alpha=alpha, linewidth=0)
                highest = max(highest, *hi)
        x, median = metrics.xy(key + "q50")
        plot_series(ax, x, median, color=color, label=label, linewidth=1.5)
        highest = max(highest, *median)
    set_inertia_scale(ax, highest)
    outer = ", q05-q95" if len(scopes) <= 2 else ""
    ax.set_title(f"beta1 per layer: median, q25-q75{outer}")
    ax.set_ylabel("beta1 (spaced as -log10(1 - beta1))")
    ax.legend(fontsize=7, loc="lower right")
    plot_lr_beside(ax, metrics)


def plot_sharpness(ax, metrics: Metrics) -> None:
    if not metrics.has("sharpness/lambda_max"):
        return missing_panel(ax, "sharpness/lambda_max (HessianSharpness)")
    x, lam = metrics.xy("sharpness/lambda_max")
    plot_series(ax, x, lam, color="C0", marker=".", label="lambda_max")
    if metrics.has("sharpness/lambda_2"):
        plot_series(ax, *metrics.xy("sharpness/lambda_2"), color="C0", alpha=0.4, linestyle="--", label="lambda_2")
    if all(v > 0 for v in lam):
        ax.set_yscale("log")
    ax.set_title("Sharpness (top Hessian eigenvalues)")
    ax.legend(fontsize=8)


def plot_stability(ax, metrics: Metrics) -> None:
    """``sharpness/stability_ratio``: 1.0 is the edge of stability of the last step's iteration frozen on
    the local quadratic (for GD, momentum SGD, Adam and Adai alike), so one line at 1 replaces the 2/lr
    line, which held for plain GD only. On real networks it is no divergence alarm: in
    ``benchmarks/stability_study.py`` most runs above 1 in their first steps converged, and BatchNorm
    brings the ratio back below 1 by growing the weights (docs/callbacks-curvature.md)."""
    if not metrics.has("sharpness/stability_ratio"):
        return missing_panel(ax, "sharpness/stability_ratio (HessianSharpness)")
    x, ratio = metrics.xy("sharpness/stability_ratio")
    plot_series(ax, x, ratio, color="C4", marker=".", label="stability ratio")
    ax.axhline(1.0, color="C3", linestyle=":", label="edge of the frozen linearised step (1.0)")
    if all(v > 0 for v in ratio):
        ax.set_yscale("log")
    ax.set_title("Stability ratio\n(1 = edge of the frozen last step; not a divergence alarm)", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    plot_lr_beside(ax, metrics)


class Escape(NamedTuple):
    """One escape event of ``SaddleEscapeMonitor``: the plateau it ended lasted from ``start`` to ``end``
    (the step the loss left it); the event was confirmed and logged later, at ``logged``."""

    logged: float
    start: float
    end: float


def escapes(metrics: Metrics) -> list[Escape]:
    """The escape events, from ``saddle/escape_start`` and ``saddle/escape_end``. A run logged before
    those keys existed has only ``saddle/escape_steps`` (the plateau's length) at the step the event
    was logged: its escape is placed there, its plateau that long before it."""
    starts, ends = (dict(metrics.series.get(f"saddle/escape_{edge}", [])) for edge in ("start", "end"))
    events = []
    for logged, length in metrics.series.get("saddle/escape_steps", []):
        end = ends.get(logged, logged)
        events.append(Escape(logged, starts.get(logged, end - length), end))
    return events


def plateau_spans(steps: Sequence[float], flags: Sequence[float], events: Sequence[Escape] = ()
                  ) -> list[tuple[float, float]]:
    """``(first, end)`` step ranges to shade as plateaus. An escaped plateau spans its own
    ``(start, end)``: from where it began to where the loss left it, the escape's step. The
    ``saddle/plateau`` flag, sampled at cadence points, turns on later than that and stays on until
    the escape is confirmed, so the flagged span an escape ends is replaced by the escape's. A plateau
    that ended without an escape, or lasts to the end, is the flagged span: from the first sample
    flagged to the next sample that is not (or the last sample)."""
    timeline = sorted([(escape.logged, 0, escape) for escape in events]  # at one step, an escape is logged first
                      + [(step, 1, flag > 0.5) for step, flag in zip(steps, flags)], key=lambda item: item[:2])
    spans, first = [], None
    for step, is_sample, value in timeline:
        if not is_sample:
            spans.append((value.start, value.end))
            first = None
        elif value and first is None:
            first = step
        elif not value and first is not None:
            spans.append((first, step))
            first = None
    if first is not None:
        spans.append((first, steps[-1]))
    return sorted(spans)


def plot_saddle(ax, metrics: Metrics) -> None:
    if not metrics.has("saddle/grad_norm"):
        return missing_panel(ax, "saddle/grad_norm (SaddleEscapeMonitor)")
    x, norm = metrics.xy("saddle/grad_norm")
    plot_series(ax, x, norm, color="C0", label="grad norm")
    if all(v > 0 for v in norm):
        ax.set_yscale("log")
    events = escapes(metrics)
    for i, (start, end) in enumerate(plateau_spans(*metrics.xy("saddle/plateau"), events)):
        ax.axvspan(start, end, color="0.6", alpha=0.3, label="plateau" if i == 0 else None)
    for i, event in enumerate(events):
        ax.axvline(event.end, color="C3", linestyle="--", linewidth=1, label="escape" if i == 0 else None)
    if metrics.has("saddle/lambda_min"):
        twin = ax.twinx()
        plot_series(twin, *metrics.xy("saddle/lambda_min"), color="C2", label="lambda_min", alpha=0.8, linewidth=1)
        twin.axhline(0, color="0.5", linewidth=0.5)
        twin.legend(fontsize=7, loc="upper right")
    ax.set_title(f"Saddle indicators ({int(metrics.last('saddle/escapes') or 0)} escapes)")
    ax.legend(fontsize=7, loc="upper left")


def plot_negative_ratio(ax, metrics: Metrics) -> None:
    """``saddle/negative_ratio`` (|lambda_min| / lambda_max, in [0, 1]) on its own axis."""
    if not metrics.has("saddle/negative_ratio"):
        return missing_panel(ax, "saddle/negative_ratio (SaddleEscapeMonitor)")
    plot_series(ax, *metrics.xy("saddle/negative_ratio"), color="C1", label="|lambda_min| / lambda_max")
    ax.set_ylim(bottom=0)
    ax.set_title("Negative curvature ratio")
    ax.legend(fontsize=8)


PANELS = (plot_loss, plot_accuracy, plot_inertia, plot_sharpness, plot_stability, plot_saddle,
          plot_negative_ratio)


SUMMARY_KEYS = ("sharpness/lambda_max", "sharpness/trace", "sharpness/trace_stderr", "sharpness/stability_ratio",
                "saddle/escapes")


def summary(metrics: Metrics) -> dict[str, float]:
    """Final values of the headline metrics that were logged: test, then validation accuracy and loss
    in any key style (``test/acc``, ``val_loss``...), then the curvature ones."""
    stages = ("test", "val")
    scores = sorted((stages.index(_stage(key)), w, natural_key(key), key) for w, word in enumerate(("acc", "loss"))
                    for key in stage_keys(metrics, word) if _stage(key) in stages)
    keys = [*dict.fromkeys(key for *_, key in scores), *SUMMARY_KEYS]
    return {k: metrics.last(k) for k in keys if metrics.has(k)}


def render(run_dir: Path, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write ``report.png`` and ``report.html`` (the PNG embedded) into ``out_dir`` (default: ``run_dir``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out_dir = Path(out_dir or run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = find_metrics(run_dir)
    metrics = Metrics.read(sources)
    fig, axes = plt.subplots(2, 4, figsize=(21, 9), constrained_layout=True)
    for panel, ax in zip(PANELS, axes.flat):
        panel(ax, metrics)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    facts = summary(metrics)
    table = axes.flat[-1]
    table.axis("off")
    lines = [f"{k}: {v:.4g}" for k, v in facts.items()] or ["no final metrics logged"]
    table.text(0.02, 0.95, "Final values\n\n" + "\n".join(lines), va="top", family="monospace",
               fontsize=11, transform=table.transAxes)
    fig.suptitle(f"adai-lightning report: {run_dir}", fontsize=13)
    png = out_dir / "report.png"
    fig.savefig(png, dpi=90)
    plt.close(fig)
    page = out_dir / "report.html"
    rows = [(k, f"{v:.4g}") for k, v in facts.items()]
    write_html(page, f"adai-lightning report: {run_dir}",
               f"<p>Logs: {html.escape(', '.join(map(str, sources)))}</p>" + html_table(("metric", "final"), rows), png)
    return png, page


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table border='1' cellpadding='4' style='border-collapse:collapse'><tr>{cells}</tr>{body}</table>"


def write_html(page: Path, title: str, body: str, png: Path) -> None:
    """A self-contained page: ``body`` (HTML) and the PNG embedded as base64."""
    encoded = base64.b64encode(png.read_bytes()).decode("ascii")
    page.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
        f"<body style='font-family:sans-serif'><h1>{html.escape(title)}</h1>{body}"
        f"<img alt='plots' style='max-width:100%' src='data:image/png;base64,{encoded}'></body></html>"
    )


def main(args: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="adai-lightning report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run's default_root_dir (searched for metrics.csv)")
    parser.add_argument("--out", type=Path, default=None, help="where to write report.png/html (default: run_dir)")
    options = parser.parse_args(args)
    try:
        png, page = render(options.run_dir, options.out)
    except FileNotFoundError as error:  # no metrics.csv there: the user's path, one line and exit 2
        from adai_lightning.cli import ConfigurationError

        raise ConfigurationError(str(error)) from error
    print(f"wrote {png}\nwrote {page}")
