"""Stochastic trace estimation from matrix-vector products (Hutchinson, Rademacher probes)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from adai_lightning.curvature.eigen import MatVec


class TraceEstimate(NamedTuple):
    """The estimate and its standard error (sample std of the probes / sqrt(samples))."""

    trace: float
    stderr: float


def hutchinson_trace(matvec: MatVec, dim: int, samples: int, generator: torch.Generator,
                     like: torch.Tensor) -> TraceEstimate:
    """``E[z^T A z] = tr(A)`` for Rademacher ``z``; ``samples`` products.

    Probes are drawn on CPU from ``generator`` (never the global RNG).  With one sample the
    standard error is unknown and reported as ``nan``.
    """
    if samples < 1:
        raise ValueError(f"Invalid samples: {samples}; it must be >= 1")
    estimates = []
    for _ in range(samples):
        probe = torch.randint(0, 2, (dim,), generator=generator, dtype=torch.int64).mul_(2).sub_(1)
        probe = probe.to(dtype=like.dtype, device=like.device)
        estimates.append(float(torch.dot(probe, matvec(probe))))
    values = torch.tensor(estimates, dtype=torch.float64)
    stderr = float(values.std() / samples ** 0.5) if samples > 1 else float("nan")
    return TraceEstimate(float(values.mean()), stderr)
