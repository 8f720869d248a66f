"""The learning-rate sweep and optimizer comparison of ``recipes/gpt_tiny.yaml`` (docs/claims.md).

    python benchmarks/gpt_lr_sweep.py --data.batch_size 16        # 12 fits of 100 steps (extra args go to every fit)
    python benchmarks/gpt_lr_sweep.py --steps 200 --seeds 0,1 --out runs/gpt_sweep

Fits the recipe (its cosine schedule over ``--steps``, validation every 50 steps, then a test) with
each optimizer at four learning rates half a decade apart around the usual values (Adai: the recipe's
range; SGD-momentum 0.9: Adai's lr x (1 - 0.9), the paper's correspondence; AdamW, torch's defaults
otherwise: around 1e-3, common for models this small), the inner lrs of all three first, so that each
optimizer's best lr can be seen to lie inside its bracket.
The monitoring callbacks are off except one ``HessianSharpness`` measurement (lambda_max and the
stability ratio) at the last step. Prints a row per fit (final ``val/loss``, ``val/ppl``), then, for each
optimizer's lr with the lowest mean final ``val/loss`` (the test split plays no part in the choice),
``adai-lightning compare``'s verdict tables (``adai_lightning.compare.verdict_tables``) over those fits.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's adai_lightning, not an installed one

from adai_lightning import compare, report  # noqa: E402

RECIPE = ROOT / "recipes" / "gpt_tiny.yaml"
STEPS_PER_EPOCH = 50  # the recipe's limit_train_batches
GRID = {
    "Adai": ("adai_lightning.Adai", {}, (0.03, 0.1, 0.3, 1.0)),
    "SGD": ("torch.optim.SGD", {"momentum": 0.9}, (0.01, 0.03, 0.1, 0.3)),
    "AdamW": ("torch.optim.AdamW", {}, (3e-4, 1e-3, 3e-3, 1e-2)),
}


def fit(name: str, lr: float, seed: int, steps: int, out: Path, extra: list[str]) -> Path:
    """One fit and its test; returns its run folder."""
    class_path, init_args, _ = GRID[name]
    run_dir = out / f"{name}_lr{lr:g}_seed{seed}"
    optimizer = json.dumps({"class_path": class_path, "init_args": {**init_args, "lr": lr}})
    final_sharpness = json.dumps([{"class_path": "adai_lightning.callbacks.HessianSharpness",
                                   "init_args": {"every_n_train_steps": steps, "num_samples": 16, "top_k": 1}}])
    command = [sys.executable, "-m", "adai_lightning", "fit", "--config", str(RECIPE), "--optimizer", optimizer,
               "--seed_everything", str(seed), "--trainer.callbacks", final_sharpness,
               "--trainer.enable_checkpointing", "false", "--trainer.max_epochs", str(steps // STEPS_PER_EPOCH),
               "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run_dir), *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "run.log", "w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True, env=env, cwd=ROOT)
    return run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="steps per fit, a multiple of 50 (default: %(default)s)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("runs/gpt_sweep"))
    options, extra = parser.parse_known_args()
    seeds = [int(s) for s in options.seeds.split(",")]
    runs: dict[tuple[str, float], list[Path]] = {}
    print("| optimizer | lr | seed | final val/loss | val/ppl | seconds |\n| --- | --- | --- | --- | --- | --- |")
    for level in (1, 2, 0, 3):  # the usual lrs first
        for name, (_, _, lrs) in GRID.items():
            for seed in seeds:
                started = time.time()
                run_dir = fit(name, lrs[level], seed, options.steps, options.out, extra)
                runs.setdefault((name, lrs[level]), []).append(run_dir)
                metrics = report.Metrics.read(report.find_metrics(run_dir))
                print(f"| {name} | {lrs[level]:g} | {seed} | {metrics.last('val/loss'):.4f} | "
                      f"{metrics.last('val/ppl'):.2f} | {time.time() - started:.0f} |", flush=True)

    def mean_val_loss(key: tuple[str, float]) -> float:
        return statistics.fmean(report.Metrics.read(report.find_metrics(d)).last("val/loss") for d in runs[key])

    best = {name: min((key for key in runs if key[0] == name), key=mean_val_loss) for name in GRID}
    print("\nBest lr on validation loss: " + ", ".join(f"{name} {lr:g}" for name, lr in best.values()))
    results = {name: [compare.final_values(d)[1] for d in runs[key]] for name, key in best.items()}
    labels, rows, diffs = compare.verdict_tables(results)
    print("\n" + compare.markdown(["optimizer", *labels], rows) + "\n\n" + compare.markdown(["difference", *labels], diffs))


if __name__ == "__main__":
    main()
