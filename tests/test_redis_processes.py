"""Exactness across processes: four spawned processes, clocks minutes apart, share one limit exactly."""

from __future__ import annotations

import multiprocessing

from ratelimit_middleware import ALGORITHMS, MultiTierRateLimiter, RedisRateLimiter, RedisStorage

from . import redis_workers
from .conftest import CONTRACT_TIMEOUT, unique_prefix
from .redis_server import RedisServer

PROCESSES = 4


def window_far_from_a_boundary(now: float, margin: float = 600.0) -> float:
    """A window of about 28 hours whose current aligned window [k * w, (k + 1) * w) has ``margin`` seconds
    left at least, so that fixed and sliding window counters cannot cross a boundary during the test."""
    window = 100_000.0
    while now % window > window - margin:
        window += margin
    return window


def test_four_processes_admit_exactly_the_limit(redis_server: RedisServer) -> None:
    seconds, micros = redis_server.client().time()
    window = window_far_from_a_boundary(seconds + micros / 1e6)
    prefix = unique_prefix("procs")
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(PROCESSES)
    results = context.Queue()
    workers = [
        context.Process(
            target=redis_workers.hammer,
            args=(index, redis_server.url, prefix, window, (index - 1.5) * 240.0, start, results),
        )
        for index in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    try:
        admitted = [results.get(timeout=120) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
    assert [worker.exitcode for worker in workers] == [0] * PROCESSES
    for name in ALGORITHMS:
        assert sum(counts[name] for counts in admitted) == redis_workers.LIMIT, name
        limiter = RedisRateLimiter(
            redis_server.client(),
            redis_workers.LIMIT,
            window,
            algorithm=name,
            key_prefix=prefix,
            timeout=CONTRACT_TIMEOUT,
        )
        assert limiter.get_request_count("shared", "gpt-4") == redis_workers.LIMIT, name
    assert sum(counts["multi_tier"] for counts in admitted) == redis_workers.PER_MODEL
    assert max(counts["multi_tier"] for counts in admitted) <= redis_workers.PER_USER_MODEL
    tiers = MultiTierRateLimiter(
        per_user_model=f"{redis_workers.PER_USER_MODEL}/hour",
        per_model=f"{redis_workers.PER_MODEL}/hour",
        storage=RedisStorage(redis_server.client(), key_prefix=prefix, timeout=CONTRACT_TIMEOUT),
    )
    assert tiers.get_request_count("anyone", "gpt-4", tier="per_model") == redis_workers.PER_MODEL
