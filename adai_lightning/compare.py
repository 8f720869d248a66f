"""``adai-lightning compare --config RECIPE --optimizers Adai,SGD,Adam --seeds 3 [CLI overrides ...]``.

Runs the recipe once per optimizer and seed, one after the other, each in its own directory
``OUT/<optimizer>_seed<k>`` (a ``fit``, then a ``test`` of the checkpoint it saved, if any),
then writes ``compare.md`` (the verdict tables below), ``compare.png`` (overlaid curves) and
``compare.html`` (both, self-contained).

Verdict tables: per optimizer, mean +- std over seeds of the final training loss, test accuracy,
lambda_max, trace and stability ratio (those logged), and the steps each plateau lasted (the
``saddle/escape_steps`` events, plateau 1, 2, ... in order); then the paired differences
``Adai - <other>`` over equal seeds, with how many seeds have Adai lower.

Optimizer settings come from the recipes' optimizer configs: ``Adai`` is the recipe's own;
any other name ``N`` is the first of ``DIR/<recipe name>/<n>.yaml`` and ``DIR/<n>.yaml`` (``n`` =
``N`` lower-cased, ``DIR`` = ``--optimizer-configs``, default the ``optimizers`` folder next to the
recipe), added as a second ``--config``; a name without a config is passed to ``--optimizer`` with
its defaults. The recipe's weight decay and lr schedule apply to all. Extra arguments go to every
run unchanged.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from adai_lightning import report

CURVES = (("val/loss", "validation loss"), ("val/acc", "validation accuracy"),
          ("sharpness/lambda_max", "lambda_max"), ("train/loss_step", "training loss"))


def optimizer_config(name: str, recipe: Path, directory: Path) -> Path | None:
    """The optimizer config for ``name`` on ``recipe``: the recipe's own folder first, then the shared one."""
    for candidate in (directory / recipe.stem / f"{name.lower()}.yaml", directory / f"{name.lower()}.yaml"):
        if candidate.is_file():
            return candidate
    return None


def optimizer_args(name: str, recipe: Path, directory: Path) -> list[str]:
    """CLI arguments selecting optimizer ``name``: none for Adai (the recipe's), else its config file."""
    if name == "Adai":
        return []
    config = optimizer_config(name, recipe, directory)
    return ["--config", str(config)] if config is not None else ["--optimizer", name]


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


#: The verdict table's columns: a label and the logged keys that give it (the first one logged).
FINALS = (("final train loss", ("train/loss_epoch", "train/loss_step", "train/loss")), ("test acc", ("test/acc",)),
          ("test loss", ("test/loss",)), ("test ppl", ("test/ppl",)), ("lambda_max", ("sharpness/lambda_max",)), ("trace", ("sharpness/trace",)),
          ("stability ratio", ("sharpness/stability_ratio",)))
Finals = dict[str, float | None]


def final_values(run_dir: Path) -> tuple[report.Metrics, Finals]:
    """The run's metrics and its final values: one per FINALS label, and ``plateau <k> steps`` for
    each escape event in order (how long the run stayed on its k-th plateau)."""
    metrics = report.Metrics.read(report.find_metrics(run_dir))
    finals: Finals = {}
    for label, keys in FINALS:
        key = next((k for k in keys if metrics.has(k)), None)
        finals[label] = metrics.last(key) if key else None
    for index, length in enumerate(metrics.xy("saddle/escape_steps")[1], start=1):
        finals[f"plateau {index} steps"] = length
    return metrics, finals


def mean_std(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "not logged"
    spread = statistics.stdev(present) if len(present) > 1 else 0.0
    return f"{statistics.fmean(present):.4g} +- {spread:.2g} (n={len(present)})"


def paired(adai: list[Finals], other: list[Finals], label: str) -> str:
    """``mean +- std`` of Adai - other over the seeds both logged, and the signs."""
    diffs = [a[label] - b[label] for a, b in zip(adai, other) if a.get(label) is not None and b.get(label) is not None]
    if not diffs:
        return "-"
    lower = sum(d < 0 for d in diffs)
    higher = sum(d > 0 for d in diffs)
    return f"{mean_std(diffs)}; Adai lower in {lower}/{len(diffs)}, higher in {higher}/{len(diffs)}"


def verdict_tables(results: dict[str, list[Finals]]) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """The columns, the per-optimizer rows (mean +- std over seeds) and the paired-difference rows."""
    labels = [label for label, _ in FINALS if any(f[label] is not None for runs in results.values() for f in runs)]
    plateaus = max((sum(k.startswith("plateau ") for k in f) for runs in results.values() for f in runs), default=0)
    labels += [f"plateau {k} steps" for k in range(1, plateaus + 1)]
    rows = [[name] + [mean_std([f.get(label) for f in runs]) for label in labels] for name, runs in results.items()]
    diffs = [[f"Adai - {name}"] + [paired(results["Adai"], runs, label) for label in labels]
             for name, runs in results.items() if name != "Adai" and "Adai" in results]
    return labels, rows, diffs


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    return "\n".join("| " + " | ".join(r) + " |" for r in [list(header), ["---"] * len(header), *rows])


def plot(results: dict[str, list[tuple[report.Metrics, Finals]]], out: Path) -> Path:
    """The overlay PNG of every run's curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    return png


def main(args: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="adai-lightning compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="the recipe YAML")
    parser.add_argument("--optimizers", default="Adai,SGD,Adam", help="comma-separated names (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=3, help="runs per optimizer, seeds 0..N-1 (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: runs/compare/<recipe>)")
    parser.add_argument("--optimizer-configs", type=Path, default=None,
                        help="folder of optimizer configs (default: the 'optimizers' folder next to the recipe)")
    options, extra = parser.parse_known_args(args)
    if options.seeds < 1:
        parser.error(f"Invalid --seeds: {options.seeds}; it must be >= 1")
    names = [n.strip() for n in options.optimizers.split(",") if n.strip()]
    out = options.out or Path("runs") / "compare" / options.config.stem
    configs = options.optimizer_configs or options.config.parent / "optimizers"
    total, started = len(names) * options.seeds, time.time()
    results: dict[str, list] = {}
    for index, (name, seed) in enumerate((n, s) for n in names for s in range(options.seeds)):
        progress(index, total, f"running {name} seed {seed}", started)
        run_dir = out / f"{name}_seed{seed}"
        run_one(options.config, run_dir, seed, [*optimizer_args(name, options.config, configs), *extra])
        results.setdefault(name, []).append(final_values(run_dir))
    progress(total, total, "done", started)
    labels, rows, diffs = verdict_tables({name: [f for _, f in runs] for name, runs in results.items()})
    png = plot(results, out)
    text = (f"Final values, mean +- std over seeds ({options.seeds} per optimizer):\n\n"
            + markdown(["optimizer", *labels], rows)
            + "\n\nPaired differences over equal seeds:\n\n" + markdown(["difference", *labels], diffs) + "\n")
    (out / "compare.md").write_text(text)
    report.write_html(out / "compare.html", f"adai-lightning compare: {options.config}",
                      report.html_table(["optimizer", *labels], rows)
                      + report.html_table(["difference", *labels], diffs), png)
    print(text)
    print(f"wrote {out / 'compare.md'}, {png}, {out / 'compare.html'}")
