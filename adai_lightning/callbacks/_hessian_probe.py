"""The fixed evaluation subset and side-effect isolation shared by the Hessian callbacks.

``HessianProbe`` collects the first ``num_batches`` batches once (from a loader the user gives or
from a fresh iterator over the trainer's train loader), caches them on the module's device, and
evaluates curvature on them without changing the training run:

- the loss is ``loss_fn(module, batch)``; the default calls ``module.training_step(batch, 0)``
  with ``module.log``/``module.log_dict`` replaced by no-ops on the instance for the duration (so
  the step's own logging does not record the probe's losses), and takes the tensor or its
  ``"loss"`` entry;
- modules are put in eval mode (``train_mode=False``, default: BatchNorm uses its running
  statistics, dropout is off), and each module's mode is restored afterwards;
- every buffer (BatchNorm running statistics, ``num_batches_tracked``) is copied back afterwards;
- the global torch RNG (CPU and the module's CUDA device) is restored (``torch.random.fork_rng``),
  and reseeded with ``seed`` before every batch so that with ``train_mode=True`` dropout draws
  the same mask in every Hessian-vector product (the operator stays one fixed matrix);
- only ``torch.autograd.grad`` is used: parameter ``.grad`` fields are never touched.
- the operator lives for one cadence point only (a ``with`` block): its kept first-order graph
  (automatic reuse, one batch) is freed afterwards, so no memory is held between cadence points.

Under ``torch.distributed`` each rank keeps its own loader's first batches (its sampler's share),
HVPs and gradients are summed across ranks explicitly, and the operator is the Hessian of the
mean over all ranks' batches: the single-process Hessian of the same data, identical on every rank.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator, TypeVar

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor

from adai_lightning.callbacks._cadence import CadencedCallback
from adai_lightning.curvature import HessianOperator

LossFn = Callable[[Any, Any], Tensor]
Result = TypeVar("Result")


def check_int(name: str, value: Any, minimum: int) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r}; it must be an integer >= {minimum}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r}; it must be one of {', '.join(map(repr, choices))}")


def training_step_loss(module: Any, batch: Any) -> Tensor:
    """The loss ``module.training_step(batch, 0)`` returns (a tensor or a dict with ``"loss"``)."""
    output = module.training_step(batch, 0)
    loss = output["loss"] if isinstance(output, dict) else output
    if not isinstance(loss, Tensor):
        raise TypeError(f"training_step returned {type(output).__name__}; pass loss_fn=... to the callback")
    return loss


@contextlib.contextmanager
def _logging_suppressed(module: Any) -> Iterator[None]:
    """Shadow ``module.log`` and ``module.log_dict`` with no-ops on the instance, then remove them."""
    module.log = module.log_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del module.log, module.log_dict


def _sum_across_ranks(vector: Tensor) -> Tensor:
    summed = vector.clone()
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class HessianProbe:
    """Builds a ``HessianOperator`` on the fixed subset and runs a computation on it in isolation."""

    def __init__(self, owner: str, num_batches: int, dataloader: Any, loss_fn: LossFn | None, train_mode: bool,
                 on_error: str, seed: int) -> None:
        check_int("num_batches", num_batches, 1)
        check_choice("on_error", on_error, ("warn", "raise"))
        check_int("seed", seed, 0)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"Invalid loss_fn: {loss_fn!r}; it must be callable as loss_fn(module, batch)")
        self.owner = owner
        self.num_batches = num_batches
        self.dataloader = dataloader
        self.loss_fn = loss_fn or training_step_loss
        self.train_mode = bool(train_mode)
        self.on_error = on_error
        self.seed = seed
        self.disabled = False
        self._batches: list[Any] | None = None

    def generator(self) -> torch.Generator:
        """A CPU generator of the probe's own, seeded identically on every rank and every call."""
        return torch.Generator().manual_seed(self.seed)

    def _collect(self, trainer: pl.Trainer, module: pl.LightningModule) -> list[Any]:
        loader = self.dataloader if self.dataloader is not None else trainer.train_dataloader
        if loader is None:
            raise RuntimeError(f"{self.owner}: no train dataloader to take the evaluation batches from")
        if getattr(loader, "persistent_workers", False) and getattr(loader, "num_workers", 0) > 0:
            # iter() on such a loader resets the very iterator the training loop is consuming
            raise RuntimeError(f"{self.owner}: the train loader has persistent workers; pass dataloader=... "
                               "(a loader of its own) to take the evaluation batches from")
        batches = []
        for batch in loader:
            batches.append(move_data_to_device(batch, module.device))
            if len(batches) == self.num_batches:
                break
        return batches

    @contextlib.contextmanager
    def _isolated(self, module: pl.LightningModule) -> Iterator[None]:
        modes = [(m, m.training) for m in module.modules()]
        buffers = [(b, b.detach().clone()) for b in module.buffers()]
        devices = [module.device] if module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), _logging_suppressed(module), torch.enable_grad():
            module.train(self.train_mode)
            try:
                yield
            finally:
                for submodule, training in modes:
                    submodule.training = training
                with torch.no_grad():
                    for buffer, saved in buffers:
                        buffer.copy_(saved)

    def _operator(self, module: pl.LightningModule) -> HessianOperator:
        world_size = _world_size()

        def loss(batch: Any) -> Tensor:
            torch.default_generator.manual_seed(self.seed)
            if module.device.type == "cuda":
                torch.cuda.default_generators[module.device.index or 0].manual_seed(self.seed)
            return self.loss_fn(module, batch)

        total = len(self._batches) * world_size
        reduce = _sum_across_ranks if world_size > 1 else None
        return HessianOperator(module.parameters(), loss, self._batches, total_batches=total, reduce=reduce)

    def run(self, trainer: pl.Trainer, module: pl.LightningModule,
            compute: Callable[[HessianOperator], Result]) -> Result | None:
        """``compute(operator)`` on the fixed subset, side-effect free; None once disabled.

        Any error of the computation (typically an op without double backward) is raised with
        ``on_error="raise"``; otherwise it is reported in one warning and the probe disables itself.
        """
        if self.disabled:
            return None
        try:
            with self._isolated(module):
                if self._batches is None:
                    self._batches = self._collect(trainer, module)
                with self._operator(module) as operator:  # frees the kept graph after this cadence point
                    return compute(operator)
        except (RuntimeError, NotImplementedError, TypeError) as error:
            if self.on_error == "raise":
                raise
            self.disabled = True
            warnings.warn(f"{self.owner} disabled itself: the Hessian computation failed ({error}); "
                          "training continues. Pass on_error='raise' to stop instead.", RuntimeWarning, stacklevel=2)
            return None


