"""Rate limiting for AI inference APIs: per user, per model and per tier.

>>> from ratelimit_middleware import RateLimiter
>>> limiter = RateLimiter(max_requests=100, window_seconds=3600)
>>> limiter.allow("alice", "gpt-4")
True
"""

from .algorithms import ALGORITHMS
from .backends.memory import MemoryStorage
from .config import RateLimitConfig, Window
from .decision import Decision
from .limiter import MultiTierRateLimiter, RateLimiter
from .policy import TIERS

__all__ = [
    "ALGORITHMS",
    "TIERS",
    "Decision",
    "MemoryStorage",
    "MultiTierRateLimiter",
    "RateLimitConfig",
    "RateLimiter",
    "Window",
]
