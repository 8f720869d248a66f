"""The multi-tensor Triton path (Adai's CUDA step) without a GPU: its kernels under Triton's CPU
interpreter against the float64 oracle, its launch count per step, and its dispatch rules.

The interpreter has to be switched on before Triton is first imported, so the kernels run in a
subprocess (``tests/scripts/multi_tensor_interpreter.py``) that prints its measurements as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from adai_lightning.optim import Adai, _fused, _multi_tensor, _native

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not _multi_tensor.triton_available(), reason="triton is not installed")
FAST_CHECKS = ("launches", "oracle_float64", "skipped_step", "gradient_expanded")
SLOW_CHECKS = ("oracle_float32", "bfloat16", "bfloat16_expanded", "gradient_plain", "bitwise_resume")


def _interpreter_report(*checks: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "multi_tensor_interpreter.py"),
                           "--checks", *checks], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fast_report() -> dict:
    return _interpreter_report(*FAST_CHECKS)


@pytest.mark.parametrize("kind, bound", [("cold", 40), ("warm", 12), ("guarded", 34)])
def test_launches_per_step_do_not_grow_with_the_model(fast_report, kind, bound):
    """One whole Adai.step() on 20 and on 160 parameter tensors: two Triton launches (one per pass)
    and the same few torch operations, with every table built and uploaded (cold) or cached (warm:
    only the step's coefficients are uploaded), with ``skip_nonfinite=False``; and warm with the
    default guard (``guarded``: the step counts, the skip verdict, its counters and the bias
    corrections are small device ops)."""
    small, large = fast_report["launches"][kind]
    assert (small["tensors"], large["tensors"]) == (20, 160)
    assert small["triton_launches"] == large["triton_launches"] == 2
    assert small["ops"] == large["ops"]
    assert large["torch_ops"] <= bound


def test_interpreter_float64_matches_oracle(fast_report):
    """Three param groups (L2 + dampening 0.5, decoupled + maximize, other betas), a parameter without
    gradient every third step (two step counts in one bucket), 0-dim and transposed parameters,
    tensors spanning several blocks and chunks."""
    assert fast_report["oracle_float64"] <= 1e-9


def test_found_inf_skips_the_step_on_device(fast_report):
    assert fast_report["skipped_step"] == dict(one_changes_nothing=True, zero_equals_none=True,
                                               none_changes_something=True)


def test_expanded_bfloat16_gradient_is_read_never_written(fast_report):
    assert fast_report["gradient_expanded"] == dict(same_version=True, same_values=True, params_moved=True)


@pytest.mark.slow
def test_interpreter_float32_bfloat16_and_resume():
    report = _interpreter_report(*SLOW_CHECKS)
    assert report["oracle_float32"] <= 1e-5
    for key in ("bfloat16", "bfloat16_expanded"):  # same bf16 rounding as the foreach path, fp32 state
        assert report[key]["param_ulps"] <= 1.0 and report[key]["state_rel"] <= 1e-5
        assert report[key]["state_dtypes"] == ["torch.float32"]
    assert report["gradient_plain"] == dict(same_version=True, same_values=True, params_moved=True)
    assert report["bitwise_resume"] is True


@pytest.mark.parametrize("requested, numel, device_types, expected", [
    (None, 10, ("cuda", "cpu"), False),         # small bucket: not worth a compilation
    (None, 2**20, ("cuda", "cpu"), True),
    (True, 10, ("cuda", "cpu"), True),
    (False, 2**20, ("cuda", "cpu"), False),
    (True, 10, ("cuda",), False),                # CPU buckets belong to the native kernel
])
def test_dispatch_rule(monkeypatch, requested, numel, device_types, expected):
    monkeypatch.setattr(_multi_tensor, "DEVICE_TYPES", device_types)
    monkeypatch.setattr(_multi_tensor, "_build_error", lambda *key: None)
    param = torch.ones(numel)
    hyper = Adai._hyper(Adai([param]).param_groups[0])
    assert _multi_tensor.use_multi_tensor(requested, [param], [param], torch.float32, hyper) == expected


def test_unavailable_kernels_warn_once_and_the_compiled_path_decides(monkeypatch):
    """A failed Triton build warns once; then the torch.compile path runs (or, for fused=True, raises)."""
    monkeypatch.setattr(_multi_tensor, "DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(_multi_tensor, "_warned", set())
    monkeypatch.setattr(_multi_tensor, "_build_error", lambda *key: "no GPU compiler (test)")
    monkeypatch.setattr(_fused, "_build_error", lambda *key: "no inductor (test)")
    monkeypatch.setattr(_native, "supports", lambda *args: False)
    param = torch.ones(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            param.grad = torch.ones(4)
            with pytest.raises(RuntimeError, match=r"fused=True\) cannot run: no inductor"):
                Adai([param], fused=True, skip_nonfinite=False).step()  # guarded steps never compile
    messages = [str(w.message) for w in caught]
    assert messages == ["Adai's multi-tensor CUDA step is unavailable, trying the compiled path: no GPU compiler (test)"]


@pytest.mark.parametrize("param_type, state_type, flags", [
    ("float32", "float32", (False, False, False)),
    ("bfloat16", "float32", (True, True, True)),
    ("float16", "float32", (False, True, False)),
    ("float64", "float64", (True, False, True)),
])
def test_kernels_compile_for_hopper_without_a_gpu(param_type, state_type, flags):
    """Both kernels go through Triton's whole CUDA pipeline (TTIR, TTGIR, LLVM, PTX, cubin) for sm_90,
    the H100/H200 architecture, on this GPU-less machine: what a GPU would run, short of running it."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from adai_lightning.optim import _triton_kernels as kernels

    if not isinstance(kernels.inertia_update_kernel, triton.runtime.JITFunction):
        pytest.skip("TRITON_INTERPRET=1 is set: the kernels are interpreted, not compiled")
    use_l2, damped, found_inf = flags
    types = dict(G_TYPE=getattr(tl, param_type), S_TYPE=getattr(tl, state_type), P_TYPE=getattr(tl, param_type),
                 USE_L2=use_l2, BLOCK=_multi_tensor.BLOCK, CHUNK=_multi_tensor.CHUNK)
    table = {"tensors": "*i64", "chunks": "*i64", "scalars": "*fp64"}
    sources = [
        (kernels.vhat_sum_kernel, {**table, "partials": "*fp64"}, types),
        (kernels.inertia_update_kernel, {**table, "vbar_ptr": "*fp32", "found_inf": "*fp32"},
         {**types, "DAMPED": damped, "HAS_FOUND_INF": found_inf}),
    ]
    for kernel, pointers, constexprs in sources:
        signature = {name: pointers.get(name, "constexpr") for name in kernel.arg_names}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32))
        assert ".target sm_90" in compiled.asm["ptx"] and len(compiled.asm["cubin"]) > 1000


