"""GCRA (generic cell rate algorithm): a token bucket stored as a single timestamp.

Units replenish evenly, one every ``window / limit`` seconds (the emission interval ``T``), and the burst is
the whole limit: ``limit`` units can pass at once, then one more each ``T``. The state is the theoretical
arrival time ``tat``: the time at which the bucket would be full again. A request of ``cost`` fits when
``max(tat, now) + cost * T - now <= window``. In any interval of length ``d`` it admits at most
``limit + d / T`` units.
"""

from __future__ import annotations

import math

from .base import Algorithm, Verdict

# Sums of many emission intervals carry float rounding; compare against the window with this relative slack
# so that ``limit`` requests at one instant all fit. It is far below a microsecond for any sane window.
_SLACK = 1e-9


class GCRA(Algorithm[float]):
    """Smooth, O(1) memory (one float per key); the limit is the burst."""

    name = "gcra"
    __slots__ = ("ceiling", "interval")

    def __init__(self, limit: int, window: float) -> None:
        super().__init__(limit, window)
        self.interval = window / limit
        self.ceiling = window + window * _SLACK  # the most debt a request may leave

    def evaluate(self, state: float | None, now: float, cost: int) -> Verdict:
        tat = now if state is None or state < now else state
        debt = tat + cost * self.interval - now
        window = self.window
        if debt <= self.ceiling:
            remaining = int((window - debt) / self.interval + _SLACK)
            return True, remaining if remaining > 0 else 0, 0.0, debt
        return False, 0, debt - window, tat - now

    def commit(self, state: float | None, now: float, cost: int) -> float:
        tat = now if state is None or state < now else state
        return tat + cost * self.interval

    def admit(self, state: float | None, now: float, cost: int) -> float | None:
        tat = now if state is None or state < now else state
        tat += cost * self.interval
        return tat if tat - now <= self.ceiling else None

    def used(self, state: float | None, now: float) -> int:
        if state is None or state <= now:
            return 0
        return math.ceil((state - now) / self.interval - _SLACK)

    def idle(self, state: float, now: float) -> bool:
        return state <= now

    def adjust(self, state: float | None, now: float, at: float, delta: int) -> float | None:
        if delta >= 0:
            # As if charged at `at`: the part of that debt that has drained since stays drained.
            tat = (at if state is None or state < at else state) + delta * self.interval
            return tat if tat > now else state
        if state is None or state <= now:
            return state  # the charge has drained already: nothing left to refund
        # A refund cannot make the bucket fuller than full: the part already drained stays drained.
        tat = state + delta * self.interval
        return tat if tat > now else None
