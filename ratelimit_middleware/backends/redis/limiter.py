"""``RedisRateLimiter``: ``RateLimiter`` on a ``RedisStorage``, for limits shared by many processes."""

from __future__ import annotations

from collections.abc import Callable

from ...config import LimitSpec
from ...limiter import RateLimiter
from .breaker import CircuitBreaker
from .clients import RedisClient
from .failover import OnError
from .storage import DEFAULT_TIMEOUT, RedisStorage

__all__ = ["RedisRateLimiter"]


class RedisRateLimiter(RateLimiter):
    """``RateLimiter`` with its state in Redis: the same methods, algorithms and decisions, one limit shared
    by every process that uses the same Redis, ``key_prefix`` and limit.

    ``client`` is a ``redis.Redis`` or ``RedisCluster`` (sync methods), their ``redis.asyncio`` twins (``a*``
    methods) or a URL (both; ``redis+cluster://node:port`` for a cluster). ``timeout``,
    ``connect_timeout``, ``on_error``, ``breaker`` and ``clock`` (a testing hook replacing Redis' ``TIME``)
    are those of ``RedisStorage``. ``len()`` raises ``TypeError``: the keys live in Redis. Use
    ``MultiTierRateLimiter(..., storage=RedisStorage(client))`` for several tiers.
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
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float | None = None,
        on_error: OnError = "allow",
        breaker: CircuitBreaker | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        storage = RedisStorage(
            client,
            key_prefix=key_prefix,
            timeout=timeout,
            connect_timeout=connect_timeout,
            on_error=on_error,
            breaker=breaker,
            clock=clock,
        )
        super().__init__(max_requests, window_seconds, limit=limit, algorithm=algorithm, storage=storage)
