"""Peak extra memory of a Lanczos run against the model's size (per process: per rank under FSDP2).

    PYTHONPATH=. python benchmarks/probe_memory.py [--model resnet18] [--iters 20] [--ranks 2] [--host-basis] 2>/dev/null

Each configuration runs in fresh processes: the model (``benchmarks/hvp_cost.py``'s ``build``, train mode,
batch 16 for ResNet-18, 64 for the small net, per rank) does one forward and backward first (so that the
allocator's working set of training is already there), then ``iters`` Lanczos steps with exact products
(graph kept) or finite differences. ``--ranks 2``: two gloo processes, ``fully_shard`` on every residual
block (every child of the small net with parameters) and on the root, finite differences only (FSDP2 refuses exact
products). Printed per rank: the growth of the peak resident set (``ru_maxrss``) during the Lanczos run in
MB and as a multiple of the rank's parameter bytes (its shards), and the Lanczos basis's own share (iters x
those bytes). ``--host-basis`` keeps the basis in host memory: on CPU the same memory, so it measures only
the option's overhead; it matters on an accelerator.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn import functional as F

HEADER = ("| model | ranks | products | basis | Lanczos steps | parameters MB per rank | peak RSS growth MB per rank "
          "| x parameters | basis MB |\n|---|---:|---|---|---:|---:|---:|---:|---:|")


def shard(model: torch.nn.Module, world: int) -> None:
    """FSDP2 on ``world`` gloo ranks: every residual block (or every child of the small net with parameters),
    then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    blocks = ([m for m in model.modules() if type(m).__name__ == "BasicBlock"]
              or [m for m in model.children() if any(True for _ in m.parameters())])
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def child(model_name: str, hvp: str, iters: int, host_basis: bool, world: int) -> None:
    from adai_lightning.curvature import HessianOperator, lanczos
    from adai_lightning.curvature.eigen import warm_start
    from benchmarks.hvp_cost import build

    model, (inputs, targets) = build(model_name, 64 if model_name == "small" else 16, "train")
    if world > 1:
        dist.init_process_group("gloo")
        shard(model, world)
    params = [p for p in model.parameters() if p.requires_grad]
    F.cross_entropy(model(inputs), targets).backward()  # training's own working set
    for p in params:
        p.grad = None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with HessianOperator(params, lambda batch: F.cross_entropy(model(inputs), targets), [None], total_batches=world,
                         hvp=hvp) as operator:
        lanczos(operator, warm_start([], params, torch.Generator().manual_seed(0)), iters, (0, -1),
                host_basis=host_basis)
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
    size = sum(t.numel() * t.element_size() for t in local) / 2 ** 20
    rows = [(size, growth)]
    if world > 1:
        rows = [None] * world
        dist.all_gather_object(rows, (size, growth))
        dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        growths = "/".join(f"{g:.0f}" for _, g in rows)
        ratios = "/".join(f"{g / s:.1f}" for s, g in rows)
        sizes = "/".join(f"{s:.1f}" for s, _ in rows)
        bases = "/".join(f"{iters * s:.0f}" for s, _ in rows)
        print(f"| {model_name} | {world} | {hvp} | {'host' if host_basis else 'device'} | {iters} | {sizes} | {growths} "
              f"| {ratios} | {bases} |", flush=True)


def launch(args: argparse.Namespace, hvp: str) -> None:
    """One configuration in ``args.ranks`` fresh processes (gloo on a free local port)."""
    command = [sys.executable, __file__, "--iters", str(args.iters), "--ranks", str(args.ranks),
               *(["--host-basis"] if args.host_basis else []), "--child", args.model, hvp]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    procs = [subprocess.Popen(command, env={**os.environ, "RANK": str(rank), "WORLD_SIZE": str(args.ranks),
                                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for rank in range(args.ranks)]
    if any(proc.wait() for proc in procs):
        sys.exit(f"a process of the {hvp} configuration failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", choices=["small", "resnet18"])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--ranks", type=int, default=1, choices=[1, 2], help="processes (2: FSDP2 on gloo)")
    parser.add_argument("--host-basis", action="store_true", help="keep the Lanczos basis in host memory")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.iters, args.host_basis, args.ranks)
        return
    print(HEADER)
    for hvp in ("exact", "finite_difference") if args.ranks == 1 else ("finite_difference",):
        launch(args, hvp)


if __name__ == "__main__":
    main()
