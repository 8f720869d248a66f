"""Run Adai's multi-tensor Triton kernels on CPU tensors under Triton's interpreter; print a JSON report.

    PYTHONPATH=. python tests/scripts/multi_tensor_interpreter.py [--checks launches oracle_float64 ...]

The interpreter must be switched on before Triton is first imported, which a pytest process
cannot promise, hence a script of its own (``tests/test_perf_cuda_path.py`` runs it once and
checks every number). It measures, it does not judge: deviations from the float64 oracle, whether
a skipped step or a gradient changed anything, bitwise resume, and the kernel launches and torch
operations of one step for models of 20 and 160 parameter tensors.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from adai_lightning.optim import Adai, _multi_tensor, _native  # noqa: E402
from adai_lightning.optim import _triton_kernels as kernels  # noqa: E402
from tests.test_perf_fused import _run_pair, oracle_deviation  # noqa: E402


def use_interpreter_on_cpu() -> None:
    """Send CPU buckets to the multi-tensor path (the native kernel would take them), tiny chunks so
    that the test tensors span several blocks and chunks."""
    _multi_tensor.DEVICE_TYPES = ("cuda", "cpu")
    _native.supports = lambda *args: False
    _multi_tensor.BLOCK, _multi_tensor.CHUNK = 8, 16
    warnings.filterwarnings("ignore", message="divide by zero encountered in log")  # log(0) -> -inf, intended


def deviation_from_oracle(dtype: torch.dtype, steps: int) -> float:
    """Largest deviation from the float64 oracle, relative to the largest parameter magnitude."""
    return oracle_deviation(*_run_pair(dtype, steps=steps, fused=True))


def _bf16_pair(steps: int, expanded: bool) -> dict[str, float]:
    """bfloat16 parameters (float32 state) on the multi-tensor path against the foreach path."""
    gen = torch.Generator().manual_seed(2)
    start = [torch.randn(shape, generator=gen).to(torch.bfloat16) for shape in ((40, 3), (5,), (7, 2))]
    runs = []
    for options in (dict(fused=True), dict(foreach=True, fused=False)):
        params = [p.clone() for p in start]
        optimizer = Adai(params, lr=0.05, weight_decay=0.01, **options)
        grads = torch.Generator().manual_seed(3)
        for _ in range(steps):
            for param in params:
                grad = torch.randn(param.shape, generator=grads).to(torch.bfloat16)
                param.grad = grad[..., :1].expand(param.shape) if expanded and param.dim() else grad
            optimizer.step()
        runs.append((params, optimizer))
    (ours, opt), (reference, ref_opt) = runs
    ulp = max(((p.float() - q.float()).abs() / q.float().abs().clamp_min(1e-3)).max().item()
              for p, q in zip(ours, reference)) / 2**-7
    state = max((opt.state[p][key] - ref_opt.state[q][key]).abs().max().item()
                / ref_opt.state[q][key].abs().max().clamp_min(1e-30).item()
                for p, q in zip(ours, reference) for key in ("exp_avg", "exp_avg_sq", "beta1_prod"))
    dtypes = {str(opt.state[p][key].dtype) for p in ours for key in ("exp_avg", "exp_avg_sq", "beta1_prod")}
    return dict(param_ulps=ulp, state_rel=state, state_dtypes=sorted(dtypes))


def _model(tensors: int) -> torch.nn.Module:
    layers = [torch.nn.Linear(3 + i % 4, 4) for i in range(tensors // 2)]  # weight and bias each
    return torch.nn.Sequential(*layers)


def gradient_untouched(expanded: bool) -> dict[str, bool]:
    """Step with gradients the optimizer must only read; report whether they kept version and value."""
    params = [torch.nn.Parameter(torch.randn(5, dtype=torch.bfloat16)), torch.nn.Parameter(torch.randn(33))]
    for p in params:
        p.grad = torch.ones(1, dtype=p.dtype).expand(p.shape) if expanded else torch.randn_like(p)
    before = [(p.grad._version, p.grad.clone()) for p in params]
    start = [p.detach().clone() for p in params]
    Adai(params, fused=True).step()
    return dict(same_version=all(p.grad._version == v for p, (v, _) in zip(params, before)),
                same_values=all(torch.equal(p.grad, g) for p, (_, g) in zip(params, before)),
                params_moved=all(not torch.equal(p, s) for p, s in zip(params, start)))


def skipped_step() -> dict[str, bool]:
    """Pass 2 with found_inf = 1 changes nothing; with found_inf = 0 it equals a step without it."""
    gen = torch.Generator().manual_seed(4)
    lists = [[torch.randn(n, generator=gen, dtype=torch.float64) for n in (37, 5, 1)] for _ in range(5)]
    lists[4] = [t.abs().clamp_max(0.9) for t in lists[4]]  # beta1_prod in (0, 1)
    hyper = Adai._hyper(Adai([torch.zeros(1)], weight_decay=0.1).param_groups[0])
    outcome = {}
    for label, found in (("none", None), ("zero", torch.zeros(())), ("one", torch.ones(()))):
        work = copy.deepcopy(lists)
        total = _multi_tensor.vhat_sum_multi_tensor(work[0], work[1], work[3], [2, 2, 2], hyper, found_inf=found)
        _multi_tensor.inertia_update_multi_tensor(*work, [2, 2, 2], total / 43, hyper, found_inf=found)
        outcome[label] = work
    def same(a, b):
        return all(torch.equal(x, y) for la, lb in zip(a, b) for x, y in zip(la, lb))
    return dict(one_changes_nothing=same(outcome["one"], lists), zero_equals_none=same(outcome["zero"], outcome["none"]),
                none_changes_something=not same(outcome["none"], lists))


def bitwise_resume(steps: int = 6) -> bool:
    """``steps`` steps in one go equal half of them, a state_dict round trip into a new optimizer, then the rest."""
    def run(split: int | None) -> list[torch.Tensor]:
        torch.manual_seed(5)
        model = _model(6)
        optimizer = Adai(model.parameters(), fused=True, lr=0.3)
        grads = torch.Generator().manual_seed(6)
        for step in range(steps):
            if step == split:
                state = copy.deepcopy(optimizer.state_dict())
                optimizer = Adai(model.parameters(), fused=True, lr=0.3)
                optimizer.load_state_dict(state)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=grads)
            optimizer.step()
        return [p.detach().clone() for p in model.parameters()] + [
            t for s in optimizer.state.values() for t in (s["exp_avg"], s["exp_avg_sq"], s["beta1_prod"])]
    return all(torch.equal(a, b) for a, b in zip(run(None), run(steps // 2)))


class _CountOps(TorchDispatchMode):
    """Counts torch operations (on CUDA, each is at most one kernel or copy), except inside kernel launches."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class _CountingKernel:
    """Stands in for a Triton kernel: counts launches, and pauses op counting during the interpreter's run."""

    def __init__(self, kernel, launches: list[str], mode: _CountOps) -> None:
        self.kernel, self.launches, self.mode = kernel, launches, mode

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(self.kernel.__name__)
            self.mode.paused = True
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                self.mode.paused = False
        return launch


