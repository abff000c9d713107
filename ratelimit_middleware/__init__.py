"""Rate limiting for AI inference APIs: per user, per model and per tier.

>>> from ratelimit_middleware import RateLimiter
>>> limiter = RateLimiter(max_requests=100, window_seconds=3600)
>>> limiter.allow("alice", "gpt-4")
True

``RedisRateLimiter`` and ``RedisStorage`` (state in Redis) are imported on first use, so this package imports
without the ``redis`` extra installed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .algorithms import ALGORITHMS
from .backends.memory import MemoryStorage
from .config import Limits, RateLimitConfig, Window
from .decision import Allowed, Decision
from .limiter import MultiTierRateLimiter, RateLimiter
from .policy import TIERS
from .reservation import Reservation

if TYPE_CHECKING:
    from .backends.redis import RedisRateLimiter as RedisRateLimiter
    from .backends.redis import RedisStorage as RedisStorage

__all__ = [
    "ALGORITHMS",
    "TIERS",
    "Allowed",
    "Decision",
    "Limits",
    "MemoryStorage",
    "MultiTierRateLimiter",
    "RateLimitConfig",
    "RateLimiter",
    "Reservation",
    "Window",
]

# Quiet by default, as a library should be: the application's logging configuration decides what is shown.
logging.getLogger("ratelimit_middleware").addHandler(logging.NullHandler())

_REDIS_NAMES = frozenset({"RedisRateLimiter", "RedisStorage"})


def __getattr__(name: str) -> Any:
    """``RedisRateLimiter`` and ``RedisStorage``, imported on first use (they need ``redis``)."""
    if name not in _REDIS_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        from .backends import redis as backend
    except ModuleNotFoundError as error:
        if error.name != "redis" and not (error.name or "").startswith("redis."):
            raise
        raise ImportError(
            f"{name} needs the redis package: pip install 'ratelimit-middleware[redis]'"
        ) from error
    value = getattr(backend, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | _REDIS_NAMES)
