"""Tracking against re-discovery: Hessian-vector products per cadence point, warm-started vs cold Lanczos.

    PYTHONPATH=. python benchmarks/lanczos_warm_start.py [--tols 1e-3 1e-4] [--max-epochs 15] 2>/dev/null

Trains ``recipes/default.yaml`` (through :class:`adai_lightning.cli.AdaiCLI`: the recipe's model, data,
Adai and schedule; its callbacks replaced by this script's probe) and at the recipe's cadence
(read from the recipe: HessianSharpness's and SaddleEscapeMonitor's ``every_n_train_steps``) measures on the probe's fixed subset
(256 samples, train mode, graphs kept, exact products):

- the reference: ``--reference-iters`` (100) iterations of Lanczos from a random start (no early stop);
- ``cold``: Lanczos from a random start stopping at ``tol`` (at most 100 products);
- ``warm``: Lanczos from the previous point's eigenvectors and guard vectors (the callbacks'
  ``warm_start=True``), stopping at ``tol``;

each for every ``--tols`` and ``--guards`` (Ritz values beyond the wanted ones that must converge too).

For HessianSharpness (top 2, "largest") and SaddleEscapeMonitor (both ends) it prints per point the
products, the relative error of lambda_max (and lambda_2 / lambda_min) against the reference and the
overlap |<v, v_previous>| of the warm run's first eigenvector with the previous point's, then the medians and the ratio of products warm / cold (goal <= 1/3 with lambda_max within 1e-3).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import yaml

from adai_lightning.callbacks._hessian_probe import HessianProbe
from adai_lightning.cli import AdaiCLI
from adai_lightning.curvature import lanczos, lanczos_extremes
from adai_lightning.curvature.eigen import warm_start
from adai_lightning.curvature.vectors import dot, to_device, to_host

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "default.yaml"


def recipe_cadence() -> dict[str, int]:
    """The recipe's ``every_n_train_steps`` of HessianSharpness ("sharpness") and SaddleEscapeMonitor ("saddle")."""
    names = {"HessianSharpness": "sharpness", "SaddleEscapeMonitor": "saddle"}
    callbacks = yaml.safe_load(RECIPE.read_text())["trainer"]["callbacks"]
    return {names[c["class_path"].rsplit(".", 1)[-1]]: c["init_args"]["every_n_train_steps"]
            for c in callbacks if c["class_path"].rsplit(".", 1)[-1] in names}


def relative(value: float, reference: float) -> float:
    return abs(value - reference) / abs(reference)


class WarmColdProbe(pl.Callback):
    """At each cadence point, reference / cold / warm Lanczos runs on one operator, per ``tol`` and ``guard``."""

    def __init__(self, tols: list[float], guards: list[int], every: int | None = None,
                 reference_iters: int = 100) -> None:
        self.probe = HessianProbe("benchmark", 256, None, None, True, "raise", 0, keep_graphs=True, hvp="exact")
        self.settings = [(tol, guard) for tol in tols for guard in guards]
        self.cadence = {kind: every or steps for kind, steps in recipe_cadence().items()}
        self.reference_iters = reference_iters
        self.previous: dict[tuple, list] = {}
        self.rows: list[dict] = []

    def _compare(self, kind: str, step: int, reference, find) -> None:
        """``find(previous, tol, guard) -> EigenPairs`` cold and warm for every setting; one row each, with the
        overlap of the warm run's first eigenvector with the one the previous point found."""
        for tol, guard in self.settings:
            key = (kind, tol, guard)
            for run, previous in (("cold", []), ("warm", self.previous.get(key, []))):
                pairs = find(previous, tol, guard)
                overlap = float("nan")
                if run == "warm":
                    if previous:
                        overlap = abs(dot(to_device(previous[0], pairs.vectors[0]), pairs.vectors[0]))
                    self.previous[key] = [to_host(v) for v in pairs.tracked()]
                self.rows.append({"kind": kind, "step": step, "run": f"{run} tol={tol:g} guard={guard}",
                                  "products": pairs.products, "overlap": overlap,
                                  "err1": relative(float(pairs.values[0 if kind == "sharpness" else -1]), reference[0]),
                                  "err2": relative(float(pairs.values[1 if kind == "sharpness" else 0]), reference[1])})

    def _sharpness(self, operator, step: int) -> None:
        generator, params = self.probe.generator, operator.params
        reference = lanczos_extremes(operator, params, 2, "largest", generator(), self.reference_iters).values.tolist()
        self._compare("sharpness", step, reference, lambda previous, tol, guard: lanczos_extremes(
            operator, params, 2, "largest", generator(), 100, previous, tol, guard=guard))

    def _saddle(self, operator, step: int) -> None:
        generator, params = self.probe.generator, operator.params
        values = lanczos(operator, warm_start([], params, generator()), self.reference_iters, (0, -1)).values
        self._compare("saddle", step, [float(values[-1]), float(values[0])], lambda previous, tol, guard: lanczos(
            operator, warm_start(previous, params, generator()), 100, (0, -1), tol, guard=guard))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        for kind, every in self.cadence.items():
            if step % every == 0:
                measure = self._sharpness if kind == "sharpness" else self._saddle
                done = len(self.rows)
                self.probe.run(trainer, pl_module, lambda operator: measure(operator, step))
                for row in self.rows[done:]:  # as they come: a long run shows progress
                    print(row, flush=True)