def launches_per_step(tensors: int, warm: bool, skip_nonfinite: bool = False) -> dict[str, object]:
    """Kernel launches and torch operations of one whole ``Adai.step()`` on the multi-tensor path
    (``skip_nonfinite``: with the default non-finite guard, step counts on the device).

    The state is created by a first step on the foreach path (the interpreter is slow). ``warm``:
    a second multi-tensor step with the gradients in the same memory (as autograd's caching
    allocator usually gives them) reuses the cached tables and uploads only the step's coefficients;
    cold: the measured step builds and uploads every table, the worst case.
    """
    torch.manual_seed(7)
    params = list(_model(tensors).parameters())
    optimizer = Adai(params, fused=False, skip_nonfinite=skip_nonfinite)
    launches: list[str] = []
    mode = _CountOps()
    originals = kernels.vhat_sum_kernel, kernels.inertia_update_kernel
    for step in range(3 if warm else 2):
        for p in params:
            if p.grad is None:
                p.grad = torch.randn_like(p)
            else:
                p.grad.copy_(torch.randn_like(p))
        if step < (2 if warm else 1):
            optimizer.step()
            optimizer.param_groups[0]["fused"] = True
            continue
        _multi_tensor._scalars.cache_clear()  # in training every step count is new
        if not warm:
            _multi_tensor._tensor_table.cache_clear()
            _multi_tensor._chunk_table.cache_clear()
        kernels.vhat_sum_kernel, kernels.inertia_update_kernel = (_CountingKernel(k, launches, mode) for k in originals)
        try:
            with mode:
                optimizer.step()
        finally:
            kernels.vhat_sum_kernel, kernels.inertia_update_kernel = originals
    return dict(tensors=len(params), triton_launches=len(launches), torch_ops=len(mode.ops), ops=sorted(mode.ops))


def launch_counts() -> dict[str, list[dict[str, object]]]:
    """:func:`launches_per_step` for 20 and 160 tensors, cold and warm, and warm with the default non-finite
    guard, after one step that checks the kernels."""
    launches_per_step(2, warm=False)
    counts = {kind: [launches_per_step(n, warm=kind == "warm") for n in (20, 160)] for kind in ("cold", "warm")}
    counts["guarded"] = [launches_per_step(n, warm=True, skip_nonfinite=True) for n in (20, 160)]
    return counts


CHECKS = dict(
    launches=launch_counts,
    oracle_float64=lambda: deviation_from_oracle(torch.float64, steps=8),
    oracle_float32=lambda: deviation_from_oracle(torch.float32, steps=8),
    bfloat16=lambda: _bf16_pair(steps=6, expanded=False),
    bfloat16_expanded=lambda: _bf16_pair(steps=3, expanded=True),
    gradient_plain=lambda: gradient_untouched(expanded=False),
    gradient_expanded=lambda: gradient_untouched(expanded=True),
    skipped_step=skipped_step,
    bitwise_resume=bitwise_resume,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", nargs="+", choices=list(CHECKS), default=list(CHECKS), help="what to run")
    args = parser.parse_args()
    use_interpreter_on_cpu()
    print(json.dumps({name: CHECKS[name]() for name in args.checks}))


if __name__ == "__main__":
    main()
