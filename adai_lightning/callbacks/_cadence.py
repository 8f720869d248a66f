"""What the three monitoring callbacks share: a validated cadence and logger-agnostic logging.

Logging follows Lightning's ``LearningRateMonitor``: scalars go straight to every attached
logger's ``log_metrics`` (loggers write on rank zero only), at the step Lightning itself logs at,
so the callbacks' own cadence decides when they log, not ``Trainer(log_every_n_steps=...)``.
Histograms go to loggers whose experiment has ``add_histogram`` (TensorBoard), on rank zero.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback


def _check_cadence(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"Invalid {name}: {value!r}; it must be None or an integer >= 1")


class CadencedCallback(Callback):
    """A callback that acts every ``every_n_train_steps`` optimizer steps and/or ``every_n_epochs`` epochs.

    Subclasses implement :meth:`on_cadence`, called from training hooks only (after the optimizer
    step, gradients enabled), so Lightning's ``inference_mode`` never gets in the way.
    """

    def __init__(self, every_n_train_steps: int | None, every_n_epochs: int | None) -> None:
        _check_cadence("every_n_train_steps", every_n_train_steps)
        _check_cadence("every_n_epochs", every_n_epochs)
        if every_n_train_steps is None and every_n_epochs is None:
            raise ValueError("Invalid cadence: set every_n_train_steps or every_n_epochs (both are None)")
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs
        self._last_step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_train_steps=self.every_n_train_steps, every_n_epochs=self.every_n_epochs)

    def on_cadence(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """Compute and log; ``batch`` is the last training batch (None at an epoch end)."""
        raise NotImplementedError

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_train_steps and step > 0 and step % self.every_n_train_steps == 0 and step != self._last_step:
            self._last_step = step
            self.on_cadence(trainer, pl_module, batch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0 \
                and trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.on_cadence(trainer, pl_module, None)

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict.get("last_step", -1)


def log_scalars(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Send ``metrics`` to every logger at the step Lightning logs its own metrics at."""
    if not metrics:
        return
    step = trainer.fit_loop.epoch_loop._batches_that_stepped
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def log_histogram(trainer: pl.Trainer, key: str, values: torch.Tensor) -> None:
    """Add a histogram of ``values`` to every logger that can show one (TensorBoard), on rank zero."""
    if not trainer.is_global_zero:
        return
    step = trainer.fit_loop.epoch_loop._batches_that_stepped
    for logger in trainer.loggers:
        add_histogram = getattr(logger.experiment, "add_histogram", None)
        if add_histogram is not None:
            add_histogram(key, values.detach().float().cpu(), global_step=step)
