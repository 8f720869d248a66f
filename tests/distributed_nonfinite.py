"""``skip_nonfinite`` on 2 gloo processes: every rank skips the step when any rank's part of the gradients is bad.

Usage: ``python distributed_nonfinite.py OUT_JSON``. Under ZeRO each rank checks only the parameters it
owns, and under FSDP2 only its shard of every gradient, so the verdict must travel between ranks: with
the foreach path as one extra all-reduce before pass 1, with the native kernel inside the ``vbar``
all-reduce. A NaN is put into the gradient on one rank (FSDP2: into rank 0's shard) or into one
parameter on both ranks (ZeRO: only its owner sees it). Rank 0 writes ``{scenario: deviation}``: the
largest relative parameter deviation from one process that never takes the bad step.
"""

from __future__ import annotations

import json
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from adai_lightning import Adai
from distributed_scenarios import GLOBAL_BATCH, HYPER, WORLD, batches, deviation, full_params, make_model

BAD_STEP = 4
GUARDED = dict(HYPER, skip_nonfinite=True)


def train(model: nn.Module, optimizer, rank: int, world: int, poison=None) -> None:
    """Every step on this rank's slice of the global batch; ``poison(model)`` spoils the gradients at BAD_STEP."""
    for step, (x, y) in enumerate(batches()):
        part = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x[part]), y[part]).backward()
        if step == BAD_STEP:
            if poison is None:
                continue
            poison(model)
        optimizer.step()


def reference() -> list[torch.Tensor]:
    model = make_model()
    train(model, Adai(model.parameters(), **GUARDED), rank=0, world=1)
    return full_params(model)


def zero(fused: bool | None, foreach: bool) -> tuple[nn.Module, float]:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = nn.parallel.DistributedDataParallel(make_model())
    optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=Adai, sharding="partitioned",
                                        foreach=foreach, fused=fused, **GUARDED)

    def poison(ddp: nn.Module) -> None:  # the last parameter has one owner: the other rank must learn of it
        list(ddp.parameters())[-1].grad[0] = float("nan")

    train(model, optimizer, dist.get_rank(), WORLD, poison)
    return model.module, optimizer.optim.skipped_steps.item()


def fsdp2() -> tuple[nn.Module, float]:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    fully_shard(model)
    optimizer = Adai(model.parameters(), **GUARDED)

    def poison(sharded: nn.Module) -> None:
        if dist.get_rank() == 0:
            next(sharded.parameters()).grad.to_local().view(-1)[0] = float("nan")

    train(model, optimizer, dist.get_rank(), WORLD, poison)
    return model, optimizer.skipped_steps.item()


SCENARIOS = {
    "zero_foreach": lambda: zero(fused=False, foreach=True),
    "zero_native": lambda: zero(fused=None, foreach=None),
    "fsdp2": fsdp2,
}


def worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        expected = reference()
        results = {}
        for name, run in SCENARIOS.items():
            model, skipped = run()
            results[name] = {"deviation": deviation(full_params(model), expected), "skipped_steps": skipped}
        if rank == 0:
            with open(out, "w") as f:
                json.dump(results, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(f"{tmp}/init", sys.argv[1]), nprocs=WORLD)
