"""``HessianSharpness``: top Hessian eigenvalues and trace of the training loss on a fixed subset."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from adai_lightning.callbacks._cadence import log_scalars
from adai_lightning.callbacks._hessian_probe import (DEFAULT_MAX_OVERHEAD, DEFAULT_NUM_SAMPLES, LossFn,
                                                     ProbedCallback, check_choice, check_int)
from adai_lightning.curvature import (HessianOperator, default_lanczos_iters, hutch_plus_plus_trace,
                                      hutchinson_trace, lanczos_extremes, power_top_k)

TRACE_ESTIMATORS = {"hutchinson": hutchinson_trace, "hutch++": hutch_plus_plus_trace}


class HessianSharpness(ProbedCallback):
    """Logs the top-``top_k`` Hessian eigenvalues (and optionally the trace) every cadence point.

    Cadence: by default (``every_n_train_steps=None``, ``every_n_epochs=None``) as often as
    ``max_overhead`` allows (the callback's time at most that fraction of the training time; the
    first measurement is planned from an estimate of its cost, so a fit too short to pay for one
    measures nothing and warns; see :class:`~adai_lightning.callbacks._cadence.CadencedCallback`).
    An explicit ``every_n_train_steps`` or ``every_n_epochs`` runs at every such point and
    ``max_overhead`` is then not used.

    Keys: ``sharpness/lambda_max``, ``sharpness/lambda_2`` .. ``sharpness/lambda_<top_k>``,
    ``sharpness/lambda_max_x_lr`` (lambda_max times the first optimizer's first param-group lr:
    gradient descent on a quadratic is stable below 2), and with ``trace_samples > 0``
    ``sharpness/trace`` and ``sharpness/trace_stderr`` (``trace_method`` "hutchinson" or "hutch++",
    Rademacher probes; Hutch++ needs ``trace_samples >= 3``).

    Cost per cadence point, in Hessian-vector products (with a one-batch subset the first-order
    graph is built once and each product is one more backward through it; with several batches, the
    default, each product redoes a forward and a double backward per batch): ``lanczos_iters`` (default ``max(20, 3 top_k + 10)``)
    for Lanczos, at most ``top_k * power_iters`` for power iteration, plus ``trace_samples``.

    The evaluation subset (``num_samples`` samples, fixed and checkpointed), the loss, train mode
    (default; ``train_mode=False``: eval mode) and side-effect isolation are those of
    :class:`~adai_lightning.callbacks._hessian_probe.HessianProbe` (see docs/callbacks-curvature.md).
    """

    def __init__(self, every_n_train_steps: int | None = None, every_n_epochs: int | None = None,
                 max_overhead: float | None = DEFAULT_MAX_OVERHEAD, num_samples: int = DEFAULT_NUM_SAMPLES,
                 top_k: int = 2, method: str = "lanczos", trace_samples: int = 0, trace_method: str = "hutchinson",
                 lanczos_iters: int | None = None,
                 power_iters: int = 100, dataloader: Any = None, loss_fn: LossFn | None = None,
                 train_mode: bool = True, on_error: str = "warn", seed: int = 0) -> None:
        super().__init__(every_n_train_steps, every_n_epochs, max_overhead, num_samples, dataloader, loss_fn,
                         train_mode, on_error, seed)
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

    def products_per_point(self) -> int:
        eigen = (default_lanczos_iters(self.top_k) if self.lanczos_iters is None else self.lanczos_iters) \
            if self.method == "lanczos" else self.top_k * self.power_iters
        return eigen + self.trace_samples

    def _measure(self, operator: HessianOperator) -> dict[str, float]:
        generator, like = self.probe.generator(), operator.params[0]
        if self.method == "lanczos":
            pairs = lanczos_extremes(operator, operator.dim, self.top_k, "largest", generator, like, self.lanczos_iters)
        else:
            pairs = power_top_k(operator, operator.dim, self.top_k, generator, like, self.power_iters)
        values = pairs.values.tolist()
        metrics = {"sharpness/lambda_max": values[0]}
        metrics.update({f"sharpness/lambda_{i}": value for i, value in enumerate(values[1:], start=2)})
        if self.trace_samples:
            trace = TRACE_ESTIMATORS[self.trace_method](operator, operator.dim, self.trace_samples, generator, like)
            metrics.update({"sharpness/trace": trace.trace, "sharpness/trace_stderr": trace.stderr})
        return metrics

    def on_cadence(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        metrics = self.probe.run(trainer, pl_module, self._measure)
        if metrics is None:
            return
        if trainer.optimizers:
            metrics["sharpness/lambda_max_x_lr"] = metrics["sharpness/lambda_max"] * \
                float(trainer.optimizers[0].param_groups[0]["lr"])
        log_scalars(trainer, metrics)
