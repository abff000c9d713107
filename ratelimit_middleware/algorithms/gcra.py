"""GCRA (generic cell rate algorithm): a token bucket stored as a single timestamp.

Units replenish evenly, one every ``window / limit`` seconds (the emission interval ``T``), and the burst is
the whole limit: ``limit`` units can pass at once, then one more each ``T``. The state is the theoretical
arrival time ``tat``: the time at which the bucket would be full again. A request of ``cost`` fits when
``max(tat, now) + cost * T - now <= window`` (up to the float rounding of the sums). In any interval of length
``d`` it admits at most ``limit + d / T`` units. Settlements are conservative while the bucket holds debt:
never less than if the actual usage had been charged at the reservation's time. Once it drained, an overage
lands from the end of its own charge, the charges ahead of it forgotten (the key no longer tells them).

Time is a float, and so is every sum of intervals: a limit is refused (``ValueError``) whose slack of
``_SLACK`` of the window passes a tenth of a unit (above ``GCRA_MAX_LIMIT``), or whose interval is finer than
a microsecond (above ``GCRA_MAX_RATE`` per second), four floats of a Unix time: at 2**53 per hour, 0.4 ps
each, a charge of one unit left ``tat`` unchanged. The other algorithms count in integers and take them.
"""

from __future__ import annotations

import math

from ..config import describe_seconds
from .base import Algorithm, Verdict, wait_until

# Sums of many emission intervals carry float rounding; compare against the window with this relative slack
# so that ``limit`` requests at one instant all fit. It is far below a microsecond for any sane window.
_SLACK = 1e-9
# ...and with the rounding of each sum at the clock's magnitude: `tat` is a time, so every charge rounds it to
# the floats near `now` (0.24 us apart at Unix times), whatever the window. The slack covers that many sums
# (the limit, up to this many) at `now * 2**-52` each: about 0.40 ms at Unix times (2026) for a limit of 1,024
# or more. It never exceeds half an interval: a larger one would admit whole units more than the limit.
_SUMS = 1024
GCRA_MAX_LIMIT = 10**8
"""The largest limit GCRA takes: its slack of 1e-9 of the window stays within a tenth of a unit."""
GCRA_MAX_RATE = 1_000_000
"""The most units per second GCRA takes: a unit then moves ``tat`` by a few floats at Unix times."""


class GCRA(Algorithm[float]):
    """Smooth, O(1) memory (one float per key); the limit is the burst."""

    name = "gcra"
    __slots__ = ("cap", "ceiling", "drift", "interval")

    def __init__(self, limit: int, window: float) -> None:
        if limit > GCRA_MAX_LIMIT or limit > window * GCRA_MAX_RATE:
            raise ValueError(
                f"gcra cannot count {limit} per {describe_seconds(window)}: at most {GCRA_MAX_LIMIT:,} per "
                f"window and {GCRA_MAX_RATE:,} per second (it keeps time in floats); use another algorithm"
            )
        super().__init__(limit, window)
        self.interval = window / limit
        # The most debt a request may leave at `now` is `ceiling + min(now * drift, cap)`.
        self.ceiling = window + window * _SLACK
        self.drift = min(limit, _SUMS) * 2.0**-52
        self.cap = self.interval / 2

    def evaluate(self, state: float | None, now: float, cost: int) -> Verdict:
        tat = now if state is None or state < now else state
        ceiling, drift = self.ceiling, self.drift
        after = tat + cost * self.interval  # what `commit` stores
        debt = after - now
        spare = now * drift
        if spare > self.cap:
            spare = self.cap
        bound = ceiling + spare
        if debt <= bound:
            return True, self._remaining(after, now, bound), 0.0, debt
        return False, 0, self._wait(tat, now, cost, debt), tat - now

    def _remaining(self, after: float, now: float, bound: float) -> int:
        """The most units one more request could take after one that leaves ``after`` (its debt within
        ``bound``), by admission's own expression: the quotient alone is one off either way when the sums
        round."""
        interval = self.interval
        remaining = int((bound - (after - now)) / interval)
        if after + remaining * interval - now > bound:
            remaining -= 1
        elif after + (remaining + 1) * interval - now <= bound:
            remaining += 1
        return remaining

    def figures(self, state: float, now: float, cost: int) -> tuple[int, float]:
        spare = now * self.drift
        if spare > self.cap:
            spare = self.cap
        return self._remaining(state, now, self.ceiling + spare), state - now

    def _wait(self, tat: float, now: float, cost: int, debt: float) -> float:
        """The wait until ``cost`` fits, admitted by ``evaluate`` at ``now`` plus it (a method of its own: a
        closure in ``evaluate`` would slow every call of it)."""
        interval, ceiling, drift, cap = self.interval, self.ceiling, self.drift, self.cap

        def admits(later: float) -> bool:  # `evaluate` at `later`, allowed or not
            spare = later * drift
            if spare > cap:
                spare = cap
            return (later if tat < later else tat) + cost * interval - later <= ceiling + spare

        return wait_until(now, debt - self.window, admits)

    def commit(self, state: float | None, now: float, cost: int) -> float:
        tat = now if state is None or state < now else state
        return tat + cost * self.interval

    def admit(self, state: float | None, now: float, cost: int) -> float | None:
        tat = now if state is None or state < now else state
        tat += cost * self.interval
        spare = now * self.drift
        if spare > self.cap:
            spare = self.cap
        return tat if tat - now <= self.ceiling + spare else None

    def used(self, state: float | None, now: float) -> int:
        if state is None or state <= now:
            return 0
        # Less the slack admission grants (so that `used + remaining` is the limit), as whole units.
        spare = now * self.drift
        if spare > self.cap:
            spare = self.cap
        spare += self.ceiling - self.window
        used = math.ceil((state - now - spare) / self.interval)
        return used if used > 0 else 0

    def idle(self, state: float, now: float) -> bool:
        return state <= now

    def adjust(self, state: float | None, now: float, at: float, charged: int, delta: int) -> float | None:
        if delta >= 0:
            # As if charged at `at`, behind the charge itself: the part of that debt that has drained since
            # stays drained. The charge ends at `at + charged * T` at the earliest, also when its key has
            # drained and gone since (swept, expired, deleted by a refund): without it the overage would
            # land on an empty bucket at `at`, forgetting the charge ahead of it. A key drained but still
            # there is the same as one gone (memory sweeps it at times, Redis expires it at `tat`), not a
            # later end of the charge: the settlement never depends on when it goes. A bucket is never more
            # than empty: `tat` saturates one window ahead, as a window counter at its limit (a key many
            # windows ahead would also outlive every idle key behind it in memory's sweep).
            interval = self.interval
            tat = at + charged * interval
            if state is not None and state > tat and state > now:
                tat = state
            tat += delta * interval
            full = now + self.window
            if tat > full:
                tat = full if state is None or state < full else state
            return tat if tat > now else state
        if state is None or state <= now:
            return state  # the charge has drained already: nothing left to refund
        # Give back only what of the charge cannot have drained yet. Its units drain one per interval from
        # `at` at the earliest (sooner only if nothing was ahead of them), so `now - at` of them may be gone;
        # the end of the bucket may belong to later charges, which a larger refund would erase.
        give = -delta * self.interval
        if now > at:
            give -= now - at
            if give <= 0:
                return state
        tat = state - give
        return tat if tat > now else None
