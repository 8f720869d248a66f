"""``adai-lightning report RUN_DIR``: one PNG and one self-contained HTML page from a run's ``metrics.csv``.

Panels: loss and accuracy curves; beta1 quantile bands per layer over time (``inertia/...`` keys of
``InertiaMonitor``); sharpness lambda_max against the 2/lr stability line (``HessianSharpness``);
saddle indicators with plateaus shaded and escape events marked (``SaddleEscapeMonitor``).
A panel whose keys were not logged says so instead of failing, so a run without callbacks still
gets its loss curves. matplotlib is imported only when a report is drawn.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import math
from collections.abc import Sequence
from pathlib import Path

#: At most this many layers get a beta1 band (more would be unreadable in one panel).
MAX_BAND_LAYERS = 6
QUANTILE_BANDS = (("q05", "q95", 0.15), ("q25", "q75", 0.35))


class Metrics:
    """The columns of one or more CSVLogger ``metrics.csv`` files as ``key -> [(step, value)]``."""

    def __init__(self, series: dict[str, list[tuple[float, float]]]) -> None:
        self.series = series

    @classmethod
    def read(cls, paths: Sequence[Path]) -> Metrics:
        series: dict[str, list[tuple[float, float]]] = {}
        last_step = 0.0
        for index, path in enumerate(paths):
            with open(path, newline="") as handle:
                for row in csv.DictReader(handle):
                    step = _number(row.get("step"))
                    if step is None:
                        continue
                    if index > 0:  # a later test of the final checkpoint: place it at the end of training
                        step = max(step, last_step)
                    for key, text in row.items():
                        value = _number(text)
                        if key not in ("step", "epoch") and value is not None:
                            series.setdefault(key, []).append((step, value))
            last_step = max((p[-1][0] for p in series.values() if p), default=0.0)
        for points in series.values():
            points.sort()
        return cls(series)

    def has(self, key: str) -> bool:
        return bool(self.series.get(key))

    def xy(self, key: str) -> tuple[list[float], list[float]]:
        points = self.series.get(key, [])
        return [p[0] for p in points], [p[1] for p in points]

    def last(self, key: str) -> float | None:
        points = self.series.get(key)
        return points[-1][1] if points else None

    def scopes(self, prefix: str) -> list[str]:
        """Names ``<n>`` of every ``<prefix><n>/q50`` key, in first-logged order."""
        return [k[len(prefix):-len("/q50")] for k in self.series if k.startswith(prefix) and k.endswith("/q50")]


def _number(text: str | None) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def find_metrics(run_dir: Path) -> list[Path]:
    """The newest ``metrics.csv`` under ``run_dir`` with training rows, plus newer test-only ones.

    ``adai-lightning test --ckpt_path ...`` into the same run directory writes a second CSV holding
    only ``test/*`` columns; it belongs to the same run and is merged in.
    """
    candidates = sorted(Path(run_dir).rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"No metrics.csv under {run_dir}: point report at a run's default_root_dir "
                                "(a run logged with lightning's CSVLogger)")
    header = {p: (p.read_text().splitlines() or [""])[0].split(",") for p in candidates}
    trained = [p for p in candidates if any(k.startswith("train/") for k in header[p])]
    if not trained:
        return candidates[-1:]
    fit = trained[-1]
    later_tests = [p for p in candidates[candidates.index(fit) + 1:]
                   if all(k in ("epoch", "step") or k.startswith("test/") for k in header[p])]
    return [fit, *later_tests]


def missing_panel(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"not logged:\n{what}", ha="center", va="center", color="0.45", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _plot_keys(ax, metrics: Metrics, keys: dict[str, str], **style) -> bool:
    drawn = False
    for key, label in keys.items():
        if metrics.has(key):
            x, y = metrics.xy(key)
            ax.plot(x, y, label=label, marker="o" if len(x) < 3 else None, **style)
            drawn = True
    return drawn


def plot_loss(ax, metrics: Metrics) -> None:
    keys = {"train/loss_step": "train (step)", "train/loss_epoch": "train (epoch)", "train/loss": "train",
            "val/loss": "val", "test/loss": "test"}
    if not _plot_keys(ax, metrics, keys):
        return missing_panel(ax, "train/loss, val/loss")
    ax.set_yscale("log")
    ax.set_title("Loss")
    ax.legend(fontsize=8)


def plot_accuracy(ax, metrics: Metrics) -> None:
    keys = {"train/acc": "train", "val/acc": "val", "test/acc": "test"}
    if not _plot_keys(ax, metrics, keys):
        return missing_panel(ax, "train/acc, val/acc")
    ax.set_title("Accuracy")
    ax.legend(fontsize=8)


def band_scopes(metrics: Metrics) -> tuple[str, list[str]]:
    """The beta1 scopes to draw: weight parameters, else modules, else the global distribution."""
    params = [n for n in metrics.scopes("inertia/param/") if not n.endswith("bias")]
    for prefix, names in (("inertia/param/", params), ("inertia/module/", metrics.scopes("inertia/module/")),
                          ("inertia/", ["global"] if metrics.has("inertia/global/q50") else [])):
        if names:
            if len(names) > MAX_BAND_LAYERS:  # keep first, last and evenly spaced layers in between
                idx = {round(i * (len(names) - 1) / (MAX_BAND_LAYERS - 1)) for i in range(MAX_BAND_LAYERS)}
                names = [names[i] for i in sorted(idx)]
            return prefix, names
    return "", []


def plot_inertia(ax, metrics: Metrics) -> None:
    prefix, names = band_scopes(metrics)
    if not names:
        return missing_panel(ax, "inertia/.../q05..q95 (InertiaMonitor)")
    colors = [f"C{i}" for i in range(len(names))]
    for name, color in zip(names, colors):
        key = f"{prefix}{name}/"
        for low, high, alpha in QUANTILE_BANDS[-1:] if len(names) > 2 else QUANTILE_BANDS:
            if metrics.has(key + low) and metrics.has(key + high):
                x, lo = metrics.xy(key + low)
                _, hi = metrics.xy(key + high)
                ax.fill_between(x, lo, hi, color=color, alpha=alpha, linewidth=0)
        x, median = metrics.xy(key + "q50")
        ax.plot(x, median, color=color, label=name, linewidth=1.5)
    ax.set_ylim(-0.02, 1.02)
    outer = ", q05-q95" if len(names) <= 2 else ""
    ax.set_title(f"beta1 per layer: median, q25-q75{outer}")
    ax.legend(fontsize=7, loc="lower right")


def plot_sharpness(ax, metrics: Metrics) -> None:
    if not metrics.has("sharpness/lambda_max"):
        return missing_panel(ax, "sharpness/lambda_max (HessianSharpness)")
    x, lam = metrics.xy("sharpness/lambda_max")
    ax.plot(x, lam, color="C0", marker=".", label="lambda_max")
    if metrics.has("sharpness/lambda_2"):
        ax.plot(*metrics.xy("sharpness/lambda_2"), color="C0", alpha=0.4, linestyle="--", label="lambda_2")
    if metrics.has("sharpness/lambda_max_x_lr"):  # 2/lr = 2 * lambda_max / (lambda_max * lr)
        lam_by_step = dict(zip(x, lam))
        points = [(s, 2 * lam_by_step[s] / v) for s, v in zip(*metrics.xy("sharpness/lambda_max_x_lr"))
                  if s in lam_by_step and v > 0]
        if points:
            ax.plot(*zip(*points), color="C3", linestyle=":", label="2 / lr (GD stability edge)")
    if all(v > 0 for v in lam):
        ax.set_yscale("log")
    ax.set_title("Sharpness (top Hessian eigenvalue)")
    ax.legend(fontsize=8)


def plateau_spans(steps: list[float], flags: list[float]) -> list[tuple[float, float]]:
    """``(first, end)`` step ranges where the plateau flag is on; a span ends at the next sample."""
    spans, start = [], None
    for step, flag in zip(steps, flags):
        if flag > 0.5 and start is None:
            start = step
        elif flag <= 0.5 and start is not None:
            spans.append((start, step))
            start = None
    if start is not None:
        spans.append((start, steps[-1]))
    return spans


def plot_saddle(ax, metrics: Metrics) -> None:
    if not metrics.has("saddle/grad_norm"):
        return missing_panel(ax, "saddle/grad_norm (SaddleEscapeMonitor)")
    x, norm = metrics.xy("saddle/grad_norm")
    ax.plot(x, norm, color="C0", label="grad norm")
    if all(v > 0 for v in norm):
        ax.set_yscale("log")
    for i, (start, end) in enumerate(plateau_spans(*metrics.xy("saddle/plateau"))):
        ax.axvspan(start, end, color="0.6", alpha=0.3, label="plateau" if i == 0 else None)
    for i, step in enumerate(metrics.xy("saddle/escape_steps")[0]):
        ax.axvline(step, color="C3", linestyle="--", linewidth=1, label="escape" if i == 0 else None)
    twin_keys = {"saddle/lambda_min": "lambda_min", "saddle/negative_ratio": "negative ratio"}
    if any(metrics.has(k) for k in twin_keys):
        twin = ax.twinx()
        for color, (key, label) in zip(("C2", "C1"), twin_keys.items()):
            if metrics.has(key):
                twin.plot(*metrics.xy(key), color=color, label=label, alpha=0.8, linewidth=1)
        twin.axhline(0, color="0.5", linewidth=0.5)
        twin.legend(fontsize=7, loc="upper right")
    ax.set_title(f"Saddle indicators ({int(metrics.last('saddle/escapes') or 0)} escapes)")
    ax.legend(fontsize=7, loc="upper left")


PANELS = (plot_loss, plot_accuracy, plot_inertia, plot_sharpness, plot_saddle)


def summary(metrics: Metrics) -> dict[str, float]:
    """Final values of the headline metrics that were logged."""
    keys = ("test/acc", "test/loss", "val/acc", "val/loss", "sharpness/lambda_max", "saddle/escapes")
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
    fig, axes = plt.subplots(2, 3, figsize=(16, 9), constrained_layout=True)
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
    png, page = render(options.run_dir, options.out)
    print(f"wrote {png}\nwrote {page}")
