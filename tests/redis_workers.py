"""Run in spawned processes by ``test_redis_processes`` and ``test_renewal``: hammer shared limits through one
Redis, hold a concurrency slot until killed.

Kept apart from the test modules so that a spawned process imports only this, redis and the limiter.
"""

from __future__ import annotations

import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any

from ratelimit_middleware import ALGORITHMS, Limits, MultiTierRateLimiter, RedisRateLimiter, RedisStorage
from ratelimit_middleware.renewal import LeaseKeeper

LIMIT = 200
ATTEMPTS = 120  # per process and algorithm: four processes try 480 times for 200 places
PER_USER_MODEL, PER_MODEL, MULTI_TIER_ATTEMPTS = 40, 100, 60
TIMEOUT = 5.0  # as conftest's CONTRACT_TIMEOUT: a loaded machine must not turn a slow reply into a fail-open


def skew_local_clocks(seconds: float) -> None:
    """This process's clocks read ``seconds`` off: the limits must not notice, time comes from Redis."""
    for name in ("time", "monotonic", "perf_counter"):
        real, real_ns = getattr(time, name), getattr(time, f"{name}_ns")
        setattr(time, name, lambda real=real: real() + seconds)
        setattr(time, f"{name}_ns", lambda real_ns=real_ns: real_ns() + int(seconds * 1e9))


def hammer(
    index: int, url: str, prefix: str, window: float, skew: float, start: Barrier, results: Queue[Any]
) -> None:
    skew_local_clocks(skew)
    limiters = {
        name: RedisRateLimiter(url, LIMIT, window, algorithm=name, key_prefix=prefix, timeout=TIMEOUT)
        for name in ALGORITHMS
    }
    tiers = MultiTierRateLimiter(
        per_user_model=f"{PER_USER_MODEL}/hour",
        per_model=f"{PER_MODEL}/hour",
        storage=RedisStorage(url, key_prefix=prefix, timeout=TIMEOUT),
    )
    for limiter in limiters.values():
        limiter.get_request_count("warm", "up")  # connected, scripts loaded: the race starts together
    admitted = dict.fromkeys(limiters, 0)
    admitted["multi_tier"] = 0
    start.wait(timeout=60)
    for attempt in range(ATTEMPTS):
        for name, limiter in limiters.items():
            admitted[name] += limiter.allow("shared", "gpt-4")
        if attempt < MULTI_TIER_ATTEMPTS:
            admitted["multi_tier"] += tiers.allow(f"user-{index}", "gpt-4")[0]
    results.put(admitted)


def hold_a_slot(url: str, prefix: str, lease: float, held: Any) -> None:
    """Take the one concurrency slot and keep renewing it, as a worker serving a long stream does, until
    killed (``held`` is set once the slot is taken)."""
    limiter = MultiTierRateLimiter(
        per_user_model=Limits(max_concurrent=1),
        storage=RedisStorage(url, key_prefix=prefix, lease=lease, timeout=TIMEOUT),
    )
    reservation = limiter.reserve("u", "m")
    assert reservation.allowed
    LeaseKeeper().keep(reservation)
    held.set()
    while True:
        time.sleep(1)
