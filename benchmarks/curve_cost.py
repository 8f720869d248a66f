"""What each curve of the default recipe costs per cadence point, against how accurate it is.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/curve_cost.py [--every 50] [--reference-every 100] 2>/dev/null

Trains ``recipes/default.yaml`` (its model, data, Adai and schedule through
:class:`adai_lightning.cli.AdaiCLI`; its callbacks replaced by this script's probes) and every ``--every``
optimizer steps measures each curve the recipe's Hessian callbacks log, the way they compute it (exact
products, train mode, graphs kept, the callbacks' iteration caps, warm-started from the same variant's
previous point), in several settings:

- ``top-2`` (HessianSharpness's lambda_max and lambda_2), ``ratio`` (its stability ratio, Lanczos on the
  Adai-scaled operator), ``ends`` (SaddleEscapeMonitor's lambda_min, from one Lanczos run for both
  ends): ``tol`` 1e-2 / 1e-3 / 1e-4 on the recipe's 256-sample subset, and tol 1e-3 on 64 samples;
- ``trace``: Hutch++ with 15 and 30 samples (256 samples), 30 (64 samples).

Every ``--reference-every`` steps it also computes the references on the 256-sample subset: 100 cold
Lanczos iterations (no early stop) for lambda_max, lambda_2 and lambda_min, the same for the stability
ratio, and a ``--trace-reference``-sample Hutch++ trace. Each setting's products per point (on its own
subset) and process CPU seconds per point (``time.process_time``: little affected by other processes)
are printed with its relative error against the references (for lambda_min also whether its sign is
the reference's), and the cost of one training step for scale.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from typing import Any, Callable

import lightning.pytorch as pl

from adai_lightning.callbacks._hessian_probe import HessianProbe
from adai_lightning.curvature import default_lanczos_iters, hutch_plus_plus_trace, lanczos, lanczos_extremes
from adai_lightning.curvature.eigen import warm_start
from adai_lightning.curvature.stability import linearised_step, stability_ratio
from adai_lightning.curvature.vectors import to_host
from benchmarks.lanczos_warm_start import fit_recipe_with, relative

TOLS = (1e-2, 1e-3, 1e-4)
#: The callbacks' Lanczos caps in the recipe: HessianSharpness top-2 and its ratio, SaddleEscapeMonitor.
ITERS = {"top-2": default_lanczos_iters(2), "ratio": default_lanczos_iters(1), "ends": 20}
REFERENCE_ITERS = 100


class CurveCost(pl.Callback):
    """At each point: every setting of every curve on its probe, timed and counted; references every so often."""

    def __init__(self, every: int, reference_every: int, trace_reference: int) -> None:
        self.probes = {n: HessianProbe("benchmark", n, None, None, True, "raise", 0, keep_graphs=True, hvp="exact")
                       for n in (256, 64)}
        self.every, self.reference_every, self.trace_reference = every, reference_every, trace_reference
        self.tracked: dict[tuple, list] = defaultdict(list)
        self.rows: list[dict[str, Any]] = []
        self.references: dict[int, dict[str, float]] = {}
        self.lrs: list[float] = []
        self.train_seconds = [0.0, 0]  # process seconds of training steps, and their count

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_start = time.process_time()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs = [float(group["lr"]) for group in optimizer.param_groups]

    def _timed(self, step: int, curve: str, setting: str, operator, compute: Callable[[], Any]) -> dict:
        """Run ``compute()`` (EigenPairs or a TraceEstimate), count its products and CPU time, keep its row."""
        products, start = operator.num_products, time.process_time()
        result = compute()
        row = {"step": step, "curve": curve, "setting": setting, "products": operator.num_products - products,
               "seconds": time.process_time() - start}
        if curve == "trace":
            row.update(trace=result.trace, stderr=result.stderr)
        else:
            self.tracked[(curve, setting)] = [to_host(v) for v in result.tracked()]
            values = result.values.tolist()
            row.update({"lambda_max": values[0], "lambda_2": values[1]} if curve == "top-2" else
                       {"ratio" if curve == "ratio" else "lambda_min": values[0]})
        self.rows.append(row)
        return row

    def _eigen(self, step: int, operator, trainer, setting: str, tol: float) -> None:
        """The three Lanczos curves, each warm-started from this setting's previous point and stopping at ``tol``."""
        params, generator, tracked = operator.params, self.probes[256].generator, self.tracked
        top = self._timed(step, "top-2", setting, operator, lambda: lanczos_extremes(
            operator, params, 2, "largest", generator(), ITERS["top-2"], tracked[("top-2", setting)], tol))
        linear = linearised_step(trainer.optimizers[0], params, self.lrs)
        self._timed(step, "ratio", setting, operator, lambda: stability_ratio(
            operator, linear, generator(), params, ITERS["ratio"], top["lambda_max"], tracked[("ratio", setting)], tol))
        self._timed(step, "ends", setting, operator, lambda: lanczos(
            operator, warm_start(tracked[("ends", setting)], params, generator()), ITERS["ends"], (0, -1), tol))

    def _trace(self, step: int, operator, setting: str, samples: int) -> None:
        self._timed(step, "trace", setting, operator,
                    lambda: hutch_plus_plus_trace(operator, operator.params, samples, self.probes[256].generator()))

    def _reference(self, step: int, operator, trainer) -> None:
        """100 cold Lanczos iterations (lambda_max, lambda_2 and lambda_min from one run), the same for the
        ratio, and a ``trace_reference``-sample Hutch++ trace."""
        params, generator = operator.params, self.probes[256].generator
        start = operator.num_products
        values = lanczos(operator, warm_start([], params, generator()), REFERENCE_ITERS).values
        ratio = stability_ratio(operator, linearised_step(trainer.optimizers[0], params, self.lrs), generator(),
                                params, REFERENCE_ITERS, float(values[-1]))
        trace = hutch_plus_plus_trace(operator, params, self.trace_reference, generator())
        self.references[step] = {"lambda_max": float(values[-1]), "lambda_2": float(values[-2]),
                                 "lambda_min": float(values[0]), "ratio": float(ratio.values[0]), "trace": trace.trace}
        print(f"step {step}: reference {self.references[step]} ({operator.num_products - start} products)", flush=True)

    def _measure(self, step: int, trainer, size: int, operator) -> None:
        reference = step % self.reference_every == 0
        if size == 64:
            self._eigen(step, operator, trainer, "tol 1e-3, 64 samples", 1e-3)
            if reference:
                self._trace(step, operator, "30 samples, 64 samples", 30)
            return
        for tol in TOLS:
            self._eigen(step, operator, trainer, f"tol {tol:g}", tol)
        if reference:
            for samples in (15, 30):
                self._trace(step, operator, f"{samples} samples", samples)
            self._reference(step, operator, trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train_seconds[0] += time.process_time() - self._step_start
        self.train_seconds[1] += 1
        step = trainer.global_step
        if step % self.every:
            return
        for size, probe in self.probes.items():
            probe.run(trainer, pl_module, lambda operator: self._measure(step, trainer, size, operator))
        print(f"step {step}: {[(r['curve'], r['setting'], r['products']) for r in self.rows if r['step'] == step]}",
              flush=True)


KEYS = {"top-2": ("lambda_max", "lambda_2"), "ratio": ("ratio",), "ends": ("lambda_min",), "trace": ("trace",)}


def report(cost: CurveCost) -> None:
    step_seconds = cost.train_seconds[0] / cost.train_seconds[1]
    print(f"\none training step: {step_seconds * 1e3:.1f} ms of process CPU time (mean of {cost.train_seconds[1]})")
    print(f"{'curve':<7}{'setting':<24}{'points':>7}{'products med':>13}{'s/point med':>12}{'= steps':>8}"
          f"   max relative error vs reference (points with one)")
    for curve, keys in KEYS.items():
        for setting in dict.fromkeys(r["setting"] for r in cost.rows if r["curve"] == curve):
            rows = [r for r in cost.rows if r["curve"] == curve and r["setting"] == setting]
            seconds = statistics.median(r["seconds"] for r in rows)
            errors = []
            for key in keys:
                checked = [(r[key], cost.references[r["step"]][key]) for r in rows if r["step"] in cost.references]
                error = max(relative(value, ref) for value, ref in checked)
                signs = "" if key != "lambda_min" else \
                    f" (sign as reference {sum((v < 0) == (ref < 0) for v, ref in checked)}/{len(checked)})"
                errors.append(f"{key} {error:.1e}{signs}")
            if curve == "trace":
                errors.append("stderr/trace med " +
                              f"{statistics.median(r['stderr'] / abs(r['trace']) for r in rows):.1e}")
            print(f"{curve:<7}{setting:<24}{len(rows):>7}{statistics.median(r['products'] for r in rows):>13.0f}"
                  f"{seconds:>12.3f}{seconds / step_seconds:>8.1f}   {', '.join(errors)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--reference-every", type=int, default=100)
    parser.add_argument("--trace-reference", type=int, default=120)
    parser.add_argument("--max-epochs", type=int, default=15)
    args = parser.parse_args()
    cost = CurveCost(args.every, args.reference_every, args.trace_reference)
    fit_recipe_with(cost, args.max_epochs)
    report(cost)


if __name__ == "__main__":
    main()
