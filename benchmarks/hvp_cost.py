"""Cost of one Hessian-vector product against one forward + backward pass on the same batch.

    PYTHONPATH=. python benchmarks/hvp_cost.py [--models small resnet18] [--rounds 15] 2>/dev/null

A curvature callback pays for a Hessian-vector product (HVP) where training pays for a forward
and a backward pass; this prints the ratio (goal: at most 2.5). Both are timed from scratch on
the same batch and parameters, in interleaved rounds (medians):

- ``forward+backward``: ``loss.backward()``-equivalent (``torch.autograd.grad`` of the loss);
- ``HVP double backward``: forward, ``grad(loss, create_graph=True)``, then ``grad(<grad, v>)``,
  the Pearlmutter trick that works with any module (BatchNorm in training mode included);
- ``HVP forward-over-reverse``: ``torch.func.jvp`` of the gradient function (no second graph),
  on a copy of the model whose BatchNorm layers no longer update running statistics
  (``torch.func.replace_all_batch_norm_modules_``; the product is the same, as training-mode
  BatchNorm normalises with batch statistics either way). The script checks that both products agree.

Models: ``small`` is the default recipe's ``SmallConvNet`` on digits-shaped input ``(N, 1, 8, 8)``
(the recipe's batch size, 64); ``resnet18`` is torchvision's ResNet-18 (10 classes) on ``(N, 3, 32, 32)``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, replace_all_batch_norm_modules_

from adai_lightning.recipes import SmallConvNet


def build(name: str, batch: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model in training mode and one batch of random inputs and labels."""
    gen = torch.Generator().manual_seed(0)
    if name == "small":
        model, shape = SmallConvNet(), (batch, 1, 8, 8)
    else:
        import torchvision

        model, shape = torchvision.models.resnet18(weights=None, num_classes=10), (batch, 3, 32, 32)
    return model.train(), torch.rand(shape, generator=gen), torch.randint(0, 10, (batch,), generator=gen)


def direction(model: nn.Module) -> list[torch.Tensor]:
    """The vector ``v`` of the product, one tensor per parameter (seeded)."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(p.shape, generator=gen) for p in model.parameters()]


def forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    params = [p for p in model.parameters() if p.requires_grad]
    return lambda: torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)


def hvp_double_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    params = list(model.parameters())
    vector = direction(model)

    def run():
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vector))
        return torch.autograd.grad(dot, params)

    return run


def hvp_forward_over_reverse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    model = replace_all_batch_norm_modules_(copy.deepcopy(model))
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    vector = dict(zip(params, direction(model)))

    def loss(p):
        return nn.functional.cross_entropy(functional_call(model, (p, buffers), (x,)), y)

    return lambda: list(jvp(grad(loss), (params,), (vector,))[1].values())


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def measure(name: str, batch: int, rounds: int) -> dict[str, float | str]:
    """Median milliseconds of each computation (interleaved rounds), or the reason one cannot run."""
    model, x, y = build(name, batch)
    candidates = {
        "forward+backward": forward_backward,
        "HVP double backward": hvp_double_backward,
        "HVP forward-over-reverse": hvp_forward_over_reverse,
    }
    runs, results, products = {}, {}, {}
    for label, make in candidates.items():
        try:
            run = make(model, x, y)
            products[label] = run()  # warm-up, and the value for the agreement check
            runs[label] = run
        except Exception as error:  # noqa: BLE001  (report any limitation of torch.func as n/a)
            results[label] = f"n/a ({type(error).__name__})"
    hvps = [torch.cat([t.reshape(-1) for t in products[k]]) for k in products if k.startswith("HVP")]
    if len(hvps) == 2:
        results["relative difference"] = ((hvps[0] - hvps[1]).norm() / hvps[0].norm()).item()
    samples: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(rounds):
        for label, run in runs.items():
            start = time.perf_counter()
            run()
            samples[label].append(time.perf_counter() - start)
    results.update({label: median_ms(s) for label, s in samples.items()})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["small", "resnet18"], choices=["small", "resnet18"])
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: 64 small, 32 resnet18)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU, {args.threads} threads, {args.rounds} rounds (medians)\n")
    print("| model | batch | forward+backward ms | HVP double backward ms (x) | HVP forward-over-reverse ms (x) "
          "| products' relative difference |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in args.models:
        batch = args.batch or (64 if name == "small" else 32)
        results = measure(name, batch, args.rounds)
        base = results["forward+backward"]
        cells = [
            f"{value:.2f} ({value / base:.2f}x)" if isinstance(value, float) else value
            for value in (results["HVP double backward"], results["HVP forward-over-reverse"])
        ]
        agreement = results.get("relative difference")
        agreement = "n/a" if agreement is None else f"{agreement:.1e}"
        print(f"| {name} | {batch} | {base:.2f} | {cells[0]} | {cells[1]} | {agreement} |")


if __name__ == "__main__":
    main()
