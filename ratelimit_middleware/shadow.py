"""Shadow mode for one policy: evaluate a limiter, record what it decides, never deny.

``Shadow(limiter)`` stands wherever a limiter does (a middleware's ``limiter``, a ``path_limits`` entry, a
plan): a request the limiter denies comes back allowed, as a ``ShadowDecision`` carrying the denial's
figures (so the rate limit headers still tell the truth), and observers count it as ``shadow_denied``.
Nothing is charged for it. The middlewares' ``shadow=True`` does the same for every limiter at once; this
rolls out one new limit while the others keep being enforced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from .checker import is_limiter
from .decision import Decision, ShadowDecision
from .reservation import Reservation

if TYPE_CHECKING:
    from .checker import Checker, Reserver
    from .request import RequestView

__all__ = ["Shadow"]


def _let_through(decision: Decision) -> Decision:
    return decision if decision.allowed else ShadowDecision._make(decision._replace(allowed=True))


def _let_reservation_through(reservation: Reservation) -> Reservation:
    if reservation.allowed:
        return reservation
    decisions = {unit: _let_through(decision) for unit, decision in reservation.decisions.items()}
    return Reservation(  # charging nothing: settling it changes nothing
        reservation.user,
        reservation.model,
        _let_through(reservation.decision),
        decisions,
        reservation.reserved,
    )


class Shadow:
    """``limiter``, evaluated and recorded but never denying."""

    def __init__(self, limiter: Checker) -> None:
        if not is_limiter(limiter):
            raise TypeError(f"Shadow needs a limiter instance, got {limiter!r}")
        self.limiter = limiter
        self._routes = callable(getattr(limiter, "route", None))

    def route(self, request: RequestView, model: str) -> tuple[Checker, str]:
        """Shadow of the limiter the request is routed to (when ``limiter`` is ``Plans``), and its model."""
        if not self._routes:
            return self, model
        routed, model = getattr(self.limiter, "route")(request, model)  # noqa: B009 - checked above
        return Shadow(routed), model

    @property
    def uses_reservations(self) -> bool:
        return getattr(self.limiter, "uses_reservations", False) is True

    def check(self, user: str, model: str, cost: int = 1) -> Decision:
        return _let_through(self.limiter.check(user, model, cost))

    async def acheck(self, user: str, model: str, cost: int = 1) -> Decision:
        return _let_through(await self.limiter.acheck(user, model, cost))

    def reserve(self, user: str, model: str, *, input_tokens: int = 0, output_tokens: int = 0) -> Reservation:
        reserve = getattr(self.limiter, "reserve")  # noqa: B009 - only limiters with reservations get here
        return _let_reservation_through(
            reserve(user, model, input_tokens=input_tokens, output_tokens=output_tokens)
        )

    async def areserve(
        self, user: str, model: str, *, input_tokens: int = 0, output_tokens: int = 0
    ) -> Reservation:
        limiter = cast("Reserver", self.limiter)
        reservation = await limiter.areserve(
            user, model, input_tokens=input_tokens, output_tokens=output_tokens
        )
        return _let_reservation_through(reservation)
