"""Adai's CUDA measurements in one run, printed as a markdown report; exit status 1 on any failure.

    benchmarks/gpu_suite.sh                  # on a GPU machine: the real thing, under 8 minutes
    benchmarks/gpu_suite.sh --device cpu     # dry run: every section end to end on CPU, tiny sizes

Sections (``--sections``):

- ``exactness``: every Adai path that can run on the device (multi-tensor Triton, ``torch.compile``,
  foreach, single-tensor) against the float64 oracle (``tests/adai_oracle.py``) on the
  three-group problem of ``tests/test_perf_fused.py``: float32 within 1e-5, bfloat16 parameters
  (float32 state) within ``steps * 2**-8`` of the largest parameter (a bfloat16 rounding per step);
  the multi-tensor path also with tiny blocks and chunks (8 and 16 elements), so that every tensor
  spans several. Any miss fails the run.
- ``calls``: what the ``torch.compile`` path (the CUDA default before the multi-tensor one) launches
  per step for each model's real shapes: one compiled call per item and pass.
- ``step``: ms per step (median of interleaved rounds, a cache-sized buffer overwritten before each
  step), ratio to ``Adam(fused=True)``, ``Adam(foreach=True)`` and SGD with momentum, peak extra
  memory, and device launches per step with their summed run time (kernels, copies and memsets in
  a ``torch.profiler`` trace of one step; CUDA only: a wall time well above it means the step is
  host-bound), for ResNet-18, ResNet-50 and GPT-2 small parameter shapes (built from shapes,
  nothing downloaded).
- ``hvp``: ``benchmarks/hvp_cost.py`` on the device (Hessian-vector products against forward+backward).
- ``fit``: one short ``adai-lightning fit`` of ``recipes/cifar10_resnet18.yaml`` on stand-in CIFAR-10
  files (``benchmarks/gpu_suite_fit.py``).

On CPU the multi-tensor kernels run under Triton's interpreter (``gpu_suite.sh`` sets
``TRITON_INTERPRET=1``), so CPU timings say nothing about CUDA: the dry run checks the machinery.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import optimizer_step  # noqa: E402

from adai_lightning.optim import Adai, _fused, _multi_tensor, _native  # noqa: E402
from tests.test_perf_fused import _run_pair, oracle_deviation  # noqa: E402

GPT2_SMALL = ([(50257, 768), (1024, 768)]
              + [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,), (768,), (768,), (768, 3072), (3072,),
                 (3072, 768), (768,)] * 12
              + [(768,), (768,)])
PATHS = ("multi_tensor", "multi_tensor_small_chunks", "compiled", "foreach", "single_tensor")
BASELINES = ("Adam fused", "Adam foreach", "SGD-M foreach")


@contextlib.contextmanager
def forced(path: str, device: torch.device) -> Iterator[None]:
    """Make ``Adai(fused=True)`` take ``path`` ("multi_tensor..." or "compiled") on ``device``'s buckets."""
    small = dict(BLOCK=8, CHUNK=16) if path == "multi_tensor_small_chunks" else {}
    device_types = (device.type,) if path.startswith("multi_tensor") else ()
    with mock.patch.object(_native, "supports", lambda *args: False), \
            mock.patch.object(_multi_tensor, "DEVICE_TYPES", device_types), \
            mock.patch.multiple(_multi_tensor, **small) if small else contextlib.nullcontext():
        yield


def path_options(path: str) -> dict[str, object]:
    return {"foreach": dict(foreach=True, fused=False), "single_tensor": dict(foreach=False, fused=False)}.get(
        path, dict(fused=True))


