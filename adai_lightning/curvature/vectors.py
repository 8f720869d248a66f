"""Vectors in the parameters' own layout: a list of tensors, one per parameter (a local shard under FSDP2).

The curvature algorithms (Lanczos, power iteration, Hutchinson/Hutch++, the stability ratio) never
concatenate the model into one flat vector: a vector is a list shaped like the parameters, and these
few operations are all they need. Under FSDP2 a parameter is a ``DTensor``; its entry holds only this
rank's shard. Dot products and norms sum the local pieces and all-reduce once per sharded mesh
dimension, so a shard counts once and a replicated tensor (replicated mesh dimension, or a plain
tensor on every rank as under DDP) is not counted again on each rank.

Random vectors are drawn on CPU in float64 from the caller's ``torch.Generator``, one parameter at a
time in its global shape (host memory: the largest parameter), and each rank keeps its shard: the
same vector on one process and on any number of ranks, and the global RNG streams are never used.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

Vector = list[Tensor]


def _dtensor_class() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


DTensor = _dtensor_class()


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (FSDP2 / tensor parallel parameter or vector entry)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """This rank's piece of ``tensor`` (the tensor itself unless it is a ``DTensor``)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def _sharded_groups(tensor: Tensor) -> tuple[Any, ...]:
    """The process groups whose ranks hold different pieces of ``tensor`` (its ``Shard`` mesh dimensions)."""
    if not is_sharded(tensor):
        return ()
    mesh = tensor.device_mesh
    return tuple(mesh.get_group(dim) for dim, placement in enumerate(tensor.placements) if placement.is_shard())


def dots(rows: Sequence[Sequence[Tensor]], b: Sequence[Tensor]) -> Tensor:
    """``[<row, b> for row in rows]`` in float64 on the host, the same on every rank: local sums, then
    one all-reduce per distinct set of sharded groups (not one per row or per parameter)."""
    totals: dict[tuple[Any, ...], Tensor] = {}
    for index, tensor in enumerate(b):
        pieces = torch.stack([torch.sum(local(row[index]).detach().double() * local(tensor).detach().double()) for row in rows]) \
            if rows else torch.zeros(0, dtype=torch.float64, device=local(tensor).device)
        key = _sharded_groups(tensor)
        totals[key] = totals[key] + pieces if key in totals else pieces
    result = torch.zeros(len(rows), dtype=torch.float64)
    for groups, total in totals.items():
        for group in groups:
            dist.all_reduce(total, group=group)
        result += total.cpu()
    return result


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """``<a, b>`` over every entry (float64 accumulation), the same on every rank."""
    return float(dots([a], b)[0])


#: 16-bit floating dtypes: norms of them are taken in float32 (here), finite differences refuse them (hvp.py).
LOW_PRECISION = (torch.float16, torch.bfloat16)


def squared_norms(a: Sequence[Tensor]) -> Tensor:
    """``|a_i|^2`` of every entry (float64, on the host), the same on every rank.

    One ``torch._foreach_norm`` per device, dtype and set of sharded groups, in the entries' own
    dtype (float32 for 16-bit entries, which could overflow): a float64 copy of every entry, as
    :func:`dots` makes, cost 72 ms on ResNet-18's 62 tensors against 4 ms (one CPU thread). Then
    one all-reduce per set of sharded groups, as in :func:`dots`."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    pieces = [local(tensor).detach() for tensor in a]
    for index, (tensor, piece) in enumerate(zip(a, pieces)):
        groups.setdefault((_sharded_groups(tensor), piece.device, piece.dtype), []).append(index)
    result = torch.zeros(len(pieces), dtype=torch.float64)
    for (sharded_groups, _, dtype), indices in groups.items():
        chosen = [pieces[i] for i in indices]
        low = dtype in LOW_PRECISION
        norms = torch._foreach_norm(chosen, 2, dtype=torch.float32) if low else torch._foreach_norm(chosen)
        squares = torch.stack(norms).double().square()
        for group in sharded_groups:
            dist.all_reduce(squares, group=group)
        result[indices] = squares.cpu()
    return result


def norm(a: Sequence[Tensor]) -> float:
    """The global L2 norm of ``a``."""
    return float(squared_norms(a).sum()) ** 0.5


def scaled(a: Sequence[Tensor], factor: float) -> Vector:
    """``factor * a`` (new tensors)."""
    return [t * factor for t in a]


def combination(a: Sequence[Tensor], b: Sequence[Tensor], alpha: float = 1.0) -> Vector:
    """``a + alpha * b`` (new tensors)."""
    return [x.add(y, alpha=alpha) for x, y in zip(a, b)]


def add_(target: Sequence[Tensor], other: Sequence[Tensor], alpha: float = 1.0) -> None:
    """``target += alpha * other`` in place."""
    for x, y in zip(target, other):
        x.add_(y, alpha=alpha)


def normalized(a: Sequence[Tensor]) -> Vector:
    """``a / |a|`` (new tensors)."""
    return scaled(a, 1.0 / norm(a))


def zeros_like(like: Sequence[Tensor]) -> Vector:
    """Zeros shaped (and sharded) like ``like``."""
    return [torch.zeros_like(t) for t in like]


def to_device(a: Sequence[Tensor], like: Sequence[Tensor]) -> Vector:
    """``a`` moved to the device and dtype of ``like`` (no copy when already there)."""
    return [x.to(device=ref.device, dtype=ref.dtype) for x, ref in zip(a, like)]


def to_host(a: Sequence[Tensor]) -> Vector:
    """``a`` copied to host (CPU) memory; DTensor entries keep their placement on a CPU copy of the shard."""
    return [x.detach().to("cpu", copy=True) for x in a]


def _shard_of(full: Tensor, like: Tensor) -> Tensor:
    """The piece of the global tensor ``full`` that this rank holds of ``like`` (itself for a plain tensor)."""
    if not is_sharded(like):
        return full
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    piece = full[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
    return DTensor.from_local(piece.contiguous(), like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


def _drawn(like: Sequence[Tensor], draw: Any) -> Vector:
    """One tensor per entry of ``like``: ``draw(global_shape)`` on CPU float64, cast, moved, sharded like it."""
    vector = []
    for ref in like:
        full = draw(ref.shape).to(dtype=ref.dtype)
        vector.append(_shard_of(full, ref).to(device=ref.device))
    return vector


def random_normal(like: Sequence[Tensor], generator: torch.Generator) -> Vector:
    """A standard-normal vector shaped like ``like``, drawn on CPU from ``generator``."""
    return _drawn(like, lambda shape: torch.randn(shape, generator=generator, dtype=torch.float64))


def random_unit(like: Sequence[Tensor], generator: torch.Generator) -> Vector:
    """A standard-normal vector drawn from ``generator``, normalised to unit length."""
    return normalized(random_normal(like, generator))


def rademacher(like: Sequence[Tensor], generator: torch.Generator) -> Vector:
    """A vector of independent +-1 entries shaped like ``like``, drawn on CPU from ``generator``."""
    return _drawn(like, lambda shape: torch.randint(0, 2, shape, generator=generator, dtype=torch.int64)
                  .mul_(2).sub_(1).double())


def numel(like: Sequence[Tensor]) -> int:
    """The global number of entries (a DTensor counts its global shape)."""
    return sum(t.numel() for t in like)


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate (plain, unsharded) tensors into one flat vector: for dense references on small models."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector into tensors shaped like ``like`` (views, no copy): the inverse of :func:`flatten`."""
    pieces, offset = [], 0
    for ref in like:
        pieces.append(vector[offset:offset + ref.numel()].view_as(ref))
        offset += ref.numel()
    return pieces
