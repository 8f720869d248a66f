"""Cost of Hessian-vector products against one forward + backward pass on the same batch.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/hvp_cost.py [--models small gpt resnet18] [--modes train eval] \
        [--rounds 21] 2>/dev/null

A curvature callback pays for Hessian-vector products (HVPs) where training pays for a forward
and a backward pass; this prints the ratio, measured in the same process (goal: at most 2.5).  All
products go through ``HessianOperator`` on one batch, in interleaved rounds (a new random order each
round, medians):

- ``forward+backward``: ``torch.autograd.grad`` of the loss (what a training step differentiates,
  with the SDPA kernel torch picks);
- ``finite difference``: ``hvp="finite_difference"``, two gradients at ``theta +- eps v`` (same kernel);
- ``HVP from scratch``: ``reuse_graph=False``: forward, first backward with ``create_graph=True``,
  then the backward of ``<grad, v>``, for every product;
- ``first HVP``: ``reuse_graph=True`` right after ``release()``: builds and keeps the first-order
  graph, then one product (the per-product cost when only one product is taken, k=1);
- ``reused HVP``: a further product on the kept graph (one backward);
- ``graph build`` = first - reused; ``amortised k=20`` = (first + 19 reused) / 20, the cost per
  product of a 20-step Lanczos run, the callbacks' default.

Every column is also given as a multiple of forward+backward (the cost per product in units of one
training step's forward+backward).  The last column checks that the
reused product equals the from-scratch one (relative difference).

Exact products run SDPA's math kernel (the fused ones have no double backward).

Models: ``small`` is the default recipe's ``SmallConvNet`` on digits-shaped input ``(N, 1, 8, 8)``
(the recipe's batch size, 64); ``gpt`` the GPT recipe's ``TinyGPT`` (3 layers, width 96, SDPA) on
``N`` random windows of 64 tokens (default 8); ``resnet18`` is torchvision's ResNet-18 (10 classes)
on ``(N, 3, 32, 32)``.
Mode ``train`` normalises with batch statistics (the callbacks' default ``train_mode=True``), ``eval``
with running statistics (``train_mode=False``).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from torch.nn.attention import SDPBackend, sdpa_kernel

from adai_lightning.curvature import HessianOperator, flatten, unflatten
from adai_lightning.recipes import SmallConvNet
from adai_lightning.recipes.gpt import TinyGPT

LANCZOS_PRODUCTS = 20
MODELS = ("small", "gpt", "resnet18")
DEFAULT_BATCH = {"small": 64, "gpt": 8, "resnet18": 32}


def build(name: str, batch: int, mode: str, device: str = "cpu") -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The model in the given mode and one batch of random inputs and labels (seeded), on ``device``."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    if name == "gpt":
        model, tokens = TinyGPT(), torch.randint(0, 256, (batch, 65), generator=gen)
        data = (tokens[:, :-1], tokens[:, 1:])
    else:
        if name == "small":
            model, shape = SmallConvNet(), (batch, 1, 8, 8)
        else:
            import torchvision

            model, shape = torchvision.models.resnet18(weights=None, num_classes=10), (batch, 3, 32, 32)
        data = (torch.rand(shape, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
    return model.to(device).train(mode == "train"), (data[0].to(device), data[1].to(device))


def cross_entropy(model: nn.Module, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The mean cross-entropy of ``model`` on ``(inputs, labels)`` (per-token for the GPT)."""
    return nn.functional.cross_entropy(model(pair[0]).flatten(0, -2), pair[1].flatten())


def timings(name: str, batch: int, mode: str, rounds: int, device: str = "cpu") -> dict[str, float]:
    """Median seconds of each computation over interleaved rounds, and the reused/fresh agreement.

    On CPU the clock is the process's CPU time (with one thread, the work done, whatever the machine's
    load); on CUDA wall time, every timed call ending with a synchronisation, so device work is counted."""
    model, data = build(name, batch, mode, device)
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    clock = time.perf_counter if cuda else time.process_time  # CPU: process time, independent of the load

    def loss_fn(pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return cross_entropy(model, pair)

    def math_loss_fn(pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        with sdpa_kernel(SDPBackend.MATH):
            return cross_entropy(model, pair)

    params = [p for p in model.parameters() if p.requires_grad]
    fresh = HessianOperator(params, math_loss_fn, [data], reuse_graph=False, hvp="exact")
    reused = HessianOperator(params, math_loss_fn, [data], reuse_graph=True, hvp="exact")
    difference = HessianOperator(params, loss_fn, [data], hvp="finite_difference")
    vector = unflatten(torch.randn(fresh.dim, generator=torch.Generator().manual_seed(1)).to(device), params)

    def first() -> float:
        reused.release()
        sync()
        start = clock()
        reused(vector)
        sync()
        return clock() - start

    def timed(run: Callable[[], object]) -> Callable[[], float]:
        def measure() -> float:
            sync()
            start = clock()
            run()
            sync()
            return clock() - start
        return measure

    runs = {
        "forward+backward": timed(lambda: torch.autograd.grad(loss_fn(data), params)),
        "finite difference": timed(lambda: difference(vector)),
        "HVP from scratch": timed(lambda: fresh(vector)),
        "first HVP": first,
        "reused HVP": timed(lambda: reused(vector)),
    }
    expected, actual = flatten(fresh(vector)), flatten(reused(vector))  # warm-up, and the agreement check
    for run in runs.values():
        run()
    samples: dict[str, list[float]] = {label: [] for label in runs}
    order, shuffle = list(runs), random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for label in order:
            if label == "reused HVP" and not reused.holds_graph:
                reused(vector)  # keep the graph built outside the timed call
            samples[label].append(runs[label]())
    result = {label: statistics.median(s) for label, s in samples.items()}
    result["relative difference"] = float((actual - expected).norm() / expected.norm())
    return result


def row(name: str, batch: int, mode: str, result: dict[str, float]) -> str:
    """One markdown row: milliseconds and multiples of forward+backward."""
    base, first, reused = result["forward+backward"], result["first HVP"], result["reused HVP"]
    columns = [result["finite difference"], result["HVP from scratch"], first - reused, reused, first,
               (first + (LANCZOS_PRODUCTS - 1) * reused) / LANCZOS_PRODUCTS]
    cells = [f"{value * 1e3:.2f} ({value / base:.2f}x)" for value in columns]
    return (f"| {name} | {mode} | {batch} | {base * 1e3:.2f} | " + " | ".join(cells)
            + f" | {result['relative difference']:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--modes", nargs="+", default=["eval", "train"], choices=["eval", "train"])
    parser.add_argument("--batch", type=int, default=None, help=f"batch size (default: {DEFAULT_BATCH})")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = "wall" if torch.device(args.device).type == "cuda" else "process CPU"
    print(f"torch {torch.__version__}, {args.device}, {args.threads} threads, {args.rounds} rounds (medians of "
          f"{clock} time)\n")
    print("| model | mode | batch | forward+backward ms | finite difference ms (x) | HVP from scratch ms (x) "
          "| graph build ms (x) "
          "| reused HVP ms (x) | per product, k=1 ms (x) "
          f"| per product, k={LANCZOS_PRODUCTS} ms (x) | reused vs fresh relative difference |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.models:
        batch = args.batch or DEFAULT_BATCH[name]
        for mode in args.modes:
            print(row(name, batch, mode, timings(name, batch, mode, args.rounds, args.device)), flush=True)


if __name__ == "__main__":
    main()
