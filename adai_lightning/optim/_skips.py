"""The host's view of skipped steps (``Adai(skip_nonfinite=True)``, the default), without synchronising.

A step is skipped on the device (``found_inf``); its counters (total skipped, and the current run of
consecutive skips) are device tensors. Warning about the first skip and stopping a run that skips
step after step need them on the host, and ``step()`` must not wait for the device to read them:

- CPU counters are read right after the step (reading CPU memory synchronises with nothing): the
  warning comes from the step that skipped, the error from the ``max_consecutive_skips``-th skip
  in a row.
- CUDA counters are copied, after a step, into pinned host memory asynchronously, and a CUDA event
  marks the copy; a later ``step()`` reads them once the event has completed (``Event.query()``
  does not block) and then starts the next copy. The warning and the error therefore come from a
  later step than the one that skipped: usually the next one, after at most as many steps as the
  device runs behind the host.
- Other devices (XPU, MPS, ...): read every :data:`OTHER_DEVICE_EVERY` steps, which synchronises then.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

#: How often counters on devices other than CPU and CUDA are read (each read waits for the device).
OTHER_DEVICE_EVERY = 50


class SkipWatch:
    """Reads the skip counters on the host as described above; warns once, raises after a run of skips."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.warned = False
        self.calls = 0
        self.pending: tuple[torch.cuda.Event, Tensor] | None = None

    def after_step(self, skipped: Tensor, run: Tensor) -> None:
        """Judge the counters as of this step (CPU) or of an earlier one whose copy has arrived (elsewhere)."""
        self.calls += 1
        device = skipped.device
        if device.type == "cpu":
            self.judge(float(skipped), float(run))
        elif device.type == "cuda":
            if self.pending is not None:
                event, host = self.pending
                if not event.query():
                    return
                self.pending = None
                self.judge(*host.tolist())
            host = torch.empty(2, dtype=torch.float32, pin_memory=True)
            host.copy_(torch.stack([skipped, run]), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending = (event, host)
        elif self.calls % OTHER_DEVICE_EVERY == 0:
            self.judge(float(skipped), float(run))

    def judge(self, skipped: float, run: float) -> None:
        if skipped > 0 and not self.warned:
            self.warned = True
            warnings.warn(
                f"Adai skipped a step: a gradient held a NaN or infinity ({skipped:g} skipped so far). Parameters, "
                f"state and step counts were left unchanged; optimizer.skipped_steps counts the skips. "
                f"skip_nonfinite=False turns skipping off", RuntimeWarning, stacklevel=6)  # the caller of optimizer.step()
        if self.limit is not None and run >= self.limit:
            raise RuntimeError(
                f"Adai skipped {run:g} steps in a row (max_consecutive_skips={self.limit}): every one of them had "
                f"a NaN or infinite gradient, so the run looks broken. Look for where the non-finite values come "
                f"from (loss, inputs, learning rate), or raise max_consecutive_skips (None never stops)"
            )
