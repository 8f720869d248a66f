"""Acceptance of SaddleEscapeMonitor's plateau/escape events on full-length recipe runs (issue 12, item 1).

    python benchmarks/saddle_escapes.py                   # 18 fits (2 recipes x Adai, SGD, Adam x 3 seeds), ~2 min
    python benchmarks/saddle_escapes.py --with-curvature  # the monitor's Hessian cadence on too (~15 min)

Runs ``recipes/saddle_deep_linear.yaml`` and ``recipes/default.yaml`` with each optimizer (the
configs ``adai-lightning compare`` uses) and seeds 0-2, with the recipe's own SaddleEscapeMonitor
settings (the other callbacks and the loggers off; its Hessian cadence off unless ``--with-curvature``:
the plateau detector reads the training losses only), records every training loss, and checks the
monitor's escape events against the truth:

- saddle recipe: the loss sits on plateaus at the levels ``L_k = sum_{j > k} s_j^2`` (the teacher's
  squared singular values not yet learned: 29.73, 4.73, 0.73, 0.09); drop ``k`` happens when the
  running median of the loss (centred, 25 steps) first falls below the log-midpoint
  ``sqrt(L_{k-1} L_k)``; plateau ``k`` lasts from drop ``k - 1`` (step 0 for the first) to drop ``k``.
  Required: >= 90 % of the drops detected, no event that matches no drop, no two events for one
  drop, and each matched event's ``escape_steps`` within 25 % of its plateau's true length.
- default recipe: zero events after convergence (after the median loss first falls below 10 % of its
  start); it has no plateau at all, so every event there would be false.

Prints one line per run and the totals; exits 1 if a requirement fails.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's adai_lightning, not an installed one
RECIPES = ROOT / "recipes"
OPTIMIZERS = ("Adai", "SGD", "Adam")
SMOOTHING = 25


class LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


def fit(recipe: str, optimizer: str, seed: int, workdir: Path,
        curvature: bool) -> tuple[list[float], list[dict[str, int]], Any]:
    """One full-length fit with only the recipe's SaddleEscapeMonitor: the losses, its events, the datamodule."""
    from adai_lightning.cli import AdaiCLI
    from adai_lightning.compare import optimizer_args

    path = RECIPES / f"{recipe}.yaml"
    config = yaml.safe_load(path.read_text())
    trainer = config["trainer"]
    trainer["callbacks"] = [c for c in trainer["callbacks"] if c["class_path"].endswith("SaddleEscapeMonitor")]
    if not curvature:
        trainer["callbacks"][0]["init_args"]["every_n_train_steps"] = 10 ** 9
    trainer.update(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=str(workdir))
    config.pop("test_after_fit", None)
    copy = workdir / path.name  # same file name: compare's per-recipe optimizer configs are found by it
    copy.write_text(yaml.safe_dump(config))
    args = ["--config", str(copy), "--seed_everything", str(seed),
            *optimizer_args(optimizer, path, RECIPES / "optimizers")]
    cli = AdaiCLI(args=args, run=False)
    recorder = LossRecorder()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    monitor = next(c for c in cli.trainer.callbacks if type(c).__name__ == "SaddleEscapeMonitor")
    return recorder.losses, monitor.detector.escapes, cli.datamodule


def centred_median(losses: list[float], window: int = SMOOTHING) -> list[float]:
    half = window // 2
    return [statistics.median(losses[max(0, i - half):i + half + 1]) for i in range(len(losses))]


def true_plateaus(losses: list[float], singular_values: list[float]) -> list[tuple[int, int]]:
    """``(drop step, plateau length)`` for each drop the run made, from the teacher's levels."""
    squares = sorted((s * s for s in singular_values), reverse=True)
    levels = [sum(squares[k:]) for k in range(len(squares) + 1)]  # the last level is 0
    smooth, drops, previous = centred_median(losses), [], 0
    for k in range(1, len(levels)):
        threshold = math.sqrt(levels[k - 1] * levels[k]) if levels[k] > 0 else levels[k - 1] / 3
        step = next((i for i, v in enumerate(smooth) if v < threshold), None)
        if step is None:
            break
        drops.append((step, step - previous))
        previous = step
    return drops


def check_saddle(losses: list[float], events: list[dict[str, int]], singular_values: list[float]) -> dict[str, Any]:
    truth = true_plateaus(losses, singular_values)
    matched: dict[int, dict[str, int]] = {}
    false, duplicates, off = 0, 0, []
    for event in events:
        nearest = min(range(len(truth)), key=lambda k: abs(truth[k][0] - event["end"]), default=None)
        if nearest is None or abs(truth[nearest][0] - event["end"]) > 0.25 * truth[nearest][1]:
            false += 1
        elif nearest in matched:
            duplicates += 1
        else:
            matched[nearest] = event
            error = abs(event["length"] - truth[nearest][1]) / truth[nearest][1]
            off.append(error)
    return {"drops": len(truth), "detected": len(matched), "false": false, "duplicates": duplicates,
            "worst_length_error": max(off, default=0.0), "truth": truth,
            "events": [(e["start"], e["end"], e["length"]) for e in events]}


def check_converged(losses: list[float], events: list[dict[str, int]]) -> dict[str, Any]:
    smooth = centred_median(losses)
    converged = next((i for i, v in enumerate(smooth) if v < 0.1 * smooth[0]), len(losses))
    return {"events": len(events), "after_convergence": sum(e["end"] >= converged for e in events),
            "converged_at": converged}


def main() -> int:
    import tempfile

    curvature = "--with-curvature" in sys.argv[1:]
    torch.set_num_threads(1)
    totals = {"drops": 0, "detected": 0, "false": 0, "duplicates": 0, "worst": 0.0, "post": 0, "events": 0}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in ("saddle_deep_linear", "default"):
            for optimizer in OPTIMIZERS:
                for seed in range(3):
                    workdir = Path(tmp) / f"{recipe}_{optimizer}_{seed}"
                    workdir.mkdir()
                    losses, events, data = fit(recipe, optimizer, seed, workdir, curvature)
                    if recipe == "saddle_deep_linear":
                        result = check_saddle(losses, events, list(data.hparams.singular_values))
                        for key in ("drops", "detected", "false", "duplicates"):
                            totals[key] += result[key]
                        totals["worst"] = max(totals["worst"], result["worst_length_error"])
                        print(f"{recipe} {optimizer} seed {seed}: true (drop, length) {result['truth']}; "
                              f"events (start, end, length) {result['events']}; worst length error "
                              f"{result['worst_length_error']:.0%}", flush=True)
                    else:
                        result = check_converged(losses, events)
                        totals["post"] += result["after_convergence"]
                        totals["events"] += result["events"]
                        print(f"{recipe} {optimizer} seed {seed}: {result['events']} events, "
                              f"{result['after_convergence']} after convergence (step {result['converged_at']})",
                              flush=True)
    ok = (totals["detected"] >= 0.9 * totals["drops"] and totals["false"] == 0 and totals["duplicates"] == 0
          and totals["worst"] <= 0.25 and totals["post"] == 0)
    print(f"saddle_deep_linear: {totals['detected']}/{totals['drops']} drops detected, {totals['false']} false, "
          f"{totals['duplicates']} duplicate events, worst escape_steps error {totals['worst']:.0%}; "
          f"default: {totals['events']} events, {totals['post']} after convergence -> {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
