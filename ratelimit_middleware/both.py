"""Two limits on one request: a path whose spellings fall under two path rules (see ``routes``) gets both,
and ``Both(current, Shadow(new))`` keeps a limit enforced while a new one is tried beside it.

``Both(first, second)`` stands wherever a limiter does, and takes what a limiter option takes (a limiter, a
config or a limit string). The second is asked only if the first allows, and the answer is the binding
decision of both. Reservations (token or concurrency limits) combine too: a plain limit is checked before a
reserving one, and two reserving limits give one ``JointReservation``.
"""

from __future__ import annotations

import asyncio
from typing import cast

from .checker import Checker, LimiterSpec, Reserver, as_checker, reserver_of
from .decision import Decision, ShadowDecision
from .errors import FallbackDecision
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

    def __init__(self, first: LimiterSpec, second: LimiterSpec) -> None:
        first, second = as_checker(first, "Both's first limit"), as_checker(second, "Both's second limit")
        if reserver_of(first) is not None and reserver_of(second) is None:
            first, second = second, first
        self.first, self.second = first, second
        self.uses_reservations = reserver_of(second) is not None
        self.inline = all(getattr(limiter, "inline", False) is True for limiter in (first, second))
        self._routes = any(callable(getattr(limiter, "route", None)) for limiter in (first, second))

    def route(self, request: RequestView, model: str) -> tuple[Checker, str]:
        """The two limiters of this request once a side that is ``Plans`` (or ``Shadow`` of them) is routed
        to the request's plan; each is asked with its own model (a plan's aliases apply to the plan only)."""
        if not self._routes:
            return self, model
        first, second = (_routed(limiter, request, model) for limiter in (self.first, self.second))
        return Both(first, second), model

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
        try:
            later = cast(Reserver, self.second).reserve(user, model, **tokens)
        except BaseException:
            earlier.cancel()
            raise
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
        try:
            later = await cast(Reserver, self.second).areserve(user, model, **tokens)
        except BaseException:  # cancelled too: the first gives back what it holds, whatever happens
            await asyncio.shield(earlier.acancel())
            raise
        if not later.allowed:
            await asyncio.shield(earlier.acancel())
        return _joint(earlier, later)


def _routed(limiter: Checker, request: RequestView, model: str) -> Checker:
    """``limiter`` routed for this request, asked with the model it was routed with."""
    route = getattr(limiter, "route", None)
    if route is None:
        return limiter
    routed, own = route(request, model)
    return routed if own == model else _AskedAs(routed, own)


class _AskedAs:
    """A limiter asked with its own model whatever model it is given: a plan's, after the plan's aliases,
    beside a limit that counts the model as the client named it."""

    def __init__(self, limiter: Checker, model: str) -> None:
        self.limiter, self.model = limiter, model
        self.uses_reservations = reserver_of(limiter) is not None
        self.inline = getattr(limiter, "inline", False) is True

    def check(self, user: str, model: str, cost: int = 1) -> Decision:
        return self.limiter.check(user, self.model, cost)

    async def acheck(self, user: str, model: str, cost: int = 1) -> Decision:
        return await self.limiter.acheck(user, self.model, cost)

    def reserve(self, user: str, model: str, *, input_tokens: int = 0, output_tokens: int = 0) -> Reservation:
        reserver = cast(Reserver, self.limiter)
        return reserver.reserve(user, self.model, input_tokens=input_tokens, output_tokens=output_tokens)

    async def areserve(
        self, user: str, model: str, *, input_tokens: int = 0, output_tokens: int = 0
    ) -> Reservation:
        reserver = cast(Reserver, self.limiter)
        return await reserver.areserve(
            user, self.model, input_tokens=input_tokens, output_tokens=output_tokens
        )


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
    """The binding one of two limits' decisions on one request. While both allow, a decision made by a
    storage's failure policy marks it (observers must see the fallback, and an unchecked count gets no
    headers); else a shadow denial binds, as the denial it stands for, even against a limit at its last
    unit (observers must count it)."""
    decision = binding([first, second])
    if first.allowed and second.allowed:
        for made in (first, second):
            if isinstance(made, FallbackDecision):
                return type(made).of(decision)
        for made in (first, second):
            if isinstance(made, ShadowDecision):
                return made
    return decision
