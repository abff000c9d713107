"""``RedisRateLimiter``: ``RateLimiter`` on a ``RedisStorage``, for limits shared by many processes."""

from __future__ import annotations

from collections.abc import Callable

from ...config import LimitSpec
from ...limiter import RateLimiter
from .connection import RedisClient
from .storage import RedisStorage

__all__ = ["RedisRateLimiter"]


class RedisRateLimiter(RateLimiter):
    """``RateLimiter`` with its state in Redis: the same methods, algorithms and decisions, one limit shared
    by every process that uses the same Redis, ``key_prefix`` and limit.

    ``client`` is a ``redis.Redis`` (sync methods), a ``redis.asyncio.Redis`` (``a*`` methods) or a URL
    (both). ``clock`` is a testing hook replacing Redis' ``TIME`` (see ``RedisStorage``). ``len()`` raises
    ``TypeError``: the keys live in Redis. Use ``MultiTierRateLimiter(..., storage=RedisStorage(client))``
    for several tiers.
    """

    storage: RedisStorage

    def __init__(
        self,
        client: RedisClient,
        max_requests: int | None = None,
        window_seconds: float | None = None,
        *,
        limit: LimitSpec | None = None,
        algorithm: str = "sliding_log",
        key_prefix: str = "ratelimit",
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(
            max_requests,
            window_seconds,
            limit=limit,
            algorithm=algorithm,
            storage=RedisStorage(client, key_prefix=key_prefix, clock=clock),
        )
