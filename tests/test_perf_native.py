"""The native CPU Adai step (a C library built at first use) against the float64 oracle, its
dispatch, its build cache and its fallback."""

from __future__ import annotations

import warnings

import pytest
import torch

from adai_lightning.optim import Adai, _native
from tests.test_perf_fused import _assert_close_to_oracle, _run_pair


@pytest.fixture
def native_calls(monkeypatch):
    """Counts the buckets the native kernel stepped (pass 2 calls)."""
    calls = []
    update = _native.inertia_update_native
    monkeypatch.setattr(_native, "inertia_update_native",
                        lambda *args, **kwargs: calls.append(args[0][0].dtype) or update(*args, **kwargs))
    return calls


@pytest.fixture
def fresh_library():
    """Forget the loaded library before and after the test (the test may point it elsewhere)."""
    _native._library.cache_clear()
    yield
    _native._library.cache_clear()


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_native_matches_oracle(native_calls, dtype, rtol):
    """Three groups (L2 with dampening 0.5, decoupled with maximize, other betas/eps), a parameter
    without gradient every third step, a 0-dim one and a transposed one whose gradient is contiguous."""
    _assert_close_to_oracle(*_run_pair(dtype, steps=100, fused=True), rtol)
    assert native_calls and set(native_calls) == {dtype}


def test_native_alternating_with_foreach_matches_oracle(native_calls):
    _assert_close_to_oracle(*_run_pair(torch.float64, steps=9, alternate_paths=True, fused=True), 1e-9)
    assert native_calls


def test_default_picks_native_for_float32_and_float64_only(native_calls):
    params = [torch.ones(3, dtype=dtype, requires_grad=True) for dtype in (torch.float32, torch.float64,
                                                                           torch.bfloat16)]
    for param in params:
        param.grad = torch.full_like(param, 0.5)
    Adai(params).step()
    assert sorted(map(str, native_calls)) == ["torch.float32", "torch.float64"]


def _steps_with_threads(threads: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(n, generator=gen) for n in (70_000, 33_000, 5)]  # several chunks, and tails
    optimizer = Adai(params, lr=0.5)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(5):
            for param in params:
                param.grad = torch.randn(param.shape, generator=gen)
            optimizer.step()
    finally:
        torch.set_num_threads(previous)
    return params


def test_results_do_not_depend_on_the_thread_count():
    for one, two in zip(_steps_with_threads(1), _steps_with_threads(2)):
        assert torch.equal(one, two)


def test_nan_gradient_propagates_like_foreach():
    """A NaN in the gradient is not clipped away by the kernel's clamps: both paths give NaN alike."""
    params = [torch.ones(4, 3), torch.ones(4, 3)]
    optimizers = [Adai([params[0]], skip_nonfinite=False), Adai([params[1]], foreach=True, fused=False,
                                                                skip_nonfinite=False)]
    for param, optimizer in zip(params, optimizers):
        param.grad = torch.arange(12.0).view(4, 3)
        param.grad[1, 2] = float("nan")
        optimizer.step()
    assert params[0].isnan().any()
    torch.testing.assert_close(params[0], params[1], equal_nan=True)


def test_library_is_built_once_into_the_cache(fresh_library, monkeypatch, tmp_path):
    monkeypatch.setenv("ADAI_LIGHTNING_CACHE", str(tmp_path))
    assert not isinstance(_native._library(), str)
    built = list(tmp_path.glob("adai_cpu_*.so"))
    assert len(built) == 1
    _native._library.cache_clear()  # a new process: it must load the cached file, not compile again
    monkeypatch.setattr(_native, "_build", lambda *args: pytest.fail("the cached library was rebuilt"))
    assert not isinstance(_native._library(), str)


def test_failed_build_names_the_reason(fresh_library, monkeypatch, tmp_path):
    monkeypatch.setenv("ADAI_LIGHTNING_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    reason = _native._library()
    assert isinstance(reason, str) and "building its CPU kernel failed" in reason and "false" in reason


def test_unavailable_library_warns_once_and_falls_back_to_foreach(monkeypatch):
    monkeypatch.setattr(_native, "_library", lambda: "no C compiler found (set $CC)")
    monkeypatch.setattr(_native, "_warned", set())
    auto, plain = torch.ones(4, 3), torch.ones(4, 3)
    auto_opt, plain_opt = Adai([auto]), Adai([plain], foreach=True, fused=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            for param, optimizer in ((auto, auto_opt), (plain, plain_opt)):
                param.grad = torch.arange(12.0).view(4, 3)
                optimizer.step()
    assert [str(w.message) for w in caught] == [
        "Adai's native CPU step is unavailable, using the compiled or foreach path: no C compiler found (set $CC)"
    ]
    assert torch.equal(auto, plain)


@pytest.mark.parametrize("beta2", [0.999, 0.9999])
def test_native_second_moment_is_as_exact_as_the_eager_paths_in_float32(beta2: float) -> None:
    """The kernel forms 1 - beta2 in double: before, (float)1 - (float)beta2 put 1.3e-5 (0.999) and
    1.7e-4 (0.9999) of relative error into exp_avg_sq after 20 steps; float32 rounding alone gives ~1e-6."""
    param = torch.nn.Parameter(torch.zeros(10_000))
    opt = Adai([param], betas=(0.1, beta2))
    reference = torch.zeros(10_000, dtype=torch.float64)
    for step in range(20):
        grad = torch.randn(10_000, generator=torch.Generator().manual_seed(step))
        param.grad = grad
        opt.step()
        reference = beta2 * reference + (1 - beta2) * grad.double() ** 2
    error = ((opt.state[param]["exp_avg_sq"].double() - reference).abs() / reference).max().item()
    assert error < 2e-6
