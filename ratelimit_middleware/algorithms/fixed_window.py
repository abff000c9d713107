"""Fixed window: a counter per aligned window ``[k * window, (k + 1) * window)``.

Cheapest and easiest to explain, but bursty: up to twice the limit can pass around a window boundary (the end
of one window and the start of the next). The state packs the window number ``k`` and the units used in it
into one int, ``k * (limit + 1) + used``: exact (``used <= limit`` always; an overage settled after the fact
saturates at the limit) and 28-36 bytes instead of a tuple.
"""

from __future__ import annotations

from .base import Algorithm, Verdict, wait_until


class FixedWindow(Algorithm[int]):
    """O(1) memory; never more than the limit per aligned window."""

    name = "fixed_window"
    __slots__ = ("base",)

    def __init__(self, limit: int, window: float) -> None:
        super().__init__(limit, window)
        self.base = limit + 1

    def _used_now(self, state: int | None, k: int) -> int:
        if state is None:
            return 0
        state_k, used = divmod(state, self.base)
        return used if state_k == k else 0

    def evaluate(self, state: int | None, now: float, cost: int) -> Verdict:
        k = int(now // self.window)
        used = self._used_now(state, k)
        to_next = self._to_next(now, k)
        if used + cost <= self.limit:
            after = used + cost
            return True, self.limit - after, 0.0, to_next if after else 0.0
        return False, 0, to_next, to_next

    def _to_next(self, now: float, k: int) -> float:
        """Seconds from ``now`` (in window ``k``) to window ``k + 1``: to its start, raised if needed until
        ``now`` plus it falls in window ``k + 1`` by ``now // window`` (a decimal window's start rounds)."""
        window = self.window
        to_next = (k + 1) * window - now
        if (now + to_next) // window <= k:  # the rounded boundary still falls in window k
            to_next = wait_until(now, to_next, lambda later: later // window > k)
        return to_next

    def commit(self, state: int | None, now: float, cost: int) -> int:
        k = int(now // self.window)
        return k * self.base + self._used_now(state, k) + cost

    def admit(self, state: int | None, now: float, cost: int) -> int | None:
        base = self.base
        start = int(now // self.window) * base  # window k with nothing used; the states of k follow it
        used = state - start if state is not None and start <= state < start + base else 0
        return start + used + cost if used + cost <= self.limit else None

    def figures(self, state: int, now: float, cost: int) -> tuple[int, float]:
        k = int(now // self.window)
        return self.limit - self._used_now(state, k), self._to_next(now, k)

    def used(self, state: int | None, now: float) -> int:
        return self._used_now(state, int(now // self.window))

    def idle(self, state: int, now: float) -> bool:
        return state // self.base < int(now // self.window)

    def adjust(self, state: int | None, now: float, at: float, charged: int, delta: int) -> int | None:
        k = int(at // self.window)
        if k != int(now // self.window):
            return state  # the charge's window is over: nothing to settle
        used = min(max(self._used_now(state, k) + delta, 0), self.limit)  # a window cannot be more than full
        return k * self.base + used