def _suite(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_gpu_suite_dry_run_exactness_and_call_counts():
    """The suite's plumbing on CPU: oracle table, compiled-path call counts from the real shapes, exit 0."""
    done = _suite("--sections", "exactness", "calls", "--paths", "foreach", "single_tensor", "--steps", "4")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| foreach |", "| single_tensor |"))]
    assert len(rows) == 4 and all(row.endswith("| ok |") for row in rows)
    assert "| resnet50 | 161 | 25.6M |" in done.stdout and "| gpt2-small | 148 | 124.4M |" in done.stdout
    assert done.stdout.rstrip().endswith("all checks passed")


def test_gpu_suite_fails_loudly_on_an_exactness_error():
    """A zero tolerance makes every nonzero deviation an error: FAIL in the report and exit status 1."""
    done = _suite("--sections", "exactness", "--paths", "foreach", "--dtypes", "float32", "--steps", "3",
                  "--tolerance-scale", "0")
    assert done.returncode == 1
    assert "**FAIL**" in done.stdout and "- FAIL exactness: foreach float32 deviates" in done.stdout
    assert "gpu_suite: FAILED (exit 1)" in done.stderr


@pytest.mark.slow
def test_gpu_suite_dry_run_end_to_end():
    """``benchmarks/gpu_suite.sh --device cpu``: every section, every path (multi-tensor under the interpreter)."""
    done = _suite(timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for heading in ("## exactness", "## calls", "## step", "## hvp", "## fit", "all checks passed"):
        assert heading in done.stdout
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_suite import PATHS

    assert done.stdout.count("| ok |") == len(PATHS) * 2
    assert "| cifar10_resnet18 | cpu | 2 |" in done.stdout
