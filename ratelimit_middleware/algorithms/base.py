"""The contract every algorithm keeps, so that storage never needs to know which one it runs.

An algorithm instance is bound to one window (``limit`` units per ``window`` seconds) and is pure: it reads a
state (``None`` for a key never seen or forgotten) and the time, and says what a request of ``cost`` units
would get. ``commit`` returns the state after admitting it. Storage keeps the states, one per key, and makes
the evaluate-then-commit of all windows of a decision atomic; the Redis scripts implement the same contract.
``admit`` is both steps at once, for a single window (``check`` and ``allow`` of a single rule in memory);
``figures`` then gives ``check`` the figures of an admitted request from the state ``admit`` left.

Preconditions enforced by the caller: ``limit >= 1`` and ``0 <= cost <= limit`` (a cost above the limit is
denied before any algorithm runs: it can never fit). ``adjust`` settles an earlier charge after the fact
(token reservations, released concurrency slots).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from math import inf, nextafter
from typing import ClassVar, Generic, TypeVar

S = TypeVar("S")

Verdict = tuple[bool, int, float, float]
"""``(allowed, remaining, retry_after, reset_after)``: remaining units after this request (0 when denied),
seconds until this request would fit (0.0 when allowed), seconds until the key is fully recovered."""


_BUMPS = 64  # floats tried past the computed wait before giving up (a few ulps are ever needed)


def wait_until(now: float, wait: float, admits: Callable[[float], bool]) -> float:
    """``wait``, raised to the next floats if needed, such that a retry at ``now + wait`` is admitted.

    The exact wait is rounded, then added to ``now`` by the client's clock and rounded again, and the retry
    evaluates its own float expressions: so the computed wait may land a few ulps short of admission. Each
    step moves the retry to the next float after where the last one landed. The Lua scripts run the same
    steps (``wait_until`` in common.lua), so both backends give the same wait to the bit.
    """
    for _ in range(_BUMPS):
        later = now + wait
        if admits(later):
            break
        wait = max(nextafter(later, inf) - now, nextafter(wait, inf))
    return wait


class Algorithm(ABC, Generic[S]):
    """One window of one limit, evaluated by a particular algorithm."""

    name: ClassVar[str]
    __slots__ = ("limit", "window")

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window

    @abstractmethod
    def evaluate(self, state: S | None, now: float, cost: int) -> Verdict:
        """What a request of ``cost`` units arriving at ``now`` gets; changes nothing."""

    @abstractmethod
    def commit(self, state: S | None, now: float, cost: int) -> S:
        """The state after admitting ``cost`` units at ``now`` (``cost >= 1``; may reuse ``state``)."""

    def admit(self, state: S | None, now: float, cost: int) -> S | None:
        """The state after admitting ``cost`` units at ``now`` if they fit, else ``None`` (``cost >= 1``).

        Exactly ``commit`` if ``evaluate`` allows. The algorithms override it with one pass that skips the
        figures only a ``Decision`` needs: it is the whole work of ``allow`` on a single window.
        """
        return self.commit(state, now, cost) if self.evaluate(state, now, cost)[0] else None

    @abstractmethod
    def figures(self, state: S, now: float, cost: int) -> tuple[int, float]:
        """``(remaining, reset_after)`` of a request of ``cost`` units (``cost >= 1``) admitted at ``now``,
        from the state it left (``admit`` or ``commit``): those of ``evaluate``'s verdict for it.

        Apart from ``admit``, which ``allow`` runs alone: it needs the answer only."""

    @abstractmethod
    def used(self, state: S | None, now: float) -> int:
        """Units counted against the limit at ``now``."""

    @abstractmethod
    def idle(self, state: S, now: float) -> bool:
        """True once ``state`` is indistinguishable from no state: storage may forget the key."""

    @abstractmethod
    def adjust(self, state: S | None, now: float, at: float, charged: int, delta: int) -> S | None:
        """The state after changing a charge of ``charged`` units made at time ``at`` by ``delta`` units
        (``None``: forget it).

        Settles a reservation: a negative ``delta`` refunds (never more than was charged: the caller passes
        at least ``-charged``), a positive one charges an overage. Either lands where the charge at ``at``
        was counted (its window, its log entry); once that charge no longer counts, nothing changes. Only
        GCRA needs ``charged``: its state does not say where a charge ended once it has drained.
        """
