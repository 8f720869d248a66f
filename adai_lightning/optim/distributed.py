"""Adai's one global scalar, ``vbar``, when the model is spread over several processes.

Adai's inertia depends on ``vbar``, the mean of ``vhat`` over EVERY element of the model. Where each
rank holds the whole model (single process, DDP) the local mean is already the global one. Where each
rank holds only part of it (ZeRO's optimizer-state partitions, FSDP2's DTensor shards) the local mean
is another number on every rank, and the algorithm silently changes. This module turns the local
``(sum of vhat, element count)`` pair into the global mean with ONE all-reduce of a two-element float64
tensor per optimizer step: 16 bytes per rank, asynchronous on the device, no host synchronisation.

Sharding modes (the ``sharding`` argument of :class:`~adai_lightning.optim.Adai`):

``"auto"``
    reduce over ranks when any parameter is a DTensor (FSDP2 ``fully_shard``, tensor parallel);
    otherwise do nothing (single process, DDP: every rank holds every element).
``"partitioned"``
    this optimizer holds a disjoint part of the model's parameters on each rank of the process group
    (``ZeroRedundancyOptimizer(..., optimizer_class=Adai, sharding="partitioned")``): always reduce.
``"replicated"``
    never communicate: every rank holds all parameters (or each rank trains its own model).

Pure torch.distributed: no Lightning import.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from adai_lightning.optim._functional import safe_mean

try:  # DTensor is public from torch 2.4 on; older builds simply have no FSDP2
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - exercised only on torch builds without distributed
    DTensor = None

SHARDING_MODES = ("auto", "partitioned", "replicated")


def validate_sharding(sharding: str) -> None:
    """Raise a ValueError naming ``sharding`` unless it is one of :data:`SHARDING_MODES`."""
    if sharding not in SHARDING_MODES:
        raise ValueError(f"Invalid sharding: {sharding!r}; it must be one of {', '.join(SHARDING_MODES)}")


def is_dtensor(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (an FSDP2 / tensor-parallel parameter or its state)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local_part(tensor: Tensor) -> Tensor:
    """The piece of ``tensor`` stored on this rank: the local shard of a DTensor, the tensor otherwise.

    The local shard shares storage with the DTensor, so in-place updates on it update the DTensor.
    """
    return tensor.to_local() if is_dtensor(tensor) else tensor


def shaped_like(reference: Tensor, local: Tensor) -> Tensor:
    """``local`` (this rank's piece) as a DTensor laid out like ``reference`` when that is one."""
    if not is_dtensor(reference):
        return local
    return DTensor.from_local(local, reference.device_mesh, reference.placements, run_check=False,
                              shape=reference.shape, stride=reference.stride())


def replication(param: Tensor) -> int:
    """On how many ranks each element of this rank's piece of ``param`` lives (1 when fully sharded)."""
    if not is_dtensor(param):
        return 1
    mesh = param.device_mesh
    return math.prod(mesh.size(dim) for dim, placement in enumerate(param.placements) if not placement.is_shard())


def needs_reduction(sharding: str, params: Iterable[Tensor]) -> bool:
    """Whether ``vbar`` must be reduced over ranks for these parameters in this sharding mode."""
    if sharding == "replicated" or not (dist.is_available() and dist.is_initialized()):
        return False
    if sharding == "partitioned":
        return True
    params = list(params)
    dtensors = [p for p in params if is_dtensor(p)]
    if not dtensors:
        return False
    copies = {replication(p) for p in dtensors}
    if len(copies) > 1 or len(dtensors) != len(params):
        raise ValueError(
            "Adai's sharding='auto' needs every parameter to be a DTensor replicated on the same number of "
            f"ranks (found replication factors {sorted(copies)} and "
            f"{len(dtensors)} DTensor parameters); mixed placements would weight the mean of vhat unevenly"
        )
    return True


def global_mean(total: Tensor, count: int, process_group: dist.ProcessGroup | None) -> Tensor:
    """The mean of ``vhat`` over all ranks of ``process_group`` from this rank's sum and element count.

    One ``all_reduce(SUM)`` of ``[total, count]`` in float64 (exact counts up to 2**53). When every
    element lives on the same number ``r`` of ranks (``r = 1`` for ZeRO and FSDP2, the replicate size
    for HSDP), both sum and count are ``r`` times too large and the mean is exact. Returns the mean in
    ``total``'s dtype; 1 where the mean is 0 (see :func:`~adai_lightning.optim._functional.safe_mean`).
    """
    pair = torch.stack([total.to(torch.float64), total.new_full((), count, dtype=torch.float64)])
    dist.all_reduce(pair, op=dist.ReduceOp.SUM, group=process_group)
    return safe_mean(pair[0], pair[1]).to(total.dtype)
