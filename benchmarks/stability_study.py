"""What ``sharpness/stability_ratio`` predicts on real training (issue 20): an lr scan of the default recipe.

    python benchmarks/stability_study.py                 # 3 optimizers x 4 lrs x 2 models, 100 steps: ~15 min CPU
    python benchmarks/stability_study.py --steps 60 --multipliers 1 16 --optimizers Adai   # a quick look

Builds ``recipes/default.yaml`` through the CLI (sklearn digits, SmallConvNet, seed 0) with constant lr
(no scheduler) at ``multiplier x`` each optimizer's recipe lr (Adai 0.5 from the recipe, SGD-M 0.1 and
Adam 1e-3 from ``recipes/optimizers/*.yaml``), with and without the BatchNorm layers. The only
callback is the product's ``HessianSharpness`` (``dense_first_steps`` every step, then every
``--every`` steps; ``--num-samples`` probe samples), extended here to also record, at each point:

- the update's component along the edge mode: ``a_t = <w, S^-1 u_t>`` with ``w`` the top eigenvector of
  ``S H S`` (the one whose eigenvalue / 2 is the ratio; for SGD ``S`` is a scalar and ``w`` is the top
  eigenvector of ``H``) and ``u_t`` the last optimizer step's change of the parameters; also
  ``a_{t-1}`` along the same ``w``. A period-2 oscillation along the mode is ``a_t a_{t-1} < 0`` with
  the mode carrying at least ``--mode-share`` of the (scaled) update;
- the training loss of every step.

Then the candidate predictions, pooled over runs with and without BatchNorm:

- spike: ratio > 1 at a point predicts a loss spike (the step's loss above ``1.5 m + 0.2``, ``m`` the
  minimum of the 10 losses before) within ``--horizon`` steps: precision and recall over points;
- period-2: the rate of mode sign flips at points with ratio > 1 against ratio <= 1;
- catapult-then-settle: a run whose ratio exceeds 1 and later falls below 1 while its loss ends below
  ``--converged`` (not at chance); how many did, and whether lambda_max or the step size fell;
- divergence: runs whose loss rose above 1.05 x its start (chance, ln 10 = 2.30) and whose last 10
  losses average at least ``--diverged`` x the start (or are not finite), against the ratio measured
  in their first 5 steps and the step the loss first rose.

Prints one line per run, the pooled tables, and writes every point to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's adai_lightning, not an installed one

from adai_lightning.callbacks import HessianSharpness  # noqa: E402
from adai_lightning.curvature.stability import linearised_step, stability_ratio  # noqa: E402
from adai_lightning.curvature.vectors import flatten  # noqa: E402

RECIPES = ROOT / "recipes"
OPTIMIZERS = ("Adai", "SGD", "Adam")
SPIKE_LOOKBACK = 10


class StudySharpness(HessianSharpness):
    """The product's HessianSharpness, also recording the loss of every step and the update along the edge mode."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.losses: list[float] = []
        self.points: list[dict[str, float]] = []
        self._before: torch.Tensor | None = None
        self._updates: list[torch.Tensor] = []  # the last two optimizer steps' parameter changes

    def _flat(self, module: pl.LightningModule) -> torch.Tensor:
        return flatten([p.detach() for p in module.parameters() if p.requires_grad]).clone()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self._before = self._flat(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = float(outputs["loss"] if isinstance(outputs, dict) else outputs)
        self.losses.append(loss)
        self._updates = [*self._updates[-1:], self._flat(pl_module) - self._before]
        if not math.isfinite(loss):
            trainer.should_stop = True  # nothing left to measure
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _measure(self, trainer: pl.Trainer, operator: Any) -> dict[str, float]:
        metrics = super()._measure(trainer, operator)
        optimizer = trainer.optimizers[0]
        step = linearised_step(optimizer, operator.params, [float(lr) for lr in self._step_lrs])
        pair = stability_ratio(operator, step, self.probe.generator(), operator.params, self._ratio_iters(),
                               tol=self.tol)
        root = flatten(step.scale).clamp(min=0).sqrt()
        mode = flatten(pair.vectors[0])
        inverse = torch.where(root > 0, 1 / root.clamp(min=1e-30), torch.zeros_like(root))
        along = [float(mode @ (inverse * u)) for u in self._updates]
        shares = [abs(a) / max(float((inverse * u).norm()), 1e-30) for a, u in zip(along, self._updates)]
        self.points.append({"step": trainer.global_step, "loss": self.losses[-1], "mode_ratio": float(pair.values[0]),
                            "along": along[-1], "along_before": along[0] if len(along) == 2 else math.nan,
                            "share": shares[-1], "share_before": shares[0] if len(shares) == 2 else math.nan,
                            "step_scale_mean": float(flatten(step.scale).mean()), **metrics})
        return metrics


def build(optimizer: str, multiplier: float, batchnorm: bool, steps: int, study: StudySharpness,
          workdir: Path) -> tuple[Any, float]:
    """The default recipe through the CLI, constant lr ``multiplier x`` the optimizer's recipe lr, only ``study``."""
    from adai_lightning.cli import AdaiCLI

    config = yaml.safe_load((RECIPES / "default.yaml").read_text())
    config.pop("lr_scheduler")
    config.pop("test_after_fit", None)
    config["trainer"].update(logger=False, callbacks=[], plugins=None, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, max_steps=steps, max_epochs=None,
                             limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(workdir))
    if optimizer != "Adai":
        config["optimizer"] = yaml.safe_load((RECIPES / "optimizers" / f"{optimizer.lower()}.yaml").read_text())["optimizer"]
    lr = multiplier * float(config["optimizer"]["init_args"]["lr"])
    config["optimizer"]["init_args"]["lr"] = lr
    path = workdir / "default.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = AdaiCLI(args=["--config", str(path)], run=False)
    if not batchnorm:
        backbone = cli.model.backbone
        for index, layer in enumerate(backbone):
            if isinstance(layer, nn.BatchNorm2d):
                backbone[index] = nn.Identity()
    cli.trainer.callbacks.append(study)
    return cli, lr


def spikes(losses: list[float]) -> list[int]:
    """Steps (1-based, as global_step after the step) whose loss jumps above 1.5 x the recent minimum + 0.2."""
    found = []
    for i in range(SPIKE_LOOKBACK, len(losses)):
        recent = min(losses[i - SPIKE_LOOKBACK:i])
        if not math.isfinite(losses[i]) or losses[i] > 1.5 * recent + 0.2:
            found.append(i + 1)
    return found


def summarise(run: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    points, losses = run["points"], run["losses"]
    tail = losses[-10:]
    rose = next((i + 1 for i, loss in enumerate(losses) if not loss <= 1.05 * losses[0]), None)
    diverged = not all(map(math.isfinite, tail)) or (rose is not None and sum(tail) / len(tail) >= args.diverged * losses[0])
    above = [p for p in points if p["sharpness/stability_ratio"] > 1]
    first_above = above[0]["step"] if above else None
    settled = None
    if above and not diverged and sum(tail) / len(tail) < args.converged:
        later = [p for p in points if p["step"] > first_above and p["sharpness/stability_ratio"] <= 1]
        settled = later[0]["step"] if later else None
    early = [p["sharpness/stability_ratio"] for p in points if p["step"] <= 5]
    return {"diverged": diverged, "rose": rose, "final_loss": sum(tail) / len(tail), "first_above": first_above,
            "settled": settled, "early_max": max(early, default=math.nan), "spikes": spikes(losses),
            "max_ratio": max((p["sharpness/stability_ratio"] for p in points), default=math.nan)}


def flips(points: list[dict[str, float]], share: float) -> tuple[int, int]:
    """(period-2 flips, points with both updates known) among ``points``."""
    known = [p for p in points if math.isfinite(p["along_before"])]
    flipped = [p for p in known if p["along"] * p["along_before"] < 0 and min(p["share"], p["share_before"]) >= share]
    return len(flipped), len(known)


def median_share(runs: list[dict[str, Any]], above: bool) -> float:
    """The median share of the (scaled) update along the edge mode at points with ratio > 1 (or <= 1)."""
    shares = sorted(p["share"] for r in runs for p in r["points"]
                    if math.isfinite(p["share"]) and (p["sharpness/stability_ratio"] > 1) == above)
    return shares[len(shares) // 2] if shares else math.nan


def evaluate(runs: list[dict[str, Any]], args: argparse.Namespace, label: str) -> list[str]:
    """The pooled prediction table of ``runs``."""
    true_positive = positives = false_negative = negatives = 0
    caught = total_spikes = 0
    above_flips = [0, 0]
    below_flips = [0, 0]
    for run in runs:
        spike_steps = run["summary"]["spikes"]
        finite = [p for p in run["points"] if math.isfinite(p["sharpness/stability_ratio"])]
        for point in finite:
            followed = any(point["step"] < s <= point["step"] + args.horizon for s in spike_steps)
            if point["sharpness/stability_ratio"] > 1:
                positives += 1
                true_positive += followed
            else:
                negatives += 1
                false_negative += followed
        for s in spike_steps:
            total_spikes += 1
            caught += any(s - args.horizon <= p["step"] < s and p["sharpness/stability_ratio"] > 1 for p in finite)
        for bucket, chosen in ((above_flips, [p for p in finite if p["sharpness/stability_ratio"] > 1]),
                               (below_flips, [p for p in finite if p["sharpness/stability_ratio"] <= 1])):
            f, n = flips(chosen, args.mode_share)
            bucket[0] += f
            bucket[1] += n
    diverged = [r for r in runs if r["summary"]["diverged"]]
    early_above = [r for r in runs if r["summary"]["early_max"] > 1]
    catapults = [r for r in runs if r["summary"]["settled"] is not None]
    rate = lambda pair: f"{pair[0]}/{pair[1]} = {pair[0] / pair[1]:.2f}" if pair[1] else "0/0"  # noqa: E731
    return [
        f"## {label}: {len(runs)} runs, {sum(len(r['points']) for r in runs)} points",
        f"spike within {args.horizon} steps after ratio > 1: precision {rate((true_positive, positives))}, "
        f"recall {rate((caught, total_spikes))}; after ratio <= 1: {rate((false_negative, negatives))}",
        f"period-2 along the edge mode (share >= {args.mode_share}): ratio > 1 {rate(above_flips)}, "
        f"ratio <= 1 {rate(below_flips)}; median share of the update in the mode: ratio > 1 "
        f"{median_share(runs, True):.3f}, ratio <= 1 {median_share(runs, False):.3f}",
        f"divergence: {len(diverged)} runs diverged; ratio > 1 in steps 1-5 in {len(early_above)} runs, "
        f"{len([r for r in early_above if r['summary']['diverged']])} of them diverged; "
        f"diverged with ratio <= 1 in steps 1-5: {len([r for r in diverged if r['summary']['early_max'] <= 1])}",
        f"catapult-then-settle (ratio > 1, later <= 1, final loss < {args.converged}): {len(catapults)} runs "
        f"of {len([r for r in runs if r['summary']['first_above'] is not None])} that went above 1",
    ]


def scale_free(point: dict[str, float]) -> float:
    """``lambda_max |w|^2``: unchanged when scale-invariant (BatchNorm-fed) weights only grow in norm."""
    return point.get("sharpness/lambda_max", math.nan) * point.get("sharpness/weight_norm", math.nan) ** 2


def run_line(run: dict[str, Any]) -> str:
    s, points = run["summary"], run["points"]
    first, last = (points[0], points[-1]) if points else ({}, {})
    get = lambda p, k: p.get(k, math.nan)  # noqa: E731
    return (f"{run['optimizer']:>4} {'BN' if run['batchnorm'] else 'noBN':>4} x{run['multiplier']:<5g} lr {run['lr']:<8.3g} "
            f"final loss {s['final_loss']:8.3g} {'DIVERGED' if s['diverged'] else 'ok':>8} | ratio step1 "
            f"{get(first, 'sharpness/stability_ratio'):7.3g} max {s['max_ratio']:7.3g} last "
            f"{get(last, 'sharpness/stability_ratio'):7.3g} | lambda_max {get(first, 'sharpness/lambda_max'):7.3g} -> "
            f"{get(last, 'sharpness/lambda_max'):7.3g} | |w| {get(first, 'sharpness/weight_norm'):6.3g} -> "
            f"{get(last, 'sharpness/weight_norm'):6.3g} | lambda_max |w|^2 {scale_free(first):7.3g} -> "
            f"{scale_free(last):7.3g} | rose {s['rose']} | spikes {len(s['spikes'])} first>1 {s['first_above']} "
            f"settled {s['settled']} | {run['seconds']:.0f} s")


def report(runs: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """The prediction tables with BatchNorm, without, and pooled."""
    lines = []
    for label, chosen in (("with BatchNorm", [r for r in runs if r["batchnorm"]]),
                          ("without BatchNorm", [r for r in runs if not r["batchnorm"]]), ("all", runs)):
        if chosen:
            lines += evaluate(chosen, args, label)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--multipliers", nargs="+", type=float, default=[0.25, 1, 4, 16])
    parser.add_argument("--models", nargs="+", default=["BN", "noBN"], choices=["BN", "noBN"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--dense", type=int, default=20, help="measure every step up to this one")
    parser.add_argument("--every", type=int, default=10, help="then every this many steps")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--lanczos-iters", type=int, default=15)
    parser.add_argument("--horizon", type=int, default=10)
    parser.add_argument("--mode-share", type=float, default=0.1)
    parser.add_argument("--converged", type=float, default=0.5)
    parser.add_argument("--diverged", type=float, default=0.95,
                        help="diverged: the loss rose above its start, and its last 10 average >= this x its start")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("stability_study.json"))
    parser.add_argument("--workdir", type=Path, default=Path("runs/stability_study"))
    parser.add_argument("--reread", type=Path, help="evaluate the runs of an earlier --out file (trains nothing)")
    args = parser.parse_args()
    if args.reread is not None:
        runs = json.loads(args.reread.read_text())["runs"]
        for run in runs:
            run["summary"] = summarise(run, args)
            print(run_line(run))
        print("\n".join(report(runs, args)))
        return
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    runs = []
    started = time.time()
    for batchnorm in [m == "BN" for m in args.models]:
        for optimizer in args.optimizers:
            for multiplier in args.multipliers:
                study = StudySharpness(every_n_train_steps=args.every, dense_first_steps=args.dense,
                                       num_samples=args.num_samples, top_k=1, lanczos_iters=args.lanczos_iters,
                                       keep_graphs=True, on_error="raise")
                begin = time.time()
                cli, lr = build(optimizer, multiplier, batchnorm, args.steps, study, args.workdir)
                pl.seed_everything(0, verbose=False)
                cli.trainer.fit(cli.model, datamodule=cli.datamodule)
                run = {"optimizer": optimizer, "batchnorm": batchnorm, "multiplier": multiplier, "lr": lr,
                       "losses": study.losses, "points": study.points, "seconds": time.time() - begin}
                run["summary"] = summarise(run, args)
                runs.append(run)
                print(run_line(run), flush=True)
    print("\n".join(report(runs, args)))
    print(f"{len(runs)} runs in {time.time() - started:.0f} s")
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}, default=str))


if __name__ == "__main__":
    main()
