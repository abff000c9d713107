"""Reserve, then settle: token budgets and concurrency slots for requests whose real cost comes later.

Before calling the model, ``limiter.reserve(user, model, input_tokens=..., output_tokens=...)`` charges one
request, the estimated tokens and one concurrency slot, all or nothing. After the response,
``reservation.settle(input_tokens, output_tokens)`` charges the real usage instead: what was not used is
refunded, an overage is charged, in the window the reservation was made in; the slot is given back.
``cancel()`` refunds every reserved token (for failed upstream calls) and gives the slot back. A reservation
settles once; later calls do nothing. As a context manager it cancels on an exception and otherwise settles
with the estimate unless settled already.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType

from .decision import Decision

__all__ = ["Reservation"]

Adjust = Callable[[Sequence[int]], None]
AsyncAdjust = Callable[[Sequence[int]], Awaitable[None]]
Settlement = Callable[[tuple[int, int], "tuple[int, int] | None"], tuple[int, ...]]


def check_tokens(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value!r}")
    return value


def _no_settlement(reserved: tuple[int, int], actual: tuple[int, int] | None) -> tuple[int, ...]:
    return ()


def _nothing(deltas: Sequence[int]) -> None:
    """Nothing was charged: nothing to adjust."""


async def _anothing(deltas: Sequence[int]) -> None:
    """``_nothing`` for event loops."""


class Reservation:
    """What ``reserve`` charged, and how to settle it."""

    __slots__ = (
        "_aadjust",
        "_adjust",
        "_open",
        "_settlement",
        "decision",
        "decisions",
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
        settlement: Settlement,
        adjust: Adjust,
        aadjust: AsyncAdjust,
    ) -> None:
        self.user = user
        self.model = model
        self.decision = decision
        """The binding decision over every limit."""
        self.decisions = dict(decisions)
        """The binding decision of each unit (``"requests"``, ``"tokens"``, ``"concurrent"``...)."""
        self.reserved = reserved
        """``(input_tokens, output_tokens)`` reserved."""
        self._settlement = settlement
        self._adjust = adjust
        self._aadjust = aadjust
        self._open = decision.allowed  # a denied reservation charged nothing: there is nothing to settle

    @classmethod
    def uncharged(
        cls,
        user: str,
        model: str,
        decision: Decision,
        decisions: Mapping[str, Decision],
        reserved: tuple[int, int],
    ) -> Reservation:
        """A reservation that charged nothing (refused outright, or let through by shadow mode): settling or
        cancelling it changes nothing."""
        return cls(user, model, decision, decisions, reserved, _no_settlement, _nothing, _anothing)

    @property
    def allowed(self) -> bool:
        return self.decision.allowed

    @property
    def settled(self) -> bool:
        """True once settled or cancelled (or when denied: nothing was charged)."""
        return not self._open

    def _deltas(self, actual: tuple[int, int] | None) -> tuple[int, ...] | None:
        if not self._open:
            return None
        self._open = False
        if actual is not None:
            actual = (check_tokens(actual[0], "input_tokens"), check_tokens(actual[1], "output_tokens"))
        return self._settlement(self.reserved, actual)

    def settle(self, input_tokens: int, output_tokens: int) -> None:
        """Charge the real usage instead of the estimate, and give the concurrency slot back."""
        deltas = self._deltas((input_tokens, output_tokens))
        if deltas is not None:
            self._adjust(deltas)

    async def asettle(self, input_tokens: int, output_tokens: int) -> None:
        """``settle`` for event loops."""
        deltas = self._deltas((input_tokens, output_tokens))
        if deltas is not None:
            await self._aadjust(deltas)

    def cancel(self) -> None:
        """Refund every reserved token and give the concurrency slot back (the request stays counted)."""
        deltas = self._deltas(None)
        if deltas is not None:
            self._adjust(deltas)

    async def acancel(self) -> None:
        """``cancel`` for event loops."""
        deltas = self._deltas(None)
        if deltas is not None:
            await self._aadjust(deltas)

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
        state = "open" if self._open else "settled"
        return f"<Reservation {state} allowed={self.allowed} reserved={self.reserved}>"
