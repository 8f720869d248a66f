"""Tracking against re-discovery: Hessian-vector products per cadence point, warm-started vs cold Lanczos.

    PYTHONPATH=. python benchmarks/lanczos_warm_start.py [--tols 1e-3 1e-4] [--max-epochs 15] 2>/dev/null

Trains ``recipes/default.yaml`` (through :class:`adai_lightning.cli.AdaiCLI`: the recipe's model, data,
Adai and schedule; its callbacks replaced by this script's probe) and at the recipe's cadence
(HessianSharpness every 20 steps, SaddleEscapeMonitor every 10) measures on the probe's fixed subset
(256 samples, train mode, graphs kept, exact products):

- the reference: 100 iterations of Lanczos from a random start (no early stop);
- ``cold``: Lanczos from a random start stopping at ``tol`` (at most 100 products);
- ``warm``: Lanczos from the previous point's eigenvectors (the callbacks' ``warm_start=True``),
  stopping at ``tol``.

For HessianSharpness (top 2, "largest") and SaddleEscapeMonitor (both ends) it prints per point the
products and the relative error of lambda_max (and lambda_2 / lambda_min) against the reference,
then the medians and the ratio of products warm / cold (goal <= 1/3 with lambda_max within 1e-3).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch

from adai_lightning.callbacks._hessian_probe import HessianProbe
from adai_lightning.cli import AdaiCLI
from adai_lightning.curvature import lanczos, lanczos_extremes
from adai_lightning.curvature.eigen import warm_start
from adai_lightning.curvature.vectors import to_host

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "default.yaml"
CADENCE = {"sharpness": 20, "saddle": 10}


def relative(value: float, reference: float) -> float:
    return abs(value - reference) / abs(reference)


class WarmColdProbe(pl.Callback):
    """At each cadence point, reference / cold / warm / fixed-20 Lanczos runs on one operator."""

    def __init__(self, tols: list[float]) -> None:
        self.probe = HessianProbe("benchmark", 256, None, None, True, "raise", 0, keep_graphs=True, hvp="exact")
        self.tols = tols
        self.previous: dict[tuple[str, float], list] = {}
        self.rows: list[dict] = []

    def _sharpness(self, operator, step: int) -> None:
        generator = self.probe.generator
        params = operator.params
        reference = lanczos_extremes(operator, params, 2, "largest", generator(), 100).values
        for tol in self.tols:
            for run, previous in (("cold", []), ("warm", self.previous.get(("sharpness", tol), []))):
                pairs = lanczos_extremes(operator, params, 2, "largest", generator(), 100, previous, tol)
                if run == "warm":
                    self.previous[("sharpness", tol)] = [to_host(v) for v in pairs.vectors]
                self.rows.append({"kind": "sharpness", "step": step, "run": f"{run} tol={tol:g}",
                                  "products": pairs.products,
                                  "err1": relative(float(pairs.values[0]), float(reference[0])),
                                  "err2": relative(float(pairs.values[1]), float(reference[1]))})

    def _saddle(self, operator, step: int) -> None:
        generator = self.probe.generator
        params = operator.params
        reference = lanczos(operator, warm_start([], params, generator()), 100, (0, -1)).values
        for tol in self.tols:
            for run, previous in (("cold", []), ("warm", self.previous.get(("saddle", tol), []))):
                pairs = lanczos(operator, warm_start(previous, params, generator()), 100, (0, -1), tol)
                if run == "warm":
                    self.previous[("saddle", tol)] = [to_host(v) for v in pairs.vectors]
                self.rows.append({"kind": "saddle", "step": step, "run": f"{run} tol={tol:g}",
                                  "products": pairs.products,
                                  "err1": relative(float(pairs.values[-1]), float(reference[-1])),
                                  "err2": relative(float(pairs.values[0]), float(reference[0]))})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        for kind, every in CADENCE.items():
            if step % every == 0:
                measure = self._sharpness if kind == "sharpness" else self._saddle
                done = len(self.rows)
                self.probe.run(trainer, pl_module, lambda operator: measure(operator, step))
                for row in self.rows[done:]:  # as they come: a long run shows progress
                    print(row, flush=True)


def report(rows: list[dict]) -> None:
    for kind, second in (("sharpness", "lambda_2"), ("saddle", "lambda_min")):
        print(f"\n{kind}: products and relative error vs 100-iteration cold Lanczos (median / max over points)")
        print(f"{'run':<16}{'points':>7}{'products med':>14}{'max':>6}{'err lambda_max med':>20}{'max':>10}"
              f"{'err ' + second + ' med':>20}{'max':>10}")
        runs = sorted({r["run"] for r in rows if r["kind"] == kind})
        medians = {}
        for run in runs:
            chosen = [r for r in rows if r["kind"] == kind and r["run"] == run]
            products = [r["products"] for r in chosen]
            medians[run] = statistics.median(products)
            print(f"{run:<16}{len(chosen):>7}{medians[run]:>14.1f}{max(products):>6}"
                  f"{statistics.median(r['err1'] for r in chosen):>20.2e}{max(r['err1'] for r in chosen):>10.2e}"
                  f"{statistics.median(r['err2'] for r in chosen):>20.2e}{max(r['err2'] for r in chosen):>10.2e}")
        for run in runs:
            if run.startswith("warm"):
                cold = run.replace("warm", "cold")
                print(f"products warm/cold ({run[5:]}): {medians[run] / medians[cold]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tols", nargs="+", type=float, default=[1e-4])
    parser.add_argument("--max-epochs", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        cli = AdaiCLI(args=["--config", str(RECIPE), f"--trainer.default_root_dir={root}",
                            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                            "--trainer.callbacks=[]", f"--trainer.max_epochs={args.max_epochs}"], run=False)
        probe = WarmColdProbe(args.tols)
        cli.trainer.callbacks.append(probe)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    report(probe.rows)


if __name__ == "__main__":
    main()
