"""Adai's one global scalar, ``vbar``, when the model is spread over several processes.

Adai's inertia depends on ``vbar``, the mean of ``vhat`` over EVERY element of the model. Where each
rank holds only part of the model (ZeRO's optimizer-state partitions, FSDP2's DTensor shards) a local
mean is another number on every rank, and the algorithm silently changes. This module turns the local
``(sum of vhat, element count)`` pair into the global mean with ONE all-reduce of a two-element float64
tensor per optimizer step: 16 bytes per rank, issued on the device, no host synchronisation.

Whenever torch.distributed is initialised with more than one rank, the default reduces: replicated
ranks (DDP) then contribute W identical sums and W identical counts, so their mean is unchanged, and
disjoint shards (ZeRO, FSDP2) or hybrid layouts add up to the whole model. So every layout is right
with no flag; the price under DDP is that 16-byte all-reduce (measured in docs/distributed.md).

Sharding modes (the ``sharding`` argument of :class:`~adai_lightning.optim.Adai`):

``"auto"`` (default)
    reduce over ``process_group`` whenever it has more than one rank. Refuses DTensor parameters
    replicated on unequal numbers of ranks (or mixed with plain tensors), whose mean would be weighted
    unevenly.
``"partitioned"``
    reduce over ``process_group`` without the layout check (the caller vouches that every element is
    counted the same number of times).
``"replicated"``
    never communicate: every rank holds all parameters (DDP; saves the all-reduce) or each rank trains
    its own model. Wrong under ZeRO or FSDP2.

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


def needs_reduction(
    sharding: str, params: Iterable[Tensor], process_group: dist.ProcessGroup | None = None
) -> bool:
    """Whether ``vbar`` must be reduced over ``process_group`` for these parameters in this sharding mode."""
    if sharding == "replicated" or not (dist.is_available() and dist.is_initialized()):
        return False
    if dist.get_world_size(process_group) <= 1:
        return False
    if sharding == "auto":
        check_uniform_replication(list(params))
    return True


def check_uniform_replication(params: list[Tensor]) -> None:
    """Refuse layouts in which the elements would be counted unequally often in the reduced mean."""
    dtensors = [p for p in params if is_dtensor(p)]
    if not dtensors:
        return
    copies = {replication(p) for p in dtensors}
    if len(copies) > 1 or len(dtensors) != len(params):
        raise ValueError(
            "Adai's sharding='auto' needs every parameter to be a DTensor replicated on the same number of "
            f"ranks, or none to be one (found replication factors {sorted(copies)} and "
            f"{len(dtensors)} DTensor parameters of {len(params)}); mixed placements would weight the mean of "
            "vhat unevenly"
        )


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
