"""``adai-lightning compare --config RECIPE --optimizers Adai,SGD,Adam --seeds 3 [CLI overrides ...]``.

Runs the recipe once per optimizer and seed, one after the other, each in its own directory
``OUT/<optimizer>_seed<k>`` (a ``fit``, then a ``test`` of the checkpoint it saved, if any),
then writes ``compare.md`` (mean +- std over seeds of the final test metric and of the final
lambda_max, when logged), ``compare.png`` (overlaid curves) and ``compare.html`` (both, self-contained).

Optimizer settings follow the paper's correspondence: ``Adai`` is the recipe's own optimizer
settings; ``SGD`` is momentum 0.9 with lr = 0.1 x the recipe's lr (Adai lr 1.0 <-> SGD-M lr 0.1);
``Adam`` uses lr 1e-3. Any other name is passed to ``--optimizer`` with its defaults. The recipe's
weight decay and lr schedule apply to all. Extra arguments go to every run unchanged.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from adai_lightning import report

CURVES = (("val/loss", "validation loss"), ("val/acc", "validation accuracy"),
          ("sharpness/lambda_max", "lambda_max"), ("train/loss_step", "training loss"))


def optimizer_args(name: str, recipe_lr: float | None) -> list[str]:
    """CLI arguments selecting optimizer ``name`` with the paper's baseline settings."""
    if name == "Adai":
        return []
    if name == "SGD":
        if recipe_lr is None:
            raise ValueError("SGD's lr is derived from the recipe's optimizer.init_args.lr, which is not set")
        return ["--optimizer", "torch.optim.SGD", "--optimizer.lr", repr(0.1 * recipe_lr), "--optimizer.momentum", "0.9"]
    if name == "Adam":
        return ["--optimizer", "torch.optim.Adam", "--optimizer.lr", "0.001"]
    return ["--optimizer", name]


def progress(done: int, total: int, label: str, started: float) -> None:
    """One line per run: ``[####......] 2/6 SGD seed 0 (41 s elapsed)``."""
    filled = round(20 * done / total)
    print(f"[{'#' * filled}{'.' * (20 - filled)}] {done}/{total} {label} ({time.time() - started:.0f} s elapsed)",
          flush=True)


def run_one(recipe: Path, run_dir: Path, seed: int, extra: list[str]) -> None:
    """``fit``, then ``test`` of the newest checkpoint the fit saved; output goes to ``run_dir/run.log``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    common = ["--config", str(recipe), "--seed_everything", str(seed), "--trainer.default_root_dir", str(run_dir),
              *extra]
    with open(run_dir / "run.log", "w") as log:
        _run_cli(["fit", *common], log)
        checkpoints = sorted(run_dir.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        if checkpoints:
            _run_cli(["test", *common, "--ckpt_path", str(checkpoints[-1])], log)


def _run_cli(command: list[str], log) -> None:
    proc = subprocess.run([sys.executable, "-m", "adai_lightning", *command], stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"adai-lightning {' '.join(command)} failed (exit {proc.returncode}); see {log.name}")


def final_values(run_dir: Path) -> tuple[report.Metrics, dict[str, float | None]]:
    metrics = report.Metrics.read(report.find_metrics(run_dir))
    test_key = next((k for k in ("test/acc", "test/loss", "val/acc", "val/loss") if metrics.has(k)), None)
    return metrics, {"metric": test_key, "value": metrics.last(test_key) if test_key else None,
                     "lambda_max": metrics.last("sharpness/lambda_max")}


def mean_std(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "not logged"
    spread = statistics.stdev(present) if len(present) > 1 else 0.0
    return f"{statistics.fmean(present):.4g} +- {spread:.2g} (n={len(present)})"


def summarise(results: dict[str, list[tuple[report.Metrics, dict]]], out: Path) -> tuple[list[list[str]], Path]:
    """The table rows and the overlay PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for name, runs in results.items():
        finals = [f for _, f in runs]
        rows.append([name, finals[0]["metric"] or "-", mean_std([f["value"] for f in finals]),
                     mean_std([f["lambda_max"] for f in finals])])
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 4), constrained_layout=True)
    for ax, (key, title) in zip(axes, CURVES):
        for color, (name, runs) in enumerate(results.items()):
            for i, (metrics, _) in enumerate(runs):
                if metrics.has(key):
                    x, y = metrics.xy(key)
                    ax.plot(x, y, color=f"C{color}", alpha=0.8, marker="o" if len(x) < 3 else None,
                            label=name if i == 0 else None)
        if ax.lines:
            ax.legend(fontsize=8)
            ax.set_yscale("log" if "loss" in key or "lambda" in key else "linear")
        else:
            report.missing_panel(ax, key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    png = out / "compare.png"
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return rows, png


def main(args: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="adai-lightning compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="the recipe YAML")
    parser.add_argument("--optimizers", default="Adai,SGD,Adam", help="comma-separated names (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=3, help="runs per optimizer, seeds 0..N-1 (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: runs/compare/<recipe>)")
    options, extra = parser.parse_known_args(args)
    if options.seeds < 1:
        parser.error(f"Invalid --seeds: {options.seeds}; it must be >= 1")
    names = [n.strip() for n in options.optimizers.split(",") if n.strip()]
    out = options.out or Path("runs") / "compare" / options.config.stem
    recipe_lr = (yaml.safe_load(options.config.read_text()).get("optimizer") or {}).get("init_args", {}).get("lr")
    total, started = len(names) * options.seeds, time.time()
    results: dict[str, list] = {}
    for index, (name, seed) in enumerate((n, s) for n in names for s in range(options.seeds)):
        progress(index, total, f"running {name} seed {seed}", started)
        run_dir = out / f"{name}_seed{seed}"
        run_one(options.config, run_dir, seed, [*optimizer_args(name, recipe_lr), *extra])
        results.setdefault(name, []).append(final_values(run_dir))
    progress(total, total, "done", started)
    rows, png = summarise(results, out)
    header = ("optimizer", "final metric", "mean +- std", "final lambda_max")
    table = "\n".join("| " + " | ".join(r) + " |" for r in [list(header), ["---"] * 4, *rows])
    (out / "compare.md").write_text(table + "\n")
    report.write_html(out / "compare.html", f"adai-lightning compare: {options.config}",
                      report.html_table(header, rows), png)
    print(table)
    print(f"wrote {out / 'compare.md'}, {png}, {out / 'compare.html'}")
