"""Hessian-vector products of a loss averaged over a fixed list of batches, by double backward.

The Hessian is never formed: ``H v`` is the gradient of ``<grad L, v>``.  The first-order
gradients are built with ``create_graph=True`` (a forward and a backward per batch); each product
is then one more backward through that graph with ``v`` as its output gradient.  Parameter
``.grad`` fields are never touched (only ``torch.autograd.grad`` is used).

Graph reuse: a from-scratch product re-runs the forward and both backwards.  With
``reuse_graph`` the first-order graph of every batch is kept across products, so each product
costs only the last backward (Lanczos runs ~20 products on one operator).  Kept graphs hold the
activations of a double-backward step per batch until ``release()`` (or the end of a ``with``
block); the automatic choice (``reuse_graph=None``) keeps them only for a single batch, where the
from-scratch product holds that same graph at its peak anyway (the kept one is only not freed
node by node during each product's backward).  A
graph is rebuilt when a parameter was changed in place since it was built (tensor ``_version``);
changes that bypass autograd's version counter (``p.data.add_``, raw data pointers) are not seen:
call ``release()`` after them.

Distributed use: each rank passes its own share of the batches and ``total_batches`` (the count
over all ranks) and a ``reduce`` function that sums a flat tensor across ranks (an explicit
``all_reduce``: DDP's gradient hooks do not fire under ``autograd.grad``).  The operator is then the
Hessian of the mean over all ranks' batches, the same on every rank.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

LossFn = Callable[[Any], Tensor]
Reduce = Callable[[Tensor], Tensor]
Grads = tuple[Tensor | None, ...]


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one flat vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector into tensors shaped like ``like`` (views, no copy)."""
    pieces, offset = [], 0
    for ref in like:
        pieces.append(vector[offset:offset + ref.numel()].view_as(ref))
        offset += ref.numel()
    return pieces


class HessianOperator:
    """``v -> H v`` for ``L = sum_b w_b loss_fn(batch_b)`` w.r.t. ``params``.

    ``loss_fn(batch)`` returns the scalar mean loss of one batch. The weights ``w_b`` are
    ``weights`` if given (e.g. each batch's share of the samples, so that ``L`` is the mean over
    samples when the last batch is smaller), else ``1 / total_batches`` (batches weigh equally, as
    the epoch-mean loss of a loader does).  Under ``reduce`` a rank may hold no batch (it
    contributes zeros).  Vectors are flat, in the parameters' dtype and device.
    ``reuse_graph``: True keeps every batch's first-order graph across products, False rebuilds
    it for each product, None (default) keeps it when there is a single batch.  Use the operator
    as a context manager (or call ``release()``) to free kept graphs.
    """

    def __init__(self, params: Sequence[Tensor], loss_fn: LossFn, batches: Sequence[Any],
                 total_batches: int | None = None, reduce: Reduce | None = None,
                 reuse_graph: bool | None = None, weights: Sequence[float] | None = None) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("Invalid params: no parameter requires a gradient")
        if not batches and reduce is None:
            raise ValueError("Invalid batches: the list is empty")
        if reuse_graph not in (None, True, False):
            raise ValueError(f"Invalid reuse_graph: {reuse_graph!r}; it must be None, True or False")
        if weights is not None and (total_batches is not None or len(weights) != len(batches)):
            raise ValueError(f"Invalid weights: {len(weights)} for {len(batches)} batches (and not with total_batches)")
        self.loss_fn = loss_fn
        self.batches = list(batches)
        self.total_batches = len(self.batches) if total_batches is None else total_batches
        self.weights = [1.0 / self.total_batches] * len(self.batches) if weights is None else list(weights)
        self.reduce = reduce
        self.reuse_graph = len(self.batches) == 1 if reuse_graph is None else reuse_graph
        self.dim = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.num_products = 0
        self.num_graph_builds = 0
        self._graphs: list[Grads] = []
        self._versions: list[int] = []

    def __enter__(self) -> HessianOperator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        """Free the kept first-order graphs (the next product rebuilds them)."""
        self._graphs, self._versions = [], []

    @property
    def holds_graph(self) -> bool:
        """Whether first-order graphs are kept (and not stale) right now."""
        return bool(self._graphs) and self._versions == [p._version for p in self.params]

    def _batch_loss(self, index: int) -> Tensor:
        loss = self.loss_fn(self.batches[index])
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
        return loss.reshape(()) * self.weights[index]

    def _sum_over_ranks(self, vector: Tensor) -> Tensor:
        return self.reduce(vector) if self.reduce is not None else vector

    def _first_order(self, index: int) -> Grads:
        """One batch's gradients with their graph (``create_graph=True``)."""
        self.num_graph_builds += 1
        return torch.autograd.grad(self._batch_loss(index), self.params, create_graph=True, allow_unused=True)

    def _accumulate(self, total: Tensor | None, pieces: Sequence[Tensor | None]) -> Tensor:
        """``total + flatten(pieces)`` (None pieces are zeros), written into one flat buffer."""
        if total is None:
            if all(piece is not None for piece in pieces):
                return flatten(pieces)  # one copy, no zero fill
            total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for view, piece in zip(unflatten(total, self.params), pieces):
            if piece is not None:
                view.add_(piece)
        return total

    def _finish(self, total: Tensor | None) -> Tensor:
        if total is None:  # no parameter reaches the loss
            total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        return self._sum_over_ranks(total)

    def gradient(self) -> Tensor:
        """The flat gradient of the averaged loss: from the kept graphs if any, else one backward per batch."""
        if self.holds_graph:
            per_batch = [[None if g is None else g.detach() for g in grads] for grads in self._graphs]
        else:
            per_batch = (torch.autograd.grad(self._batch_loss(i), self.params, allow_unused=True)
                         for i in range(len(self.batches)))
        total = None
        for grads in per_batch:
            total = self._accumulate(total, grads)
        return self._finish(total)

    def _graph_per_batch(self) -> Iterable[Grads]:
        """Each batch's first-order gradients: the kept ones, or built now (and kept if reusing)."""
        if self.reuse_graph and not self.holds_graph:
            self.release()
            self._graphs = [self._first_order(i) for i in range(len(self.batches))]
            self._versions = [p._version for p in self.params]
        if self.reuse_graph:
            return iter(self._graphs)
        return (self._first_order(i) for i in range(len(self.batches)))

    def __call__(self, vector: Tensor) -> Tensor:
        """``H @ vector``: one backward per batch through its first-order graph (built first if not kept)."""
        tangent = unflatten(vector.to(self.dtype), self.params)
        total = None
        for grads in self._graph_per_batch():
            used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            if not used:
                continue
            hv = torch.autograd.grad([grads[i] for i in used], self.params, grad_outputs=[tangent[i] for i in used],
                                     retain_graph=self.reuse_graph, allow_unused=True)
            total = self._accumulate(total, hv)
        self.num_products += 1
        return self._finish(total)
