"""Hessian-vector products of a loss averaged over a fixed list of batches: exact or by finite differences.

The Hessian is never formed. Vectors are lists of tensors in the parameters' own layout (see
:mod:`~adai_lightning.curvature.vectors`); no flat copy of the model is made. Two ways to take a
product (``hvp=``):

- ``"exact"``: ``H v`` is the gradient of ``<grad L, v>`` (double backward). The first-order
  gradients are built with ``create_graph=True`` (a forward and a backward per batch); each product
  is then one more backward through that graph with ``v`` as its output gradient. Needs every
  operation to have a differentiable backward.
- ``"finite_difference"``: the central difference ``(g(theta + eps v) - g(theta - eps v)) / (2 eps)``
  of two ordinary gradients (a forward and a backward per batch each): it runs wherever the model
  can run a backward (fused attention kernels, ``once_differentiable`` functions, compiled code as
  compiled). The parameters are moved in place for the two gradients and restored bitwise from a
  saved copy afterwards (one copy of the parameters, not an add/subtract). The step moves the
  weights ``v`` touches by about ``r`` of their own size (``r (1 + |theta|) / |v|`` for a ``v`` spread
  over all of them; :func:`finite_difference_step`). *Error model*
  (relative error of a product): truncation ``A r^2`` (the third derivative, ``eps^2 |D^3 L[v, v, .]| / 6``)
  plus rounding ``B u / r`` of the two gradients (``u`` the parameters' machine epsilon), smallest at
  ``r* = (B u / 2A)^(1/3)``. ``A`` depends on the direction. Measured (``benchmarks/hvp_accuracy.py
  --rel-steps``, the GPT recipe's model, float32): a random ``v`` has A ~ 48, B ~ 0.48 (r* = 8.4e-4),
  its top eigenvector (along which Lanczos reads lambda_max) A ~ 800, B ~ 0.18 (r* = 2.3e-4). The
  default ``r = STEP_FACTOR u^(1/3)`` (4.9e-4 in float32, 6e-7 in float64) sits between: products
  within ~2e-4 in both directions in float32 (1.2e-4, 2.1e-4; at the former ``r = u^(1/3)``: 1.2e-3,
  2.0e-2; the former global scale ``(1 + |theta|) / |v|`` made the top-eigenvector step 56x larger
  still: 25 % at r = 1e-3); on a tanh MLP ``1.6 u^(2/3)`` in float64, ``2.2 u^(2/3)`` in float32
  (``tests/test_curvature_products.py``). A kink
  (ReLU, max-pool) within ``eps v`` is not in this model: there the difference is no Hessian product
  at any step (see docs/callbacks-curvature.md). 16 bits are refused: under an active bfloat16/float16
  autocast the two gradients run with autocast off (one RuntimeWarning; autocast's cache of cast
  weights would also hide the step), and a loss computed in 16 bits (a model cast to bfloat16, an
  autocast inside ``loss_fn``: seen in the loss's dtype and, by a saved-tensors hook, in the dtypes
  the forward saves for its backward) raises a RuntimeError: ``u^(1/3)`` of bfloat16 is 20 % of the
  weights, no step resolves a product there.
- ``"auto"`` (default): exact; if the first exact product fails (an operation without double
  backward), finite differences from then on, said once in a warning naming the cause.

Parameter ``.grad`` fields are never touched (only ``torch.autograd.grad`` is used).

Graph reuse (exact products): a from-scratch product re-runs the forward and both backwards. With
``reuse_graph`` the first-order graph of every batch is kept across products, so each product
costs only the last backward (Lanczos runs ~20 products on one operator). Kept graphs hold the
activations of a double-backward step per batch until ``release()`` (or the end of a ``with``
block); the automatic choice (``reuse_graph=None``) keeps them only for a single batch, where the
from-scratch product holds that same graph at its peak anyway. A graph is rebuilt when a parameter
was changed in place since it was built (tensor ``_version``); changes that bypass autograd's
version counter (``p.data.add_``, raw data pointers) are not seen: call ``release()`` after them.

Distributed use: each rank passes its own share of the batches and ``total_batches`` (the count
over all ranks) and a ``reduce`` function that sums a list of tensors across ranks (an explicit
``all_reduce``: DDP's gradient hooks do not fire under ``autograd.grad``).  The operator is then the
Hessian of the mean over all ranks' batches, the same on every rank.

FSDP2 (``fully_shard``: every parameter a ``DTensor`` shard): ``torch.autograd.grad`` does not reach
the sharded parameters (the forward runs on all-gathered copies; FSDP2 reduce-scatters their
gradients into the shards' ``.grad`` in post-backward hooks), so exact products are refused and
gradients are taken with ``loss.backward()``: the shards' ``.grad`` are set aside first and put back
afterwards (the same tensor objects, bitwise), and FSDP2's mean over the mesh is multiplied back to a
sum (no ``reduce``: the hooks already reduced). Every rank must then run the same number of batches
(the collectives of FSDP2's hooks): pad a short share with zero-weight batches.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from adai_lightning.curvature.vectors import LOW_PRECISION, Vector, is_sharded, numel, squared_norms

LossFn = Callable[[Any], Tensor]
Reduce = Callable[[Vector], Vector]
Grads = tuple[Tensor | None, ...]
HVP_MODES = ("exact", "finite_difference", "auto")


#: The finite-difference step relative to ``1 + |theta|`` is ``STEP_FACTOR u^(1/3)`` (see the error model).
STEP_FACTOR = 0.1


#: Why exact products are refused under FSDP2 (said in the error, and by hvp="auto" in its warning).
SHARDED_EXACT_CAUSE = ("FSDP2 (fully_shard) parameters: torch.autograd.grad does not reach the sharded parameters, "
                       "whose gradients FSDP2 writes in post-backward hooks, so there is no double backward")

#: Autograd nodes that stand for a backward with no derivative of its own (``once_differentiable``
#: functions: "Error"; ops without a double-backward formula: "NotImplemented").
UNDIFFERENTIABLE_NODES = ("Error", "DelayedError", "NotImplemented")


def check_twice_differentiable(grads: Sequence[Tensor | None]) -> None:
    """Raise a RuntimeError if the first-order gradients' graph holds a node that cannot be differentiated.

    A ``once_differentiable`` backward hangs its result on a detached stand-in behind an error node:
    the double backward w.r.t. the parameters never reaches that node, so it raises nothing and
    silently drops the node's second-derivative terms (measured: 88 % error on a tanh MLP). One walk
    over the graph, at the first build, catches it."""
    seen, stack = set(), [g.grad_fn for g in grads if g is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ in UNDIFFERENTIABLE_NODES:
            raise RuntimeError(f"the gradient's graph holds a node without a second derivative ({type(node).__name__}: "
                               "a once_differentiable autograd Function or an op without double backward); exact "
                               "products would drop its second-derivative terms without an error")
        stack.extend(child for child, _ in node.next_functions)


def finite_difference_step(params: Sequence[Tensor], vector: Sequence[Tensor], rel_step: float | None = None) -> float:
    """``eps = rel_step (1 / |v| + rms_v(theta) / rms_v(v))``; ``rel_step`` defaults to ``STEP_FACTOR u^(1/3)``,
    ``u`` the machine epsilon of the parameters' dtype (see the module docstring for the error model).

    ``rms_v(x)^2 = sum_t w_t |x_t|^2 / n_t`` over the parameter tensors ``t`` (``n_t`` entries), weighted
    by ``v``'s share ``w_t = |v_t|^2 / |v|^2`` of each: the step moves the weights ``v`` touches by about
    ``rel_step`` of their own size. For a ``v`` spread over every tensor this is ``rel_step (1 + |theta|) / |v|``;
    for one concentrated on small weights (the GPT recipe's top eigenvector lies on 0.02-scale weights, while
    its LayerNorm gains make 26 of |theta| = 27.8) that global step was 56x too large (25 % error)."""
    if rel_step is None:
        rel_step = STEP_FACTOR * torch.finfo(params[0].dtype).eps ** (1 / 3)
    shares, weights = squared_norms(vector), squared_norms(params)
    length = float(shares.sum()) ** 0.5
    if length == 0:
        return 0.0
    sizes = torch.tensor([float(p.numel()) for p in params], dtype=torch.float64)
    seen = float((shares * weights / sizes).sum() / (shares.square() / sizes).sum()) ** 0.5
    return rel_step * (1.0 / length + seen)


class HessianOperator:
    """``v -> H v`` for ``L = sum_b w_b loss_fn(batch_b)`` w.r.t. ``params``.

    ``loss_fn(batch)`` returns the scalar mean loss of one batch. The weights ``w_b`` are
    ``weights`` if given (e.g. each batch's share of the samples, so that ``L`` is the mean over
    samples when the last batch is smaller), else ``1 / total_batches`` (batches weigh equally, as
    the epoch-mean loss of a loader does).  Under ``reduce`` a rank may hold no batch (it
    contributes zeros).  Vectors are lists of tensors shaped like ``params`` (their dtype and device).
    ``hvp``: "exact", "finite_difference" or "auto" (see the module docstring); ``rel_step``: the
    finite-difference step relative to the weights ``v`` touches (default: ``STEP_FACTOR u^(1/3)``).
    ``reuse_graph``: True keeps every batch's first-order graph across exact products, False rebuilds
    it for each product, None (default) keeps it when there is a single batch.  Use the operator
    as a context manager (or call ``release()``) to free kept graphs.
    """

    def __init__(self, params: Sequence[Tensor], loss_fn: LossFn, batches: Sequence[Any],
                 total_batches: int | None = None, reduce: Reduce | None = None,
                 reuse_graph: bool | None = None, weights: Sequence[float] | None = None, hvp: str = "auto",
                 rel_step: float | None = None) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("Invalid params: no parameter requires a gradient")
        if not batches and reduce is None:
            raise ValueError("Invalid batches: the list is empty")
        if reuse_graph not in (None, True, False):
            raise ValueError(f"Invalid reuse_graph: {reuse_graph!r}; it must be None, True or False")
        if weights is not None and (total_batches is not None or len(weights) != len(batches)):
            raise ValueError(f"Invalid weights: {len(weights)} for {len(batches)} batches (and not with total_batches)")
        if hvp not in HVP_MODES:
            raise ValueError(f"Invalid hvp: {hvp!r}; it must be one of {', '.join(map(repr, HVP_MODES))}")
        if rel_step is not None and not 0 < rel_step < 1:
            raise ValueError(f"Invalid rel_step: {rel_step!r}; it must be in (0, 1) (or None)")
        self.loss_fn = loss_fn
        self.batches = list(batches)
        self.total_batches = len(self.batches) if total_batches is None else total_batches
        self.weights = [1.0 / self.total_batches] * len(self.batches) if weights is None else list(weights)
        self.sharded = any(is_sharded(p) for p in self.params)
        if self.sharded and (reduce is not None or not all(is_sharded(p) for p in self.params)):
            raise ValueError("Invalid params: under FSDP2 every parameter must be sharded (fully_shard the root "
                             "module) and reduce must be None (FSDP2's hooks reduce the gradients)")
        self.reduce = reduce
        self.reuse_graph = len(self.batches) == 1 if reuse_graph is None else reuse_graph
        #: "exact" or "finite_difference" once decided ("auto" until the first product).
        self.hvp = hvp
        self.rel_step = rel_step
        self.dim = numel(self.params)
        self.num_products = 0
        self.num_graph_builds = 0
        self._graphs: list[Grads] = []
        self._versions: list[int] = []
        self._loss_dtype: torch.dtype | None = None
        self._saved_dtypes: set[torch.dtype] = set()
        self._warned_autocast = False

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
        self._loss_dtype = loss.dtype
        return loss.reshape(()) * self.weights[index]

    def _first_order(self, index: int) -> Grads:
        """One batch's gradients with their graph (``create_graph=True``), checked once for nodes without a
        second derivative."""
        if self.sharded:
            raise RuntimeError(SHARDED_EXACT_CAUSE)
        self.num_graph_builds += 1
        grads = torch.autograd.grad(self._batch_loss(index), self.params, create_graph=True, allow_unused=True)
        if self.num_graph_builds == 1:
            check_twice_differentiable(grads)
        return grads

    def _accumulate(self, total: Vector | None, pieces: Sequence[Tensor | None]) -> Vector:
        """``total + pieces`` (None pieces are zeros); the first pieces become the total."""
        if total is None:
            return [torch.zeros_like(p) if piece is None else piece for p, piece in zip(self.params, pieces)]
        for view, piece in zip(total, pieces):
            if piece is not None:
                view.add_(piece)
        return total

    def _finish(self, total: Vector | None) -> Vector:
        if total is None:  # no parameter reaches the loss (or this rank holds no batch)
            total = [torch.zeros_like(p) for p in self.params]
        return self.reduce(total) if self.reduce is not None else total

    def _sharded_gradient(self) -> Vector:
        """Under FSDP2: the gradient over all ranks' batches by ``backward()`` (see the module docstring)."""
        saved = [p.grad for p in self.params]
        for param in self.params:
            param.grad = None
        try:
            for index in range(len(self.batches)):
                self._batch_loss(index).backward()
            mesh_size = float(self.params[0].device_mesh.size())  # FSDP2 divides the sum by it
            return [torch.zeros_like(p) if p.grad is None else p.grad.mul_(mesh_size) for p in self.params]
        finally:
            for param, grad in zip(self.params, saved):
                param.grad = grad

    def _local_gradient(self) -> Vector | None:
        """This rank's gradient of the weighted loss at the current parameters, one backward per batch
        (under FSDP2: already the gradient over all ranks)."""
        if self.sharded:
            return self._sharded_gradient()
        total = None
        for index in range(len(self.batches)):
            total = self._accumulate(total, torch.autograd.grad(self._batch_loss(index), self.params,
                                                                allow_unused=True))
        return total

    def gradient(self) -> Vector:
        """The gradient of the averaged loss: from the kept graphs if any, else one backward per batch."""
        if not self.holds_graph:
            return self._finish(self._local_gradient())
        total = None
        for grads in self._graphs:
            total = self._accumulate(total, [None if g is None else g.detach().clone() for g in grads])
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

    def _exact(self, tangent: Sequence[Tensor]) -> Vector | None:
        """This rank's ``H v`` by double backward: one backward per batch through its first-order graph."""
        total = None
        for grads in self._graph_per_batch():
            used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            if not used:
                continue
            hv = torch.autograd.grad([grads[i] for i in used], self.params, grad_outputs=[tangent[i] for i in used],
                                     retain_graph=self.reuse_graph, allow_unused=True)
            total = self._accumulate(total, hv)
        return total

    def _full_precision(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast off for the two gradients if it is on in 16 bits (said once per operator)."""
        device_type = self.params[0].device.type
        if not (torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) in LOW_PRECISION):
            return contextlib.nullcontext()
        if not self._warned_autocast:
            self._warned_autocast = True
            warnings.warn("Hessian-vector products by finite differences run with autocast turned off: a 16-bit "
                          "step cannot resolve a product, and autocast's cache of cast weights would not see the "
                          "moved parameters", RuntimeWarning, stacklevel=4)
        return torch.autocast(device_type, enabled=False)

    def _note_saved(self, tensor: Tensor) -> Tensor:
        """A saved-tensors pack hook: notes the dtype of every tensor the forward saves for its backward."""
        self._saved_dtypes.add(tensor.dtype)
        return tensor

    def _check_precision(self) -> None:
        """Refuse a loss computed in 16 bits: a 16-bit loss, or 16-bit tensors saved for the backward (parameters
        cast to bfloat16/float16, an autocast entered inside ``loss_fn``)."""
        low = sorted(str(d) for d in ({self._loss_dtype} | self._saved_dtypes) & set(LOW_PRECISION))
        if low:
            raise RuntimeError(f"finite-difference Hessian products need the loss in float32 or float64, got "
                               f"{', '.join(low)} (parameters or loss): a 16-bit step cannot resolve a Hessian product; "
                               "compute the loss in float32 (e.g. bf16-mixed, not bf16-true) or use hvp='exact'")

    def _finite_difference(self, tangent: Sequence[Tensor]) -> Vector | None:
        """This rank's ``(g(theta + eps v) - g(theta - eps v)) / (2 eps)``; the parameters are restored bitwise."""
        eps = finite_difference_step(self.params, tangent, self.rel_step)
        if eps == 0.0:
            return None
        saved = [p.detach().clone() for p in self.params]
        try:
            gradients = []
            self._saved_dtypes = set()
            with self._full_precision(), torch.autograd.graph.saved_tensors_hooks(self._note_saved, lambda t: t):
                for move in (eps, -2 * eps):  # to theta + eps v, then on to theta - eps v: one pass each
                    with torch.no_grad():
                        for param, direction in zip(self.params, tangent):
                            param.add_(direction, alpha=move)
                    gradients.append(self._local_gradient())
                    self._check_precision()
        finally:
            with torch.no_grad():
                for param, original in zip(self.params, saved):
                    param.copy_(original)
        plus, minus = gradients
        if plus is None:
            return None
        for high, low in zip(plus, minus):
            high.sub_(low).div_(2 * eps)
        return plus

    def _auto(self, tangent: Sequence[Tensor]) -> Vector | None:
        """Exact if it works; else finite differences from now on, said once."""
        try:
            product = self._exact(tangent)
        except (RuntimeError, NotImplementedError) as error:
            self.release()
            product = self._finite_difference(tangent)
            cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            warnings.warn(f"Hessian-vector products by finite differences of gradients (hvp='auto'): the exact "
                          f"double backward failed ({cause}); hvp='finite_difference' chooses this without the "
                          "failed attempt",
                          RuntimeWarning, stacklevel=3)
            self.hvp = "finite_difference"
            return product
        self.hvp = "exact"
        return product

    def __call__(self, vector: Sequence[Tensor]) -> Vector:
        """``H @ vector``, in the layout of the parameters."""
        tangent = [v.to(p.dtype) for v, p in zip(vector, self.params)]
        take = {"exact": self._exact, "finite_difference": self._finite_difference, "auto": self._auto}[self.hvp]
        total = take(tangent)
        self.num_products += 1
        return self._finish(total)
