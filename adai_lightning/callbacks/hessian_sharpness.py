"""``HessianSharpness``: top Hessian eigenvalues and trace of the training loss on a fixed subset."""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch

from adai_lightning.callbacks._cadence import check_cadence, log_scalars
from adai_lightning.callbacks._hessian_probe import (DEFAULT_MAX_OVERHEAD, DEFAULT_NUM_SAMPLES, LossFn,
                                                     ProbedCallback, check_choice, check_int, check_tracking)
from adai_lightning.curvature import (HessianOperator, default_lanczos_iters, hutch_plus_plus_trace,
                                      hutchinson_trace, lanczos_extremes, power_top_k)
from adai_lightning.curvature.stability import linearised_step, stability_ratio
from adai_lightning.curvature.vectors import Vector, norm, to_host

TRACE_ESTIMATORS = {"hutchinson": hutchinson_trace, "hutch++": hutch_plus_plus_trace}
#: Lanczos stops when the wanted Ritz values are within this relative accuracy (benchmarks/lanczos_warm_start.py).
DEFAULT_TOL = 1e-4


class HessianSharpness(ProbedCallback):
    """Logs the top-``top_k`` Hessian eigenvalues (and optionally the trace) every cadence point.

    Cadence: by default (``every_n_train_steps=None``, ``every_n_epochs=None``) as often as
    ``max_overhead`` allows (the callback's time at most that fraction of the training time; the
    first measurement is planned from an estimate of its cost, so a fit too short to pay for one
    measures nothing and warns; see :class:`~adai_lightning.callbacks._cadence.CadencedCallback`).
    An explicit ``every_n_train_steps`` or ``every_n_epochs`` runs at every such point and
    ``max_overhead`` is then not used. ``dense_first_steps=N`` also measures at every optimizer step
    1..N, whatever the cadence: a run that diverges does so in its first steps, before a sparse
    cadence's first point (and under a budget those points count against ``max_overhead`` too).

    Keys: ``sharpness/lambda_max``, ``sharpness/lambda_2`` .. ``sharpness/lambda_<top_k>``,
    ``sharpness/weight_norm`` (the L2 norm of all probed parameters: beside ``lambda_max`` it tells a
    flatter region from grown BatchNorm-scaled weights, whose Hessian shrinks as their norm grows),
    ``sharpness/stability_ratio`` (1.0 = the first optimizer's edge of stability on the local
    quadratic: ``lambda_max(S H S) / 2`` with the step sizes and inertia of its last step, see
    :mod:`adai_lightning.curvature.stability`; gradient descent: ``lr lambda_max / 2``; Adai with its
    per-element beta1, Adam with its preconditioner, SGD with its momentum; omitted for optimizers
    it does not model), and with ``trace_samples > 0``
    ``sharpness/trace`` and ``sharpness/trace_stderr`` (``trace_method`` "hutchinson" or "hutch++",
    Rademacher probes; Hutch++ needs ``trace_samples >= 3``). The trace is the costliest curve per
    point (``trace_samples`` products, where tracked Lanczos needs a few) and changes slowly:
    ``trace_every_n_train_steps=N`` takes it only at cadence points at least N optimizer steps after
    the last one that took it (the first at the first point at step >= N; the last trace step is kept
    in the checkpoint, so a resumed run traces where an uninterrupted one does); None (default): at
    every cadence point.

    Products (``hvp``): "auto" (default), "exact" or "finite_difference", see
    :class:`~adai_lightning.curvature.HessianOperator` and docs/callbacks-curvature.md.

    Tracking (``warm_start=True``, default): each Lanczos run (the top-k and the stability ratio's)
    starts from the eigenvectors the previous cadence point found (kept in the checkpoint, so a
    resumed run measures bitwise what an uninterrupted one does) and stops once the wanted Ritz
    values are within ``tol`` (relative; None: always ``lanczos_iters``). The Lanczos basis lives on
    the parameters' device, or in host memory with ``host_basis=True``.

    Cost per cadence point, in Hessian-vector products (with a one-batch subset, or with
    ``keep_graphs=True``, each batch's first-order graph is built once and each product is one more
    backward through it; with several batches and ``keep_graphs=None``, the default, each product
    redoes a forward and a double backward per batch, holding one batch's graph at a time):
    at most ``lanczos_iters`` (default ``max(20, 3 top_k + 10)``) for Lanczos, at most ``top_k * power_iters``
    for power iteration, plus ``trace_samples``, plus for the stability ratio of an optimizer with
    per-element step sizes (Adai, Adam) one more Lanczos run of ``lanczos_iters`` on the scaled
    operator (SGD's ratio is arithmetic on lambda_max). The learning rates are those the last
    optimizer step used (read in ``on_before_optimizer_step``, before any scheduler moves them); the
    inertia and preconditioner come from the state it left.

    Every product costs that many passes over each batch of the subset: ``num_samples`` in batches of
    ``probe_batch_size`` (default None: the train loader's batch size, so the probe's memory is that of
    a training batch's double backward; a batch-size-1 loader then makes ``num_samples`` batches per
    product: pass e.g. ``probe_batch_size=64`` to make ``ceil(num_samples / 64)``).

    The evaluation subset (``num_samples`` samples, fixed and checkpointed), the loss, train mode
    (default; ``train_mode=False``: eval mode) and side-effect isolation are those of
    :class:`~adai_lightning.callbacks._hessian_probe.HessianProbe` (see docs/callbacks-curvature.md).
    """

    def __init__(self, every_n_train_steps: int | None = None, every_n_epochs: int | None = None,
                 max_overhead: float | None = DEFAULT_MAX_OVERHEAD, num_samples: int = DEFAULT_NUM_SAMPLES,
                 top_k: int = 2, method: str = "lanczos", trace_samples: int = 0, trace_method: str = "hutchinson",
                 lanczos_iters: int | None = None,
                 power_iters: int = 100, dataloader: Any = None, loss_fn: LossFn | None = None,
                 train_mode: bool = True, on_error: str = "warn", seed: int = 0,
                 keep_graphs: bool | None = None, hvp: str = "auto", warm_start: bool = True,
                 tol: float | None = DEFAULT_TOL, host_basis: bool = False, probe_batch_size: int | None = None,
                 dense_first_steps: int = 0, trace_every_n_train_steps: int | None = None) -> None:
        super().__init__(every_n_train_steps, every_n_epochs, max_overhead, num_samples, dataloader, loss_fn,
                         train_mode, on_error, seed, keep_graphs, hvp, probe_batch_size)
        check_tracking(warm_start, tol, host_basis)
        check_int("dense_first_steps", dense_first_steps, 0)
        check_cadence("trace_every_n_train_steps", trace_every_n_train_steps)
        check_int("top_k", top_k, 1)
        check_choice("method", method, ("lanczos", "power"))
        check_int("trace_samples", trace_samples, 0)
        check_choice("trace_method", trace_method, tuple(TRACE_ESTIMATORS))
        if trace_method == "hutch++" and 0 < trace_samples < 3:
            raise ValueError(f"Invalid trace_samples: {trace_samples}; trace_method='hutch++' needs 0 or >= 3")
        if lanczos_iters is not None:
            check_int("lanczos_iters", lanczos_iters, top_k)
        check_int("power_iters", power_iters, 1)
        self.top_k = top_k
        self.method = method
        self.trace_samples = trace_samples
        self.trace_method = trace_method
        self.lanczos_iters = lanczos_iters
        self.power_iters = power_iters
        self.dense_first_steps = dense_first_steps
        self.trace_every_n_train_steps = trace_every_n_train_steps
        self._last_trace_step = 0  # the optimizer step of the last trace (0: none yet)
        self.warm_start = warm_start
        self.tol = tol
        self.host_basis = host_basis
        #: The eigenvectors the last cadence point found ("top": the top-k, "ratio": the scaled operator's), with
        #: Lanczos's guard vectors (one more inward, see :func:`~adai_lightning.curvature.lanczos`), on the host.
        self.tracked: dict[str, list[Vector]] = {}
        self._step_lrs: list[Any] | None = None  # the learning rates of the last optimizer step
        self._scaled_ratio = True  # whether the stability ratio needs its own Lanczos run (not plain SGD)

    def _ratio_iters(self) -> int:
        return default_lanczos_iters(1) if self.lanczos_iters is None else self.lanczos_iters

    def products_per_point(self) -> int:
        eigen = (default_lanczos_iters(self.top_k) if self.lanczos_iters is None else self.lanczos_iters) \
            if self.method == "lanczos" else self.top_k * self.power_iters
        return eigen + self.trace_samples + (self._ratio_iters() if self._scaled_ratio else 0)

    def step_is_due(self, trainer: pl.Trainer, step: int) -> bool:
        """Every step up to ``dense_first_steps`` (the same on every rank: no collective), then the cadence."""
        return step <= self.dense_first_steps or super().step_is_due(trainer, step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = getattr(trainer, "optimizers", None) or []  # absent on a bare strategy-level trainer
        optimizer = optimizers[0] if optimizers else None
        self._scaled_ratio = not (isinstance(optimizer, torch.optim.SGD) and len(optimizer.param_groups) == 1)
        super().on_train_start(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if trainer.optimizers and optimizer is trainer.optimizers[0]:  # a scalar copy: no host sync, no cost
            self._step_lrs = [lr.detach().clone() if isinstance(lr, torch.Tensor) else lr
                              for lr in (group["lr"] for group in optimizer.param_groups)]

    def _stability(self, trainer: pl.Trainer, operator: HessianOperator, lambda_max: float) -> dict[str, float]:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        if optimizer is None or self._step_lrs is None or len(self._step_lrs) != len(optimizer.param_groups):
            return {}
        step = linearised_step(optimizer, operator.params, [float(lr) for lr in self._step_lrs])
        if step is None:
            return {}
        ratio = stability_ratio(operator, step, self.probe.generator(), operator.params, self._ratio_iters(),
                                lambda_max=lambda_max, previous=self._previous("ratio"), tol=self.tol)
        self._track("ratio", ratio.tracked())
        return {"sharpness/stability_ratio": float(ratio.values[0])}

    def _previous(self, key: str) -> list[Vector]:
        return self.tracked.get(key, []) if self.warm_start else []

    def _track(self, key: str, vectors: list[Vector]) -> None:
        if self.warm_start and vectors:
            self.tracked[key] = [to_host(vector) for vector in vectors]

    def _measure(self, trainer: pl.Trainer, operator: HessianOperator) -> dict[str, float]:
        generator, like = self.probe.generator(), operator.params
        if self.method == "lanczos":
            pairs = lanczos_extremes(operator, like, self.top_k, "largest", generator, self.lanczos_iters,
                                     self._previous("top"), self.tol, self.host_basis)
            self._track("top", pairs.tracked())
        else:
            pairs = power_top_k(operator, like, self.top_k, generator, self.power_iters)
        values = pairs.values.tolist()
        metrics = {"sharpness/lambda_max": values[0],
                   "sharpness/weight_norm": norm([p.detach() for p in operator.params])}
        metrics.update({f"sharpness/lambda_{i}": value for i, value in enumerate(values[1:], start=2)})
        if self._trace_due(trainer.global_step):
            self._last_trace_step = trainer.global_step
            trace = TRACE_ESTIMATORS[self.trace_method](operator, like, self.trace_samples, generator)
            metrics.update({"sharpness/trace": trace.trace, "sharpness/trace_stderr": trace.stderr})
        metrics.update(self._stability(trainer, operator, values[0]))
        return metrics

    def _trace_due(self, step: int) -> bool:
        every = self.trace_every_n_train_steps
        return self.trace_samples > 0 and (every is None or step - self._last_trace_step >= every)

    def on_cadence(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        metrics = self.probe.run(trainer, pl_module, partial(self._measure, trainer))
        if metrics is not None:
            log_scalars(trainer, metrics)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "tracked": self.tracked, "last_trace_step": self._last_trace_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.tracked = dict(state_dict.get("tracked", {}))
        self._last_trace_step = state_dict.get("last_trace_step", 0)
