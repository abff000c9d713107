"""Coalescing: concurrent async decisions share pipelined round trips, and each still gets its own answer."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import redis

from ratelimit_middleware import RedisRateLimiter
from ratelimit_middleware.backends.redis.coalescer import MAX_BATCH
from ratelimit_middleware.errors import RateLimiterUnavailable

from .conftest import CONTRACT_TIMEOUT, unique_prefix
from .redis_server import RedisServer


def limiter_on(redis_server: RedisServer, limit: int, **options: Any) -> RedisRateLimiter:
    options.setdefault("timeout", CONTRACT_TIMEOUT)
    return RedisRateLimiter(redis_server.url, limit, 60, key_prefix=unique_prefix(), **options)


def test_concurrent_checks_share_round_trips_and_admit_exactly_the_limit(
    redis_server: RedisServer, algorithm: str
) -> None:
    limiter = limiter_on(redis_server, 150, algorithm=algorithm)
    connection = limiter.storage.connection

    async def scenario() -> list[bool]:
        await limiter.aget_request_count("warm", "up")  # connected, script loaded
        connection.round_trips = 0
        decisions = await asyncio.gather(*(limiter.aallow("u", "m") for _ in range(200)))
        await limiter.storage.aclose()
        return decisions

    decisions = asyncio.run(scenario())
    assert sum(decisions) == 150 and decisions[:150] == [True] * 150  # in the order they were made
    assert connection.round_trips == math.ceil(200 / MAX_BATCH)  # 200 decisions, pipelined in batches
    assert limiter.get_request_count("u", "m") == 150


def test_a_lone_call_is_sent_at_once(redis_server: RedisServer) -> None:
    limiter = limiter_on(redis_server, 5)
    connection = limiter.storage.connection

    async def scenario() -> None:
        for count in range(1, 4):
            assert await limiter.aallow("u", "m")
            assert connection.round_trips == count
        await limiter.storage.aclose()

    asyncio.run(scenario())


def test_large_bursts_are_cut_into_batches(redis_server: RedisServer) -> None:
    limiter = limiter_on(redis_server, 10_000)
    connection = limiter.storage.connection

    async def scenario() -> None:
        await limiter.aget_request_count("warm", "up")
        connection.round_trips = 0
        burst = 2 * MAX_BATCH + 10
        assert all(await asyncio.gather(*(limiter.aallow(f"u{i}", "m") for i in range(burst))))
        assert connection.round_trips == 3
        await limiter.storage.aclose()

    asyncio.run(scenario())


def test_a_failing_call_fails_alone(redis_server: RedisServer) -> None:
    """A script error in a batch (a key of the wrong type) answers that call, by the policy, and no other."""
    limiter = limiter_on(redis_server, 5, on_error="deny")
    admin = redis_server.client()
    admin.set(f"{limiter.storage.key_prefix}:sliding_log:per_user_model:5/60:{{bad}}:m", "not a log")

    async def scenario() -> list[Any]:
        calls = [limiter.acheck(user, "m") for user in ["a", "bad", "b", "a"]]
        results = await asyncio.gather(*calls, return_exceptions=True)
        await limiter.storage.aclose()
        return results

    first, bad, second, third = asyncio.run(scenario())
    assert isinstance(bad, RateLimiterUnavailable)
    assert isinstance(bad.__context__, redis.ResponseError) and "WRONGTYPE" in str(bad.__context__)
    assert (first.remaining, second.remaining, third.remaining) == (4, 4, 3)
    admin.close()


def test_batches_recover_from_script_flush(redis_server: RedisServer, algorithm: str) -> None:
    limiter = limiter_on(redis_server, 30, algorithm=algorithm)
    connection = limiter.storage.connection
    admin = redis_server.client()

    async def scenario() -> list[bool]:
        await limiter.aget_request_count("warm", "up")
        admin.script_flush()
        connection.round_trips = 0
        decisions = await asyncio.gather(*(limiter.aallow("u", "m") for _ in range(40)))
        await limiter.storage.aclose()
        return decisions

    assert sum(asyncio.run(scenario())) == 30
    assert connection.round_trips == 2  # NOSCRIPT for the whole batch, then EVAL for the whole batch
    admin.close()


def test_a_caller_cancelled_before_its_batch_goes_out_is_not_counted(redis_server: RedisServer) -> None:
    limiter = limiter_on(redis_server, 10)

    async def scenario() -> None:
        await limiter.aget_request_count("warm", "up")
        tasks = [asyncio.ensure_future(limiter.aallow("u", "m")) for _ in range(5)]
        await asyncio.sleep(0)  # every task has queued its call; the batch goes out on the next iteration
        tasks[2].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[2], asyncio.CancelledError)
        assert [results[i] for i in (0, 1, 3, 4)] == [True] * 4
        assert await limiter.aget_request_count("u", "m") == 4
        await limiter.storage.aclose()

    asyncio.run(scenario())


def test_bursts_take_turns_and_time_queued_counts_against_the_timeout(server: RedisServer) -> None:
    """One batch in flight at a time; a call queued behind a batch that used up its timeout fails at once."""
    limiter = limiter_on(server, 10_000, timeout=0.1, on_error="deny")

    async def scenario() -> list[Any]:
        await limiter.aget_request_count("warm", "up")
        server.pause()
        try:
            return await asyncio.gather(
                *(limiter.acheck(f"u{i}", "m") for i in range(MAX_BATCH + 5)), return_exceptions=True
            )
        finally:
            server.resume()
            await limiter.storage.aclose()

    started = time.perf_counter()
    results = asyncio.run(scenario())
    assert time.perf_counter() - started < 1.0  # both batches within one timeout, not one each
    assert all(isinstance(result, RateLimiterUnavailable) for result in results)
