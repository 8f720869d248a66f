"""What the three monitoring callbacks share: a validated cadence and logger-agnostic logging.

The cadence is fixed (``every_n_train_steps`` / ``every_n_epochs``: every such point runs) or, when
both are None, budgeted by ``max_overhead`` (see :class:`CadencedCallback`).

Logging follows Lightning's ``LearningRateMonitor``: scalars go straight to every attached
logger's ``log_metrics`` (loggers write on rank zero only), at the step Lightning itself logs at,
so the callbacks' own cadence decides when they log, not ``Trainer(log_every_n_steps=...)``.
Histograms, computed by the callback, go to loggers whose experiment has ``add_histogram_raw``
(TensorBoard), on rank zero.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from adai_lightning.callbacks._budget import OverheadBudget, check_max_overhead

#: A budgeted cadence first runs after this many optimizer steps (or at the last step of a shorter
#: fit): the first steps carry one-off costs that would distort the step time the budget plans with.
WARMUP_STEPS = 10


def check_cadence(name: str, value: int | None) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is None or an integer >= 1 (a cadence in steps or epochs)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"Invalid {name}: {value!r}; it must be None or an integer >= 1")


class CadencedCallback(Callback):
    """A callback that acts every ``every_n_train_steps`` optimizer steps and/or ``every_n_epochs`` epochs,
    or, when both are None, as often as the overhead budget ``max_overhead`` allows.

    Budgeted cadence: the first candidate point is optimizer step :data:`WARMUP_STEPS` (or the
    fit's last step if it is shorter); later ones are planned from the mean step time so far. At
    each one the callback runs if its time so far plus the expected cost of a run stays within
    ``max_overhead`` of the training time (:class:`~adai_lightning.callbacks._budget.OverheadBudget`),
    and otherwise plans the next candidate. The expected cost is the last run's, or before the
    first run :meth:`estimated_cost`: a fit too short to pay for one run measures nothing, and
    the callback says so in one warning at the end of training. Rank 0 decides and broadcasts its decision
    (``trainer.strategy.broadcast``), at candidate points only, so every rank takes the same one.
    With a fixed cadence ``max_overhead`` is not used: every cadence point runs.

    Subclasses implement :meth:`on_cadence`, called from training hooks only (after the optimizer
    step, gradients enabled), so Lightning's ``inference_mode`` never gets in the way.
    """

    #: Whether the subclass offers ``max_overhead`` (named in the error for a missing cadence).
    budgeted_cadence = False

    def __init__(self, every_n_train_steps: int | None, every_n_epochs: int | None,
                 max_overhead: float | None = None) -> None:
        check_cadence("every_n_train_steps", every_n_train_steps)
        check_cadence("every_n_epochs", every_n_epochs)
        check_max_overhead(max_overhead)
        fixed = every_n_train_steps is not None or every_n_epochs is not None
        if not fixed and max_overhead is None:
            also = " and max_overhead is None" if self.budgeted_cadence else ""
            raise ValueError(f"Invalid cadence: set every_n_train_steps or every_n_epochs (both are None){also}")
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs
        self.max_overhead = max_overhead
        self.budget = None if fixed else OverheadBudget(max_overhead)
        self._last_step = -1
        self._next_check: int | None = None  # budgeted: the next candidate step
        self._decision = (-1, False)  # budgeted: (step, run) of the last candidate point

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_train_steps=self.every_n_train_steps,
                                        every_n_epochs=self.every_n_epochs, max_overhead=self.max_overhead)

    def on_cadence(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """Compute and log; ``batch`` is the last training batch (None at an epoch end)."""
        raise NotImplementedError

    def estimated_cost(self, trainer: pl.Trainer, step_seconds: float) -> float:
        """Seconds one run is expected to take before any was timed, given the mean training step
        time; the budget plans the first run with it. Subclasses with a budgeted cadence override it."""
        return 0.0

    def describe_cost(self, trainer: pl.Trainer) -> str:
        """What one run costs, in the callback's own units (for the warning of a fit too short to pay for one)."""
        return ""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.budget is None:
            return
        self.budget.start()
        if self._next_check is None:
            total = trainer.estimated_stepping_batches
            self._next_check = WARMUP_STEPS if math.isinf(total) else max(1, min(WARMUP_STEPS, int(total)))

    def step_is_due(self, trainer: pl.Trainer, step: int) -> bool:
        """Whether optimizer step ``step`` is a cadence point; a collective call at budgeted candidates."""
        if self.budget is None:
            return bool(self.every_n_train_steps) and step % self.every_n_train_steps == 0
        if self._decision[0] == step:
            return self._decision[1]
        if self._next_check is None or step < self._next_check:
            return False
        if self.budget.runs == 0:  # nothing timed yet: plan with the estimate
            self.budget.last_cost = self.estimated_cost(trainer, self.budget.training / step)
        run = self.budget.allows()
        later = None if run else step + self.budget.steps_until_allowed(step)
        run, later = trainer.strategy.broadcast((run, later), src=0)
        if later is not None:
            self._next_check = later
        self._decision = (step, run)
        return run

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        self._last_step = trainer.global_step
        if self.budget is None:
            self.on_cadence(trainer, pl_module, batch)
            return
        with self.budget.measure(pl_module.device):
            self.on_cadence(trainer, pl_module, batch)
        later = trainer.global_step + self.budget.steps_until_allowed(trainer.global_step)
        self._next_check = trainer.strategy.broadcast(later, src=0)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step > 0 and step != self._last_step and self.step_is_due(trainer, step):
            self._run(trainer, pl_module, batch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0 \
                and trainer.global_step != self._last_step:
            self._run(trainer, pl_module, None)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.budget is not None and self.budget.runs == 0:
            cost = self.describe_cost(trainer)
            rank_zero_warn(f"{type(self).__name__} measured nothing in this fit: one measurement is expected to "
                           f"take about {self.budget.last_cost:.2g} s{f' ({cost})' if cost else ''}, more than "
                           f"max_overhead={self.max_overhead} "
                           f"of its {self.budget.training:.1f} s of training allows. Pass every_n_train_steps "
                           f"(a fixed cadence) or a larger max_overhead to measure a fit this short.")

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"last_step": self._last_step}
        if self.budget is not None:
            state.update(next_check=self._next_check, budget=self.budget.state_dict())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict.get("last_step", -1)
        if self.budget is not None:
            self._next_check = state_dict.get("next_check")
            self.budget.load_state_dict(state_dict.get("budget", {}))


def log_scalars(trainer: pl.Trainer, metrics: dict[str, float], step: int | None = None) -> None:
    """Send ``metrics`` to every logger at ``step``, by default the step Lightning logs its own metrics at."""
    if not metrics:
        return
    if step is None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def histogram_writers(trainer: pl.Trainer) -> list[Callable[..., None]]:
    """The ``add_histogram_raw`` of every logger that can show a histogram (TensorBoard); none off rank zero."""
    if not trainer.is_global_zero:
        return []
    writers = (getattr(logger.experiment, "add_histogram_raw", None) for logger in trainer.loggers)
    return [writer for writer in writers if writer is not None]


def log_histogram(trainer: pl.Trainer, key: str, histogram: Any) -> None:
    """Add a precomputed histogram (``add_histogram_raw``'s arguments as a NamedTuple) to every logger
    that can show one (TensorBoard), on rank zero."""
    step = trainer.fit_loop.epoch_loop._batches_that_stepped
    for add_histogram_raw in histogram_writers(trainer):
        add_histogram_raw(key, *histogram, global_step=step)
