"""The default recipe's main job: how much longer its three monitoring callbacks make the fit.

    PYTHONPATH=. python benchmarks/main_job_time.py [--max-epochs 15] [--variants tracked cold] 2>/dev/null

Trains ``recipes/default.yaml`` with its own callbacks (through :class:`adai_lightning.cli.AdaiCLI`), times
``trainer.fit`` and, inside it, every hook of the package's callbacks (their own time, as
``benchmarks/callback_overhead.py`` does), and prints ``fit / (fit - own)``: the main job's time as a multiple
of the same training without the callbacks, measured within one fit and so hardly affected by the load of a
shared machine. Variants: ``tracked`` is the recipe as it is (warm-started Lanczos stopping at ``tol``);
``cold`` sets ``warm_start=False, tol=None`` on both Hessian callbacks (every point from a random start,
all ``lanczos_iters`` products: the behaviour before tracking). The last logged values of each curve are
printed for comparison.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

from benchmarks.callback_overhead import CALLBACKS, RECIPE, time_hooks
from adai_lightning.cli import AdaiCLI

CURVES = ("sharpness/lambda_max", "sharpness/lambda_2", "sharpness/trace", "sharpness/stability_ratio",
          "saddle/lambda_min")


def run(variant: str, max_epochs: int) -> tuple[float, float, dict[str, float]]:
    with tempfile.TemporaryDirectory() as root:
        cli = AdaiCLI(args=["--config", str(RECIPE), f"--trainer.default_root_dir={root}",
                            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                            f"--trainer.max_epochs={max_epochs}"], run=False)
        own = [0.0]
        for callback in cli.trainer.callbacks:
            if type(callback).__name__ in CALLBACKS:
                time_hooks(callback, own)
                if variant == "cold" and hasattr(callback, "warm_start"):
                    callback.warm_start, callback.tol = False, None
        start = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        seconds = time.perf_counter() - start
        last: dict[str, float] = {}
        for path in Path(root).rglob("metrics.csv"):
            with path.open() as handle:
                for row in csv.DictReader(handle):
                    last.update({key: float(row[key]) for key in CURVES if row.get(key)})
    return seconds, own[0], last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-epochs", type=int, default=15)
    parser.add_argument("--variants", nargs="+", default=["tracked", "cold"], choices=["tracked", "cold"])
    args = parser.parse_args()
    for variant in args.variants:
        seconds, own, last = run(variant, args.max_epochs)
        values = ", ".join(f"{key.split('/')[1]} {value:.5g}" for key, value in last.items())
        print(f"{variant}: fit {seconds:.1f} s, callbacks {own:.1f} s, main job / training = "
              f"{seconds / (seconds - own):.2f}; last values: {values}", flush=True)


if __name__ == "__main__":
    main()
