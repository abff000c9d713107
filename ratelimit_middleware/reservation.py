"""Reserve, then settle: token budgets and concurrency slots for requests whose real cost comes later.

Before calling the model, ``limiter.reserve(user, model, input_tokens=..., output_tokens=...)`` charges one
request, the estimated tokens and one concurrency slot, all or nothing. After the response,
``reservation.settle(input_tokens, output_tokens)`` charges the real usage instead: what was not used is
refunded, an overage is charged, in the window the reservation was made in; the slot is given back.
``cancel()`` refunds every reserved token (for failed upstream calls) and gives the slot back. A reservation
settles once; later calls do nothing. As a context manager it cancels on an exception and otherwise settles
with the estimate unless settled already.

On Redis a concurrency slot is a lease that expires (so that a dead worker cannot hold it for ever):
``lease`` says after how many seconds, and ``renew()`` extends it while the response is still running (the
middlewares do so for long responses and streams).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

from .config import check_amount
from .decision import Decision

if TYPE_CHECKING:
    from .backends.base import ReservingBackend

__all__ = ["JointReservation", "Reservation"]

T = TypeVar("T")
Settlement = Callable[[tuple[int, int], "tuple[int, int] | None"], tuple[int, ...]]


class Reservation:
    """What ``reserve`` charged, and how to settle it."""

    __slots__ = (
        "_charge",
        "decision",
        "decisions",
        "lease",
        "model",
        "reserved",
        "user",
    )

    def __init__(
        self,
        user: str,
        model: str,
        decision: Decision,
        decisions: Mapping[str, Decision],
        reserved: tuple[int, int],
        charge: tuple[ReservingBackend, object, Settlement] | None = None,
    ) -> None:
        self.user = user
        self.model = model
        self.decision = decision
        """The binding decision over every limit."""
        self.decisions = dict(decisions)
        """The binding decision of each unit (``"requests"``, ``"tokens"``, ``"concurrent"``...)."""
        self.reserved = reserved
        """``(input_tokens, output_tokens)`` reserved."""
        # What settles the charge until it is settled: its backend, the backend's receipt and the policy's
        # settlement. None once settled, and for a reservation that charged nothing (denied, refused
        # outright, or let through by shadow mode).
        self._charge = charge if decision.allowed else None
        self.lease = self._charge[0].lease if self._charge and "concurrent" in decisions else None
        """Seconds after which the concurrency slots taken expire unless renewed; ``None`` when they do not
        expire (in memory) or none were taken."""

    @property
    def allowed(self) -> bool:
        return self.decision.allowed

    @property
    def settled(self) -> bool:
        """True once settled or cancelled (or when denied: nothing was charged)."""
        return self._charge is None

    def _settling(
        self, actual: tuple[int, int] | None
    ) -> tuple[ReservingBackend, object, tuple[int, ...]] | None:
        """The backend, receipt and adjustments that settle the charge with ``actual`` usage (``None``:
        cancel), or ``None`` when there is nothing (left) to settle."""
        if actual is not None:
            actual = (check_amount(actual[0], "input_tokens"), check_amount(actual[1], "output_tokens"))
        if self._charge is None:
            return None
        backend, receipt, settlement = self._charge
        self._charge = None
        return backend, receipt, settlement(self.reserved, actual)

    def settle(self, input_tokens: int, output_tokens: int) -> None:
        """Charge the real usage instead of the estimate, and give the concurrency slot back."""
        settling = self._settling((input_tokens, output_tokens))
        if settling is not None:
            backend, receipt, deltas = settling
            backend.adjust(self.user, self.model, receipt, deltas)

    async def asettle(self, input_tokens: int, output_tokens: int) -> None:
        """``settle`` for event loops."""
        settling = self._settling((input_tokens, output_tokens))
        if settling is not None:
            backend, receipt, deltas = settling
            await backend.aadjust(self.user, self.model, receipt, deltas)

    def cancel(self) -> None:
        """Refund every reserved token and give the concurrency slot back (the request stays counted)."""
        settling = self._settling(None)
        if settling is not None:
            backend, receipt, deltas = settling
            backend.adjust(self.user, self.model, receipt, deltas)

    async def acancel(self) -> None:
        """``cancel`` for event loops."""
        settling = self._settling(None)
        if settling is not None:
            backend, receipt, deltas = settling
            await backend.aadjust(self.user, self.model, receipt, deltas)

    def renew(self) -> bool | None:
        """Extend the leases of the concurrency slots held to ``lease`` seconds from now.

        True while the reservation holds its slots (also when they never expire); False once settled, or when
        a lease had already expired: the slot may have been taken by another request meanwhile, so it is not
        taken again. None when the storage could not be reached (it logs its outage itself).
        """
        if self._charge is None:
            return False
        backend, receipt, _ = self._charge
        return self.lease is None or backend.renew(self.user, self.model, receipt)

    async def arenew(self) -> bool | None:
        """``renew`` for event loops."""
        if self._charge is None:
            return False
        backend, receipt, _ = self._charge
        return self.lease is None or await backend.arenew(self.user, self.model, receipt)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if error is not None:
            self.cancel()
        else:
            self.settle(*self.reserved)

    async def __aenter__(self) -> Reservation:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if error is not None:
            await self.acancel()
        else:
            await self.asettle(*self.reserved)

    def __repr__(self) -> str:
        state = "settled" if self.settled else "open"
        return f"<{type(self).__name__} {state} allowed={self.allowed} reserved={self.reserved}>"


class JointReservation(Reservation):
    """The allowed reservations of two limits on one request (a path under two rules), settled, cancelled
    and renewed together; ``decision`` and ``decisions`` are the binding ones of both. A part that charged
    nothing (a shadow limit's denial let through) has nothing to settle or renew."""

    __slots__ = ("parts",)

    def __init__(
        self, parts: tuple[Reservation, Reservation], decision: Decision, decisions: Mapping[str, Decision]
    ) -> None:
        first = parts[0]
        super().__init__(first.user, first.model, decision, decisions, first.reserved)
        self.parts = tuple(part for part in parts if not part.settled)
        leases = [part.lease for part in self.parts if part.lease is not None]
        self.lease = min(leases) if leases else None

    @property
    def settled(self) -> bool:
        return all(part.settled for part in self.parts)

    def settle(self, input_tokens: int, output_tokens: int) -> None:
        _each([functools.partial(part.settle, input_tokens, output_tokens) for part in self.parts])

    async def asettle(self, input_tokens: int, output_tokens: int) -> None:
        await _each_async(
            [functools.partial(part.asettle, input_tokens, output_tokens) for part in self.parts]
        )

    def cancel(self) -> None:
        _each([part.cancel for part in self.parts])

    async def acancel(self) -> None:
        await _each_async([part.acancel for part in self.parts])

    def renew(self) -> bool | None:
        return _held(_each([part.renew for part in self.parts if not part.settled]))

    async def arenew(self) -> bool | None:
        return _held(await _each_async([part.arenew for part in self.parts if not part.settled]))


def _each(calls: list[Callable[[], T]]) -> list[T]:
    """Every call's result, each made even when one before raised (whose error is raised after: a
    storage that failed for one part must not keep the other's slot)."""
    results, failure = [], None
    for call in calls:
        try:
            results.append(call())
        except BaseException as error:
            failure = failure or error
    if failure is not None:
        raise failure
    return results


async def _each_async(calls: list[Callable[[], Awaitable[T]]]) -> list[T]:
    """``_each`` for coroutines."""
    results, failure = [], None
    for call in calls:
        try:
            results.append(await call())
        except BaseException as error:
            failure = failure or error
    if failure is not None:
        raise failure
    return results


def _held(renewed: list[bool | None]) -> bool | None:
    """What renewing the parts still held says of the whole: lost if one is lost, unknown if one is
    unknown, and lost when none is held any more."""
    if not renewed or False in renewed:
        return False
    return None if None in renewed else True
