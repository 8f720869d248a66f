"""Runs Adai on 2 gloo processes under DDP, ZeRO and FSDP2 and compares with one process.

Usage: ``python distributed_scenarios.py OUT_JSON SCENARIO [SCENARIO ...]``. Each scenario trains
the same 3-layer MLP for ``STEPS`` steps on the same global batches (each rank gets half of every
batch) and records the largest relative parameter deviation from a single-process Adai run with the
same arguments, as ``{scenario: deviation}`` written by rank 0. Scenarios without a ``sharding``
argument check that the default is right for their layout. Run by ``tests/test_distributed_*.py`` in a subprocess.
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

STEPS = 30
WORLD = 2
GLOBAL_BATCH = 16
HYPER = dict(lr=0.1, betas=(0.1, 0.99), eps=1e-3, weight_decay=5e-4)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 12, generator=gen), torch.randn(GLOBAL_BATCH, 4, generator=gen))
            for _ in range(STEPS)]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, rank: int, world: int, steps=slice(None)) -> None:
    """Steps of mean-squared error (all ``STEPS`` by default) on this rank's slice of every global batch."""
    for x, y in batches()[steps]:
        part = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x[part]), y[part]).backward()
        optimizer.step()


def full_params(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter as a full plain tensor (DTensors gathered)."""
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in model.parameters()]


def single_process_adai(params, options: dict) -> Adai:
    """Adai as in a single process, although it runs inside the process group (possibly on one rank
    alone): ``sharding="replicated"``, or it would wait for the other ranks to join its reduction of vbar."""
    return Adai(params, **{**options, "sharding": "replicated"})


def reference(options: dict | None = None) -> list[torch.Tensor]:
    """Parameters after ``STEPS`` single-process steps of Adai with ``options`` (default :data:`HYPER`)."""
    model = make_model()
    train(model, single_process_adai(model.parameters(), HYPER if options is None else options), rank=0, world=1)
    return full_params(model)


def deviation(params: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """Largest ``|p - p_ref| / max|p_ref|`` over the parameter tensors."""
    return max(((p - q).abs().max() / q.abs().max()).item() for p, q in zip(params, expected))


def run_ddp(options: dict) -> nn.Module:
    model = nn.parallel.DistributedDataParallel(make_model())
    train(model, Adai(model.parameters(), **options), dist.get_rank(), WORLD)
    return model.module


def run_zero(options: dict) -> nn.Module:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = nn.parallel.DistributedDataParallel(make_model())
    optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=Adai, **options)
    train(model, optimizer, dist.get_rank(), WORLD)
    return model.module


def run_fsdp2(options: dict) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    train(model, Adai(model.parameters(), **options), dist.get_rank(), WORLD)
    return model


HALF = slice(None, STEPS // 2)


def resume_single_process(model: nn.Module, options: dict, load_state) -> nn.Module:
    """A plain copy of ``model`` whose Adai gets its state from ``load_state`` and runs the remaining steps."""
    plain = make_model()
    with torch.no_grad():
        for target, source in zip(plain.parameters(), full_params(model)):
            target.copy_(source)
    optimizer = single_process_adai(plain.parameters(), options)
    load_state(plain, optimizer)
    train(plain, optimizer, rank=0, world=1, steps=slice(STEPS // 2, None))
    return plain


def zero_checkpoint(options: dict) -> nn.Module:
    """Half the steps under ZeRO, the consolidated state saved, the rest in one process from it."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = nn.parallel.DistributedDataParallel(make_model())
    optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=Adai, **options)
    train(model, optimizer, dist.get_rank(), WORLD, HALF)
    optimizer.consolidate_state_dict(to=0)
    state = [optimizer.state_dict() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(state, src=0)
    return resume_single_process(model.module, options, lambda _, opt: opt.load_state_dict(state[0]))


def fsdp2_checkpoint(options: dict) -> nn.Module:
    """Half the steps under FSDP2, the full optimizer state gathered, the rest in one process from it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict)
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    fully_shard(model)
    optimizer = Adai(model.parameters(), **options)
    train(model, optimizer, dist.get_rank(), WORLD, HALF)
    full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    return resume_single_process(model, options, lambda plain, opt: set_optimizer_state_dict(plain, opt, full))


def single_process_half(options: dict) -> tuple[nn.Module, Adai]:
    """Half the steps in one process (every rank computes the same), for resuming under sharding."""
    model = make_model()
    optimizer = single_process_adai(model.parameters(), options)
    train(model, optimizer, rank=0, world=1, steps=HALF)
    return model, optimizer


def zero_from_single_process(options: dict) -> nn.Module:
    """A single-process checkpoint loaded into ZeRO (each rank keeps its partition), the rest sharded."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    plain, plain_optimizer = single_process_half(options)
    model = nn.parallel.DistributedDataParallel(plain)
    optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=Adai, **options)
    optimizer.load_state_dict(plain_optimizer.state_dict())
    train(model, optimizer, dist.get_rank(), WORLD, slice(STEPS // 2, None))
    return model.module


def fsdp2_from_single_process(options: dict) -> nn.Module:
    """A single-process checkpoint loaded into FSDP2 (state sharded on load), the rest sharded."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict)
    from torch.distributed.fsdp import fully_shard

    model, plain_optimizer = single_process_half(options)
    full = get_optimizer_state_dict(model, plain_optimizer)
    fully_shard(model)
    optimizer = Adai(model.parameters(), **options)
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))
    train(model, optimizer, dist.get_rank(), WORLD, slice(STEPS // 2, None))
    return model


def idle_rank(options: dict) -> nn.Module:
    """Rank 0 optimises the whole model on full batches; rank 1 only a parameter that never has a gradient.

    Like a ZeRO partition of frozen weights: rank 1's steps have nothing to update but must still join
    every reduction of ``vbar`` (rank 0 would wait forever otherwise), contributing a zero sum and count.
    """
    model = make_model()
    params = model.parameters() if dist.get_rank() == 0 else [nn.Parameter(torch.zeros(3))]
    train(model, Adai(params, **options), rank=0, world=1)
    return model


UNREDUCED = {**HYPER, "sharding": "replicated"}
# name: (run, Adai's arguments for it and for the single-process reference, less ``sharding``)
SCENARIOS = {
    "zero_from_single_process": (zero_from_single_process, HYPER),
    "fsdp2_from_single_process": (fsdp2_from_single_process, HYPER),
    "zero_checkpoint": (zero_checkpoint, HYPER),
    "fsdp2_checkpoint": (fsdp2_checkpoint, HYPER),
    "ddp": (run_ddp, HYPER),
    "ddp_replicated": (run_ddp, UNREDUCED),
    "zero": (run_zero, HYPER),
    "zero_adai_defaults": (run_zero, {}),
    "zero_unreduced": (run_zero, UNREDUCED),
    "fsdp2": (run_fsdp2, HYPER),
    "fsdp2_unreduced": (run_fsdp2, UNREDUCED),
    "idle_rank": (idle_rank, HYPER),
}


def worker(rank: int, init_file: str, out: str, names: list[str]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name in names:
            run, options = SCENARIOS[name]
            params = full_params(run(options))
            same_algorithm = {k: v for k, v in options.items() if k != "sharding"}
            results[name] = deviation(params, reference(same_algorithm))
        if rank == 0:
            with open(out, "w") as f:
                json.dump(results, f)
        dist.barrier()  # no rank tears gloo down while the other still uses it (SIGABRT otherwise)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    out_json, scenario_names = sys.argv[1], sys.argv[2:]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(f"{tmp}/init", out_json, scenario_names), nprocs=WORLD)
