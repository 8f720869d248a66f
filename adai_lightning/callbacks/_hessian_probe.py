"""The Hessian probe: the contract between the Hessian callbacks and a user's LightningModule.

``HessianProbe`` evaluates curvature on a fixed, recorded evaluation subset without changing the
training run (final parameters, buffers, optimizer state, logged metrics, torchmetrics states and
every RNG bitwise identical with and without the callbacks):

- the subset: ``num_samples`` samples of the train loader's *dataset*, chosen by index from a
  generator seeded with ``seed`` and collated into batches of ``probe_batch_size`` samples (default:
  the loader's ``batch_size``; :mod:`~adai_lightning.callbacks._probe_subset`); the train loader, its
  sampler and generator are never iterated. The chosen indices are saved in the callback's checkpoint state and reused after
  a resume. It is taken once, at the first cadence point, with the RNGs seeded by ``seed`` (random
  transforms in the dataset give the same samples every time), and kept on the module's device;
- the loss of a batch is ``loss_fn(module, batch)`` if given, else ``training_step`` called with
  the arguments its signature takes (``batch_idx=0``) inside the isolation context of
  :mod:`~adai_lightning.callbacks._probe_isolation` (no logging, inert optimizers and
  ``manual_backward``, torchmetrics states kept, RNGs, modes and buffers restored; with
  ``hvp="exact"`` also math SDPA and compiled code run eagerly, so that a double backward exists);
- products (``hvp``): "exact" (double backward), "finite_difference" (central differences of two
  gradients; the model runs as in training: fused attention kernels, compiled code as compiled;
  parameters restored bitwise) or "auto" (default: exact if the model as it runs has a double
  backward, else finite differences, said once in a warning; the choice is kept for later cadence
  points and in the checkpoint), see :class:`~adai_lightning.curvature.HessianOperator`;
- ``train_mode=True`` (default): modules stay in the modes training runs them in (BatchNorm with
  batch statistics: the objective actually optimized), with the RNG reseeded to ``seed`` before
  every batch so that dropout draws the same mask in every Hessian-vector product (the operator
  stays one fixed matrix); ``train_mode=False``: eval mode (running statistics, no dropout);
- only ``torch.autograd.grad`` is used: parameter ``.grad`` fields are never touched;
- vectors are lists of tensors in the parameters' layout (no flat copy of the model);
- the operator lives for one cadence point only (a ``with`` block): its kept first-order graphs
  (``keep_graphs``: None keeps them for a one-batch subset only, True for every batch, False never)
  are freed afterwards, so no memory is held between cadence points.

The operator is the Hessian of the sample-weighted mean of the batch losses (each batch weighs its
share of the subset's samples). Under ``torch.distributed`` every rank forms the same batches and
takes every ``world_size``-th of them (rank ``r``: batches ``r, r + W, ...``); HVPs and gradients
are summed across ranks explicitly (one all-reduce per parameter), so the operator is the
single-process Hessian of the same subset, identical on every rank.

When the loss cannot be evaluated or differentiated twice, the probe raises (``on_error="raise"``)
or warns once, naming the cause and the fix, and disables itself; training continues.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, TypeVar

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor

from adai_lightning.callbacks._cadence import CadencedCallback
from adai_lightning.callbacks._probe_isolation import StepRecorder, isolated, step_loss
from adai_lightning.callbacks._probe_subset import (ProbeBatch, ProbeError, SubsetRecord, evaluation_batches,
                                                    expected_batches)
from adai_lightning.curvature import HVP_MODES, HessianOperator
from adai_lightning.curvature.vectors import Vector, is_sharded

LossFn = Callable[[Any, Any], Tensor]
Result = TypeVar("Result")
#: The default evaluation subset: 256 samples (four batches of the default recipe's 64).
DEFAULT_NUM_SAMPLES = 256


def check_int(name: str, value: Any, minimum: int) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r}; it must be an integer >= {minimum}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r}; it must be one of {', '.join(map(repr, choices))}")


def check_probe_batch_size(value: Any, dataloader: Any) -> None:
    """Raise a ValueError naming ``probe_batch_size`` unless it is None or an integer >= 1 that can rebatch
    ``dataloader`` (an iterable of batches that is not a ``DataLoader`` gives its batches as they are)."""
    if value is None:
        return
    check_int("probe_batch_size", value, 1)
    if dataloader is not None and not isinstance(dataloader, torch.utils.data.DataLoader):
        raise ValueError(f"Invalid probe_batch_size: {value!r}; dataloader= is a {type(dataloader).__name__}, not a "
                         "DataLoader, so its batches are used as they are: leave probe_batch_size=None")


def check_tracking(warm_start: Any, tol: Any, host_basis: Any) -> None:
    """Raise a ValueError naming the parameter unless ``warm_start`` and ``host_basis`` are booleans and ``tol``
    is None or a number in (0, 1)."""
    for name, value in (("warm_start", warm_start), ("host_basis", host_basis)):
        if not isinstance(value, bool):
            raise ValueError(f"Invalid {name}: {value!r}; it must be True or False")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1):
        raise ValueError(f"Invalid tol: {tol!r}; it must be None or a number in (0, 1)")


def _sum_across_ranks(vector: Vector) -> Vector:
    """Each tensor summed over the ranks (in place: the operator's per-rank results are fresh tensors)."""
    works = [dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True) for tensor in vector]
    for work in works:
        work.wait()
    return vector


