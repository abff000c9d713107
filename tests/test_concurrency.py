"""Exactness under threads: many threads on one key admit exactly the limit, on every storage.

On network storages each thread makes just enough calls for the threads together to exceed the limit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from ratelimit_middleware import MultiTierRateLimiter, RateLimiter
from ratelimit_middleware.backends.base import Storage

from .conftest import NETWORK_STORAGES

THREADS = 8


def calls_per_thread(storage_name: str, in_memory: int, needed: int) -> int:
    """``in_memory`` calls per thread in memory; elsewhere enough for ``needed`` admissions and some more."""
    return in_memory if storage_name not in NETWORK_STORAGES else needed // THREADS + 25


def hammer(check: Callable[[], object], calls: int, threads: int = THREADS) -> int:
    admitted = [0] * threads
    start = threading.Barrier(threads)

    def worker(index: int) -> None:
        start.wait()
        for _ in range(calls):
            if check():
                admitted[index] += 1

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return sum(admitted)


@pytest.mark.parametrize("limit", [1, 500, 5000])
def test_eight_threads_on_one_key_admit_exactly_the_limit(
    algorithm: str, limit: int, storage: Storage, storage_name: str
) -> None:
    limiter = RateLimiter(limit, 3600, algorithm=algorithm, storage=storage)
    calls = calls_per_thread(storage_name, 2000, limit)
    assert hammer(lambda: limiter.allow("u", "m"), calls) == limit
    assert limiter.get_request_count("u", "m") == limit


def test_threads_on_multitier_keep_every_tier_exact(
    algorithm: str, storage: Storage, storage_name: str
) -> None:
    limiter = MultiTierRateLimiter(
        per_user_model="300/hour", per_model="1000/hour", algorithm=algorithm, storage=storage
    )
    users = [f"user-{i}" for i in range(THREADS)]
    admitted = [0] * THREADS
    start = threading.Barrier(THREADS)
    calls = calls_per_thread(storage_name, 1000, 1000)

    def worker(index: int) -> None:
        start.wait()
        for _ in range(calls):
            if limiter.allow(users[index], "gpt-4")[0]:
                admitted[index] += 1

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert sum(admitted) == 1000
    assert max(admitted) <= 300
    assert limiter.get_request_count("x", "gpt-4", tier="per_model") == 1000


def test_threads_with_costs_never_overshoot(algorithm: str, storage: Storage, storage_name: str) -> None:
    limiter = RateLimiter(10_000, 3600, algorithm=algorithm, storage=storage)
    calls = calls_per_thread(storage_name, 500, 10_000 // 7)
    assert hammer(lambda: limiter.allow("u", "m", cost=7), calls) == 10_000 // 7
