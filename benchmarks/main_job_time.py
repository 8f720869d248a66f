"""The default recipe's main job: how much longer its three monitoring callbacks make the fit, callback by callback.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/main_job_time.py [--variants recipe before lean] 2>/dev/null

Trains ``recipes/default.yaml`` with its own callbacks (through :class:`adai_lightning.cli.AdaiCLI`), times
``trainer.fit`` and, inside it, every hook of the package's callbacks (their own wall and process CPU time, as
``benchmarks/callback_overhead.py`` does), counts the Hessian-vector products (and gradients) each callback's
probe computes, and prints ``fit / (fit - own)``: the main job's time as a multiple of the same training without
the callbacks, measured within one fit and so hardly affected by the load of a shared machine. Variants
(:data:`VARIANTS`: attributes set on the recipe's callbacks before the fit): ``recipe`` is the recipe as it is;
``before`` its cadence before the per-curve choice of docs/performance.md ("The main job's cost, curve by
curve"); ``cold`` the recipe with every Lanczos run from a random start to its cap (``warm_start=False,
tol=None``); ``subset64`` the recipe on a 64-sample subset; ``lean`` the recipe without the dense first
sharpness points and with lambda_min at tol 1e-2 (what the next cuts would buy). The last logged value of
each curve is printed.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from benchmarks.callback_overhead import CALLBACKS, RECIPE
from adai_lightning.callbacks._hessian_probe import ProbedCallback
from adai_lightning.cli import AdaiCLI

CURVES = ("sharpness/lambda_max", "sharpness/lambda_2", "sharpness/trace", "sharpness/stability_ratio",
          "saddle/lambda_min")
HESSIAN = ("HessianSharpness", "SaddleEscapeMonitor")
#: Per variant, per callback class: the attributes to set (``num_samples`` is the probe's).
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "recipe": {},
    "before": {"HessianSharpness": dict(every_n_train_steps=20, tol=1e-4, trace_every_n_train_steps=None),
               "SaddleEscapeMonitor": dict(every_n_train_steps=10, tol=1e-4)},
    "cold": dict.fromkeys(HESSIAN, dict(warm_start=False, tol=None)),
    "subset64": dict.fromkeys(HESSIAN, dict(num_samples=64)),
    "lean": {"HessianSharpness": dict(dense_first_steps=0), "SaddleEscapeMonitor": dict(tol=1e-2)},
}


class Meter:
    """One callback's own wall and CPU seconds (all its overridden hooks), its probe's products and points."""

    def __init__(self, callback: Any) -> None:
        self.wall = self.cpu = 0.0
        self.products = self.points = 0
        for name in dir(Callback):  # Lightning's hooks only: they do not call one another
            if name.startswith("on_"):
                setattr(callback, name, self._timed(getattr(callback, name)))
        if isinstance(callback, ProbedCallback):
            callback.probe.run = self._counted(callback.probe.run)

    def _timed(self, hook: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return hook(*args, **kwargs)
            finally:
                self.wall += time.perf_counter() - wall
                self.cpu += time.process_time() - cpu
        return timed

    def _counted(self, run: Any) -> Any:
        def counted(trainer: Any, module: Any, compute: Any) -> Any:
            def compute_and_count(operator: Any) -> Any:
                try:
                    return compute(operator)
                finally:
                    self.products += operator.num_products
                    self.points += 1
            return run(trainer, module, compute_and_count)
        return counted


def configure(callback: Any, settings: dict[str, Any]) -> None:
    for name, value in settings.items():
        setattr(callback.probe if name == "num_samples" else callback, name, value)


def run(variant: str, max_epochs: int) -> None:
    with tempfile.TemporaryDirectory() as root:
        cli = AdaiCLI(args=["--config", str(RECIPE), f"--trainer.default_root_dir={root}",
                            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                            f"--trainer.max_epochs={max_epochs}"], run=False)
        meters = {}
        for callback in cli.trainer.callbacks:
            name = type(callback).__name__
            if name in CALLBACKS:
                configure(callback, VARIANTS[variant].get(name, {}))
                meters[name] = Meter(callback)
        wall, cpu = time.perf_counter(), time.process_time()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        last: dict[str, float] = {}
        for path in Path(root).rglob("metrics.csv"):
            with path.open() as handle:
                for row in csv.DictReader(handle):
                    last.update({key: float(row[key]) for key in CURVES if row.get(key)})
    own_wall, own_cpu = sum(m.wall for m in meters.values()), sum(m.cpu for m in meters.values())
    print(f"{variant}: fit {wall:.1f} s wall ({cpu:.1f} s CPU), callbacks {own_wall:.1f} s wall ({own_cpu:.1f} s CPU); "
          f"main job / training = {wall / (wall - own_wall):.2f} (wall), {cpu / (cpu - own_cpu):.2f} (CPU)")
    for name, meter in meters.items():
        products = f", {meter.points} points, {meter.products} products" if meter.points else ""
        print(f"  {name}: {meter.wall:.1f} s wall, {meter.cpu:.1f} s CPU{products}")
    print("  last values: " + ", ".join(f"{key.split('/')[1]} {value:.5g}" for key, value in last.items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-epochs", type=int, default=15)
    parser.add_argument("--variants", nargs="+", default=["recipe", "before"], choices=list(VARIANTS))
    args = parser.parse_args()
    for variant in args.variants:
        run(variant, args.max_epochs)


if __name__ == "__main__":
    main()
