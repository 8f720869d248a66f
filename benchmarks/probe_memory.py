"""Peak extra memory of a Lanczos run against the model's size (per process: per rank under DDP/FSDP2).

    PYTHONPATH=. python benchmarks/probe_memory.py [--model resnet18] [--iters 20] 2>/dev/null

Each configuration runs in a fresh process: the model (``benchmarks/hvp_cost.py``'s ``build``, train mode,
batch 16 for ResNet-18, 64 for the small net) does one forward and backward first (so that the allocator's
working set of training is already there), then ``iters`` Lanczos steps with exact products (graph kept)
or finite differences. Printed: the growth of the peak resident set (``ru_maxrss``) during the Lanczos run
in MB and as a multiple of the parameters' bytes, and the Lanczos basis's own share (iters x parameters).
On CPU the host basis (``host_basis=True``) is the same memory; it matters on an accelerator.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys

import torch
from torch.nn import functional as F


def child(model_name: str, hvp: str, iters: int) -> None:
    from adai_lightning.curvature import HessianOperator, lanczos
    from adai_lightning.curvature.eigen import warm_start
    from benchmarks.hvp_cost import build

    model, (inputs, targets) = build(model_name, 64 if model_name == "small" else 16, "train")
    params = [p for p in model.parameters() if p.requires_grad]
    F.cross_entropy(model(inputs), targets).backward()  # training's own working set
    for p in params:
        p.grad = None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with HessianOperator(params, lambda batch: F.cross_entropy(model(inputs), targets), [None], hvp=hvp) as operator:
        lanczos(operator, warm_start([], params, torch.Generator().manual_seed(0)), iters, (0, -1))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    size = sum(p.numel() * p.element_size() for p in params) / 2 ** 20
    print(f"| {model_name} | {hvp} | {iters} | {size:.1f} | {after - before:.0f} | {(after - before) / size:.1f} "
          f"| {iters * size:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", choices=["small", "resnet18"])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.iters)
        return
    print("| model | products | Lanczos steps | parameters MB | peak RSS growth MB | x parameters | basis MB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for hvp in ("exact", "finite_difference"):
        subprocess.run([sys.executable, __file__, "--iters", str(args.iters), "--child", args.model, hvp], check=True)


if __name__ == "__main__":
    main()