def _sharded(module: torch.nn.Module) -> bool:
    """Whether the module's parameters are FSDP2 shards (DTensors): FSDP2's hooks then reduce the gradients."""
    return any(is_sharded(p) for p in module.parameters())


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _seed_all(seed: int, device: torch.device) -> None:
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index or 0].manual_seed(seed)


def _advice(error: BaseException) -> str:
    """The fix for a failed Hessian computation, from its message."""
    text = str(error)
    if isinstance(error, ProbeError):
        return text
    if "double backward" in text or "second time" in text or "twice" in text:
        return (f"{text}. Some code cannot be differentiated twice (compiled code the probe could not run eagerly, "
                "or a custom autograd Function): pass hvp='finite_difference' (or 'auto'), or loss_fn=... "
                "computing the loss with eager, twice-differentiable operations")
    if "derivative for" in text and "not implemented" in text:
        return (f"{text}. An operation has no second derivative: pass hvp='finite_difference' (or 'auto'), or "
                "loss_fn=... computing the loss without it (e.g. a twice-differentiable equivalent)")
    return f"{text}. Pass loss_fn=... to compute the loss yourself, or on_error='raise' to see the traceback"


class HessianProbe:
    """Builds a ``HessianOperator`` on the fixed subset and runs a computation on it in isolation."""

    def __init__(self, owner: str, num_samples: int, dataloader: Any, loss_fn: LossFn | None, train_mode: bool,
                 on_error: str, seed: int, keep_graphs: bool | None = None, hvp: str = "auto",
                 probe_batch_size: int | None = None) -> None:
        check_int("num_samples", num_samples, 1)
        check_choice("hvp", hvp, HVP_MODES)
        check_probe_batch_size(probe_batch_size, dataloader)
        if keep_graphs not in (None, True, False):
            raise ValueError(f"Invalid keep_graphs: {keep_graphs!r}; it must be None, True or False")
        check_choice("on_error", on_error, ("warn", "raise"))
        check_int("seed", seed, 0)
        if not isinstance(train_mode, bool):
            raise ValueError(f"Invalid train_mode: {train_mode!r}; it must be True or False")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"Invalid loss_fn: {loss_fn!r}; it must be callable as loss_fn(module, batch)")
        self.owner = owner
        self.num_samples = num_samples
        self.dataloader = dataloader
        self.loss_fn = loss_fn
        self.train_mode = train_mode
        self.on_error = on_error
        self.seed = seed
        self.keep_graphs = keep_graphs
        self.hvp = hvp
        #: The way products are taken: ``hvp``, with "auto" replaced by what it chose at the first product.
        self.hvp_chosen = hvp
        self.probe_batch_size = probe_batch_size
        self.disabled = False
        #: The subset taken (or loaded from a checkpoint), per loader; None until the first cadence point.
        self.records: dict[str, SubsetRecord] | None = None
        self._batches: list[ProbeBatch] | None = None
        self._recorder = StepRecorder()

    def generator(self) -> torch.Generator:
        """A CPU generator of the probe's own, seeded identically on every rank and every call."""
        return torch.Generator().manual_seed(self.seed)

    def _loaders(self, trainer: pl.Trainer | None) -> tuple[Any, str, bool]:
        """The loaders to take the subset from, the CombinedLoader mode, and whether they are the trainer's."""
        if self.dataloader is not None:
            return self.dataloader, "max_size_cycle", False
        loaders = trainer.train_dataloader if trainer is not None else None
        if loaders is None:
            raise ProbeError("no train dataloader to take the evaluation subset from; pass dataloader=...")
        combined = trainer.fit_loop._combined_loader
        return loaders, getattr(combined, "_mode", "max_size_cycle"), True

    def _collect(self, trainer: pl.Trainer | None, module: pl.LightningModule) -> list[ProbeBatch]:
        """This rank's share of the subset, on the module's device (taken with the RNGs seeded by ``seed``)."""
        loaders, mode, from_trainer = self._loaders(trainer)
        _seed_all(self.seed, module.device)
        batches, self.records = evaluation_batches(loaders, mode, self.num_samples, self.seed, self.records,
                                                   from_trainer, self.probe_batch_size)
        rank, world_size = _rank_and_world()
        strategy = trainer.strategy if trainer is not None else None
        move = strategy.batch_to_device if strategy is not None else \
            (lambda data: move_data_to_device(data, module.device))
        share = batches[rank::world_size]
        if _sharded(module):  # FSDP2's hooks are collectives: every rank runs as many batches (padding weighs 0)
            share += [batches[0]._replace(weight=0.0)] * (math.ceil(len(batches) / world_size) - len(share))
        return [batch._replace(data=move(batch.data)) for batch in share]

    def expected_batches(self, trainer: pl.Trainer) -> int:
        """Batches of the subset this rank evaluates (before it is taken: from the loaders' batch sizes)."""
        if self._batches is not None:
            return max(len(self._batches), 1)
        try:
            loaders = self._loaders(trainer)[0]
        except ProbeError:
            return 1
        batches = expected_batches(loaders, self.num_samples, self.probe_batch_size)
        return max(math.ceil(batches / _rank_and_world()[1]), 1)

    def _batch_loss(self, module: pl.LightningModule, batch: ProbeBatch) -> Tensor:
        _seed_all(self.seed, module.device)
        if self.loss_fn is not None:
            return self.loss_fn(module, batch.data)
        return step_loss(module, batch.data, self._recorder)

    def _operator(self, module: pl.LightningModule) -> HessianOperator:
        reduce = _sum_across_ranks if _rank_and_world()[1] > 1 and not _sharded(module) else None
        return HessianOperator(module.parameters(), lambda batch: self._batch_loss(module, batch), self._batches,
                               weights=[batch.weight for batch in self._batches], reduce=reduce,
                               reuse_graph=self.keep_graphs, hvp=self.hvp_chosen)

    def run(self, trainer: pl.Trainer | None, module: pl.LightningModule,
            compute: Callable[[HessianOperator], Result]) -> Result | None:
        """``compute(operator)`` on the fixed subset, side-effect free; None once disabled.

        Any error of the computation (typically an op without double backward) is raised with
        ``on_error="raise"``; otherwise it is reported in one warning naming the fix and the probe
        disables itself.
        """
        if self.disabled:
            return None
        try:
            with isolated(module, self.train_mode, self._recorder, twice_differentiable=self.hvp == "exact"):
                if self._batches is None:
                    self._batches = self._collect(trainer, module)
                with self._operator(module) as operator:  # frees the kept graph after this cadence point
                    try:
                        return compute(operator)
                    finally:
                        self.hvp_chosen = operator.hvp
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as error:
            if self.on_error == "raise":
                raise
            self.disabled = True
            warnings.warn(f"{self.owner} disabled itself: {_advice(error)}. Training continues unchanged.",
                          RuntimeWarning, stacklevel=2)
            return None

    def state_dict(self) -> dict[str, Any]:
        """The disabled flag and the subset taken (per loader key: its dataset indices, or a count of leading items)."""
        records = None if self.records is None else {key: r.state_dict() for key, r in self.records.items()}
        return {"disabled": self.disabled, "subset": records, "num_samples": self.num_samples, "seed": self.seed,
                "hvp": self.hvp_chosen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.disabled = bool(state.get("disabled", False))
        if self.hvp == "auto" and state.get("hvp") in HVP_MODES:
            self.hvp_chosen = state["hvp"]
        subset = state.get("subset")
        self.records = None if subset is None else {key: SubsetRecord.from_state(r) for key, r in subset.items()}
        self._batches = None  # taken again from the saved records at the next cadence point


#: The Hessian callbacks' default budget: their own time at most 1.5 % of the training time.
DEFAULT_MAX_OVERHEAD = 0.015
#: A Hessian-vector product's cost in mean training steps per batch of the subset, for planning the
#: first measurement of a budgeted cadence: an HVP on one batch costs 2.2-2.9 forward+backward
#: passes with its graph kept (docs/performance.md), and a training step more than one (optimizer,
#: data, Lightning); about 1.6 on the default recipe.
HVP_COST_IN_STEPS = 2.0
#: With several batches the first-order graphs are not kept: each product redoes the forward and
#: both backwards of every batch, 3.4-4x a forward+backward instead of 2.4-2.9x.
REBUILT_GRAPH_FACTOR = 1.4


class ProbedCallback(CadencedCallback):
    """A cadenced callback with a ``HessianProbe``, whose disabled flag is saved in checkpoints."""

    budgeted_cadence = True

    def __init__(self, every_n_train_steps: int | None, every_n_epochs: int | None, max_overhead: float | None,
                 num_samples: int, dataloader: Any, loss_fn: LossFn | None, train_mode: bool, on_error: str,
                 seed: int, keep_graphs: bool | None, hvp: str = "auto", probe_batch_size: int | None = None) -> None:
        super().__init__(every_n_train_steps, every_n_epochs, max_overhead)
        self.probe = HessianProbe(type(self).__name__, num_samples, dataloader, loss_fn, train_mode, on_error, seed,
                                  keep_graphs, hvp, probe_batch_size)

    def products_per_point(self) -> int:
        """Hessian-vector products (or gradients) one cadence point computes, at most."""
        raise NotImplementedError

    def estimated_cost(self, trainer: pl.Trainer, step_seconds: float) -> float:
        """Products per point x batches of the subset x :data:`HVP_COST_IN_STEPS` training steps
        (x :data:`REBUILT_GRAPH_FACTOR` when the graphs are not kept: several batches, ``keep_graphs`` not True)."""
        batches = self.probe.expected_batches(trainer)
        keep = self.probe.keep_graphs
        rebuilt = keep is False or (keep is None and batches > 1)
        factor = HVP_COST_IN_STEPS * (REBUILT_GRAPH_FACTOR if rebuilt else 1.0)
        return factor * self.products_per_point() * batches * step_seconds

    def describe_cost(self, trainer: pl.Trainer) -> str:
        batches = self.probe.expected_batches(trainer)
        return (f"{self.products_per_point()} Hessian-vector products x {batches} batches of the "
                f"{self.probe.num_samples}-sample subset; a larger probe_batch_size makes fewer batches")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "probe": self.probe.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.probe.load_state_dict(state_dict.get("probe", {"disabled": state_dict.get("disabled", False)}))
