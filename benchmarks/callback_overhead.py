"""Training time of the default recipe with none, each and all of the package's callbacks, as ratios.

    PYTHONPATH=. python benchmarks/callback_overhead.py [--configs none each all] [--repeats 3] 2>/dev/null

Each configuration trains ``recipes/default.yaml`` (through :class:`adai_lightning.cli.AdaiCLI`,
so exactly the recipe's model, data, optimizer, schedule and loggers) in a fresh temporary run
directory, with the progress bar and model summary off. The recipe's own callback list is
replaced (``--trainer.callbacks=[]``) by default-constructed instances of the configuration's
callbacks (``--trainer.callbacks+=...``), so they run at their default cadence and the "none"
run has none of them. Only ``trainer.fit`` is timed. Every repeat runs each configuration once,
in a new random order, after a ``gc.collect()``; the table shows medians and minima and the ratio
of medians to the run without callbacks (goals: InertiaMonitor <= 1.02, all together <= 1.05).
On a shared machine fits of the same configuration vary by several percent, more than the goals;
so the script also times every hook of the package's callbacks (their "own" time, all their
work included) and reports it as a fraction of the rest of the fit: ``1 + own / (fit - own)``
is the ratio the callbacks cause by their own work, measured within one fit and hardly affected
by the machine's load. ``--max-epochs 300`` shows the steady state of budgeted callbacks. Callbacks that
``adai_lightning.callbacks`` does not (yet) provide are listed and left out.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from lightning.pytorch.callbacks import Callback

from adai_lightning.cli import AdaiCLI

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "default.yaml"
CALLBACKS = ("InertiaMonitor", "HessianSharpness", "SaddleEscapeMonitor")


def available_callbacks() -> tuple[list[str], dict[str, str]]:
    """The callbacks that can be imported, and for the others why not."""
    try:
        module = importlib.import_module("adai_lightning.callbacks")
    except ImportError as error:
        return [], {name: f"adai_lightning.callbacks cannot be imported ({error})" for name in CALLBACKS}
    found = [name for name in CALLBACKS if hasattr(module, name)]
    missing = {name: "not in adai_lightning.callbacks" for name in CALLBACKS if name not in found}
    return found, missing


def configurations(kinds: list[str], found: list[str]) -> dict[str, list[str]]:
    """Label -> callback class names, for the requested kinds ('none', 'each', 'all')."""
    configs: dict[str, list[str]] = {}
    if "none" in kinds:
        configs["none"] = []
    if "each" in kinds:
        configs.update({name: [name] for name in found})
    if "all" in kinds and len(found) > 1:
        configs["all (" + " + ".join(found) + ")"] = list(found)
    return configs


def time_hooks(callback: Callback, own: list[float]) -> None:
    """Add the wall time of every Lightning hook ``callback`` overrides to ``own[0]``."""
    for name in dir(Callback):
        if name.startswith("on_") and getattr(type(callback), name) is not getattr(Callback, name):
            hook = getattr(callback, name)

            def timed(*args: Any, hook: Callable = hook, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return hook(*args, **kwargs)
                finally:
                    own[0] += time.perf_counter() - start

            setattr(callback, name, timed)


def fit_seconds(callbacks: list[str], max_epochs: int | None) -> tuple[float, float]:
    """Wall-clock seconds of ``trainer.fit`` for the default recipe with these callbacks, and of
    those the seconds spent inside the callbacks' hooks."""
    with tempfile.TemporaryDirectory() as root:
        args = [
            "--config", str(RECIPE),
            f"--trainer.default_root_dir={root}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.callbacks=[]",
            *(f"--trainer.callbacks+=adai_lightning.callbacks.{name}" for name in callbacks),
        ]
        if max_epochs is not None:
            args.append(f"--trainer.max_epochs={max_epochs}")
        cli = AdaiCLI(args=args, run=False)
        own = [0.0]
        for callback in cli.trainer.callbacks:
            if type(callback).__name__ in callbacks:
                time_hooks(callback, own)
        start = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        return time.perf_counter() - start, own[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["none", "each", "all"], choices=["none", "each", "all"])
    parser.add_argument("--repeats", type=int, default=3, help="repeats per configuration, each in a new order")
    parser.add_argument("--max-epochs", type=int, default=None,
                        help="override the recipe's 15 epochs (1 for quick checks, 300 for the steady state)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-repeat shuffles of the order")
    args = parser.parse_args()

    found, missing = available_callbacks()
    for name, reason in missing.items():
        print(f"missing callback {name}: {reason}; left out")
    configs = configurations(args.configs, found)
    fit_seconds([], args.max_epochs)  # warm-up: imports, data loading, first-call costs
    samples: dict[str, list[float]] = {label: [] for label in configs}
    own_ratios: dict[str, list[float]] = {label: [] for label in configs}
    order, shuffle = list(configs), random.Random(args.seed).shuffle
    for _ in range(args.repeats):
        shuffle(order)
        for label in order:
            gc.collect()
            seconds, own = fit_seconds(configs[label], args.max_epochs)
            samples[label].append(seconds)
            own_ratios[label].append(1.0 + own / (seconds - own))

    epochs = args.max_epochs or "recipe's"
    print(f"\nrecipes/default.yaml, {epochs} epochs, {args.repeats} repeats (fit seconds)\n")
    print("| callbacks | median s | min s | x none (median) | x none (min) | own time: 1 + own / rest (median) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    base = (statistics.median(samples["none"]), min(samples["none"])) if "none" in samples else None
    for label, seconds in samples.items():
        median, least = statistics.median(seconds), min(seconds)
        ratios = (f"{median / base[0]:.3f}", f"{least / base[1]:.3f}") if base else ("n/a", "n/a")
        print(f"| {label} | {median:.2f} | {least:.2f} | {ratios[0]} | {ratios[1]} | "
              f"{statistics.median(own_ratios[label]):.3f} |")


if __name__ == "__main__":
    main()
