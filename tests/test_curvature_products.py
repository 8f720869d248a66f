"""Finite-difference and automatic Hessian-vector products, warm-started Lanczos and the host-memory basis,
against exact dense Hessians of tiny float64 models."""

import pytest
import torch
from torch import nn

from adai_lightning.curvature import (HessianOperator, finite_difference_step, flatten, hutchinson_trace,
                                      lanczos_extremes, unflatten)
from adai_lightning.curvature.eigen import lanczos
from adai_lightning.curvature.hvp import STEP_FACTOR


class _OnceDifferentiableTanh(torch.autograd.Function):
    """tanh whose backward cannot be differentiated again (as fused attention or Triton kernels)."""

    @staticmethod
    def forward(ctx, inputs):
        output = torch.tanh(inputs)
        ctx.save_for_backward(output)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (output,) = ctx.saved_tensors
        return grad_output * (1 - output * output)


def _forward(weights, inputs, once_differentiable=False):
    w1, b1, w2, b2 = weights
    hidden = nn.functional.linear(inputs, w1, b1)
    hidden = _OnceDifferentiableTanh.apply(hidden) if once_differentiable else torch.tanh(hidden)
    return nn.functional.linear(hidden, w2, b2)


def _problem(once_differentiable=False, seed=0, dtype=torch.float64):
    """A tanh MLP's parameters, a loss over two batches (in ``dtype``), and the dense float64 Hessian of their
    mean loss."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (5,), (2, 5), (2,)]
    params = [nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)) for shape in shapes]
    batches = [(torch.randn(6, 3, generator=gen, dtype=torch.float64).to(dtype),
                torch.randn(6, 2, generator=gen, dtype=torch.float64).to(dtype))
               for _ in range(2)]

    def loss_fn(batch):
        inputs, targets = batch
        return nn.functional.mse_loss(_forward(params, inputs, once_differentiable), targets)

    def dense_loss(vector):
        weights = unflatten(vector, params)
        return sum(nn.functional.mse_loss(_forward(weights, x.double()), y.double()) for x, y in batches) / len(batches)

    dense = torch.autograd.functional.hessian(dense_loss, flatten([p.detach().double() for p in params]))
    return params, loss_fn, batches, dense


def _random_vector(params, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


def test_finite_difference_product_matches_the_dense_hessian_and_restores_parameters_bitwise():
    params, loss_fn, batches, dense = _problem()
    before = [p.detach().clone() for p in params]
    operator = HessianOperator(params, loss_fn, batches, hvp="finite_difference")
    vector = _random_vector(params)
    product = operator(vector)
    exact = dense @ flatten(vector)
    # float64: the step is ~ u^(1/3) (1 + |theta|), the error ~ u^(2/3) relative (u = 2.2e-16)
    assert float((flatten(product) - exact).norm() / exact.norm()) < 1e-7
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(p.grad is None for p in params)
    assert operator.hvp == "finite_difference" and operator.num_products == 1


def test_finite_difference_step_follows_dtype_and_norms():
    params = [torch.full((4,), 2.0, dtype=torch.float32)]  # |theta| = 4
    vector = [torch.full((4,), 0.5, dtype=torch.float32)]  # |v| = 1
    default = STEP_FACTOR * torch.finfo(torch.float32).eps ** (1 / 3) * 5
    assert finite_difference_step(params, vector) == pytest.approx(default)
    assert finite_difference_step(params, [2 * v for v in vector]) == pytest.approx(default / 2)
    assert finite_difference_step(params, vector, rel_step=1e-2) == pytest.approx(1e-2 * 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # finite differences run with autocast off
        assert finite_difference_step(params, vector) == pytest.approx(default)
    # v on the small weights only: the step is relative to them (|theta_2| = 0.04, |v_2| = 1), not to |theta|
    params, vector = [torch.ones(100), torch.full((4,), 0.02)], [torch.zeros(100), torch.full((4,), 0.5)]
    assert finite_difference_step(params, vector, rel_step=1e-2) == pytest.approx(1e-2 * (1 + 0.04))


def _product_error(params, loss_fn, batches, dense, rel_step=None):
    vector = _random_vector(params)
    product = HessianOperator(params, loss_fn, batches, hvp="finite_difference", rel_step=rel_step)(vector)
    exact = dense @ flatten(vector).double()
    return float((flatten(product).double() - exact).norm() / exact.norm())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_finite_difference_error_follows_the_error_model(dtype):
    """Error ~ A r^2 + B u / r: about u^(2/3) at the default r = STEP_FACTOR u^(1/3), near the bottom of the
    valley (measured on this MLP: 1.6 u^(2/3) in float64, 2.2 in float32; at r = u^(1/3), the former step, 15)."""
    problem = _problem(dtype=dtype)
    u = torch.finfo(dtype).eps
    default = STEP_FACTOR * u ** (1 / 3)
    error = _product_error(*problem)
    assert error < 2.5 * u ** (2 / 3)
    assert _product_error(*problem, rel_step=default / 10) > 3 * error  # rounding: B u / r
    assert _product_error(*problem, rel_step=default * 10) > 3 * error  # truncation: A r^2


def test_finite_difference_under_bf16_autocast_runs_in_float32_and_says_so_once():
    params, loss_fn, batches, dense = _problem(dtype=torch.float32)
    vector = _random_vector(params)
    plain = flatten(HessianOperator(params, loss_fn, batches, hvp="finite_difference")(vector))
    operator = HessianOperator(params, loss_fn, batches, hvp="finite_difference")
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(RuntimeWarning, match="autocast turned off") as record:
        products = [flatten(operator(vector)) for _ in range(2)]
    assert len(record) == 1
    assert all(torch.equal(product, plain) for product in products)  # the float32 product, bitwise
    exact = dense @ flatten(vector).double()
    assert float((plain.double() - exact).norm() / exact.norm()) < 2.5 * torch.finfo(torch.float32).eps ** (2 / 3)


def _autocast_inside(loss_fn):
    def inner(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_fn(batch).float()  # a float32 loss of a bfloat16 forward: seen in the saved tensors
    return inner


@pytest.mark.parametrize("where", ["bfloat16 parameters", "autocast inside loss_fn"])
def test_finite_difference_refuses_a_loss_computed_in_16_bits(where):
    params, loss_fn, batches, _ = _problem(dtype=torch.bfloat16 if where == "bfloat16 parameters" else torch.float32)
    loss_fn = _autocast_inside(loss_fn) if where == "autocast inside loss_fn" else loss_fn
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="need the loss in float32 or float64, got torch.bfloat16"):
        HessianOperator(params, loss_fn, batches, hvp="finite_difference")(_random_vector(params))
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    HessianOperator(params, loss_fn, batches, hvp="exact")(_random_vector(params))  # exact products still run


def test_auto_is_exact_when_a_double_backward_exists():
    params, loss_fn, batches, dense = _problem()
    operator = HessianOperator(params, loss_fn, batches)
    vector = _random_vector(params)
    torch.testing.assert_close(flatten(operator(vector)), dense @ flatten(vector))
    assert operator.hvp == "exact"


def test_auto_falls_back_to_finite_differences_once_with_the_cause():
    params, loss_fn, batches, dense = _problem(once_differentiable=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        HessianOperator(params, loss_fn, batches, hvp="exact")(_random_vector(params))
    operator = HessianOperator(params, loss_fn, batches)
    with pytest.warns(RuntimeWarning, match="finite differences.*failed .*(once_differentiable|twice)") as record:
        top = lanczos_extremes(operator, params, 1, "largest", torch.Generator().manual_seed(0), num_iters=12)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    assert operator.hvp == "finite_difference"
    assert float(top.values[0]) == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-6)
    assert all(p.grad is None for p in params)


def test_warm_start_from_the_last_eigenvectors_converges_in_fewer_products():
    params, loss_fn, batches, dense = _problem()
    shifted = [nn.Parameter(p.detach() + 0.02 * v) for p, v in zip(params, _random_vector(params, 5))]
    exact = torch.linalg.eigvalsh(dense)
    first = lanczos_extremes(HessianOperator(params, loss_fn, batches, hvp="exact"), params, 2, "largest",
                             torch.Generator().manual_seed(0), num_iters=37, tol=1e-8)
    torch.testing.assert_close(first.values, exact.flip(0)[:2], rtol=1e-7, atol=0)
    assert first.products < 37  # stopped on convergence

    def later_point(previous):
        batches_loss = lambda batch: nn.functional.mse_loss(_forward(shifted, batch[0]), batch[1])  # noqa: E731
        operator = HessianOperator(shifted, batches_loss, batches, hvp="exact")
        return lanczos_extremes(operator, shifted, 2, "largest", torch.Generator().manual_seed(0), num_iters=37,
                                previous=previous, tol=1e-8)

    cold, warm = later_point([]), later_point(first.vectors)
    torch.testing.assert_close(warm.values, cold.values, rtol=1e-7, atol=0)
    assert warm.products < cold.products


def test_host_basis_gives_the_same_ritz_values_and_vectors():
    params, loss_fn, batches, _ = _problem()
    operator = HessianOperator(params, loss_fn, batches, hvp="exact")
    start = _random_vector(params, 3)
    on_device = lanczos(operator, start, 10, (0, -1))
    on_host = lanczos(operator, start, 10, (0, -1), host_basis=True)
    torch.testing.assert_close(on_host.values, on_device.values, rtol=1e-12, atol=1e-12)
    for a, b in zip(on_host.vectors, on_device.vectors):
        torch.testing.assert_close(flatten(a), flatten(b), rtol=1e-10, atol=1e-12)


def test_finite_difference_trace_within_three_standard_errors():
    params, loss_fn, batches, dense = _problem()
    operator = HessianOperator(params, loss_fn, batches, hvp="finite_difference")
    estimate = hutchinson_trace(operator, params, 32, torch.Generator().manual_seed(0))
    assert abs(estimate.trace - float(torch.trace(dense))) <= 3 * estimate.stderr
