"""SIGTERM and SIGINT during training: finish the step, checkpoint it, exit with 128 + the signal number.

Lightning's own handling tells a scheduler nothing: on SIGTERM (outside SLURM) it runs one more step
and exits 0 without a checkpoint; on SIGINT a ``KeyboardInterrupt`` lands wherever the process is (in
an optimizer step, in a CSV write) and it exits 1. :class:`StopSignals` instead only records the signal;
:class:`~adai_lightning.recipes.checkpointing.PeriodicCheckpoint` checks it after each training step,
saves the checkpoint of that step as a periodic save would, and stops the run with :class:`Interrupted`
(exit status 143 for SIGTERM, 130 for SIGINT, as a shell reports a process killed by them). A further
signal changes nothing (``kill -9`` stops at once; the last periodic checkpoint still resumes).

Under DDP the processes agree after every step (one all-reduce of the signal number): whichever rank
got a signal, all of them save the same step and stop together. Rank 0 also forwards its first signal
to the processes Lightning launched, as Lightning does for SIGTERM, so ``kill RANK0_PID`` stops all.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch

#: The signals that stop a run with a checkpoint.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(SystemExit):
    """The run stopped on a signal after checkpointing; the exit status is 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


class StopSignals:
    """Records the first of :data:`STOP_SIGNALS` received between :meth:`install` and :meth:`restore`."""

    def __init__(self) -> None:
        self.signum = 0
        self._trainer: pl.Trainer | None = None
        self._previous: dict[int, Any] = {}

    def install(self, trainer: pl.Trainer) -> None:
        """Replace the handlers of :data:`STOP_SIGNALS` (Lightning's included) with :meth:`record`."""
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only; handlers can be set only there
        self.signum, self._trainer = 0, trainer
        for signum in STOP_SIGNALS:
            self._previous.setdefault(signum, signal.signal(signum, self.record))

    def restore(self) -> None:
        """Put back the handlers :meth:`install` replaced."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous, self._trainer = {}, None

    def record(self, signum: int, frame: FrameType | None) -> None:
        """The handler: remember the first signal and pass it on to the processes rank 0 launched."""
        if self.signum:
            return
        self.signum = signum
        launcher = self._trainer.strategy.launcher if self._trainer is not None else None
        if launcher is not None and getattr(launcher, "procs", None):
            launcher.kill(signum)

    def agreed(self, trainer: pl.Trainer) -> int:
        """The signal any process received (0: none); under DDP a collective every rank must call."""
        if trainer.world_size == 1:
            return self.signum
        flag = torch.tensor(self.signum, device=trainer.strategy.root_device)
        return int(trainer.strategy.reduce(flag, reduce_op="max"))


def announce(trainer: pl.Trainer, signum: int, path: str) -> None:
    """One line on rank 0's stderr: which signal stopped the run, where, and how to resume."""
    if trainer.is_global_zero:
        print(f"{signal.Signals(signum).name} received: stopped after step {trainer.global_step}, "
              f"checkpoint {path}; resume with --ckpt_path last", file=sys.stderr, flush=True)