def report(rows: list[dict]) -> None:
    for kind, second in (("sharpness", "lambda_2"), ("saddle", "lambda_min")):
        print(f"\n{kind}: products and relative error vs the reference cold Lanczos (median / max over points)")
        print(f"{'run':<24}{'points':>7}{'products med':>14}{'max':>6}{'err lambda_max med':>20}{'max':>10}"
              f"{'err ' + second + ' med':>20}{'max':>10}{'overlap med':>13}")
        runs = sorted({r["run"] for r in rows if r["kind"] == kind})
        medians = {}
        for run in runs:
            chosen = [r for r in rows if r["kind"] == kind and r["run"] == run]
            products = [r["products"] for r in chosen]
            medians[run] = statistics.median(products)
            overlaps = [r["overlap"] for r in chosen if r["overlap"] == r["overlap"]]
            print(f"{run:<24}{len(chosen):>7}{medians[run]:>14.1f}{max(products):>6}"
                  f"{statistics.median(r['err1'] for r in chosen):>20.2e}{max(r['err1'] for r in chosen):>10.2e}"
                  f"{statistics.median(r['err2'] for r in chosen):>20.2e}{max(r['err2'] for r in chosen):>10.2e}"
                  f"{statistics.median(overlaps) if overlaps else float('nan'):>13.2f}")
        for run in runs:
            if run.startswith("warm"):
                cold = run.replace("warm", "cold")
                print(f"products warm/cold ({run[5:]}): {medians[run] / medians[cold]:.2f}")


def fit_recipe_with(probe: pl.Callback, max_epochs: int) -> None:
    """Train the recipe (its model, data, Adai and schedule) for ``max_epochs`` with ``probe`` as its only callback."""
    with tempfile.TemporaryDirectory() as root:
        cli = AdaiCLI(args=["--config", str(RECIPE), f"--trainer.default_root_dir={root}",
                            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                            "--trainer.callbacks=[]", f"--trainer.max_epochs={max_epochs}"], run=False)
        cli.trainer.callbacks.append(probe)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tols", nargs="+", type=float, default=[1e-4])
    parser.add_argument("--guards", nargs="+", type=int, default=[1])
    parser.add_argument("--every", type=int, help="both callbacks' cadence in steps (default: the recipe's)")
    parser.add_argument("--reference-iters", type=int, default=100, help="iterations of the cold reference")
    parser.add_argument("--max-epochs", type=int, default=15)
    args = parser.parse_args()
    probe = WarmColdProbe(args.tols, args.guards, args.every, args.reference_iters)
    fit_recipe_with(probe, args.max_epochs)
    report(probe.rows)


if __name__ == "__main__":
    main()
