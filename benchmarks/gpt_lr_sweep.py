"""The learning-rate sweep behind the optimizer configs of ``recipes/gpt_tiny.yaml`` (docs/claims.md).

    python benchmarks/gpt_lr_sweep.py                     # 9 fits of 100 steps, callbacks off
    python benchmarks/gpt_lr_sweep.py --steps 200 --out runs/gpt_sweep --data.batch_size 16   # extra args go to every fit

Fits the recipe (seed 0, its cosine schedule over ``--steps``, its validation every 50 steps, no
monitoring callbacks, no checkpoints, no test) with each optimizer at three learning rates half a
decade apart, centred on the usual values (Adai: the paper's lr 1.0 scaled down for a transformer;
SGD-momentum 0.9: Adai's lr x (1 - 0.9), the paper's correspondence; AdamW: around 3e-3, common for
models this small), and prints the final ``val/loss`` and ``val/ppl`` of each. The best lr per
optimizer on validation loss is the one the recipe (Adai) and ``recipes/optimizers/gpt_tiny/`` use;
the test split is not looked at.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's adai_lightning, not an installed one

from adai_lightning import report  # noqa: E402

RECIPE = ROOT / "recipes" / "gpt_tiny.yaml"
STEPS_PER_EPOCH = 50  # the recipe's limit_train_batches
GRID = {
    "Adai": ("adai_lightning.Adai", {}, (0.1, 0.3, 1.0)),
    "SGD": ("torch.optim.SGD", {"momentum": 0.9}, (0.01, 0.03, 0.1)),
    "AdamW": ("torch.optim.AdamW", {}, (1e-3, 3e-3, 1e-2)),
}


def fit(name: str, lr: float, steps: int, out: Path, extra: list[str]) -> dict[str, float | None]:
    class_path, init_args, _ = GRID[name]
    run_dir = out / f"{name}_lr{lr:g}"
    optimizer = json.dumps({"class_path": class_path, "init_args": {**init_args, "lr": lr}})
    command = [sys.executable, "-m", "adai_lightning", "fit", "--config", str(RECIPE), "--optimizer", optimizer,
               "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false", "--test_after_fit", "false",
               "--trainer.max_epochs", str(steps // STEPS_PER_EPOCH), "--trainer.enable_progress_bar", "false",
               "--trainer.default_root_dir", str(run_dir), *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "run.log", "w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True, env=env, cwd=ROOT)
    metrics = report.Metrics.read(report.find_metrics(run_dir))
    return {key: metrics.last(key) for key in ("val/loss", "val/ppl", "train/loss_epoch")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="steps per fit, a multiple of 50 (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("runs/gpt_sweep"))
    parser.add_argument("--optimizers", default=",".join(GRID), help="comma-separated, of %(default)s")
    options, extra = parser.parse_known_args()
    print("| optimizer | lr | final val/loss | val/ppl | last epoch's train/loss | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in options.optimizers.split(","):
        for lr in GRID[name][2]:
            started = time.time()
            result = fit(name, lr, options.steps, options.out, extra)
            print(f"| {name} | {lr:g} | {result['val/loss']:.4f} | {result['val/ppl']:.2f} | "
                  f"{result['train/loss_epoch']:.4f} | {time.time() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
