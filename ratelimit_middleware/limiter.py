"""The public limiters: validate what callers pass, then let a backend decide under a policy.

``RateLimiter`` enforces one limit per user and model; ``MultiTierRateLimiter`` enforces several tiers at once
(per user and model, per model, per user, global), all or nothing. Both run on the in-memory backend here; the
decision semantics live in ``policy`` and ``algorithms``, the storage in ``backends``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from .backends.base import Storage
from .backends.memory import DEFAULT_MAX_KEYS, MemoryStorage
from .config import LimitSpec, RateLimitConfig
from .decision import Decision
from .policy import Policy, Rule

__all__ = ["MultiTierRateLimiter", "RateLimiter"]


def _check_request(user: object, model: object, cost: object) -> None:
    if not isinstance(user, str):
        raise TypeError(f"user must be a str, got {user!r}")
    if not isinstance(model, str):
        raise TypeError(f"model must be a str, got {model!r}")
    if isinstance(cost, bool) or not isinstance(cost, int):
        raise TypeError(f"cost must be an int, got {cost!r}")
    if cost < 0:
        raise ValueError(f"cost must be >= 0, got {cost!r}")


class _Limiter:
    """What every limiter shares: checks, counts and resets through a backend."""

    def __init__(
        self,
        tiers: Sequence[tuple[str, LimitSpec | None]],
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
        self.storage = storage
        self._backend = storage.bind(self.policy)

    def check(self, user: str, model: str, cost: int = 1) -> Decision:
        """Decide on a request of ``cost`` units; an allowed one is counted."""
        if not (type(user) is str and type(model) is str and type(cost) is int and cost >= 0):
            _check_request(user, model, cost)  # the exact types pass above without a call
        return self._backend.decide(user, model, cost)

    async def acheck(self, user: str, model: str, cost: int = 1) -> Decision:
        """``check`` for event loops."""
        _check_request(user, model, cost)
        return await self._backend.adecide(user, model, cost)

    def _count_rule(self, user: str, model: str, tier: str | None) -> Rule:
        _check_request(user, model, 0)
        return self.policy.rules_for(tier)[0] if tier else self.policy.rules[0]

    def get_request_count(self, user: str, model: str, tier: str | None = None) -> int:
        """Units counted now for this user and model, in the first window of ``tier``.

        Without ``tier``, the first configured tier (in the order per_user_model, per_model, per_user,
        global).
        """
        return self._backend.used(user, model, self._count_rule(user, model, tier))

    async def aget_request_count(self, user: str, model: str, tier: str | None = None) -> int:
        """``get_request_count`` for event loops."""
        return await self._backend.aused(user, model, self._count_rule(user, model, tier))

    def reset(self, user: str, model: str, tier: str | None = None) -> None:
        """Forget this user and model in ``tier``; by default in the tiers keyed by the user.

        Shared tiers (per_model, global) are only reset when named, since resetting them frees the budget of
        every user.
        """
        _check_request(user, model, 0)
        self._backend.reset(user, model, self.policy.rules_for(tier))

    async def areset(self, user: str, model: str, tier: str | None = None) -> None:
        """``reset`` for event loops."""
        _check_request(user, model, 0)
        await self._backend.areset(user, model, self.policy.rules_for(tier))

    def __len__(self) -> int:
        """The number of keys currently held."""
        return len(self._backend)

    def __bool__(self) -> bool:
        """Always true: an empty limiter is still a limiter (``limiter or default`` must keep it)."""
        return True


class RateLimiter(_Limiter):
    """At most ``max_requests`` units per ``window_seconds`` (default 100 per hour) for each user and model.

    ``limit=`` takes a config or a string instead, with several windows if needed: ``"10/minute;1000/day"``.
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
        algorithm: str = "sliding_log",
        storage: Storage | None = None,
        clock: Callable[[], float] | None = None,
        max_keys: int | None = None,
    ) -> None:
        if limit is None:
            limit = RateLimitConfig(
                100 if max_requests is None else max_requests,
                3600 if window_seconds is None else window_seconds,
            )
        elif max_requests is not None or window_seconds is not None:
            raise TypeError("pass either limit= or max_requests/window_seconds, not both")
        super().__init__(
            [("per_user_model", limit)], algorithm=algorithm, storage=storage, clock=clock, max_keys=max_keys
        )

    def allow(self, user: str, model: str, cost: int = 1) -> bool:
        """True (and counted) if the request fits."""
        return self.check(user, model, cost).allowed

    async def aallow(self, user: str, model: str, cost: int = 1) -> bool:
        """``allow`` for event loops."""
        return (await self.acheck(user, model, cost)).allowed


class MultiTierRateLimiter(_Limiter):
    """Several tiers checked together; a request passes only if every tier allows it.

    Each tier takes a config or a limit string (one or more windows): ``per_user_model`` (each user on each
    model), ``per_model`` (all users on one model), ``per_user`` (one user on all models) and
    ``global_limit`` (all traffic). A denied request charges no tier. The keywords are those of
    ``RateLimiter``.
    """

    def __init__(
        self,
        per_user_model: LimitSpec | None = None,
        per_model: LimitSpec | None = None,
        per_user: LimitSpec | None = None,
        global_limit: LimitSpec | None = None,
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

    def allow(self, user: str, model: str, cost: int = 1) -> tuple[bool, str | None]:
        """``(allowed, reason)``; ``reason`` names the denying tier and limit, ``None`` when allowed."""
        decision = self.check(user, model, cost)
        return decision.allowed, decision.reason

    async def aallow(self, user: str, model: str, cost: int = 1) -> tuple[bool, str | None]:
        """``allow`` for event loops."""
        decision = await self.acheck(user, model, cost)
        return decision.allowed, decision.reason
