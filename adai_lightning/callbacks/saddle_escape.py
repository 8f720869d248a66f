"""``SaddleEscapeMonitor``: is training stuck near a saddle, and is the optimizer leaving it?"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor

from adai_lightning.callbacks._cadence import log_scalars
from adai_lightning.callbacks._hessian_probe import (DEFAULT_MAX_OVERHEAD, DEFAULT_NUM_SAMPLES, LossFn,
                                                     ProbedCallback, check_choice, check_int, check_tracking)
from adai_lightning.callbacks.hessian_sharpness import DEFAULT_TOL
from adai_lightning.curvature import HessianOperator, lanczos, power_smallest, power_top_k
from adai_lightning.curvature.eigen import warm_start
from adai_lightning.curvature.vectors import Vector, combination, dot, dots, norm, scaled, to_host
from adai_lightning.curvature.plateaus import (DEFAULT_DROP_FRACTION, DEFAULT_MIN_STEPS, DEFAULT_TOLERANCE,
                                               DEFAULT_WINDOW, PlateauDetector)

MOMENTUM_KEYS = ("exp_avg", "momentum_buffer")
#: This callback's names for the arguments of PlateauDetector.
DETECTOR_ARGUMENTS = {"window": "plateau_window", "min_steps": "plateau_min_steps", "tolerance": "plateau_tolerance",
                      "drop_fraction": "escape_fraction"}
#: Training losses stay on the device and reach the plateau detector in groups of this many batches.
LOSS_FLUSH_EVERY = 64


def _cosine(a: Vector, b: Vector) -> float:
    denominator = norm(a) * norm(b)
    return dot(a, b) / denominator if denominator > 0 else 0.0


def _escape_direction(vector: Vector, gradient: Vector) -> Vector:
    """Orient a unit eigenvector so that moving along it lowers the loss to first order
    (``<v, grad> <= 0``); at a critical point, so that the sum of its entries is positive."""
    slope = dot(vector, gradient)
    if abs(slope) <= 1e-12 * (norm(gradient) + 1e-30):
        slope = -float(dots([[torch.ones_like(t) for t in vector]], vector)[0])
    return scaled(vector, -1.0) if slope > 0 else vector


class SaddleEscapeMonitor(ProbedCallback):
    """Logs saddle indicators every cadence point and plateau-escape events when they happen.

    Keys: ``saddle/grad_norm`` (global L2 norm of the gradient used by the last optimizer step),
    ``saddle/lambda_min`` (most negative Hessian eigenvalue on the fixed subset),
    ``saddle/negative_ratio`` (``|lambda_min| / lambda_max`` if ``lambda_min < 0``, else 0),
    ``saddle/momentum_drift`` (cosine between the momentum's update direction ``-m`` and the escape
    direction), ``saddle/update_drift`` (cosine between the last parameter update and it),
    ``saddle/plateau`` (1.0 on a confirmed plateau, else 0.0), and when an escape is confirmed
    ``saddle/escape_steps`` (the plateau's length in steps), ``saddle/escape_start`` and
    ``saddle/escape_end`` (the optimizer steps it began and the loss left it) and ``saddle/escapes``
    (count so far).

    Plateaus and escapes come from :class:`~adai_lightning.curvature.plateaus.PlateauDetector` on the
    training losses the run already computes (no extra forward pass): a running median of the
    log-loss over ``plateau_window`` steps, a plateau = at least ``plateau_min_steps`` steps within a
    factor ``1 + plateau_tolerance``, an escape = the median falling to ``escape_fraction`` of the
    plateau's level within as many steps as the plateau lasted (at least ``plateau_min_steps``); a
    slow decay is not an escape. ``saddle/plateau`` turns on ``plateau_min_steps`` steps into a
    plateau, and an escape is logged when confirmed, a few dozen steps after the loss left the
    plateau; its ``escape_steps`` counts from the plateau's start to the step the loss left it.

    The escape direction is the lambda_min eigenvector oriented so that the loss decreases along it
    (see :func:`_escape_direction`): a positive drift means the optimizer is moving out of the
    saddle along its most negative curvature.  The momentum is the optimizer state ``exp_avg``
    (Adai, Adam) or ``momentum_buffer`` (SGD); the key is omitted when there is none.

    Cost per cadence point: ``lanczos_iters`` Hessian-vector products (Lanczos gives lambda_min and
    lambda_max from one run) or up to ``3 * power_iters`` with power iteration, plus one gradient
    on the subset; one copy of the parameters taken just before the optimizer step that precedes a
    cadence point (for ``update_drift``). The plateau detector keeps each step's loss on the device
    and reads them in groups of :data:`LOSS_FLUSH_EVERY` batches, and at cadence points and the end
    of training: one host transfer (and under DDP one all-reduce, so every rank sees the same
    plateaus) per group instead of one per step. Escape events are therefore logged when their
    group is read, at the logger step of the batch that confirmed them.

    Cadence: by default as often as ``max_overhead`` allows (see :class:`HessianSharpness`). ``hvp``,
    ``warm_start``, ``tol``, ``host_basis`` and ``probe_batch_size`` (default: the train loader's batch
    size) are those of :class:`HessianSharpness` (tracking starts from the last point's lambda_min and
    lambda_max eigenvectors and stops when both have converged).

    The plateau detector reads the loss ``training_step`` returned (the tensor or its ``"loss"``
    entry). A step without one (``training_step`` returned None to skip the batch, or returned
    nothing under manual optimization: Lightning passes ``{}``) adds nothing to it, with no extra
    forward pass; a manual-optimization module that returns no loss therefore gets no
    ``saddle/plateau`` or escape events (return the loss from ``training_step`` to get them),
    while the curvature keys come from the probe as usual.
    """

    def __init__(self, every_n_train_steps: int | None = None, every_n_epochs: int | None = None,
                 max_overhead: float | None = DEFAULT_MAX_OVERHEAD, plateau_window: int = DEFAULT_WINDOW,
                 plateau_min_steps: int = DEFAULT_MIN_STEPS, plateau_tolerance: float = DEFAULT_TOLERANCE,
                 escape_fraction: float = DEFAULT_DROP_FRACTION, num_samples: int = DEFAULT_NUM_SAMPLES,
                 method: str = "lanczos",
                 lanczos_iters: int = 20, power_iters: int = 100, dataloader: Any = None, loss_fn: LossFn | None = None,
                 train_mode: bool = True, on_error: str = "warn", seed: int = 0,
                 keep_graphs: bool | None = None, hvp: str = "auto", warm_start: bool = True,
                 tol: float | None = DEFAULT_TOL, host_basis: bool = False, probe_batch_size: int | None = None) -> None:
        super().__init__(every_n_train_steps, every_n_epochs, max_overhead, num_samples, dataloader, loss_fn,
                         train_mode, on_error, seed, keep_graphs, hvp, probe_batch_size)
        check_tracking(warm_start, tol, host_basis)
        self.detector = PlateauDetector(plateau_window, plateau_min_steps, plateau_tolerance, escape_fraction,
                                        names=DETECTOR_ARGUMENTS)
        check_choice("method", method, ("lanczos", "power"))
        check_int("lanczos_iters", lanczos_iters, 2)
        check_int("power_iters", power_iters, 1)
        self.method = method
        self.lanczos_iters = lanczos_iters
        self.power_iters = power_iters
        self.warm_start = warm_start
        self.tol = tol
        self.host_basis = host_basis
        #: The lambda_min and lambda_max eigenvectors the last cadence point found (on the host), to start from.
        self.tracked: list[Vector] = []
        self._batch_idx = -1
        self._grad_norm: float | None = None
        self._params_before: Vector | None = None
        self._pending: list[tuple[int, int, Tensor]] = []  # (global step, logger step, loss on device)
        self._unlogged: list[tuple[int, dict[str, float]]] = []  # escape events: (logger step, metrics)

    # -- per-step hooks -------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def _cadence_follows(self, trainer: pl.Trainer) -> bool:
        """Whether the optimizer step about to run is followed by a cadence point."""
        last_batch = self._batch_idx + 1 >= trainer.num_training_batches
        by_epochs = bool(self.every_n_epochs) and last_batch and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        return self.step_is_due(trainer, trainer.global_step + 1) or by_epochs

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if not self._cadence_follows(trainer):
            return
        self._grad_norm = norm([p.grad for p in pl_module.parameters() if p.grad is not None])
        self._params_before = [p.detach().clone() for p in pl_module.parameters() if p.requires_grad]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor):
            logged_at = trainer.fit_loop.epoch_loop._batches_that_stepped
            self._pending.append((trainer.global_step, logged_at, loss.detach().float().reshape(())))
            if len(self._pending) >= LOSS_FLUSH_EVERY:
                self._flush_losses()
        self._log_escapes(trainer)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush_losses()
        self._log_escapes(trainer)
        super().on_train_end(trainer, pl_module)

    def _flush_losses(self) -> None:
        """Feed the buffered losses (mean over ranks: one all-reduce) to the plateau detector.

        One host transfer per flush instead of one per step; escape events wait in
        ``_unlogged`` with the logger step of the batch that ended them, for :meth:`_log_escapes`.
        """
        if not self._pending:
            return
        steps, logged_at, losses = zip(*self._pending)
        self._pending = []
        values = torch.stack(losses)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(values)
            values /= dist.get_world_size()
        for step, at, value in zip(steps, logged_at, values.tolist()):
            event = self.detector.update(step, value)
            if event is not None:
                self._unlogged.append((at, {"saddle/escape_steps": float(event["length"]),
                                            "saddle/escape_start": float(event["start"]),
                                            "saddle/escape_end": float(event["end"]),
                                            "saddle/escapes": float(len(self.detector.escapes))}))

    def _log_escapes(self, trainer: pl.Trainer) -> None:
        for at, metrics in self._unlogged:
            log_scalars(trainer, metrics, step=at)
        self._unlogged = []

    # -- cadence point --------------------------------------------------------------------------
    def products_per_point(self) -> int:
        return 1 + (self.lanczos_iters if self.method == "lanczos" else 3 * self.power_iters)  # and the gradient

    def _extremes(self, operator: HessianOperator) -> tuple[float, float, Vector, Vector]:
        generator, like = self.probe.generator(), operator.params
        if self.method == "lanczos":
            start = warm_start(self.tracked if self.warm_start else [], like, generator)
            pairs = lanczos(operator, start, self.lanczos_iters, (0, -1), self.tol, self.host_basis)
            lambda_max, lambda_min, vector = float(pairs.values[-1]), float(pairs.values[0]), pairs.vectors[0]
            if self.warm_start:
                self.tracked = [to_host(v) for v in pairs.tracked()]
        else:
            lambda_max = float(power_top_k(operator, like, 1, generator, self.power_iters).values[0])
            low = power_smallest(operator, like, generator, self.power_iters)
            lambda_min, vector = float(low.values[0]), low.vectors[0]
        return lambda_min, lambda_max, vector, operator.gradient()

    def _momentum(self, trainer: pl.Trainer, params: list[Tensor]) -> Vector | None:
        state = trainer.optimizers[0].state if trainer.optimizers else {}
        buffers = [next((state.get(p, {})[k] for k in MOMENTUM_KEYS if k in state.get(p, {})), None) for p in params]
        if all(b is None for b in buffers):
            return None
        return [torch.zeros_like(p) if b is None else b.to(p.dtype) for b, p in zip(buffers, params)]

    def on_cadence(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        self._flush_losses()
        self._log_escapes(trainer)
        metrics = {"saddle/plateau": float(self.detector.on_plateau)}
        params = [p for p in pl_module.parameters() if p.requires_grad]
        if self._grad_norm is not None:
            metrics["saddle/grad_norm"] = self._grad_norm
        result = self.probe.run(trainer, pl_module, self._extremes)
        if result is not None:
            lambda_min, lambda_max, vector, gradient = result
            direction = _escape_direction(vector, gradient)
            metrics["saddle/lambda_min"] = lambda_min
            metrics["saddle/negative_ratio"] = abs(lambda_min) / lambda_max if lambda_min < 0 < lambda_max else \
                (math.inf if lambda_min < 0 else 0.0)
            momentum = self._momentum(trainer, params)
            if momentum is not None:
                metrics["saddle/momentum_drift"] = _cosine(scaled(momentum, -1.0), direction)
            after = [p.detach() for p in params]
            before = self._params_before
            if before is not None and [b.shape for b in before] == [a.shape for a in after]:  # not if toggled
                metrics["saddle/update_drift"] = _cosine(combination(after, before, -1.0), direction)
        self._grad_norm = self._params_before = None
        log_scalars(trainer, metrics)

    def state_dict(self) -> dict[str, Any]:
        """The state, buffered losses flushed first (under DDP an all-reduce: Lightning calls this on
        every rank when it saves a checkpoint)."""
        self._flush_losses()
        return {**super().state_dict(), "plateau": self.detector.state_dict(), "unlogged": list(self._unlogged),
                "tracked": self.tracked}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.detector.load_state_dict(state_dict.get("plateau", {}))
        self._unlogged = list(state_dict.get("unlogged", []))
        self.tracked = list(state_dict.get("tracked", []))
