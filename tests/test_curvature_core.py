"""Curvature core against the dense Hessian of tiny float64 models."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from adai_lightning.curvature import (HessianOperator, flatten, hutch_plus_plus_trace, hutchinson_trace,
                                      lanczos_extremes, power_smallest, power_top_k, unflatten)
from adai_lightning.curvature.vectors import dot


@pytest.fixture(params=[True, False], ids=["reused-graph", "fresh-graph"])
def reuse_graph(request):
    """Every core test runs with the first-order graph kept across products and rebuilt for each."""
    return request.param


def _problem(seed=0, reuse_graph=False):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    batches = [(torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)) for _ in range(3)]

    def loss_fn(batch):
        inputs, targets = batch
        return nn.functional.mse_loss(model(inputs), targets)

    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]

    def flat_loss(vector):
        values = dict(zip(names, unflatten(vector, params)))
        return sum(nn.functional.mse_loss(functional_call(model, values, (x,)), y) for x, y in batches) / len(batches)

    dense = torch.autograd.functional.hessian(flat_loss, flatten([p.detach() for p in params]))
    return HessianOperator(params, loss_fn, batches, reuse_graph=reuse_graph, hvp="exact"), dense, params


def _matrix(dense):
    """``dense`` as an operator on one-entry vectors (the layout of a single flat parameter)."""
    return lambda vector: [dense @ vector[0]]


def _close(estimate, exact, rel=0.01):
    assert abs(estimate - exact) <= rel * abs(exact), (estimate, exact)


def test_hvp_equals_dense_hessian_product(reuse_graph):
    operator, dense, params = _problem(reuse_graph=reuse_graph)
    vector = torch.randn(operator.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    product = operator(unflatten(vector, params))
    assert [p.shape for p in product] == [p.shape for p in params]  # the parameters' own layout
    torch.testing.assert_close(flatten(product), dense @ vector)
    assert all(p.grad is None for p in params)


def test_lanczos_top_k_and_smallest_match_eigvalsh(reuse_graph):
    operator, dense, params = _problem(reuse_graph=reuse_graph)
    exact = torch.linalg.eigvalsh(dense)
    assert exact[0] < 0 < exact[-1]
    top = lanczos_extremes(operator, params, 3, "largest", torch.Generator().manual_seed(0))
    for estimate, value in zip(top.values.tolist(), exact.flip(0)[:3].tolist()):
        _close(estimate, value)
    low = lanczos_extremes(operator, params, 1, "smallest", torch.Generator().manual_seed(0))
    _close(float(low.values[0]), float(exact[0]))
    # eigenvectors: Rayleigh residual small
    vector = flatten(top.vectors[0])
    assert float((dense @ vector - top.values[0] * vector).norm()) < 1e-3 * float(exact.abs().max())


def test_lanczos_is_deterministic_and_leaves_global_rng_alone(reuse_graph):
    operator, _, params = _problem(reuse_graph=reuse_graph)
    state = torch.get_rng_state()
    first = lanczos_extremes(operator, params, 2, "largest", torch.Generator().manual_seed(3))
    second = lanczos_extremes(operator, params, 2, "largest", torch.Generator().manual_seed(3))
    assert torch.equal(first.values, second.values)
    assert torch.equal(torch.get_rng_state(), state)


def test_power_iteration_top_and_shifted_smallest(reuse_graph):
    operator, dense, params = _problem(reuse_graph=reuse_graph)
    exact = torch.linalg.eigvalsh(dense)
    top = power_top_k(operator, params, 1, torch.Generator().manual_seed(0), max_iters=500, tol=1e-8)
    _close(float(top.values[0]), float(exact[-1]))
    low = power_smallest(operator, params, torch.Generator().manual_seed(0), max_iters=2000, tol=1e-9)
    _close(float(low.values[0]), float(exact[0]), rel=0.02)


@pytest.mark.parametrize("seed", [0, 1])
def test_hutchinson_trace_within_three_standard_errors(seed, reuse_graph):
    operator, dense, params = _problem(seed, reuse_graph)
    estimate = hutchinson_trace(operator, params, 64, torch.Generator().manual_seed(seed))
    assert estimate.stderr > 0
    assert abs(estimate.trace - float(torch.trace(dense))) <= 3 * estimate.stderr


def test_hutch_plus_plus_within_three_standard_errors_and_exact_on_low_rank(reuse_graph):
    operator, dense, params = _problem(0, reuse_graph)
    estimate = hutch_plus_plus_trace(operator, params, 60, torch.Generator().manual_seed(0))
    assert abs(estimate.trace - float(torch.trace(dense))) <= 3 * estimate.stderr
    low_rank = torch.outer(torch.arange(1.0, 9.0, dtype=torch.float64), torch.arange(1.0, 9.0, dtype=torch.float64))
    exact = hutch_plus_plus_trace(_matrix(low_rank), [low_rank[0]], 9, torch.Generator().manual_seed(0))
    assert exact.trace == pytest.approx(float(torch.trace(low_rank)), rel=1e-10)


def test_invalid_arguments_are_named():
    operator, _, params = _problem()
    with pytest.raises(ValueError, match="which"):
        lanczos_extremes(operator, params, 1, "middle", torch.Generator())
    with pytest.raises(ValueError, match="samples"):
        hutchinson_trace(operator, params, 0, torch.Generator())
    with pytest.raises(ValueError, match="Invalid hvp"):
        HessianOperator(params, lambda batch: batch, [0], hvp="symbolic")
    with pytest.raises(ValueError, match="Invalid rel_step"):
        HessianOperator(params, lambda batch: batch, [0], rel_step=2.0)