#: The Hessian callbacks' default budget: their own time at most 1.5 % of the training time.
DEFAULT_MAX_OVERHEAD = 0.015
#: A Hessian-vector product's cost in mean training steps, for planning the first measurement of a
#: budgeted cadence: an HVP costs 2.2-2.9 forward+backward passes (docs/performance.md), and a
#: training step more than one (optimizer, data, Lightning); about 1.6 on the default recipe.
HVP_COST_IN_STEPS = 2.0


class ProbedCallback(CadencedCallback):
    """A cadenced callback with a ``HessianProbe``, whose disabled flag is saved in checkpoints."""

    budgeted_cadence = True

    def __init__(self, every_n_train_steps: int | None, every_n_epochs: int | None, max_overhead: float | None,
                 num_batches: int, dataloader: Any, loss_fn: LossFn | None, train_mode: bool, on_error: str,
                 seed: int) -> None:
        super().__init__(every_n_train_steps, every_n_epochs, max_overhead)
        self.probe = HessianProbe(type(self).__name__, num_batches, dataloader, loss_fn, train_mode, on_error, seed)

    def products_per_point(self) -> int:
        """Hessian-vector products (or gradients) one cadence point computes, at most."""
        raise NotImplementedError

    def estimated_cost(self, step_seconds: float) -> float:
        return HVP_COST_IN_STEPS * self.products_per_point() * self.probe.num_batches * step_seconds

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "disabled": self.probe.disabled}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.probe.disabled = bool(state_dict.get("disabled", False))
