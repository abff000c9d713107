"""The public limiters: validate what callers pass, then let a backend decide under a policy.

``RateLimiter`` enforces one limit per user and model; ``MultiTierRateLimiter`` enforces several tiers at once
(per user and model, per model, per user, global), all or nothing. ``check`` counts requests; ``reserve``
also charges token budgets and takes concurrency slots, settled later (see ``reservation``). The decision
semantics live in ``policy`` and ``algorithms``, the storage in ``backends``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence

from .backends.base import Reserved, ReservingBackend, Storage, check_storage
from .backends.memory import DEFAULT_MAX_KEYS, MemoryBackend, MemoryStorage
from .config import MAX_AMOUNT, Limits, LimitSpec, RateLimitConfig, TierSpec, as_config, check_amount
from .decision import Allowed, Decision
from .policy import Policy, Rule
from .reservation import Reservation

__all__ = ["MultiTierRateLimiter", "RateLimiter"]


def check_request(user: object, model: object, cost: object) -> None:
    if not isinstance(user, str):
        raise TypeError(f"user must be a str, got {user!r}")
    if not isinstance(model, str):
        raise TypeError(f"model must be a str, got {model!r}")
    check_amount(cost, "cost")


class _Limiter:
    """What every limiter shares: checks, counts and resets through a backend."""

    def __init__(
        self,
        tiers: Sequence[tuple[str, TierSpec | None]],
        *,
        algorithm: str,
        storage: Storage | None,
        clock: Callable[[], float] | None,
        max_keys: int | None,
    ) -> None:
        self.policy = Policy(tiers, algorithm)
        if storage is None:
            storage = MemoryStorage(
                clock=time.monotonic if clock is None else clock,
                max_keys=DEFAULT_MAX_KEYS if max_keys is None else max_keys,
            )
        elif clock is not None or max_keys is not None:
            raise TypeError(
                "clock= and max_keys= configure the default MemoryStorage; pass them to it instead"
            )
        else:
            storage = check_storage(storage)
        self.storage = storage
        self.uses_reservations = len(self.policy.all_rules) > len(self.policy.rules)
        """True when token or concurrency limits are set: requests go through ``reserve``, not ``check``."""
        self._backend = storage.bind(self.policy)
        self.inline = isinstance(self._backend, MemoryBackend)
        """True when the async methods never await (in-memory storage): an event loop may call the sync ones
        instead, and save a coroutine per call."""
        # Checked once here: isinstance() against a runtime-checkable Protocol is slow on a hot path.
        self._reserver = self._backend if isinstance(self._backend, ReservingBackend) else None
        if self.uses_reservations and self._reserver is None:
            raise TypeError(f"{storage!r} does not support token or concurrency limits yet")
        # What allow() calls once the arguments are valid: the in-memory backend answers without a Decision.
        self._allows: Callable[[str, str, int], bool] = self._allowed
        self._aallows: Callable[[str, str, int], Awaitable[bool]] = self._aallowed
        if isinstance(self._backend, MemoryBackend) and self.policy.rules:
            self._allows, self._aallows = self._backend.allows, self._backend.aallows

    def _check_has_request_limits(self) -> None:
        if not self.policy.rules:
            raise TypeError(
                "this limiter has no request limit to check; use reserve() for tokens and concurrency"
            )

    def check(self, user: str, model: str, cost: int = 1) -> Decision:
        """Decide on a request of ``cost`` units against the request limits; an allowed one is counted."""
        if not (type(user) is str and type(model) is str and type(cost) is int and 0 <= cost <= MAX_AMOUNT):
            check_request(user, model, cost)  # the exact types pass above without a call
        if not self.policy.rules:
            self._check_has_request_limits()
        return self._backend.decide(user, model, cost)

    async def acheck(self, user: str, model: str, cost: int = 1) -> Decision:
        """``check`` for event loops."""
        if not (type(user) is str and type(model) is str and type(cost) is int and 0 <= cost <= MAX_AMOUNT):
            check_request(user, model, cost)  # the exact types pass above without a call
        if not self.policy.rules:
            self._check_has_request_limits()
        return await self._backend.adecide(user, model, cost)

    def _allowed(self, user: str, model: str, cost: int) -> bool:
        return self.check(user, model, cost).allowed

    async def _aallowed(self, user: str, model: str, cost: int) -> bool:
        return (await self.acheck(user, model, cost)).allowed

    def _costs(self, user: str, model: str, input_tokens: int, output_tokens: int) -> tuple[int, ...]:
        check_request(user, model, 0)
        check_amount(input_tokens, "input_tokens")
        check_amount(output_tokens, "output_tokens")
        return self.policy.costs(1, input_tokens, output_tokens)

    def _reserving(self) -> ReservingBackend:
        if self._reserver is None:
            raise TypeError(f"{self.storage!r} does not support reserve() yet")
        return self._reserver

    def _reservation(
        self,
        user: str,
        model: str,
        reserved: tuple[int, int],
        costs: tuple[int, ...],
        reply: Reserved,
    ) -> Reservation:
        decision, decisions = self.policy.reservation(reply.verdicts, costs, reply.used)
        if reply.fallback is not None:  # decided by the storage's failure policy: say so
            mark = reply.fallback.of
            decision, decisions = mark(decision), {unit: mark(each) for unit, each in decisions.items()}
        charge = (self._reserving(), reply.receipt, self.policy.settlement)
        return Reservation(user, model, decision, decisions, reserved, charge)

    def _refused(
        self, user: str, model: str, costs: tuple[int, ...], reserved: tuple[int, int]
    ) -> Reservation | None:
        oversized = self.policy.oversized_reservation(costs)
        if oversized is None:
            return None
        return Reservation(user, model, oversized, {oversized.unit: oversized}, reserved)  # charges nothing

    def reserve(self, user: str, model: str, *, input_tokens: int = 0, output_tokens: int = 0) -> Reservation:
        """Charge one request, the estimated tokens and a concurrency slot, all or nothing.

        Settle the returned ``Reservation`` with the real usage (or cancel it) when the response is done.
        """
        costs = self._costs(user, model, input_tokens, output_tokens)
        reserved = (input_tokens, output_tokens)
        refused = self._refused(user, model, costs, reserved)
        if refused is not None:
            return refused
        return self._reservation(user, model, reserved, costs, self._reserving().reserve(user, model, costs))

    async def areserve(
        self, user: str, model: str, *, input_tokens: int = 0, output_tokens: int = 0
    ) -> Reservation:
        """``reserve`` for event loops."""
        costs = self._costs(user, model, input_tokens, output_tokens)
        reserved = (input_tokens, output_tokens)
        refused = self._refused(user, model, costs, reserved)
        if refused is not None:
            return refused
        reply = await self._reserving().areserve(user, model, costs)
        return self._reservation(user, model, reserved, costs, reply)

    def _count_rule(self, user: str, model: str, tier: str | None, unit: str, window: float | None) -> Rule:
        check_request(user, model, 0)
        if tier is None:
            rules = tuple(rule for rule in self.policy.all_rules if rule.unit == unit)
            if not rules:
                raise ValueError(f"no {unit} limit is configured")
            rules = tuple(rule for rule in rules if rule.tier == rules[0].tier)
        else:
            rules = self.policy.rules_for(tier, unit)
        if window is None:
            return rules[0]
        for rule in rules:
            if rule.seconds == window:
                return rule
        listing = ", ".join(f"{rule.seconds:g}" for rule in rules)
        raise ValueError(
            f"window={window!r}: {rules[0].tier} has no {unit} window of that length; its windows: {listing}"
        )

    def get_request_count(
        self,
        user: str,
        model: str,
        tier: str | None = None,
        unit: str = "requests",
        *,
        window: float | None = None,
    ) -> int:
        """Units counted now for this user and model, in one window of ``tier`` counting ``unit``.

        Without ``tier``, the first configured tier (in the order per_user_model, per_model, per_user,
        global). ``unit`` is ``"requests"``, ``"tokens"``, ``"input_tokens"``, ``"output_tokens"`` or
        ``"concurrent"`` (requests in flight). ``window`` (its length in seconds, ``Rule.seconds``) picks one
        window of a tier with several (``"10/minute;1000/day"``: ``window=86400``); default: the first.
        """
        return self._backend.used(user, model, self._count_rule(user, model, tier, unit, window))

    async def aget_request_count(
        self,
        user: str,
        model: str,
        tier: str | None = None,
        unit: str = "requests",
        *,
        window: float | None = None,
    ) -> int:
        """``get_request_count`` for event loops."""
        return await self._backend.aused(user, model, self._count_rule(user, model, tier, unit, window))

    def counts(self, user: str, model: str) -> list[tuple[Rule, int]]:
        """Every rule of the policy (each window of each tier and unit) with the units it counts now for this
        user and model: what ``ratelimit-middleware inspect`` prints."""
        check_request(user, model, 0)
        return [(rule, self._backend.used(user, model, rule)) for rule in self.policy.all_rules]

    def _reset_rules(self, user: str, model: str, tier: str | None) -> tuple[Rule, ...]:
        check_request(user, model, 0)
        # Concurrency slots are never reset: they belong to requests still in flight.
        return tuple(rule for rule in self.policy.rules_for(tier, None) if rule.unit != "concurrent")

    def reset(self, user: str, model: str, tier: str | None = None) -> None:
        """Forget this user and model in ``tier`` (requests and tokens); by default in the tiers keyed by the
        user.

        Shared tiers (per_model, global) are only reset when named, since resetting them frees the budget of
        every user.
        """
        self._backend.reset(user, model, self._reset_rules(user, model, tier))

    async def areset(self, user: str, model: str, tier: str | None = None) -> None:
        """``reset`` for event loops."""
        await self._backend.areset(user, model, self._reset_rules(user, model, tier))

    def __len__(self) -> int:
        """The number of keys currently held."""
        return len(self._backend)

    def __bool__(self) -> bool:
        """Always true: an empty limiter is still a limiter (``limiter or default`` must keep it)."""
        return True


class RateLimiter(_Limiter):
    """At most ``max_requests`` units per ``window_seconds`` (default 100 per hour) for each user and model.

    ``limit=`` takes a config or a string instead, with several windows if needed: ``"10/minute;1000/day"``.
    ``tokens`` (input plus output), ``input_tokens``, ``output_tokens`` and ``max_concurrent`` add token
    budgets and a cap on requests in flight, enforced by ``reserve``; given alone, there is no request limit.
    ``algorithm`` is one of ``sliding_log`` (exact, the default), ``sliding_window``, ``gcra`` and
    ``fixed_window``. ``storage`` says where state lives (default: in memory); ``clock`` (seconds, inject one
    in tests) and ``max_keys`` (keys held at most) configure that default ``MemoryStorage``.
    """

    def __init__(
        self,
        max_requests: int | None = None,
        window_seconds: float | None = None,
        *,
        limit: LimitSpec | None = None,
        tokens: LimitSpec | None = None,
        input_tokens: LimitSpec | None = None,
        output_tokens: LimitSpec | None = None,
        max_concurrent: int | None = None,
        algorithm: str = "sliding_log",
        storage: Storage | None = None,
        clock: Callable[[], float] | None = None,
        max_keys: int | None = None,
    ) -> None:
        if isinstance(
            max_requests, (str, RateLimitConfig)
        ):  # RateLimiter("10/minute"): a limit, positionally
            raise TypeError(
                f"max_requests must be an int, got {max_requests!r}: for a limit, pass limit={max_requests!r}"
            )
        others = (tokens, input_tokens, output_tokens, max_concurrent)
        if limit is not None:
            limit = as_config(limit, "limit")  # named as the caller named it
        if limit is not None and (max_requests is not None or window_seconds is not None):
            raise TypeError("pass either limit= or max_requests/window_seconds, not both")
        if limit is None and (
            max_requests is not None or window_seconds is not None or all(o is None for o in others)
        ):
            limit = RateLimitConfig(
                100 if max_requests is None else max_requests,
                3600 if window_seconds is None else window_seconds,
            )
        spec: TierSpec | None = limit
        if any(other is not None for other in others):
            spec = Limits(
                limit,
                tokens=tokens,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                max_concurrent=max_concurrent,
            )
        super().__init__(
            [("per_user_model", spec)], algorithm=algorithm, storage=storage, clock=clock, max_keys=max_keys
        )

    def allow(self, user: str, model: str, cost: int = 1) -> bool:
        """True (and counted) if the request fits: ``check(...).allowed``, without building the decision."""
        if not (type(user) is str and type(model) is str and type(cost) is int and 0 <= cost <= MAX_AMOUNT):
            check_request(user, model, cost)  # the exact types pass above without a call
        return self._allows(user, model, cost)

    async def aallow(self, user: str, model: str, cost: int = 1) -> bool:
        """``allow`` for event loops."""
        if not (type(user) is str and type(model) is str and type(cost) is int and 0 <= cost <= MAX_AMOUNT):
            check_request(user, model, cost)
        return await self._aallows(user, model, cost)


class MultiTierRateLimiter(_Limiter):
    """Several tiers checked together; a request passes only if every tier allows it.

    Each tier takes a request limit (a config or a string, one or more windows), or ``Limits`` for token
    budgets and concurrency too: ``per_user_model`` (each user on each model), ``per_model`` (all users on one
    model), ``per_user`` (one user on all models) and ``global_limit`` (all traffic). A denied request
    charges no tier. The keywords are those of
    ``RateLimiter``.
    """

    def __init__(
        self,
        per_user_model: TierSpec | None = None,
        per_model: TierSpec | None = None,
        per_user: TierSpec | None = None,
        global_limit: TierSpec | None = None,
        *,
        algorithm: str = "sliding_log",
        storage: Storage | None = None,
        clock: Callable[[], float] | None = None,
        max_keys: int | None = None,
    ) -> None:
        tiers = [
            ("per_user_model", per_user_model),
            ("per_model", per_model),
            ("per_user", per_user),
            ("global", global_limit),
        ]
        super().__init__(tiers, algorithm=algorithm, storage=storage, clock=clock, max_keys=max_keys)

    def allow(self, user: str, model: str, cost: int = 1) -> Allowed:
        """``(allowed, reason)``, true only when allowed; ``reason`` names the denying tier and limit,
        ``None`` when allowed."""
        decision = self.check(user, model, cost)
        return Allowed(decision.allowed, decision.reason)

    async def aallow(self, user: str, model: str, cost: int = 1) -> Allowed:
        """``allow`` for event loops."""
        decision = await self.acheck(user, model, cost)
        return Allowed(decision.allowed, decision.reason)
