"""Loss plateaus and escapes from them, on the training losses a run already computes (pure Python).

A saddle shows up in the training loss as a plateau followed by a drop. The per-batch loss is
noisy (about 30 % between batches on the saddle recipe), so the detector works on a **running
median of the log-loss** over ``window`` steps: a spike shorter than half the window does not move
it, and a log scale makes the tolerances relative.

The detector is a small state machine on that smoothed curve ``y``:

- *searching*: an anchor ``(t0, y0)`` is moved to the current point whenever ``|y - y0|`` exceeds
  ``log(1 + tolerance)``; once the curve has stayed within that band for ``min_steps`` steps a
  plateau is **confirmed**, starting at ``t0``, at the level ``mean(y since t0)``, fixed from then on
  (a level that followed the curve would let a slow decay stay "flat" for ever);
- *on a plateau*: a value above the band
  ends the plateau without an event (the loss went up: a spike wider than the window, a divergence);
  the first value below the band is the step the loss **left** the plateau;
- an **escape** is recorded when, after leaving, ``y`` falls below ``level + log(drop_fraction)``
  (the median of the last ``window`` losses is at most ``drop_fraction`` times the plateau level:
  a sustained drop) within ``min_steps`` steps of leaving. A loss that leaves the band but takes
  longer than that to reach the fraction is a slow decay, not an escape, and the search restarts.
  For a decelerating decay (exponential, power law) this never fires: staying within a factor
  ``1 + tolerance`` for ``min_steps`` steps bounds its rate so that the next factor takes longer
  than ``min_steps``; a saddle's drop accelerates and does fire.

An event ``{"start", "end", "length"}`` has ``end`` = the step the loss left the plateau and
``length = end - start``; both ends are read on the same smoothed curve, so the median's lag of
about ``window / 2`` steps cancels in the length. Events are recorded when confirmed (up to
``min_steps`` steps after ``end``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

#: The defaults: a 25-step median, plateaus of >= 50 steps within a factor 1.5, escapes to a quarter.
DEFAULT_WINDOW, DEFAULT_MIN_STEPS, DEFAULT_TOLERANCE, DEFAULT_DROP_FRACTION = 25, 50, 0.5, 0.25


def _check(name: str, value: Any, low: float, high: float | None, integer: bool) -> None:
    kinds = (int,) if integer else (int, float)
    valid = not isinstance(value, bool) and isinstance(value, kinds) and math.isfinite(value) and value > low \
        and (high is None or value < high)
    if not valid:
        bounds = f"> {low}" if high is None else f"in ({low}, {high})"
        raise ValueError(f"Invalid {name}: {value!r}; it must be {'an integer' if integer else 'a number'} {bounds}")


class PlateauDetector:
    """Feed ``update(step, loss)`` once per optimizer step; see the module docstring for the rule.

    ``window``: running-median length (steps); ``min_steps``: shortest plateau, and the longest a
    drop may take from leaving the plateau to ``drop_fraction`` of its level; ``tolerance``: the
    plateau's band is a factor ``1 + tolerance`` either side; ``drop_fraction`` in (0, 1 / (1 +
    tolerance)): how far below the level the median must fall for an escape. Non-finite losses are
    ignored; losses <= 0 count as 1e-30 (the log needs a positive value). ``names`` maps these
    argument names to the caller's own, for its error messages.
    """

    def __init__(self, window: int = DEFAULT_WINDOW, min_steps: int = DEFAULT_MIN_STEPS,
                 tolerance: float = DEFAULT_TOLERANCE, drop_fraction: float = DEFAULT_DROP_FRACTION,
                 names: Mapping[str, str] | None = None) -> None:
        label = (names or {}).get
        _check(label("window", "window"), window, 0, None, integer=True)
        _check(label("min_steps", "min_steps"), min_steps, 0, None, integer=True)
        _check(label("tolerance", "tolerance"), tolerance, 0, None, integer=False)
        _check(label("drop_fraction", "drop_fraction"), drop_fraction, 0, 1 / (1 + tolerance), integer=False)
        self.window, self.min_steps = window, min_steps
        self.band = math.log1p(tolerance)
        self.drop = math.log(drop_fraction)
        self.escapes: list[dict[str, int]] = []
        self._logs: deque[float] = deque(maxlen=window)
        self._anchor: tuple[int, float] | None = None  # (step, smoothed log-loss) the search measures from
        self._plateau_sum: tuple[float, int] | None = None  # sum and count of the smoothed values since the anchor
        self._plateau: dict[str, float] | None = None  # {"start", "level", "left"} once confirmed
        self._first_step: int | None = None

    @property
    def on_plateau(self) -> bool:
        """Whether a confirmed plateau is in progress (the loss may have just left it)."""
        return self._plateau is not None

    @property
    def recent(self) -> list[float]:
        """The last ``window`` finite losses fed, oldest first (floored at 1e-30)."""
        return [math.exp(value) for value in self._logs]

    def _smoothed(self, loss: float) -> float | None:
        self._logs.append(math.log(max(loss, 1e-30)))
        if len(self._logs) < self.window:
            return None
        ordered = sorted(self._logs)
        middle = len(ordered) // 2
        return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2

    def update(self, step: int, loss: float) -> dict[str, int] | None:
        """Add the loss of ``step``; return the escape event if one is confirmed here."""
        if not math.isfinite(loss):
            return None
        if self._first_step is None:
            self._first_step = step
        y = self._smoothed(loss)
        if y is None:
            return None
        # the median stands for the middle of its window; the very first one for the whole window
        at = self._first_step if self._anchor is None else step - (self.window - 1) // 2
        if self._plateau is None:
            self._search(at, y)
            return None
        return self._follow(at, y)

    def _search(self, step: int, y: float) -> None:
        if self._anchor is None or abs(y - self._anchor[1]) > self.band:
            self._anchor = (step, y)
            self._plateau_sum = (y, 1)
            return
        total, count = self._plateau_sum
        self._plateau_sum = (total + y, count + 1)
        if step - self._anchor[0] >= self.min_steps:
            self._plateau = {"start": self._anchor[0], "level": (total + y) / (count + 1), "left": None}

    def _restart(self, step: int, y: float) -> None:
        self._plateau = None
        self._anchor = (step, y)
        self._plateau_sum = (y, 1)

    def _follow(self, step: int, y: float) -> dict[str, int] | None:
        plateau = self._plateau
        level = plateau["level"]
        if y > level + self.band:
            self._restart(step, y)
        elif y >= level - self.band:
            plateau["left"] = None  # a dip that came back
        elif plateau["left"] is None:
            plateau["left"] = step
        if plateau["left"] is None or self._plateau is None:
            return None
        if y <= level + self.drop:
            start, end = int(plateau["start"]), int(plateau["left"])
            event = {"start": start, "end": end, "length": end - start}
            self.escapes.append(event)
            self._restart(step, y)
            return event
        if step - plateau["left"] > max(self.min_steps, plateau["left"] - plateau["start"]):
            self._restart(step, y)  # slower than the plateau lasted: a decay, not an escape
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"logs": list(self._logs), "anchor": self._anchor, "sum": self._plateau_sum,
                "plateau": None if self._plateau is None else dict(self._plateau), "escapes": list(self.escapes),
                "first_step": self._first_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._logs = deque(state.get("logs", []), maxlen=self.window)
        anchor, total = state.get("anchor"), state.get("sum")
        self._anchor = None if anchor is None else tuple(anchor)
        self._plateau_sum = None if total is None else tuple(total)
        self._plateau = None if state.get("plateau") is None else dict(state["plateau"])
        self.escapes = list(state.get("escapes", []))
        self._first_step = state.get("first_step")
