"""Redis storage: one limit shared by every worker and machine, exact, atomic, one round trip a decision.

``RedisRateLimiter(client, 100, 3600)`` is ``RateLimiter`` on Redis; ``RedisStorage(client)`` puts any limiter
there (``MultiTierRateLimiter(..., storage=RedisStorage(client))``). Needs the ``redis`` extra.
"""

from .limiter import RedisRateLimiter
from .storage import RedisBackend, RedisStorage

__all__ = ["RedisBackend", "RedisRateLimiter", "RedisStorage"]
