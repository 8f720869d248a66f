"""Stochastic trace estimation from matrix-vector products: Hutchinson and Hutch++ (Rademacher probes).

Probes are drawn on CPU from the caller's ``torch.Generator`` (never the global RNG streams).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from adai_lightning.curvature.eigen import MatVec


class TraceEstimate(NamedTuple):
    """The estimate and its standard error (of the random part; ``nan`` with one random probe)."""

    trace: float
    stderr: float


def _rademacher(dim: int, count: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """``count`` Rademacher vectors (rows) of length ``dim``, in ``like``'s dtype and device."""
    signs = torch.randint(0, 2, (count, dim), generator=generator, dtype=torch.int64).mul_(2).sub_(1)
    return signs.to(dtype=like.dtype, device=like.device)


def _probe_mean(matvec: MatVec, probes: Tensor, project: Callable[[Tensor], Tensor]) -> TraceEstimate:
    """Mean and standard error of ``z^T P A P z`` over the probe rows, ``P = project``."""
    values = []
    for probe in probes:
        probe = project(probe)
        values.append(float(torch.dot(probe, matvec(probe))))
    samples = torch.tensor(values, dtype=torch.float64)
    stderr = float(samples.std() / len(values) ** 0.5) if len(values) > 1 else float("nan")
    return TraceEstimate(float(samples.mean()), stderr)


def hutchinson_trace(matvec: MatVec, dim: int, samples: int, generator: torch.Generator,
                     like: Tensor) -> TraceEstimate:
    """``E[z^T A z] = tr(A)`` for Rademacher ``z``; ``samples`` products."""
    if samples < 1:
        raise ValueError(f"Invalid samples: {samples}; it must be >= 1")
    return _probe_mean(matvec, _rademacher(dim, samples, generator, like), lambda z: z)


def hutch_plus_plus_trace(matvec: MatVec, dim: int, samples: int, generator: torch.Generator,
                          like: Tensor) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021) with ``samples`` products in all.

    A third of the products sketch the top of the spectrum (``Q = orth(A S)``), whose trace
    ``tr(Q^T A Q)`` is then exact; Hutchinson on the deflated ``(I - QQ^T) A (I - QQ^T)`` estimates
    the rest.  For a Hessian dominated by a few outliers this has a far smaller error than
    Hutchinson with the same budget.  The standard error is that of the Hutchinson part.
    """
    if samples < 3:
        raise ValueError(f"Invalid samples: {samples}; Hutch++ needs >= 3")
    sketch_size = samples // 3
    sketch = _rademacher(dim, sketch_size, generator, like)
    basis, _ = torch.linalg.qr(torch.stack([matvec(s) for s in sketch]).T)
    top = sum(float(torch.dot(q, matvec(q))) for q in basis.T)
    rest = _probe_mean(matvec, _rademacher(dim, samples - 2 * sketch_size, generator, like),
                       lambda z: z - basis @ (basis.T @ z))
    return TraceEstimate(top + rest.trace, rest.stderr)
