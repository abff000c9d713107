"""Exactness under threads: many threads on one key admit exactly the limit."""

from __future__ import annotations

import threading

import pytest

from ratelimit_middleware import MultiTierRateLimiter, RateLimiter


def hammer(check: object, threads: int = 8, calls: int = 2000) -> int:
    admitted = [0] * threads
    start = threading.Barrier(threads)

    def worker(index: int) -> None:
        start.wait()
        for _ in range(calls):
            if check():  # type: ignore[operator]
                admitted[index] += 1

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return sum(admitted)


@pytest.mark.parametrize("limit", [1, 500, 5000])
def test_eight_threads_on_one_key_admit_exactly_the_limit(algorithm: str, limit: int) -> None:
    limiter = RateLimiter(limit, 3600, algorithm=algorithm)
    assert hammer(lambda: limiter.allow("u", "m")) == limit
    assert limiter.get_request_count("u", "m") == limit


def test_threads_on_multitier_keep_every_tier_exact(algorithm: str) -> None:
    limiter = MultiTierRateLimiter(per_user_model="300/hour", per_model="1000/hour", algorithm=algorithm)
    users = [f"user-{i}" for i in range(8)]
    admitted = [0] * 8
    start = threading.Barrier(8)

    def worker(index: int) -> None:
        start.wait()
        for _ in range(1000):
            if limiter.allow(users[index], "gpt-4")[0]:
                admitted[index] += 1

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert sum(admitted) == 1000
    assert max(admitted) <= 300
    assert limiter.get_request_count("x", "gpt-4", tier="per_model") == 1000


def test_threads_with_costs_never_overshoot(algorithm: str) -> None:
    limiter = RateLimiter(10_000, 3600, algorithm=algorithm)
    admitted = hammer(lambda: limiter.allow("u", "m", cost=7), calls=500)
    assert admitted == 10_000 // 7
