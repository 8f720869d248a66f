"""The paper's two claims measured under controlled conditions, with verdicts decided by the numbers.

    python benchmarks/claims.py                 # 256 seeds, about 2-4 minutes on one CPU core
    python benchmarks/claims.py --seeds 16 --max-steps 4000   # a quick look

Xie et al. (ICML 2022) state that (a) Adai escapes saddle points about as fast as Adam, unlike SGD,
whose escape time grows as the curvature along the escape direction shrinks, and (b) Adai, like SGD,
favours flat minima more than Adam does. Both are claims about noisy dynamics, so we measure them on
quadratics where the noise is controlled: gradient noise with covariance ``sigma^2 |H|`` (minibatch
noise follows the Hessian near a critical point, the paper's model), seeds vectorised as a batch
dimension (``seeds x dim`` tensors: SGD, SGD-M and Adam are torch's own optimizers, elementwise;
Adai's ``vbar`` is a mean over one model, so :class:`BatchedAdai` keeps one per seed and is
checked against ``adai_lightning.Adai`` in tests/test_claims.py).

Matched effective learning rates ``eta``: SGD ``lr = eta``; SGD-M ``lr = eta (1 - 0.9)``, momentum
0.9 (torch's heavy ball moves ``lr / (1 - mu)`` per unit gradient); Adai ``lr = eta`` (its momentum
is an average, the paper's Adai lr 1.0 <-> SGD-M lr 0.1); Adam ``lr = eta * sigma``, which is
``eta`` per unit gradient on the bulk directions (curvature 1, where ``sqrt(vhat) ~ sigma``).

(a) Saddle: ``dim`` coordinates, curvature ``-gamma`` along the first (the escape direction) and 1
along the others, start at the saddle point, escape = ``|x_0| >= 1``; ``gamma`` in 1, 0.1, 0.01.
(b) Minima: the first coordinate sits in a well of curvature ``k`` whose wall is where the loss has
risen by ``depth`` (``|x_0| = sqrt(2 depth / k)``), a sharp (``k = 2``) and a flat (``k = 0.5``) well
of equal depth, the same bulk and noise; the time to leave each, and the selectivity
``median(flat) / median(sharp)`` (how much longer a flat well keeps the optimizer).

A median is "censored" when more than half of the seeds had not left by ``--max-steps``; verdicts
that would need a censored number say "inconclusive".
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

OPTIMIZERS = ("SGD", "SGD-M", "Adam", "Adai")
CURVATURES = (1.0, 0.1, 0.01)


class BatchedAdai:
    """Adai (d = 1, no weight decay) on a ``(seeds, dim)`` parameter with one ``vbar`` per seed (row):
    every row is an independent run of ``adai_lightning.Adai`` on a ``dim``-element model."""

    def __init__(self, param: Tensor, lr: float, betas: tuple[float, float] = (0.1, 0.99), eps: float = 1e-3) -> None:
        self.param, self.lr, (self.beta0, self.beta2), self.eps = param, lr, betas, eps
        self.exp_avg, self.exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
        self.beta1_prod = torch.ones_like(param)
        self.steps = 0

    @torch.no_grad()
    def step(self) -> None:
        grad = self.param.grad
        self.steps += 1
        self.exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        vhat = self.exp_avg_sq / (1 - self.beta2 ** self.steps)
        vbar = vhat.mean(dim=1, keepdim=True)
        ratio = torch.where(vbar > 0, vhat / torch.where(vbar > 0, vbar, 1.0), 0.0)
        beta1 = (1 - self.beta0 * ratio).clamp(0.0, 1 - self.eps)
        self.beta1_prod.mul_(beta1)
        self.exp_avg.mul_(beta1).add_((1 - beta1) * grad)
        self.param.sub_(self.lr * self.exp_avg / (1 - self.beta1_prod))


def make_optimizer(name: str, param: Tensor, eta: float, sigma: float):
    """The optimizer ``name`` at effective learning rate ``eta`` (see the module docstring)."""
    if name == "SGD":
        return torch.optim.SGD([param], lr=eta)
    if name == "SGD-M":
        return torch.optim.SGD([param], lr=eta * (1 - 0.9), momentum=0.9)
    if name == "Adam":
        return torch.optim.Adam([param], lr=eta * sigma)
    if name == "Adai":
        return BatchedAdai(param, lr=eta)
    raise ValueError(f"Invalid optimizer: {name!r}; it must be one of {', '.join(OPTIMIZERS)}")


def first_exit(name: str, curvatures: Tensor, radius: float, seeds: int, eta: float, sigma: float,
               max_steps: int, seed: int = 0) -> Tensor:
    """Steps until ``|x_0| >= radius`` for each seed (``max_steps + 1`` if never), from ``x = 0`` on
    ``sum_i curvatures_i x_i^2 / 2`` with gradient noise ``sigma sqrt(|curvature_i|) N(0, 1)``.
    Every optimizer sees the same noise sequence (common random numbers)."""
    param = torch.zeros(seeds, len(curvatures), dtype=torch.float64, requires_grad=True)
    optimizer = make_optimizer(name, param, eta, sigma)
    generator = torch.Generator().manual_seed(seed)
    noise_scale = sigma * curvatures.abs().sqrt()
    exits = torch.full((seeds,), max_steps + 1, dtype=torch.long)
    for step in range(1, max_steps + 1):
        noise = torch.randn(seeds, len(curvatures), generator=generator, dtype=torch.float64)
        param.grad = curvatures * param.detach() + noise_scale * noise
        optimizer.step()
        left = (param.detach()[:, 0].abs() >= radius) & (exits > max_steps)
        exits[left] = step
        if step % 64 == 0 and bool((exits <= max_steps).all()):
            break
    return exits


class Median(NamedTuple):
    steps: float
    censored: bool  # more than half the seeds never left: the median is only a lower bound

    def __str__(self) -> str:
        return f"> {self.steps:.0f}" if self.censored else f"{self.steps:.0f}"


def median_exit(exits: Tensor, max_steps: int) -> Median:
    value = float(exits.double().median())
    return Median(min(value, max_steps), value > max_steps)


def saddle_escape(seeds: int, max_steps: int, eta: float = 0.1, sigma: float = 0.1, dim: int = 10,
                  curvatures: Sequence[float] = CURVATURES) -> dict[str, dict[float, Median]]:
    """Median steps to escape, per optimizer and negative curvature ``gamma``."""
    table: dict[str, dict[float, Median]] = {}
    for name in OPTIMIZERS:
        for gamma in curvatures:
            hessian = torch.tensor([-gamma] + [1.0] * (dim - 1), dtype=torch.float64)
            exits = first_exit(name, hessian, 1.0, seeds, eta, sigma, max_steps)
            table.setdefault(name, {})[gamma] = median_exit(exits, max_steps)
    return table


def minima_selection(seeds: int, max_steps: int, eta: float = 0.1, sigma: float = 1.0, dim: int = 10,
                     depth: float = 0.15, sharp: float = 2.0, flat: float = 0.5) -> dict[str, dict[str, Median]]:
    """Median steps to leave a sharp and a flat well of equal ``depth``, per optimizer."""
    table: dict[str, dict[str, Median]] = {}
    for name in OPTIMIZERS:
        for label, k in (("sharp", sharp), ("flat", flat)):
            hessian = torch.tensor([k] + [1.0] * (dim - 1), dtype=torch.float64)
            exits = first_exit(name, hessian, math.sqrt(2 * depth / k), seeds, eta, sigma, max_steps)
            table.setdefault(name, {})[label] = median_exit(exits, max_steps)
    return table


def scaling_exponent(row: dict[float, Median]) -> float | None:
    """Least-squares slope of log(median steps) against log(1 / gamma); None if any median is censored."""
    if any(m.censored for m in row.values()):
        return None
    xs = [math.log(1 / gamma) for gamma in row]
    ys = [math.log(m.steps) for m in row.values()]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


class Verdict(NamedTuple):
    claim: str
    measured: str
    holds: bool | None  # None: inconclusive (a censored median)

    @property
    def word(self) -> str:
        return "inconclusive" if self.holds is None else "holds" if self.holds else "does not hold here"


def _decide(test: Callable[[], bool], *needed: object) -> bool | None:
    return None if any(n is None for n in needed) else test()


def saddle_verdicts(table: dict[str, dict[float, Median]]) -> list[Verdict]:
    slopes = {name: scaling_exponent(row) for name, row in table.items()}
    shown = ", ".join(f"{n} {s:.2f}" if s is not None else f"{n} censored" for n, s in slopes.items())
    ratios = {gamma: (table["Adai"][gamma], table["Adam"][gamma]) for gamma in table["Adai"]}
    censored = any(a.censored or b.censored for a, b in ratios.values())
    ratio_text = ", ".join(f"gamma {g:g}: {a.steps / b.steps:.2f}" for g, (a, b) in ratios.items())
    sgd, adai = slopes["SGD"], slopes["Adai"]
    return [
        Verdict("SGD's escape time grows as the curvature along the escape direction shrinks "
                "(exponent of median steps vs 1/|gamma| >= 0.5)", f"exponents: {shown}",
                _decide(lambda: sgd >= 0.5, sgd)),
        Verdict("Adai escapes saddle points about as fast as Adam (median ratio Adai / Adam within [0.5, 2] "
                "at every curvature)", f"Adai / Adam: {ratio_text}",
                None if censored else all(0.5 <= a.steps / b.steps <= 2 for a, b in ratios.values())),
        Verdict("Adai's escape time depends less on the curvature than SGD's (exponent at least 0.25 smaller)",
                f"Adai {adai if adai is None else round(adai, 2)} vs SGD {sgd if sgd is None else round(sgd, 2)}",
                _decide(lambda: adai <= sgd - 0.25, adai, sgd)),
    ]


class Bound(NamedTuple):
    """A ratio of medians: exact, or (``lower``) only known to be at least ``value``."""

    value: float
    lower: bool

    def __str__(self) -> str:
        return f">= {self.value:.1f}" if self.lower else f"{self.value:.1f}"


def selectivity(row: dict[str, Median]) -> Bound | None:
    """``median(flat) / median(sharp)``; a lower bound when only the flat median is censored."""
    sharp, flat = row["sharp"], row["flat"]
    return None if sharp.censored else Bound(flat.steps / sharp.steps, flat.censored)


def greater(a: Bound | None, b: Bound | None) -> bool | None:
    """Whether ``a > b``, or None when the bounds cannot tell."""
    if a is None or b is None:
        return None
    if not b.lower and a.value > b.value:
        return True  # a is at least a.value
    if not a.lower and (b.value >= a.value):
        return False  # b is at least b.value >= a
    return None


def minima_verdicts(table: dict[str, dict[str, Median]]) -> list[Verdict]:
    chosen = {name: selectivity(row) for name, row in table.items()}
    shown = ", ".join(f"{n} {s}" if s is not None else f"{n} censored" for n, s in chosen.items())
    return [
        Verdict("SGD favours flat minima more than Adam (leaves a sharp well sooner, relative to a flat one)",
                f"median(flat) / median(sharp): {shown}", greater(chosen["SGD"], chosen["Adam"])),
        Verdict("Adai, like SGD, favours flat minima more than Adam", f"Adai {chosen['Adai']} vs Adam {chosen['Adam']}",
                greater(chosen["Adai"], chosen["Adam"])),
    ]


def markdown(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def report(saddle: dict, minima: dict, verdicts: list[Verdict], seeds: int, max_steps: int, seconds: float) -> str:
    curvatures = list(next(iter(saddle.values())))
    parts = [
        f"Seeds: {seeds} per cell, at most {max_steps} steps; {seconds:.0f} s.",
        "",
        "(a) Median steps to escape a saddle (negative curvature -gamma along the escape direction):",
        markdown(["optimizer", *(f"gamma {g:g}" for g in curvatures), "exponent vs 1/gamma"],
                 [[name, *(str(row[g]) for g in curvatures),
                   "censored" if scaling_exponent(row) is None else f"{scaling_exponent(row):.2f}"]
                  for name, row in saddle.items()]),
        "",
        "(b) Median steps to leave a well of equal depth (sharp: curvature 2, flat: 0.5):",
        markdown(["optimizer", "sharp", "flat", "flat / sharp"],
                 [[name, str(row["sharp"]), str(row["flat"]), str(selectivity(row) or "censored")]
                  for name, row in minima.items()]),
        "",
        "The paper's statements, measured:",
        markdown(["paper's statement", "measured", "verdict"], [[v.claim, v.measured, v.word] for v in verdicts]),
    ]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=256, help="runs per cell, vectorised (default: %(default)s)")
    parser.add_argument("--max-steps", type=int, default=20000, help="cap per run (default: %(default)s)")
    options = parser.parse_args(argv)
    if options.seeds < 1 or options.max_steps < 1:
        parser.error("Invalid --seeds or --max-steps: both must be >= 1")
    torch.set_num_threads(1)
    started = time.time()
    saddle = saddle_escape(options.seeds, options.max_steps)
    minima = minima_selection(options.seeds, options.max_steps)
    verdicts = saddle_verdicts(saddle) + minima_verdicts(minima)
    text = report(saddle, minima, verdicts, options.seeds, options.max_steps, time.time() - started)
    print(text)
    return text


if __name__ == "__main__":
    main()
