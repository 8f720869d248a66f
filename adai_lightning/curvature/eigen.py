"""Extreme eigenpairs of a symmetric operator given only by products: Lanczos and power iteration.

Both take ``matvec(v) -> A v`` on flat vectors and a ``torch.Generator`` of their own for the start
vector, so that results are deterministic and the global RNG streams are never consumed.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]


class EigenPairs(NamedTuple):
    """Eigenvalues (float64, on CPU) and matching unit eigenvectors (rows, in the operator's dtype)."""

    values: Tensor
    vectors: Tensor


def random_unit(dim: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """A standard-normal vector drawn on CPU from ``generator``, normalised, moved next to ``like``."""
    vector = torch.randn(dim, generator=generator, dtype=torch.float64)
    return (vector / vector.norm()).to(dtype=like.dtype, device=like.device)


def lanczos(matvec: MatVec, start: Tensor, num_iters: int) -> EigenPairs:
    """All Ritz pairs of ``num_iters`` Lanczos steps with full reorthogonalisation, ascending.

    Full reorthogonalisation (twice, against every previous basis vector) keeps the basis
    orthogonal in floating point, so no spurious copies of converged eigenvalues appear.  The
    iteration stops early when the Krylov space becomes invariant (then the Ritz values are exact).
    """
    if num_iters < 1:
        raise ValueError(f"Invalid num_iters: {num_iters}; it must be >= 1")
    dim = start.numel()
    num_iters = min(num_iters, dim)
    basis = torch.zeros(num_iters, dim, dtype=start.dtype, device=start.device)
    alphas, betas = [], []
    vector = start / start.norm()
    for i in range(num_iters):
        basis[i] = vector
        product = matvec(vector)
        alpha = torch.dot(product, vector)
        alphas.append(float(alpha))
        for _ in range(2):
            product = product - basis[:i + 1].T @ (basis[:i + 1] @ product)
        beta = float(product.norm())
        if i + 1 == num_iters or beta <= 1e-10 * max(1.0, max(abs(a) for a in alphas)):
            break
        betas.append(beta)
        vector = product / beta
    size = len(alphas)
    tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if size > 1:
        off = torch.tensor(betas[:size - 1], dtype=torch.float64)
        tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
    values, coefficients = torch.linalg.eigh(tridiagonal)
    vectors = coefficients.T.to(dtype=basis.dtype, device=basis.device) @ basis[:size]
    return EigenPairs(values, vectors / vectors.norm(dim=1, keepdim=True))


def default_lanczos_iters(k: int) -> int:
    """Lanczos iterations :func:`lanczos_extremes` runs for ``k`` eigenpairs unless told otherwise."""
    return max(20, 3 * k + 10)


def lanczos_extremes(matvec: MatVec, dim: int, k: int, which: str, generator: torch.Generator, like: Tensor,
                     num_iters: int | None = None) -> EigenPairs:
    """The ``k`` largest (``which="largest"``, descending) or smallest (ascending) eigenpairs."""
    if which not in ("largest", "smallest"):
        raise ValueError(f"Invalid which: {which!r}; it must be 'largest' or 'smallest'")
    iters = num_iters if num_iters is not None else default_lanczos_iters(k)
    pairs = lanczos(matvec, random_unit(dim, generator, like), iters)
    order = torch.arange(len(pairs.values))
    order = order.flip(0)[:k] if which == "largest" else order[:k]
    return EigenPairs(pairs.values[order], pairs.vectors[order])


def power_iteration(matvec: MatVec, dim: int, generator: torch.Generator, like: Tensor, max_iters: int = 100,
                    tol: float = 1e-4, shift: float = 0.0, deflate: Tensor | None = None) -> EigenPairs:
    """The dominant (largest magnitude) eigenpair of ``A - shift I`` by power iteration.

    The returned eigenvalue is that of ``A`` (the shift added back).  ``deflate`` holds unit
    vectors (rows) already found; the iteration stays orthogonal to them, giving the next one.
    Stops when the Rayleigh quotient changes by less than ``tol`` relatively.
    """
    vector = random_unit(dim, generator, like)
    value = 0.0
    for _ in range(max_iters):
        if deflate is not None and len(deflate):
            vector = vector - deflate.T @ (deflate @ vector)
            vector = vector / vector.norm()
        product = matvec(vector) - shift * vector
        new_value = float(torch.dot(vector, product))
        norm = product.norm()
        if float(norm) == 0.0:
            break
        vector = product / norm
        converged = abs(new_value - value) <= tol * abs(new_value)
        value = new_value
        if converged:
            break
    return EigenPairs(torch.tensor([value + shift], dtype=torch.float64), vector.unsqueeze(0))


def power_top_k(matvec: MatVec, dim: int, k: int, generator: torch.Generator, like: Tensor,
                max_iters: int = 100, tol: float = 1e-4) -> EigenPairs:
    """The ``k`` largest-magnitude eigenpairs by power iteration with deflation.

    For a Hessian whose largest eigenvalue dominates (the usual case) they are the top ones;
    Lanczos is the accurate default.
    """
    values, vectors = [], torch.zeros(0, dim, dtype=like.dtype, device=like.device)
    for _ in range(k):
        pair = power_iteration(matvec, dim, generator, like, max_iters, tol, deflate=vectors)
        values.append(pair.values)
        vectors = torch.cat([vectors, pair.vectors])
    return EigenPairs(torch.cat(values), vectors)


def power_smallest(matvec: MatVec, dim: int, generator: torch.Generator, like: Tensor,
                   max_iters: int = 100, tol: float = 1e-4) -> EigenPairs:
    """The smallest algebraic eigenpair by shifted power iteration.

    First the dominant eigenvalue ``mu``; then the dominant one of ``A - |mu| I``, whose spectrum
    lies in ``[-2|mu|, 0]`` so that its dominant eigenvalue belongs to ``lambda_min``.
    """
    dominant = power_iteration(matvec, dim, generator, like, max_iters, tol)
    shift = abs(float(dominant.values[0]))
    return power_iteration(matvec, dim, generator, like, max_iters, tol, shift=shift)
