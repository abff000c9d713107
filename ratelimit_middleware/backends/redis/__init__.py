"""Redis storage: one limit shared by every worker and machine, exact, atomic, one round trip a decision.

``RedisRateLimiter(client, 100, 3600)`` is ``RateLimiter`` on Redis; ``RedisStorage(client)`` puts any limiter
there (``MultiTierRateLimiter(..., storage=RedisStorage(client))``). ``on_error=`` and ``CircuitBreaker`` say
what happens when Redis fails. Needs the ``redis`` extra.
"""

from .breaker import CircuitBreaker
from .limiter import RedisRateLimiter
from .storage import DEFAULT_TIMEOUT, RedisBackend, RedisStorage

__all__ = ["DEFAULT_TIMEOUT", "CircuitBreaker", "RedisBackend", "RedisRateLimiter", "RedisStorage"]
