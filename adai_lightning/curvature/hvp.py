"""Hessian-vector products of a loss averaged over a fixed list of batches, by double backward.

The Hessian is never formed: ``H v`` is the gradient of ``<grad L, v>``.  Each product re-runs the
forward pass batch by batch, so memory stays that of one training step.  Parameter ``.grad`` fields
are never touched (only ``torch.autograd.grad`` is used).

Distributed use: each rank passes its own share of the batches and ``total_batches`` (the count
over all ranks) and a ``reduce`` function that sums a flat tensor across ranks (an explicit
``all_reduce``: DDP's gradient hooks do not fire under ``autograd.grad``).  The operator is then the
Hessian of the mean over all ranks' batches, the same on every rank.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

LossFn = Callable[[Any], Tensor]
Reduce = Callable[[Tensor], Tensor]


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one flat vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector into tensors shaped like ``like``."""
    pieces, offset = [], 0
    for ref in like:
        pieces.append(vector[offset:offset + ref.numel()].view_as(ref))
        offset += ref.numel()
    return pieces


class HessianOperator:
    """``v -> H v`` for ``L = sum_b loss_fn(batch_b) / total_batches`` w.r.t. ``params``.

    ``loss_fn(batch)`` returns the scalar mean loss of one batch; batches weigh equally, as the
    epoch-mean loss of a loader does.  Vectors are flat, in the parameters' dtype and device.
    """

    def __init__(self, params: Sequence[Tensor], loss_fn: LossFn, batches: Sequence[Any],
                 total_batches: int | None = None, reduce: Reduce | None = None) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("Invalid params: no parameter requires a gradient")
        if not batches:
            raise ValueError("Invalid batches: the list is empty")
        self.loss_fn = loss_fn
        self.batches = list(batches)
        self.total_batches = len(self.batches) if total_batches is None else total_batches
        self.reduce = reduce
        self.dim = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.num_products = 0

    def _batch_loss(self, batch: Any) -> Tensor:
        loss = self.loss_fn(batch)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
        return loss.reshape(()) / self.total_batches

    def _sum_over_ranks(self, vector: Tensor) -> Tensor:
        return self.reduce(vector) if self.reduce is not None else vector

    def gradient(self) -> Tensor:
        """The flat gradient of the averaged loss (one backward per batch)."""
        total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for batch in self.batches:
            grads = torch.autograd.grad(self._batch_loss(batch), self.params, allow_unused=True)
            total += flatten([torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)])
        return self._sum_over_ranks(total)

    def __call__(self, vector: Tensor) -> Tensor:
        """``H @ vector`` (one forward and one double backward per batch)."""
        tangent = unflatten(vector.to(self.dtype), self.params)
        total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for batch in self.batches:
            grads = torch.autograd.grad(self._batch_loss(batch), self.params, create_graph=True, allow_unused=True)
            used = [(g, t, p) for g, t, p in zip(grads, tangent, self.params) if g is not None and g.requires_grad]
            if used:
                dot = sum((g * t).sum() for g, t, _ in used)
                hv = torch.autograd.grad(dot, self.params, allow_unused=True)
                total += flatten([torch.zeros_like(p) if h is None else h.detach() for h, p in zip(hv, self.params)])
        self.num_products += 1
        return self._sum_over_ranks(total)
