"""``OverheadBudget``: keep a callback's own time below a fraction of the training time.

The budget times the callback's work (``time.perf_counter``; on CUDA after a synchronize, so that
queued kernels are charged to whoever queued them) and the wall time between calls. The training
time is the wall time since :meth:`OverheadBudget.start` minus the callback's own time. A next run
is allowed when ``(spent + expected cost) / training time <= max_overhead``, the expected cost being
the last run's: the overhead stays at or below ``max_overhead`` once one run has been paid for.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Iterator

import torch

Clock = Callable[[], float]


def check_max_overhead(value: Any) -> None:
    """Raise a ValueError naming ``max_overhead`` unless it is None or a float in (0, 1]."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"Invalid max_overhead: {value!r}; it must be None (no budget) or a number in (0, 1]")


class OverheadBudget:
    """Seconds spent by a callback against seconds spent training, and whether it may run again."""

    def __init__(self, max_overhead: float, clock: Clock = time.perf_counter) -> None:
        check_max_overhead(max_overhead)
        if max_overhead is None:
            raise ValueError("Invalid max_overhead: None; an OverheadBudget needs a number in (0, 1]")
        self.max_overhead = float(max_overhead)
        self.clock = clock
        self.spent = 0.0  # the callback's own seconds
        self.last_cost = 0.0  # seconds of the last run: the expected cost of the next one
        self.runs = 0
        self._elapsed = 0.0  # wall seconds before the current start (a resumed run continues them)
        self._origin: float | None = None

    def start(self) -> None:
        """Start (or, after a resume, continue) the wall clock of the fit."""
        self._origin = self.clock() - self._elapsed

    @property
    def elapsed(self) -> float:
        """Wall seconds since the fit started, the callback's own time included."""
        return self._elapsed if self._origin is None else self.clock() - self._origin

    @property
    def training(self) -> float:
        """Wall seconds since the fit started, less the callback's own time."""
        return max(self.elapsed - self.spent, 0.0)

    def allows(self) -> bool:
        """Whether one more run of the last run's cost keeps the overhead within ``max_overhead``."""
        return self.spent + self.last_cost <= self.max_overhead * self.training

    def seconds_until_allowed(self) -> float:
        """Training seconds still needed before :meth:`allows` holds (0 when it already does)."""
        return max((self.spent + self.last_cost) / self.max_overhead - self.training, 0.0)

    def steps_until_allowed(self, steps_done: int) -> int:
        """:meth:`seconds_until_allowed` in optimizer steps at the mean step time so far (at least 1)."""
        if steps_done <= 0 or self.training <= 0:
            return 1
        return max(math.ceil(self.seconds_until_allowed() * steps_done / self.training), 1)

    @contextlib.contextmanager
    def measure(self, device: torch.device | None = None) -> Iterator[None]:
        """Charge the wall time of the ``with`` body to the callback (CUDA synchronized at both ends)."""
        synchronize = device is not None and device.type == "cuda"
        if synchronize:
            torch.cuda.synchronize(device)
        begin = self.clock()
        try:
            yield
        finally:
            if synchronize:
                torch.cuda.synchronize(device)
            self.last_cost = self.clock() - begin
            self.spent += self.last_cost
            self.runs += 1

    def state_dict(self) -> dict[str, float | int]:
        return {"spent": self.spent, "last_cost": self.last_cost, "runs": self.runs, "elapsed": self.elapsed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.spent = float(state.get("spent", 0.0))
        self.last_cost = float(state.get("last_cost", 0.0))
        self.runs = int(state.get("runs", 0))
        self._elapsed = float(state.get("elapsed", 0.0))
        self._origin = None
