"""Lanczos's convergence guard and the tracked vectors, on operators with known spectra (float64)."""

import pytest
import torch

from adai_lightning.curvature import lanczos, lanczos_extremes
from adai_lightning.curvature.eigen import DEFAULT_GUARD, EigenPairs


def _diagonal(values):
    """A matvec on one-tensor vectors for ``diag(values)`` (its eigenvectors are the unit vectors)."""
    diagonal = torch.tensor(values, dtype=torch.float64)
    return lambda vector: [diagonal * vector[0]]


def _spectrum(head, size=50, seed=0):
    """``head`` followed by ``size - len(head)`` values uniform in [0, 2)."""
    gen = torch.Generator().manual_seed(seed)
    return [*head, *(2 * torch.rand(size - len(head), generator=gen, dtype=torch.float64)).tolist()]


def _near(indices, size, noise=1e-3, seed=1):
    """The sum of the unit vectors at ``indices`` plus ``noise`` of a random direction: a warm start that
    missed one of the eigenvectors it should hold (as after the top-2 swapped places between two points)."""
    gen = torch.Generator().manual_seed(seed)
    start = noise * torch.randn(size, generator=gen, dtype=torch.float64)
    start[list(indices)] += 1.0
    return [start]


def test_guard_stops_a_warm_start_from_reporting_the_third_eigenvalue_as_the_second():
    values = _spectrum([10.0, 5.0, 3.0])
    start = _near([0, 2], len(values))  # holds lambda_1 and lambda_3, hardly lambda_2
    unguarded = lanczos(_diagonal(values), start, 40, (-1, -2), tol=1e-4, guard=0)
    assert float(unguarded.values[-2]) == pytest.approx(3.0, rel=1e-3)  # the failure the guard exists for
    guarded = lanczos(_diagonal(values), start, 40, (-1, -2), tol=1e-4)
    assert DEFAULT_GUARD == 1
    assert guarded.values[-2:].tolist() == pytest.approx([5.0, 10.0], rel=1e-3)
    assert guarded.products < 40  # it still stopped early


def test_guard_finds_lambda_min_when_the_start_holds_only_the_next_one():
    values = _spectrum([10.0, -2.0, -1.0])
    start = _near([0, 2], len(values))
    assert float(lanczos(_diagonal(values), start, 40, (0, -1), tol=1e-4, guard=0).values[0]) == pytest.approx(-1.0, rel=1e-3)
    both = lanczos(_diagonal(values), start, 40, (0, -1), tol=1e-4)
    assert [float(both.values[0]), float(both.values[-1])] == pytest.approx([-2.0, 10.0], rel=1e-3)


def test_guard_vectors_are_the_next_ritz_vectors_and_are_tracked():
    values = _spectrum([10.0, 5.0, 3.0])
    pairs = lanczos_extremes(_diagonal(values), [torch.zeros(len(values), dtype=torch.float64)], 2, "largest",
                             torch.Generator().manual_seed(0), num_iters=50)
    assert pairs.values.tolist() == pytest.approx([10.0, 5.0], rel=1e-10)
    assert len(pairs.guard_vectors) == 1 and len(pairs.tracked()) == 3
    for vector, index in zip(pairs.tracked(), (0, 1, 2)):
        assert abs(float(vector[0][index])) == pytest.approx(1.0, abs=1e-6)
    ends = lanczos(_diagonal(values), _near([0], len(values), noise=1.0), 50, (0, -1))
    assert len(ends.guard_vectors) == 2  # one inward at each end
    assert EigenPairs(torch.zeros(1), []).tracked() == []


@pytest.mark.parametrize("guard", [-1, 1.5, True, "1"])
def test_invalid_guard_is_named(guard):
    with pytest.raises(ValueError, match="Invalid guard.*integer >= 0"):
        lanczos(_diagonal([1.0, 2.0]), [torch.ones(2, dtype=torch.float64)], 2, guard=guard)
