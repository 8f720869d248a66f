"""Finite-difference Hessian-vector products against exact ones: accuracy of the curves and cost per product.

    PYTHONPATH=. python benchmarks/hvp_accuracy.py [--models small resnet18 gpt] [--iters 20] 2>/dev/null

For each model (one batch: ``small`` is the default recipe's ``SmallConvNet`` on (64, 1, 8, 8),
``resnet18`` torchvision's ResNet-18 on (16, 3, 32, 32), both built by ``benchmarks/hvp_cost.py`` in
train mode; ``gpt`` a 2-layer GPT-style model with ``F.scaled_dot_product_attention`` on 8 x 32
random tokens) and each precision (float32, and bfloat16 autocast around the whole computation),
the same computations run with ``hvp="exact"`` (math SDPA kernel: the fused one has no double
backward) and ``hvp="finite_difference"`` (the default SDPA kernel), from the same start vector and
probes: ``iters`` Lanczos steps (lambda_max and lambda_min from one run) and a 10-probe Hutchinson
trace. Printed: each value, the relative difference finite-difference vs exact, and the seconds per
product of each (Lanczos products; the first exact product builds the kept graph, which later ones
reuse).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from adai_lightning.curvature import HessianOperator, hutchinson_trace, lanczos
from adai_lightning.curvature.eigen import warm_start
from benchmarks.hvp_cost import build


class TinyGPT(nn.Module):
    """Token and position embeddings, ``layers`` pre-norm blocks (SDPA causal attention, GELU MLP), a tied head."""

    def __init__(self, vocab: int = 128, width: int = 64, heads: int = 4, layers: int = 2, length: int = 32) -> None:
        super().__init__()
        self.heads = heads
        self.embed, self.position = nn.Embedding(vocab, width), nn.Embedding(length, width)
        self.blocks = nn.ModuleList(nn.ModuleDict({"norm1": nn.LayerNorm(width), "qkv": nn.Linear(width, 3 * width),
                                                   "out": nn.Linear(width, width), "norm2": nn.LayerNorm(width),
                                                   "mlp": nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                                                        nn.Linear(4 * width, width))})
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length = tokens.shape
        x = self.embed(tokens) + self.position(torch.arange(length))
        for block in self.blocks:
            q, k, v = block["qkv"](block["norm1"](x)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + block["out"](attended.transpose(1, 2).reshape(batch, length, -1))
            x = x + block["mlp"](block["norm2"](x))
        return self.norm(x) @ self.embed.weight.T


def problem(name: str) -> tuple[nn.Module, callable]:
    """The model and ``loss_fn(batch)`` on its one batch."""
    if name == "gpt":
        torch.manual_seed(0)
        model = TinyGPT()
        tokens = torch.randint(0, 128, (8, 33), generator=torch.Generator().manual_seed(0))
        return model, lambda batch: F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    model, (inputs, targets) = build(name, 64 if name == "small" else 16, "train")
    return model, lambda batch: F.cross_entropy(model(inputs), targets)


def measure(name: str, hvp: str, bf16: bool, iters: int) -> dict[str, float]:
    model, loss_fn = problem(name)
    params = [p for p in model.parameters() if p.requires_grad]
    kernel = sdpa_kernel(SDPBackend.MATH) if hvp == "exact" else contextlib.nullcontext()
    precision = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with kernel, precision, HessianOperator(params, loss_fn, [None], hvp=hvp) as operator:
        start = time.perf_counter()
        pairs = lanczos(operator, warm_start([], params, torch.Generator().manual_seed(0)), iters, (0, -1))
        seconds = (time.perf_counter() - start) / pairs.products
        trace = hutchinson_trace(operator, params, 10, torch.Generator().manual_seed(1))
    return {"lambda_max": float(pairs.values[-1]), "lambda_min": float(pairs.values[0]), "trace": trace.trace,
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["small", "resnet18", "gpt"],
                        choices=["small", "resnet18", "gpt"])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    print("| model | precision | lambda_max exact | rel. err FD | lambda_min exact | rel. err FD | trace exact "
          "| rel. err FD | s/product exact | s/product FD |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for bf16 in (False, True):
            exact = measure(name, "exact", bf16, args.iters)
            fd = measure(name, "finite_difference", bf16, args.iters)
            errors = {k: abs(fd[k] - exact[k]) / abs(exact[k]) for k in ("lambda_max", "lambda_min", "trace")}
            print(f"| {name} | {'bf16 autocast' if bf16 else 'float32'} | {exact['lambda_max']:.4g} | "
                  f"{errors['lambda_max']:.1e} | {exact['lambda_min']:.4g} | {errors['lambda_min']:.1e} | "
                  f"{exact['trace']:.4g} | {errors['trace']:.1e} | {exact['seconds']:.3f} | {fd['seconds']:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
