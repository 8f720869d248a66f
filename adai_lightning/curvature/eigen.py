"""Extreme eigenpairs of a symmetric operator given only by products: Lanczos and power iteration.

Both take ``matvec(v) -> A v`` on vectors in the parameters' layout (lists of tensors, see
:mod:`~adai_lightning.curvature.vectors`) and a ``torch.Generator`` of their own for random start
vectors, so that results are deterministic and the global RNG streams are never consumed.

Lanczos keeps its basis (one vector per iteration: ``num_iters`` x the local shard) on the
parameters' device, or in host memory with ``host_basis=True``. It can start from the previous
cadence point's eigenvectors (``previous``: tracking instead of re-discovery) and stop as soon as the
Ritz values it is asked for, and ``guard`` more inward at each end, have converged (``tol``).

Why the guard: a warm start lies close to the previous top eigenvectors, so the Krylov space holds them
after one or two products while the next eigenvector may not be in it yet; the wanted Ritz values then
look converged to the wrong eigenvalue (measured on the default recipe: a warm top-2 reported lambda_3,
2.07, as lambda_2, 2.57; a cold lambda_min off by its own size). Requiring one more Ritz value inward to
converge too (``guard=1``, default) keeps the run going until the end of the spectrum is resolved, and
the guard's Ritz vectors are tracked as well (``EigenPairs.tracked``) so the next point starts with them.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from adai_lightning.curvature.vectors import (Vector, add_, combination, dot, dots, normalized, numel, random_unit,
                                              scaled, to_device, to_host)

MatVec = Callable[[Vector], Vector]
#: Ritz values beyond the wanted ones, at each end, that must converge too before Lanczos stops early.
DEFAULT_GUARD = 1
#: The weight of a fresh random direction in a warm start (relative to the previous eigenvectors): enough
#: for Lanczos to find a new top direction, small enough to keep the head start.
WARM_START_NOISE = 0.1


class EigenPairs(NamedTuple):
    """Eigenvalues (float64, on CPU), their unit eigenvectors (in the parameters' layout), the products used,
    and the Ritz vectors of the guard (see :func:`lanczos`)."""

    values: Tensor
    vectors: list[Vector]
    products: int = 0
    guard_vectors: tuple[Vector, ...] = ()

    def tracked(self) -> list[Vector]:
        """The vectors to warm-start the next cadence point from: the eigenvectors and the guard's."""
        return [*self.vectors, *self.guard_vectors]


def _tridiagonal(alphas: Sequence[float], betas: Sequence[float]) -> Tensor:
    matrix = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if len(alphas) > 1:
        off = torch.tensor(betas[:len(alphas) - 1], dtype=torch.float64)
        matrix += torch.diag(off, 1) + torch.diag(off, -1)
    return matrix


def _converged(values: Tensor, coefficients: Tensor, beta: float, want: Sequence[int], tol: float) -> bool:
    """Whether every wanted Ritz value is within ``tol`` (relative to the largest magnitude) of an eigenvalue.

    The residual of Ritz pair ``j`` is ``beta |s_last,j|`` (exact in exact arithmetic); the eigenvalue error is
    at most the residual and, away from other eigenvalues, at most residual^2 / gap (the gap to the nearest
    other Ritz value)."""
    if len(values) < 2:
        return False
    scale = float(values.abs().max())
    for index in want:
        residual = beta * abs(float(coefficients[-1, index]))
        others = torch.cat([values[:index % len(values)], values[index % len(values) + 1:]])
        gap = float((others - values[index]).abs().min())
        if min(residual, residual ** 2 / gap if gap > 0 else residual) > tol * scale:
            return False
    return True


def _guarded(want: Sequence[int], guard: int) -> list[int]:
    """``guard`` indices inward of the wanted ones at each end they touch (negative: from the top)."""
    top = [index for index in want if index < 0]
    bottom = [index for index in want if index >= 0]
    extra = [min(top) - 1 - i for i in range(guard)] if top else []
    extra += [max(bottom) + 1 + i for i in range(guard)] if bottom else []
    return extra


def _orthogonalise(product: Vector, basis: Sequence[Vector], host_basis: bool) -> None:
    """Subtract the projection of ``product`` on the (orthonormal) ``basis`` in place, twice (classical
    Gram-Schmidt twice keeps the basis orthogonal in floating point, so no spurious copies of converged
    eigenvalues appear)."""
    for _ in range(2):
        if host_basis:
            for vector in basis:
                on_device = to_device(vector, product)
                add_(product, on_device, -dot(on_device, product))
        else:
            for vector, coefficient in zip(basis, dots(basis, product).tolist()):
                add_(product, vector, -coefficient)


def lanczos(matvec: MatVec, start: Vector, num_iters: int, want: Sequence[int] = (-1,), tol: float | None = None,
            host_basis: bool = False, guard: int = DEFAULT_GUARD) -> EigenPairs:
    """Lanczos with full reorthogonalisation: all Ritz values (ascending) and the Ritz vectors at ``want``
    (indices into the ascending values, e.g. ``(-1,)`` the largest, ``(0, -1)`` both ends).

    Runs ``num_iters`` steps, fewer when the Krylov space becomes invariant (the Ritz values are then
    exact) or, with ``tol``, when every wanted Ritz value and ``guard`` more inward at each end are within
    ``tol`` (relative) of an eigenvalue; the guard's Ritz vectors are returned in ``guard_vectors``.
    """
    if num_iters < 1:
        raise ValueError(f"Invalid num_iters: {num_iters}; it must be >= 1")
    if tol is not None and not tol > 0:
        raise ValueError(f"Invalid tol: {tol!r}; it must be a number > 0 (or None)")
    if not isinstance(guard, int) or isinstance(guard, bool) or guard < 0:
        raise ValueError(f"Invalid guard: {guard!r}; it must be an integer >= 0")
    guarded = _guarded(want, guard)
    checked = [*want, *guarded]
    num_iters = min(num_iters, numel(start))
    basis: list[Vector] = []
    alphas: list[float] = []
    betas: list[float] = []
    vector = normalized(start)
    for i in range(num_iters):
        basis.append(to_host(vector) if host_basis else vector)
        product = matvec(vector)
        alphas.append(dot(product, vector))
        _orthogonalise(product, basis, host_basis)
        beta = dot(product, product) ** 0.5
        breakdown = beta <= 1e-10 * max(1.0, max(abs(a) for a in alphas))
        if i + 1 == num_iters or breakdown:
            break
        if tol is not None and len(alphas) > len(checked):
            values, coefficients = torch.linalg.eigh(_tridiagonal(alphas, betas))
            if _converged(values, coefficients, beta, checked, tol):
                break
        betas.append(beta)
        vector = scaled(product, 1.0 / beta)
    values, coefficients = torch.linalg.eigh(_tridiagonal(alphas, betas))

    def ritz_vectors(indices: Sequence[int]) -> list[Vector]:
        return [_ritz_vector(basis, coefficients[:, index], start) for index in indices
                if -len(values) <= index < len(values)]

    return EigenPairs(values, ritz_vectors(want), len(alphas), tuple(ritz_vectors(guarded)))


def _ritz_vector(basis: Sequence[Vector], coefficients: Tensor, like: Vector) -> Vector:
    """``sum_j c_j basis_j``, normalised, on the device of ``like``."""
    total = [torch.zeros_like(t) for t in like]
    for vector, coefficient in zip(basis, coefficients.tolist()):
        add_(total, to_device(vector, like), coefficient)
    return normalized(total)


def default_lanczos_iters(k: int) -> int:
    """Lanczos iterations :func:`lanczos_extremes` runs for ``k`` eigenpairs unless told otherwise."""
    return max(20, 3 * k + 10)


def warm_start(previous: Sequence[Vector], like: Sequence[Tensor], generator: torch.Generator) -> Vector:
    """A start vector near the span of ``previous`` (the last point's unit eigenvectors, summed) with a
    fresh random direction of relative weight :data:`WARM_START_NOISE`; a random unit vector without them."""
    fresh = random_unit(like, generator)
    if not previous:
        return fresh
    total = to_device(previous[0], like)
    for vector in previous[1:]:
        total = combination(total, to_device(vector, like))
    return combination(normalized(total), fresh, WARM_START_NOISE)


def lanczos_extremes(matvec: MatVec, like: Sequence[Tensor], k: int, which: str, generator: torch.Generator,
                     num_iters: int | None = None, previous: Sequence[Vector] = (), tol: float | None = None,
                     host_basis: bool = False, guard: int = DEFAULT_GUARD) -> EigenPairs:
    """The ``k`` largest (``which="largest"``, descending) or smallest (ascending) eigenpairs.

    ``previous``: eigenvectors of a nearby operator to start from (see :func:`warm_start`); ``tol``: stop
    when the ``k`` Ritz values and ``guard`` more have converged to that relative accuracy (at most
    ``num_iters`` products; see :func:`lanczos`).
    """
    if which not in ("largest", "smallest"):
        raise ValueError(f"Invalid which: {which!r}; it must be 'largest' or 'smallest'")
    iters = num_iters if num_iters is not None else default_lanczos_iters(k)
    want = [-1 - i for i in range(k)] if which == "largest" else list(range(k))
    pairs = lanczos(matvec, warm_start(previous, like, generator), iters, want, tol, host_basis, guard)
    found = len(pairs.vectors)
    order = torch.arange(len(pairs.values))
    order = order.flip(0)[:found] if which == "largest" else order[:found]
    return pairs._replace(values=pairs.values[order])


def power_iteration(matvec: MatVec, like: Sequence[Tensor], generator: torch.Generator, max_iters: int = 100,
                    tol: float = 1e-4, shift: float = 0.0, deflate: Sequence[Vector] = ()) -> EigenPairs:
    """The dominant (largest magnitude) eigenpair of ``A - shift I`` by power iteration.

    The returned eigenvalue is that of ``A`` (the shift added back).  ``deflate`` holds unit
    vectors already found; the iteration stays orthogonal to them, giving the next one.
    Stops when the Rayleigh quotient changes by less than ``tol`` relatively.
    """
    vector = random_unit(like, generator)
    value, products = 0.0, 0
    for _ in range(max_iters):
        if deflate:
            for found, coefficient in zip(deflate, dots(list(deflate), vector).tolist()):
                add_(vector, found, -coefficient)
            vector = normalized(vector)
        product = combination(matvec(vector), vector, -shift)
        products += 1
        new_value = dot(vector, product)
        length = dot(product, product) ** 0.5
        if length == 0.0:
            break
        vector = scaled(product, 1.0 / length)
        converged = abs(new_value - value) <= tol * abs(new_value)
        value = new_value
        if converged:
            break
    return EigenPairs(torch.tensor([value + shift], dtype=torch.float64), [vector], products)


def power_top_k(matvec: MatVec, like: Sequence[Tensor], k: int, generator: torch.Generator,
                max_iters: int = 100, tol: float = 1e-4) -> EigenPairs:
    """The ``k`` largest-magnitude eigenpairs by power iteration with deflation.

    For a Hessian whose largest eigenvalue dominates (the usual case) they are the top ones;
    Lanczos is the accurate default.
    """
    values, vectors, products = [], [], 0
    for _ in range(k):
        pair = power_iteration(matvec, like, generator, max_iters, tol, deflate=vectors)
        values.append(pair.values)
        vectors.extend(pair.vectors)
        products += pair.products
    return EigenPairs(torch.cat(values), vectors, products)


def power_smallest(matvec: MatVec, like: Sequence[Tensor], generator: torch.Generator,
                   max_iters: int = 100, tol: float = 1e-4) -> EigenPairs:
    """The smallest algebraic eigenpair by shifted power iteration.

    First the dominant eigenvalue ``mu``; then the dominant one of ``A - |mu| I``, whose spectrum
    lies in ``[-2|mu|, 0]`` so that its dominant eigenvalue belongs to ``lambda_min``.
    """
    dominant = power_iteration(matvec, like, generator, max_iters, tol)
    shift = abs(float(dominant.values[0]))
    low = power_iteration(matvec, like, generator, max_iters, tol, shift=shift)
    return low._replace(products=dominant.products + low.products)
