"""Time one optimizer step of each Adai path against torch's Adam and SGD on ResNet-18 parameter shapes.

    PYTHONPATH=. python benchmarks/optimizer_step.py [--device cpu|cuda] [--rounds 15] [--threads N] [--only Adai] 2>/dev/null

(the profiler and the compiler log to stderr; the table goes to stdout).

Every optimizer steps the same parameters with the same fixed random gradients (the values do not
change the cost of an elementwise step). Rounds are interleaved (one step of each optimizer per
round, in a fresh random order) so that drifting machine load hits all of them alike, and a
buffer larger than the last-level cache is overwritten before every timed step, so that no
optimizer finds the parameters warm in cache from the one before it. The table shows medians over
rounds, as milliseconds per step and as a ratio to ``torch.optim.Adam(fused=True)``.

"peak extra" is the largest amount of memory a step allocates on top of what existed before it:
on CUDA ``torch.cuda.max_memory_allocated`` around one step; on CPU the peak of the running sum of
the allocations and frees the torch profiler records during one step (``profile_memory=True``),
which sees every tensor allocation, including those made inside compiled kernels' wrappers.
The first step of each optimizer (state creation, and compilation for the fused path) is timed
separately and reported as "first step".
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
import torchvision

from adai_lightning.optim import Adai


def resnet18_parameters(device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """Fresh tensors with ResNet-18's parameter shapes (no weights are downloaded), with random gradients."""
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in (p.shape for p in torchvision.models.resnet18(weights=None).parameters()):
        param = (torch.randn(shape, generator=gen) * 0.05).to(device, dtype)
        param.grad = (torch.randn(shape, generator=gen) * 0.01).to(device, dtype)
        params.append(param)
    return params


def optimizer_factories() -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
    """Every optimizer in the table, by label; pytorch-optimizer's Adai only when it is installed."""
    factories = {
        "Adam fused": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
        "Adam foreach": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
        "SGD momentum foreach": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, foreach=True),
        "Adai default (fused=None)": lambda ps: Adai(ps, lr=1e-3),
        "Adai default, skip_nonfinite=False": lambda ps: Adai(ps, lr=1e-3, skip_nonfinite=False),
        "Adai fused=True": lambda ps: Adai(ps, lr=1e-3, fused=True),
        "Adai foreach": lambda ps: Adai(ps, lr=1e-3, foreach=True, fused=False),
        "Adai single-tensor": lambda ps: Adai(ps, lr=1e-3, foreach=False, fused=False),
    }
    try:
        import pytorch_optimizer
    except ImportError:
        print("pytorch-optimizer is not installed: its Adai is left out of the table")
    else:
        factories["pytorch-optimizer Adai"] = lambda ps: pytorch_optimizer.Adai(ps, lr=1e-3)
    return factories


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(optimizer: torch.optim.Optimizer, device: torch.device, flush: torch.Tensor | None = None) -> float:
    """Seconds for one ``optimizer.step()``, device work included, after overwriting ``flush``."""
    if flush is not None:
        flush.add_(1)
    synchronize(device)
    start = time.perf_counter()
    optimizer.step()
    synchronize(device)
    return time.perf_counter() - start


def peak_extra_bytes(optimizer: torch.optim.Optimizer, device: torch.device) -> int:
    """The most memory one step holds beyond what was allocated before it (see the module docstring)."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        optimizer.step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        optimizer.step()
    allocations = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(allocations, key=lambda e: e.start_ns()):
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for torch")
    parser.add_argument("--only", nargs="+", metavar="TEXT",
                        help="time only the optimizers whose label contains one of these (Adam fused always)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    params = resnet18_parameters(device, dtype)
    numel = sum(p.numel() for p in params)
    print(f"torch {torch.__version__}, device {device}, {args.threads} threads, {len(params)} tensors, "
          f"{numel / 1e6:.2f}M {args.dtype} elements, {args.rounds} rounds")
    optimizers = {label: make(params) for label, make in optimizer_factories().items()
                  if args.only is None or label == "Adam fused" or any(text in label for text in args.only)}
    first = {label: timed_step(opt, device) for label, opt in optimizers.items()}
    timed_step(optimizers["Adam fused"], device)  # warm caches once more before measuring

    times: dict[str, list[float]] = {label: [] for label in optimizers}
    labels = list(optimizers)
    flush = torch.zeros(64 * 2**20, dtype=torch.int32, device=device)  # 256 MiB, beyond any cache
    order = random.Random(0)
    for _ in range(args.rounds):
        for label in order.sample(labels, len(labels)):
            times[label].append(timed_step(optimizers[label], device, flush))
    memory = {label: peak_extra_bytes(opt, device) for label, opt in optimizers.items()}

    baseline = statistics.median(times["Adam fused"])
    largest = max(p.numel() * p.element_size() for p in params)
    print(f"\nlargest parameter tensor: {largest / 2**20:.1f} MiB\n")
    print("| optimizer | ms / step (median) | x Adam fused | peak extra MiB | first step s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label in labels:
        median = statistics.median(times[label])
        print(f"| {label} | {median * 1e3:.2f} | {median / baseline:.2f} | {memory[label] / 2**20:.1f} "
              f"| {first[label]:.2f} |")


if __name__ == "__main__":
    main()
