"""The compiled (torch.compile) fused Adai step against the float64 oracle, and its dispatch and fallback rules."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from adai_lightning.optim import AdaiW, _fused, _native
from adai_lightning.optim import Adai as GuardedAdai
from tests.adai_oracle import OracleAdai

#: The compiled kernels take Python int step counts: under the non-finite guard (on by default) their
#: buckets run foreach, so every optimizer here is built without it.
Adai = functools.partial(GuardedAdai, skip_nonfinite=False)

# Shapes: dense tensors above the (patched) small-tensor threshold, small ones that get packed,
# a transposed (non-contiguous) one and a 0-dim one.
SHAPES = [(6, 5), (7,), (3, 2, 4), (), (5, 4)]
GROUP_OPTIONS = [
    dict(weight_decay=0.05, dampening=0.5),                          # L2 decay, AdaiV2 dampening
    dict(weight_decay=0.1, decoupled=True, maximize=True, lr=0.3),   # decoupled decay, ascent
    dict(betas=(0.2, 0.9), eps=1e-2),
]
SKIPS_GRAD = 1  # parameter index (in group 0) that has no gradient on every third step


def _make_params(dtype: torch.dtype, device: str) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    groups = []
    for _ in GROUP_OPTIONS:
        params = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in SHAPES]
        params[-1] = params[-1].t()  # non-contiguous
        groups.append([p.to(device, dtype) for p in params])
    return groups


def _run_pair(dtype: torch.dtype, steps: int, alternate_paths: bool = False, device: str = "cpu",
              **optimizer_options):
    """Step Adai (on ``dtype`` and ``device``) and the oracle (float64, CPU) on the same gradients;
    return both parameter lists (``benchmarks/gpu_suite.py`` uses this on CUDA).

    ``alternate_paths`` switches every group between the fused and the foreach path on every step.
    """
    ours = _make_params(dtype, device)
    oracle = [[p.to("cpu", torch.float64).contiguous().clone() for p in group] for group in ours]
    optimizer = Adai([dict(params=ps, **o) for ps, o in zip(ours, GROUP_OPTIONS)], lr=0.5, **optimizer_options)
    reference = OracleAdai([dict(params=ps, **o) for ps, o in zip(oracle, GROUP_OPTIONS)], lr=0.5)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for group_index, (group, ref_group) in enumerate(zip(ours, oracle)):
            for index, (p, q) in enumerate(zip(group, ref_group)):
                if group_index == 0 and index == SKIPS_GRAD and step % 3 == 2:
                    p.grad = q.grad = None
                    continue
                grad = torch.randn(p.shape, generator=gen, dtype=torch.float64) * (index + 1) * 0.1
                q.grad = grad.clone()
                # p's own layout, except in the last group, where the transposed parameter gets a
                # contiguous gradient (the kernels then work on copies).
                layout = torch.empty_strided(p.shape, p.stride(), dtype=dtype, device=device) if group_index < 2 else None
                p.grad = grad.to(device, dtype) if layout is None else layout.copy_(grad)
        if alternate_paths:
            for group in optimizer.param_groups:
                group["fused"] = step % 2 == 0
        optimizer.step()
        reference.step()
    return [p for g in ours for p in g], [p for g in oracle for p in g]


@pytest.fixture(autouse=True)
def compiled_kernels_only(monkeypatch):
    """These tests are about the torch.compile kernels: keep the native CPU kernel (tested in
    test_perf_native.py) from taking the buckets."""
    monkeypatch.setattr(_native, "supports", lambda *args: False)


@pytest.fixture
def small_thresholds(monkeypatch):
    """Shrink the size thresholds so that the tiny test tensors take both the dense and the packed route."""
    monkeypatch.setattr(_fused, "SMALL_NUMEL", 16)
    monkeypatch.setattr(_fused, "PACK_NUMEL", 24)


def oracle_deviation(ours, oracle) -> float:
    """Largest deviation of any element from the oracle, relative to the largest parameter magnitude."""
    scale = max(q.abs().max().item() for q in oracle)
    return max((p.to("cpu", torch.float64) - q).abs().max().item() for p, q in zip(ours, oracle)) / scale


def _assert_close_to_oracle(ours, oracle, rtol):
    """Every element within ``rtol`` of the model's largest parameter magnitude (elements near 0 included)."""
    scale = max(q.abs().max().item() for q in oracle)
    for p, q in zip(ours, oracle):
        torch.testing.assert_close(p.to("cpu", torch.float64), q, rtol=rtol, atol=rtol * scale)


@pytest.mark.slow
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_fused_matches_oracle(small_thresholds, dtype, rtol):
    _assert_close_to_oracle(*_run_pair(dtype, steps=100, fused=True), rtol)


def test_invalid_fused_arguments_name_the_argument():
    param = torch.zeros(3, requires_grad=True)
    with pytest.raises(TypeError, match="fused"):
        Adai([param], fused="yes")
    with pytest.raises(ValueError, match="fused=True with foreach=True"):
        AdaiW([param], fused=True, foreach=True)


def _one_step(optimizer: Adai, param: torch.Tensor) -> None:
    param.grad = torch.arange(param.numel(), dtype=param.dtype).view_as(param)
    optimizer.step()


