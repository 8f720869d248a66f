"""Cost of Adai's default vbar all-reduce under DDP: step time with it (``sharding="auto"``) and without it
(``sharding="replicated"``, the zero-communication opt-out), on 2 gloo processes.

    PYTHONPATH=. python benchmarks/ddp_vbar_cost.py [--rounds 60] [--width 1024] [--batch 64]

Both optimizers drive the same DDP model (an MLP 784-width-width-10), one training iteration each per
round in an order drawn per round (the same on both ranks, as collectives must match), so that drifting
machine load hits both alike. Timed per rank: ``optimizer.step()`` alone, and the whole iteration
(forward, backward with DDP's gradient all-reduce, step). Rank 0 prints medians over rounds (and the
slower rank's median), the ratios auto / replicated, and the latency of the 16-byte all-reduce alone
(after a barrier, i.e. without waiting for a rank that lags).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from adai_lightning.optim import Adai

MODES = ("auto", "replicated")


def iteration(model: nn.Module, optimizer: Adai, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """One training iteration; returns (seconds for the whole iteration, seconds for ``optimizer.step()``)."""
    start = time.perf_counter()
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    before_step = time.perf_counter()
    optimizer.step()
    end = time.perf_counter()
    return end - start, end - before_step


def worker(rank: int, init_file: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(784, args.width), nn.ReLU(), nn.Linear(args.width, args.width), nn.ReLU(),
                        nn.Linear(args.width, 10))
    model = nn.parallel.DistributedDataParallel(net)
    optimizers = {mode: Adai(model.parameters(), lr=1e-3, sharding=mode) for mode in MODES}
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(args.batch, 784, generator=gen), torch.randint(0, 10, (args.batch,), generator=gen)
    times = {mode: ([], []) for mode in MODES}
    for round_index in range(args.warmup + args.rounds):
        order = random.Random(round_index).sample(MODES, len(MODES))
        for mode in order:
            whole, step = iteration(model, optimizers[mode], x, y)
            if round_index >= args.warmup:
                times[mode][0].append(whole)
                times[mode][1].append(step)
    bare = []
    pair = torch.zeros(2, dtype=torch.float64)
    for _ in range(args.rounds):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(pair)
        bare.append(time.perf_counter() - start)
    medians = torch.tensor([[statistics.median(times[m][k]) for k in (0, 1)] for m in MODES], dtype=torch.float64)
    slowest = medians.clone()
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    if rank == 0:
        params = sum(p.numel() for p in net.parameters())
        print(f"2 gloo ranks, 1 thread each, MLP 784-{args.width}-{args.width}-10 ({params / 1e6:.2f}M parameters), "
              f"batch {args.batch} per rank, {args.rounds} rounds; medians in ms (rank 0 / slower rank)")
        print(f"{'sharding':<12} {'iteration':>18} {'optimizer.step()':>18}")
        for i, mode in enumerate(MODES):
            cells = [f"{medians[i, k] * 1e3:7.2f} / {slowest[i, k] * 1e3:7.2f}" for k in (0, 1)]
            print(f"{mode:<12} {cells[0]:>18} {cells[1]:>18}")
        ratio = slowest[0] / slowest[1]
        print(f"ratio auto / replicated (slower rank): iteration {ratio[0]:.3f}, optimizer.step() {ratio[1]:.3f}")
        print(f"a bare 16-byte all_reduce right after a barrier: {statistics.median(bare) * 1e3:.3f} ms (median)")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(f"{tmp}/init", args), nprocs=2)


if __name__ == "__main__":
    main()