def exactness(device: torch.device, steps: int, tolerance_scale: float, paths: list[str],
              dtypes: list[str]) -> list[str]:
    """Print the oracle table; return the failures."""
    tolerances = {"float32": 1e-5, "bfloat16": steps * 2.0**-8}
    print("| path | parameters / state | steps | max deviation / max abs param | tolerance | result |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    failures = []
    for path in paths:
        for name in dtypes:
            dtype = getattr(torch, name)
            with forced(path, device):
                deviation = oracle_deviation(*_run_pair(dtype, steps, device=str(device), **path_options(path)))
            tolerance = tolerances[name] * tolerance_scale
            passed = deviation <= tolerance  # False for NaN too
            state = "float32" if name in ("float32", "bfloat16") else name
            print(f"| {path} | {name} / {state} | {steps} | {deviation:.2e} | {tolerance:.1e} | "
                  f"{'ok' if passed else '**FAIL**'} |", flush=True)
            if not passed:
                failures.append(f"exactness: {path} {name} deviates {deviation:.3e} > {tolerance:.1e}")
    return failures


def model_shapes(name: str) -> list[tuple[int, ...]]:
    """Parameter shapes of a model, without building weights (torchvision on the meta device)."""
    if name == "gpt2-small":
        return list(GPT2_SMALL)
    import torchvision

    with torch.device("meta"):
        return [tuple(p.shape) for p in getattr(torchvision.models, name)(weights=None).parameters()]


def compiled_calls(models: list[str]) -> None:
    """Items (compiled-kernel calls) per pass of the ``torch.compile`` path for each model's real shapes."""
    print("| model | tensors | elements | compiled calls, pass 1 | compiled calls, pass 2 | per step |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in models:
        tensors = [torch.empty(shape, device="meta") for shape in model_shapes(name)]
        steps = [1] * len(tensors)
        first = len(list(_fused._items([tensors, tensors], steps)))
        second = len(list(_fused._items([tensors] * 5, steps)))
        numel = sum(t.numel() for t in tensors)
        print(f"| {name} | {len(tensors)} | {numel / 1e6:.1f}M | {first} | {second} | {first + second} |")


def parameters(shapes: list[tuple[int, ...]], device: torch.device, max_dim: int | None) -> list[torch.Tensor]:
    """Random parameters with random gradients, each dimension capped at ``max_dim`` (dry runs)."""
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        shape = tuple(min(d, max_dim) for d in shape) if max_dim else shape
        param = (torch.randn(shape, generator=gen) * 0.05).to(device)
        param.grad = (torch.randn(shape, generator=gen) * 0.01).to(device)
        params.append(param)
    return params


class ForcedPath:
    """An optimizer whose every step runs with one Adai path forced (see :func:`forced`)."""

    def __init__(self, optimizer: torch.optim.Optimizer, path: str, device: torch.device) -> None:
        self.optimizer, self.path, self.device = optimizer, path, device

    def step(self) -> None:
        with forced(self.path, self.device):
            self.optimizer.step()


def step_optimizers(device: torch.device) -> dict[str, Callable[[list[torch.Tensor]], object]]:
    def path(name: str, **options: object) -> Callable[[list[torch.Tensor]], object]:
        return lambda ps: ForcedPath(Adai(ps, lr=1e-3, fused=True, **options), name, device)

    return {
        "Adam fused": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
        "Adam foreach": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
        "SGD-M foreach": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, foreach=True),
        "Adai default (fused=None)": lambda ps: Adai(ps, lr=1e-3),
        "Adai default, skip_nonfinite=False": lambda ps: Adai(ps, lr=1e-3, skip_nonfinite=False),
        "Adai multi-tensor (fused=True)": path("multi_tensor"),
        # its kernels take int step counts, which the default non-finite guard cannot give them
        "Adai compiled (torch.compile, skip_nonfinite=False)": path("compiled", skip_nonfinite=False),
        "Adai foreach": lambda ps: Adai(ps, lr=1e-3, foreach=True, fused=False),
    }


def device_work(optimizer: object, device: torch.device) -> tuple[int, float] | None:
    """Kernels, copies and memsets on the GPU during one step, and the milliseconds they ran (summed),
    from a torch.profiler trace; None on CPU. Wall time well above the device time means host-bound."""
    if device.type != "cuda":
        return None
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        optimizer.step()
        torch.cuda.synchronize(device)
    events = [e for e in prof.profiler.kineto_results.events() if e.device_type() == torch.autograd.DeviceType.CUDA]
    return len(events), sum(e.duration_ns() for e in events) / 1e6


def step_table(model: str, device: torch.device, rounds: int, max_dim: int | None) -> None:
    params = parameters(model_shapes(model), device, max_dim)
    numel = sum(p.numel() for p in params)
    optimizers = {label: make(params) for label, make in step_optimizers(device).items()}
    first = {label: optimizer_step.timed_step(opt, device) for label, opt in optimizers.items()}
    times: dict[str, list[float]] = {label: [] for label in optimizers}
    flush = torch.zeros(64 * 2**20 if device.type == "cuda" else 2**20, dtype=torch.int32, device=device)
    order = random.Random(0)
    for _ in range(rounds):
        for label in order.sample(list(optimizers), len(optimizers)):
            times[label].append(optimizer_step.timed_step(optimizers[label], device, flush))
    medians = {label: statistics.median(t) for label, t in times.items()}
    print(f"\n**{model}**: {len(params)} tensors, {numel / 1e6:.2f}M float32 elements, {rounds} rounds\n")
    print("| optimizer | ms / step | x Adam fused | x Adam foreach | x SGD-M | peak extra MiB | launches / step "
          "| device busy ms | first step s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, opt in optimizers.items():
        ratios = " | ".join(f"{medians[label] / medians[base]:.2f}" for base in BASELINES)
        memory = optimizer_step.peak_extra_bytes(opt, device) / 2**20
        work = device_work(opt, device)
        launches, busy = ("n/a (cpu)", "n/a") if work is None else (work[0], f"{work[1]:.3f}")
        print(f"| {label} | {medians[label] * 1e3:.3f} | {ratios} | {memory:.1f} | {launches} | {busy} "
              f"| {first[label]:.2f} |", flush=True)


def run_script(args: list[str], timeout: int) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--sections", nargs="+", default=["exactness", "calls", "step", "hvp", "fit"],
                        choices=["exactness", "calls", "step", "hvp", "fit"])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "gpt2-small"])
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 25 on CUDA, 2 on CPU)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps of each oracle comparison")
    parser.add_argument("--max-dim", type=int, default=None, help="cap every dimension (default: none on CUDA, 8 on CPU)")
    parser.add_argument("--tolerance-scale", type=float, default=1.0, help="multiply every exactness tolerance")
    args = parser.parse_args()
    device = torch.device(args.device)
    dry = device.type == "cpu"
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_suite: CUDA is not available here; use --device cpu for the dry run")
    if dry and os.environ.get("TRITON_INTERPRET") != "1" and "multi_tensor" in " ".join(args.paths):
        sys.exit("gpu_suite: the CPU dry run needs TRITON_INTERPRET=1 (gpu_suite.sh sets it)")
    rounds = args.rounds or (2 if dry else 25)
    max_dim = args.max_dim or (8 if dry else None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run: not a CUDA measurement)"
    print(f"# Adai GPU suite: {name}\n\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}"
          f", sections {' '.join(args.sections)}\n")
    failures: list[str] = []
    sections = {
        "exactness": lambda: failures.extend(exactness(device, args.steps, args.tolerance_scale, args.paths,
                                                       args.dtypes)),
        "calls": lambda: compiled_calls(args.models),
        "step": lambda: [step_table(model, device, rounds, max_dim) for model in args.models],
        "hvp": lambda: print(run_script(["benchmarks/hvp_cost.py", "--device", args.device, "--rounds",
                                         "1" if dry else "11", "--models", *(["small"] if dry else
                                                                            ["small", "resnet18"])], 300)),
        "fit": lambda: print(run_script(["benchmarks/gpu_suite_fit.py", "--accelerator", "cpu" if dry else "gpu",
                                         "--batches", "2" if dry else "20"], 300)),
    }
    for section in args.sections:
        print(f"\n## {section}\n", flush=True)
        started = time.perf_counter()
        try:
            sections[section]()
        except Exception:  # noqa: BLE001  (report it, run the other sections, fail at the end)
            failures.append(f"{section}: {traceback.format_exc(limit=3)}")
            print(f"**{section} failed**: see the end of the report")
        print(f"\n({section}: {time.perf_counter() - started:.1f} s)", flush=True)
    print("\n## result\n")
    print("\n".join(f"- FAIL {failure}" for failure in failures) if failures else "all checks passed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
