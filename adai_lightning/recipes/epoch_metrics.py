"""Epoch aggregates (``self.log(..., on_epoch=True)`` in training) that survive a mid-epoch resume.

Lightning keeps them in the training loop's ``_results`` (a ``_ResultCollection`` of ``_ResultMetric``:
a running weighted sum and its batch count for a mean, a running max / min / sum otherwise) and does
not checkpoint them: after a mid-epoch resume the epoch's value covers only the batches run since.
:func:`saved_aggregates` takes those accumulators into a checkpoint (every rank's, gathered: each rank
reduces its own share under ``sync_dist``); :class:`PendingAggregates` adds them back into the
resumed run's accumulators of the same epoch as each key is logged again, so the epoch's value
equals the uninterrupted run's: bit for bit for a key logged in ``training_step`` or a callback's
``on_train_batch_end`` (merged right after its first new value: ``x + S == S + x``), within float
rounding for one logged later in a step (merged one value later).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn


def _training_results(trainer: pl.Trainer) -> dict[str, Any]:
    return trainer.fit_loop.epoch_loop._results


def saved_aggregates(trainer: pl.Trainer) -> dict[str, Any]:
    """The epoch's accumulators of every epoch-level training metric, one entry per rank (a collective
    under DDP: every rank saves a checkpoint's contents, rank 0 writes them)."""
    metrics = {}
    for key, metric in sorted(_training_results(trainer).items()):
        if metric.is_tensor and metric.meta.on_epoch and not metric.has_reset:
            state = {"value": metric.value}
            if metric.meta.is_mean_reduction:
                state["count"] = metric.cumulated_batch_size
            metrics[key] = {name: _per_rank(trainer, t.detach()) for name, t in state.items()}
    return {"epoch": trainer.current_epoch, "metrics": metrics}


def _per_rank(trainer: pl.Trainer, tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor``, stacked in rank order, on the CPU."""
    if trainer.world_size == 1:
        return tensor.cpu().unsqueeze(0)
    parts = [torch.empty_like(tensor) for _ in range(trainer.world_size)]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.stack(parts).cpu()


class PendingAggregates:
    """Saved accumulators waiting for their keys to be logged again in the resumed epoch."""

    def __init__(self) -> None:
        self.epoch, self.metrics = -1, {}

    def load(self, saved: dict[str, Any] | None) -> None:
        self.epoch, self.metrics = (saved["epoch"], dict(saved["metrics"])) if saved else (-1, {})

    def merge(self, trainer: pl.Trainer, final: bool = False) -> None:
        """Add the pending accumulators of keys logged since the resume to theirs (same epoch only);
        with ``final`` (the epoch's end), warn about the keys never logged again and forget them."""
        if not self.metrics:
            return
        if trainer.current_epoch != self.epoch:
            self.metrics = {}
            return
        results = _training_results(trainer)
        for key in [k for k in self.metrics if k in results and not results[k].has_reset]:
            _add(results[key], {name: t[trainer.global_rank] for name, t in self.metrics.pop(key).items()})
        if final and self.metrics:
            rank_zero_warn(f"the epoch values of {sorted(self.metrics)} cover only the batches after the resume "
                           "(not logged again before the epoch's end)")
            self.metrics = {}


def _add(metric: Any, state: dict[str, torch.Tensor]) -> None:
    """Fold an earlier part of the epoch (``state``) into ``metric``'s running reduction."""
    value = state["value"].to(metric.value.device, metric.value.dtype)
    if metric.meta.is_mean_reduction:
        metric.value = metric.value + value
        metric.cumulated_batch_size = metric.cumulated_batch_size + state["count"].to(metric.cumulated_batch_size.device)
    elif metric.meta.is_max_reduction or metric.meta.is_min_reduction:
        metric.value = metric.meta.reduce_fx(metric.value, value)
    elif metric.meta.is_sum_reduction:
        metric.value = metric.value + value
    metric._computed = None