def test_fallback_warns_once_and_matches_foreach(monkeypatch):
    monkeypatch.setattr(_fused, "AUTO_MIN_NUMEL", 1)
    monkeypatch.setattr(_fused, "_warned", set())
    monkeypatch.setattr(_fused, "_build_error", lambda *key: "toolchain missing (test)")
    auto, plain = torch.ones(4, 3), torch.ones(4, 3)
    auto_opt, plain_opt = Adai([auto]), Adai([plain], foreach=True, fused=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            _one_step(auto_opt, auto)
            _one_step(plain_opt, plain)
    assert [str(w.message) for w in caught] == [
        "Adai's fused step is unavailable, using the foreach path: toolchain missing (test)"
    ]
    torch.testing.assert_close(auto, plain, rtol=0, atol=0)


def test_fused_true_raises_where_it_cannot_run(monkeypatch):
    monkeypatch.setattr(_fused, "_build_error", lambda *key: "toolchain missing (test)")
    param = torch.ones(5)
    with pytest.raises(RuntimeError, match=r"fused=True\) cannot run: toolchain missing"):
        _one_step(Adai([param], fused=True), param)


@pytest.mark.parametrize(
    "requested, numel, foreach, expected",
    [(None, 10, None, False), (None, 2**20, None, True), (None, 2**20, False, False), (False, 2**20, None, False),
     (True, 10, None, True)],
)
def test_dispatch_rule(monkeypatch, requested, numel, foreach, expected):
    """``fused=None`` takes the compiled path only for large buckets, and never when foreach is turned off."""
    monkeypatch.setattr(_fused, "_build_error", lambda *key: None)
    chosen = []
    monkeypatch.setattr(_fused, "vhat_sum_fused", lambda *args: chosen.append(True) or torch.tensor(1.0))
    monkeypatch.setattr(_fused, "inertia_update_fused", lambda *args: None)
    param = torch.ones(numel)
    _one_step(Adai([param], fused=requested, foreach=foreach), param)
    assert bool(chosen) == expected


@pytest.mark.slow
def test_fused_alternating_with_foreach_matches_oracle(small_thresholds):
    """Switching between the compiled and the foreach path on every step changes nothing."""
    _assert_close_to_oracle(*_run_pair(torch.float64, steps=9, alternate_paths=True, fused=True), 1e-9)


@pytest.mark.slow
def test_fused_bfloat16_parameters_follow_the_foreach_path():
    """16-bit parameters keep float32 state; both paths round the update to bfloat16 the same way."""
    gen = torch.Generator().manual_seed(2)
    start = torch.randn(64, 80, generator=gen).to(torch.bfloat16)
    params = [start.clone(), start.clone()]
    options = dict(lr=0.05, weight_decay=0.01)  # small steps: a one-ulp rounding difference stays one ulp
    optimizers = [Adai([params[0]], fused=True, **options), Adai([params[1]], foreach=True, fused=False, **options)]
    for _ in range(10):
        grad = torch.randn(64, 80, generator=gen).to(torch.bfloat16)
        for param, optimizer in zip(params, optimizers):
            param.grad = grad.clone()
            optimizer.step()
    assert optimizers[0].state[params[0]]["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(params[0], params[1], rtol=2 * 2**-7, atol=1e-2)  # two bfloat16 ulps
    assert not torch.equal(params[0], start)


def _bf16_param_with(grad: torch.Tensor) -> torch.nn.Parameter:
    param = torch.nn.Parameter(torch.randn(5, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16))
    param.grad = grad
    return param


@pytest.mark.parametrize("grad", [torch.linspace(-1, 1, 5, dtype=torch.bfloat16),
                                  torch.ones(1, dtype=torch.bfloat16).expand(5)], ids=["plain", "expanded"])
def test_fused_reads_gradients_and_never_writes_them(grad):
    """Small (packed) and irregular (expanded) bfloat16 gradients keep their version and values."""
    param = _bf16_param_with(grad)
    version, values, start = grad._version, grad.clone(), param.detach().clone()
    Adai([param], fused=True).step()
    assert grad._version == version and torch.equal(grad, values)
    assert not torch.equal(param, start)


def test_fused_found_inf_leaves_everything_unchanged():
    """Pass 2 with ``found_inf`` = 1 (device-side skip) changes no parameter and no state."""
    param = _bf16_param_with(torch.linspace(-1, 1, 5, dtype=torch.bfloat16))
    optimizer = Adai([param], fused=True)
    optimizer.step()
    state = optimizer.state[param]
    lists = [[param.detach()], [param.grad], [state["exp_avg"]], [state["exp_avg_sq"]], [state["beta1_prod"]]]
    before = [lst[0].clone() for lst in lists]
    hyper = GuardedAdai._hyper(optimizer.param_groups[0])
    _fused.inertia_update_fused(*lists, [2], torch.tensor(0.5), hyper, found_inf=torch.ones(()))
    assert all(torch.equal(lst[0], b) for lst, b in zip(lists, before))
    _fused.inertia_update_fused(*lists, [2], torch.tensor(0.5), hyper, found_inf=torch.zeros(()))
    assert not torch.equal(param, before[0])


@pytest.mark.slow
def test_fused_never_hits_the_recompile_limit(monkeypatch):
    """With dynamo's recompile limit at 1, every configuration (dtype, L2, dampening) and size (0-element,
    1-element, 0-dim, packed, dense, transposed) steps: one compiled graph per configuration serves them all."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    configs = [dict(), dict(weight_decay=0.1), dict(dampening=0.5), dict(weight_decay=0.1, dampening=0.5)]
    for config in configs:
        for shape in [(1,), (0,), (), (3,), (5000,), (70, 90)]:
            param = torch.nn.Parameter(torch.randn(shape).to(torch.bfloat16))
            transposed = torch.nn.Parameter(torch.randn(7, 3).to(torch.bfloat16).t())
            param.grad, transposed.grad = torch.randn_like(param), torch.randn(3, 7).to(torch.bfloat16)
            optimizer = Adai([param, transposed], fused=True, **config)
            optimizer.step()
            transposed.grad = None  # the next step has one parameter (another pack layout)
            optimizer.step()
            assert torch.isfinite(param).all() and torch.isfinite(transposed).all()
