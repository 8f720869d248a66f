"""Stochastic trace estimation from matrix-vector products: Hutchinson and Hutch++ (Rademacher probes).

Probes are drawn on CPU from the caller's ``torch.Generator`` (never the global RNG streams).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from adai_lightning.curvature.eigen import MatVec
from adai_lightning.curvature.vectors import Vector, add_, dot, dots, normalized, rademacher


class TraceEstimate(NamedTuple):
    """The estimate and its standard error (of the random part; ``nan`` with one random probe)."""

    trace: float
    stderr: float


def _probe_mean(matvec: MatVec, probes: Sequence[Vector], project: Callable[[Vector], Vector]) -> TraceEstimate:
    """Mean and standard error of ``z^T P A P z`` over the probes, ``P = project``."""
    values = []
    for probe in probes:
        probe = project(probe)
        values.append(dot(probe, matvec(probe)))
    samples = torch.tensor(values, dtype=torch.float64)
    stderr = float(samples.std() / len(values) ** 0.5) if len(values) > 1 else float("nan")
    return TraceEstimate(float(samples.mean()), stderr)


def hutchinson_trace(matvec: MatVec, like: Sequence[Tensor], samples: int,
                     generator: torch.Generator) -> TraceEstimate:
    """``E[z^T A z] = tr(A)`` for Rademacher ``z`` shaped like ``like``; ``samples`` products."""
    if samples < 1:
        raise ValueError(f"Invalid samples: {samples}; it must be >= 1")
    return _probe_mean(matvec, (rademacher(like, generator) for _ in range(samples)), lambda z: z)


def _orthonormal_basis(vectors: Sequence[Vector]) -> list[Vector]:
    """An orthonormal basis of the span of ``vectors`` (Gram-Schmidt twice; dependent ones dropped)."""
    basis: list[Vector] = []
    for vector in vectors:
        length = dot(vector, vector) ** 0.5
        for _ in range(2):
            for found, coefficient in zip(basis, dots(basis, vector).tolist()):
                add_(vector, found, -coefficient)
        if dot(vector, vector) ** 0.5 > 1e-10 * length:
            basis.append(normalized(vector))
    return basis


def _deflated(basis: Sequence[Vector]) -> Callable[[Vector], Vector]:
    """``z -> (I - Q Q^T) z`` for the orthonormal ``basis`` Q."""
    def project(vector: Vector) -> Vector:
        for found, coefficient in zip(basis, dots(list(basis), vector).tolist()):
            add_(vector, found, -coefficient)
        return vector
    return project


def hutch_plus_plus_trace(matvec: MatVec, like: Sequence[Tensor], samples: int,
                          generator: torch.Generator) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021) with ``samples`` products in all.

    A third of the products sketch the top of the spectrum (``Q = orth(A S)``), whose trace
    ``tr(Q^T A Q)`` is then exact; Hutchinson on the deflated ``(I - QQ^T) A (I - QQ^T)`` estimates
    the rest.  For a Hessian dominated by a few outliers this has a far smaller error than
    Hutchinson with the same budget.  The standard error is that of the Hutchinson part.
    """
    if samples < 3:
        raise ValueError(f"Invalid samples: {samples}; Hutch++ needs >= 3")
    sketch_size = samples // 3
    sketch = [rademacher(like, generator) for _ in range(sketch_size)]
    basis = _orthonormal_basis([matvec(s) for s in sketch])
    top = sum(dot(q, matvec(q)) for q in basis)
    probes = (rademacher(like, generator) for _ in range(samples - 2 * sketch_size))
    rest = _probe_mean(matvec, probes, _deflated(basis))
    return TraceEstimate(top + rest.trace, rest.stderr)
