"""When Adai needs a learning-rate warmup: a quadratic with curvature 10 to 40, 30 seeds.

    PYTHONPATH=. python benchmarks/warmup_toy.py [--seeds 30] [--steps 300] [--dims 1]

Each seed draws curvatures ``h ~ U(10, 40)`` (``--dims`` of them) and a start ``x0 ~ N(0, 1)``, then
minimises ``f(x) = sum(h * x**2) / 2`` from exact gradients with Adai at its default lr 1.0 (with and
without a linear warmup over W steps) and momentum SGD at lr 0.1, momentum 0.9 (the step Adai's lr 1.0
corresponds to in steady state). A run diverges when ``f`` ends above ``f(x0)``, exceeds ``1e6 f(x0)``
or is not finite. Also printed: the size of the first step of each, relative to the gradient.

Adai's bias correction makes its first step a full ``lr * g`` (``m / (1 - P)`` with ``m = (1 - beta1) g``,
``P = beta1``), 10x momentum SGD's ``0.1 * g``: ``x1 = (1 - lr h) x0`` grows wherever ``lr * h > 2``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch

from adai_lightning.optim import Adai

RUNS: dict[str, tuple[Callable[[list[torch.Tensor]], torch.optim.Optimizer], int]] = {
    "Adai lr 1.0": (lambda ps: Adai(ps), 0),
    "Adai lr 1.0, warmup 10": (lambda ps: Adai(ps), 10),
    "Adai lr 1.0, warmup 20": (lambda ps: Adai(ps), 20),
    "Adai lr 1.0, warmup 30": (lambda ps: Adai(ps), 30),
    "Adai lr 0.5": (lambda ps: Adai(ps, lr=0.5), 0),
    "Adai lr 0.25": (lambda ps: Adai(ps, lr=0.25), 0),
    "Adai lr 0.05": (lambda ps: Adai(ps, lr=0.05), 0),
    "SGD-M lr 0.1": (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), 0),
}


def problem(seed: int, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    curvature = 10 + 30 * torch.rand(dims, generator=gen, dtype=torch.float64)
    return curvature, torch.randn(dims, generator=gen, dtype=torch.float64)


def trajectory(make: Callable, warmup: int, curvature: torch.Tensor, start: torch.Tensor, steps: int):
    """Yield ``(f(x_t), |x_t - x_{t-1}| / |g_{t-1}|)`` after each step (lr warmed up linearly over ``warmup``)."""
    x = torch.nn.Parameter(start.clone())
    optimizer = make([x])
    base_lr = optimizer.param_groups[0]["lr"]
    for t in range(steps):
        if warmup:
            optimizer.param_groups[0]["lr"] = base_lr * min(1.0, (t + 1) / warmup)
        before = x.detach().clone()
        x.grad = curvature * before
        optimizer.step()
        yield 0.5 * float((curvature * x.detach() ** 2).sum()), float((x.detach() - before).norm() / x.grad.norm())


def diverges(make: Callable, warmup: int, curvature: torch.Tensor, start: torch.Tensor, steps: int) -> bool:
    initial = 0.5 * float((curvature * start**2).sum())
    loss = initial
    for loss, _ in trajectory(make, warmup, curvature, start, steps):
        if not math.isfinite(loss) or loss > 1e6 * initial:
            return True
    return loss > initial


def first_step(make: Callable, warmup: int) -> float:
    """``|x1 - x0| / |g0|``: the first step relative to the gradient."""
    return next(trajectory(make, warmup, torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64), 1))[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--dims", type=int, default=1)
    args = parser.parse_args()
    problems = [problem(seed, args.dims) for seed in range(args.seeds)]
    beyond_sgd = [s for s, (h, _) in enumerate(problems) if float(h.max()) > 2 * (1 + 0.9) / 0.1]
    print(f"quadratic, {args.dims} curvature(s) ~ U(10, 40) per seed, {args.seeds} seeds, {args.steps} steps")
    print(f"seeds with a curvature above SGD-M's stability limit 2 (1 + 0.9) / 0.1 = 38: {beyond_sgd}")
    for name, (make, warmup) in RUNS.items():
        failed = [s for s, (h, x0) in enumerate(problems) if diverges(make, warmup, h, x0, args.steps)]
        step = first_step(make, warmup)
        print(f"{name:<24} first step {step:.2f} |g|   diverged {len(failed):>2}/{args.seeds}: {failed}")


if __name__ == "__main__":
    main()
