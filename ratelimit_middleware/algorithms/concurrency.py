"""In-flight requests: a counter of slots taken and not yet released.

Not a rate: a slot is taken when a request starts and given back (``adjust`` by -1) when it ends, however
long that takes. A request fits while fewer than ``limit`` slots are taken. How long until one frees up is
unknowable, so a denial suggests a short ``retry_after`` (``RETRY_AFTER`` seconds).
"""

from __future__ import annotations

from .base import Algorithm, Verdict

RETRY_AFTER = 1.0


class Concurrency(Algorithm[int]):
    """At most ``limit`` requests in flight; the window is unused."""

    name = "concurrency"
    __slots__ = ()

    def evaluate(self, state: int | None, now: float, cost: int) -> Verdict:
        taken = state or 0
        if taken + cost <= self.limit:
            return True, self.limit - taken - cost, 0.0, 0.0
        return False, 0, RETRY_AFTER, RETRY_AFTER

    def commit(self, state: int | None, now: float, cost: int) -> int:
        return (state or 0) + cost

    def figures(self, state: int, now: float, cost: int) -> tuple[int, float]:
        return self.limit - state, 0.0

    def used(self, state: int | None, now: float) -> int:
        return state or 0

    def idle(self, state: int, now: float) -> bool:
        return state <= 0

    def adjust(self, state: int | None, now: float, at: float, charged: int, delta: int) -> int | None:
        taken = max((state or 0) + delta, 0)
        return taken or None
