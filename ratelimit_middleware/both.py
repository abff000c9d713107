"""Two limits on one request: a path whose spellings fall under two path rules (see ``routes``) gets both.

``Both(first, second)`` stands wherever a limiter does. The second is asked only if the first allows, and the
answer is the binding decision of both. Reservations (token or concurrency limits) combine too: a plain
limit is checked before a reserving one, and two reserving limits give one ``JointReservation``.
"""

from __future__ import annotations

from typing import cast

from .checker import Checker, Reserver, reserver_of
from .decision import Decision
from .errors import FallbackDecision
from .plans import Plans
from .policy import binding
from .request import RequestView
from .reservation import JointReservation, Reservation

__all__ = ["Both"]


class Both:
    """Two limits on one request: the second is asked only if the first allows, and the binding decision
    of both is the answer (a request denied by the second still counts in the first). A limiter with token
    or concurrency limits (``uses_reservations``) is reserved after a plain one, its requests decision
    folded with the other's; of two such, the second's denial cancels the first's reservation (its request
    stays counted). ``Plans`` on either side are routed per request first (``route``)."""

    def __init__(self, first: Checker, second: Checker) -> None:
        if reserver_of(first) is not None and reserver_of(second) is None:
            first, second = second, first
        self.first, self.second = first, second
        self.uses_reservations = reserver_of(second) is not None
        self.inline = all(getattr(limiter, "inline", False) is True for limiter in (first, second))
        self._plans = isinstance(first, Plans) or isinstance(second, Plans)
        self._routed: dict[tuple[int, int], Both] = {}

    def route(self, request: RequestView, model: str) -> tuple[Checker, str]:
        """The two limiters of this request once ``Plans`` are routed, and its model (after a plan's
        aliases)."""
        if not self._plans:
            return self, model
        first, second = self.first, self.second
        if isinstance(first, Plans):
            first, model = first.route(request, model)
        if isinstance(second, Plans):
            second, model = second.route(request, model)
        key = (id(first), id(second))
        both = self._routed.get(key)
        if both is None:
            both = self._routed[key] = Both(first, second)
        return both, model

    def check(self, user: str, model: str, cost: int = 1) -> Decision:
        decision = self.first.check(user, model, cost)
        if not decision.allowed:
            return decision
        return _joined(decision, self.second.check(user, model, cost))

    async def acheck(self, user: str, model: str, cost: int = 1) -> Decision:
        decision = await self.first.acheck(user, model, cost)
        if not decision.allowed:
            return decision
        return _joined(decision, await self.second.acheck(user, model, cost))

    def reserve(self, user: str, model: str, *, input_tokens: int = 0, output_tokens: int = 0) -> Reservation:
        tokens = {"input_tokens": input_tokens, "output_tokens": output_tokens}
        first = reserver_of(self.first)
        if first is None:
            decision = self.first.check(user, model)
            if not decision.allowed:
                return Reservation(user, model, decision, {decision.unit: decision}, (0, 0))
            return _with(cast(Reserver, self.second).reserve(user, model, **tokens), decision)
        earlier = first.reserve(user, model, **tokens)
        if not earlier.allowed:
            return earlier
        later = cast(Reserver, self.second).reserve(user, model, **tokens)
        if not later.allowed:
            earlier.cancel()
        return _joint(earlier, later)

    async def areserve(
        self, user: str, model: str, *, input_tokens: int = 0, output_tokens: int = 0
    ) -> Reservation:
        tokens = {"input_tokens": input_tokens, "output_tokens": output_tokens}
        first = reserver_of(self.first)
        if first is None:
            decision = await self.first.acheck(user, model)
            if not decision.allowed:
                return Reservation(user, model, decision, {decision.unit: decision}, (0, 0))
            return _with(await cast(Reserver, self.second).areserve(user, model, **tokens), decision)
        earlier = await first.areserve(user, model, **tokens)
        if not earlier.allowed:
            return earlier
        later = await cast(Reserver, self.second).areserve(user, model, **tokens)
        if not later.allowed:
            await earlier.acancel()
        return _joint(earlier, later)


def _joint(earlier: Reservation, later: Reservation) -> Reservation:
    """The reservations of two limits, the first allowed: the second's denial with the first's decisions
    folded in (the first cancelled by the caller), or both held together."""
    if not later.allowed:
        for decision in earlier.decisions.values():
            _with(later, decision)
        return later
    decisions = dict(earlier.decisions)
    for unit, decision in later.decisions.items():
        decisions[unit] = decision if unit not in decisions else _joined(decisions[unit], decision)
    return JointReservation((earlier, later), _joined(earlier.decision, later.decision), decisions)


def _with(reservation: Reservation, decision: Decision) -> Reservation:
    """``reservation`` with an allowing ``decision`` of another limit folded into its binding decisions."""
    same = reservation.decisions.get(decision.unit)
    reservation.decisions[decision.unit] = decision if same is None else _joined(same, decision)
    reservation.decision = _joined(reservation.decision, decision)
    return reservation


def _joined(first: Decision, second: Decision) -> Decision:
    """The binding one of two limits' decisions on one request, except that a decision made by a storage's
    failure policy wins while both allow: observers must see the fallback, and a count nobody made gets no
    headers."""
    if first.allowed and second.allowed:
        for decision in (first, second):
            if isinstance(decision, FallbackDecision):
                return decision
    return binding([first, second])
