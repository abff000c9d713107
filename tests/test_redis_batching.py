"""Coalescing: concurrent async decisions share pipelined round trips, and each still gets its own answer."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import pytest
import redis

from ratelimit_middleware import (
    MemoryStorage,
    MultiTierRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    RedisStorage,
)
from ratelimit_middleware.backends.base import Storage
from ratelimit_middleware.backends.redis import CircuitBreaker
from ratelimit_middleware.backends.redis.coalescer import MAX_BATCH
from ratelimit_middleware.backends.redis.connection import Call
from ratelimit_middleware.backends.redis.scripts import script_for
from ratelimit_middleware.decision import Decision
from ratelimit_middleware.errors import RateLimiterUnavailable, UncheckedDecision

from .conftest import CONTRACT_TIMEOUT, FakeClock, unique_prefix
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


@pytest.mark.parametrize("position", [0, 1, 3])
def test_a_failing_call_fails_alone(redis_server: RedisServer, position: int) -> None:
    """A script error in a batch (a key of the wrong type) answers that call, by the policy, and no other,
    wherever it stands in the batch (the calls run in one script)."""
    limiter = limiter_on(redis_server, 5, on_error="deny")
    admin = redis_server.client()
    admin.set(f"{limiter.storage.key_prefix}:sliding_log:per_user_model:5/60:{{bad}}:m", "not a log")
    users = ["a", "b", "a"]
    users.insert(position, "bad")

    async def scenario() -> list[Any]:
        calls = [limiter.acheck(user, "m") for user in users]
        results = await asyncio.gather(*calls, return_exceptions=True)
        await limiter.storage.aclose()
        return results

    results = asyncio.run(scenario())
    bad = results.pop(position)
    assert isinstance(bad, RateLimiterUnavailable)
    assert isinstance(bad.__context__, redis.ResponseError) and "WRONGTYPE" in str(bad.__context__)
    assert [decision.remaining for decision in results] == [4, 4, 3]
    admin.close()


def _limiters(storage: Storage, algorithm: str) -> list[Any]:
    """Three policies of one algorithm (so one script): one rule, two tiers (two keys a call), and
    reservations (tokens and a concurrency slot)."""
    return [
        RateLimiter(5, 10, algorithm=algorithm, storage=storage),
        MultiTierRateLimiter(
            per_user_model="4/10 seconds", per_model="7/minute", algorithm=algorithm, storage=storage
        ),
        RateLimiter(tokens="50/minute", max_concurrent=3, algorithm=algorithm, storage=storage),
    ]


def test_a_batch_decides_as_its_calls_one_after_another(redis_server: RedisServer, algorithm: str) -> None:
    """The calls of a batch run in one script, one after another: checks (costs 0, 1 and more), counts and
    reservations of three policies sharing the script, interleaved, decide exactly as in memory in turn."""
    clock = FakeClock()
    storage = RedisStorage(
        redis_server.url, key_prefix=unique_prefix(), timeout=CONTRACT_TIMEOUT, clock=clock
    )
    ours, theirs = _limiters(storage, algorithm), _limiters(MemoryStorage(clock=clock), algorithm)
    calls = [
        (which, user, amount)
        for amount in (1, 1, 0, 2, 1, 3, 1, 1, 0, 1, 2, 1)
        for which, user in ((0, "u"), (1, "u"), (1, "v"), (2, "u"))
    ]
    assert len(calls) <= MAX_BATCH

    def expected(which: int, user: str, amount: int) -> Any:
        if which == 2:
            return theirs[2].reserve(user, "m", input_tokens=amount * 4).decision
        if amount == 3:  # a count instead of a check
            return theirs[which].get_request_count(user, "m")
        return theirs[which].check(user, "m", amount)

    async def actual(which: int, user: str, amount: int) -> Any:
        if which == 2:
            return (await ours[2].areserve(user, "m", input_tokens=amount * 4)).decision
        if amount == 3:
            return await ours[which].aget_request_count(user, "m")
        return await ours[which].acheck(user, "m", amount)

    async def scenario() -> None:
        await ours[0].aget_request_count("warm", "up")
        for _ in range(2):
            storage.connection.round_trips = 0
            got = await asyncio.gather(*(actual(*call) for call in calls))
            assert storage.connection.round_trips == 1
            assert got == [expected(*call) for call in calls]
            clock.advance(4)
        await storage.aclose()

    asyncio.run(scenario())


def test_each_run_of_calls_to_one_script_is_one_script_call(redis_server: RedisServer) -> None:
    clock = FakeClock()
    storage = RedisStorage(
        redis_server.url, key_prefix=unique_prefix(), timeout=CONTRACT_TIMEOUT, clock=clock
    )
    memory = MemoryStorage(clock=clock)
    ours = {name: RateLimiter(2, 10, algorithm=name, storage=storage) for name in ("sliding_log", "gcra")}
    theirs = {name: RateLimiter(2, 10, algorithm=name, storage=memory) for name in ("sliding_log", "gcra")}
    order = ["sliding_log", "sliding_log", "gcra", "gcra", "gcra", "sliding_log", "gcra"]
    admin = redis_server.client()

    async def scenario() -> list[Any]:
        await ours["gcra"].aget_request_count("warm", "up")
        await ours["sliding_log"].aget_request_count("warm", "up")
        decisions = await asyncio.gather(*(ours[name].acheck("u", "m") for name in order))
        await storage.aclose()
        return decisions

    before = admin.info("commandstats")["cmdstat_evalsha"]["calls"]
    assert asyncio.run(scenario()) == [theirs[name].check("u", "m") for name in order]
    assert admin.info("commandstats")["cmdstat_evalsha"]["calls"] == before + 2 + 4  # the warm-ups, 4 runs
    admin.close()


def test_a_call_the_script_fails_on_fails_alone(redis_server: RedisServer) -> None:
    """A Lua error in one call of a batch (here arguments that are not numbers) is that call's reply."""
    limiter = limiter_on(redis_server, 5)
    connection = limiter.storage.connection
    script = script_for("sliding_log")
    good = ["decide", "", "0", "60.0", "", "5", "60.0", "1"]
    bad = [*good[:5], "five", "60.0", "1"]

    async def scenario() -> list[Any]:
        calls = [
            Call(script, [f"{unique_prefix()}:{n}".encode()], args)
            for n, args in enumerate([good, bad, good])
        ]
        results = await asyncio.gather(
            *(connection.aevaluate(call) for call in calls), return_exceptions=True
        )
        await limiter.storage.aclose()
        return results

    first, failed, last = asyncio.run(scenario())
    assert first == last == [1, 4, b"0", b"60"]
    assert isinstance(failed, redis.ResponseError) and "attempt to perform arithmetic" in str(failed)


def test_the_calls_of_a_batch_share_one_reading_of_redis_time(redis_server: RedisServer) -> None:
    limiter = limiter_on(redis_server, 100)
    admin = redis_server.client()

    async def scenario() -> None:
        assert all(await asyncio.gather(*(limiter.aallow("u", "m") for _ in range(20))))
        await limiter.storage.aclose()

    before = admin.info("commandstats")["cmdstat_evalsha"]["calls"]
    asyncio.run(scenario())
    assert admin.info("commandstats")["cmdstat_evalsha"]["calls"] == before + 1  # one script for the batch
    [key] = admin.keys(f"{limiter.storage.key_prefix}:*")
    assert len({score for _, score in admin.zrange(key, 0, -1, withscores=True)}) == 1  # logged at one time
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


def test_a_batch_cancelled_before_it_starts_fails_its_calls_as_never_sent_and_the_loop_goes_on(
    redis_server: RedisServer,
) -> None:
    """A shutdown hook that cancels a loop's tasks while the loop runs on (or asyncio.run's own cleanup) may
    cancel a batch's task before it could start: its caller is answered at once by the policy, as for a
    call Redis never ran (not counted by the breaker), and the loop's later calls go to Redis, instead of
    waiting for ever behind a batch that would never end."""
    limiter = limiter_on(redis_server, 5, breaker=CircuitBreaker(failures=1))
    connection = limiter.storage.connection

    async def scenario() -> None:
        await limiter.aget_request_count("warm", "up")
        sent = connection.round_trips
        caller = asyncio.ensure_future(limiter.acheck("u", "m"))
        known = {asyncio.current_task(), caller}
        for _ in range(10):  # until the caller's call is queued and its batch's task made, not yet started
            batches = asyncio.all_tasks() - known
            if batches:
                break
            await asyncio.sleep(0)
        assert len(batches) == 1
        batches.pop().cancel()
        assert isinstance(await asyncio.wait_for(caller, 30), UncheckedDecision)  # bounded: no hang here
        assert connection.round_trips == sent and not limiter.storage.breaker.is_open
        decisions = [await asyncio.wait_for(limiter.acheck("u", "m"), 30) for _ in range(6)]
        assert [type(decision) for decision in decisions] == [Decision] * 6
        assert [decision.allowed for decision in decisions] == [True] * 5 + [False]
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


class BlockedLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock the test moves on, as if the application had blocked it that long."""

    blocked = 0.0

    def time(self) -> float:
        return super().time() + self.blocked


@pytest.mark.parametrize("on_error", ["allow", "deny"])
@pytest.mark.parametrize("blocked", [0.15, 0.095])  # past the timeout, or with a sliver of it left
def test_calls_a_blocked_event_loop_kept_from_redis_follow_the_policy_and_leave_the_breaker_closed(
    redis_server: RedisServer, on_error: Any, blocked: float, caplog: pytest.LogCaptureFixture
) -> None:
    """Calls queued while the application blocks the loop for (nearly) all of the timeout have no time left
    to be sent: they are answered by the policy at once, without Redis, and logged once; but Redis did not
    fail, so the breaker (3 failures) stays closed and the next calls are decided by Redis."""
    limiter = limiter_on(redis_server, 5, timeout=0.1, on_error=on_error)
    connection = limiter.storage.connection

    async def scenario(loop: BlockedLoop) -> None:
        await limiter.aget_request_count("warm", "up")
        connection.round_trips = 0
        tasks = [asyncio.ensure_future(limiter.acheck("u", "m")) for _ in range(3)]
        await asyncio.sleep(0)  # every task has queued its call; the batch goes out on the next iteration
        loop.blocked += blocked
        queued = await asyncio.gather(*tasks, return_exceptions=True)
        if on_error == "allow":
            assert all(isinstance(decision, UncheckedDecision) for decision in queued)
        else:
            assert all(isinstance(error, RateLimiterUnavailable) for error in queued)
        assert connection.round_trips == 0 and not limiter.storage.breaker.is_open
        decisions = [await limiter.acheck("u", "m") for _ in range(6)]
        assert [type(decision) for decision in decisions] == [Decision] * 6
        assert [decision.allowed for decision in decisions] == [True] * 5 + [False]
        await limiter.storage.aclose()

    loop = BlockedLoop()
    try:
        with caplog.at_level(logging.WARNING, logger="ratelimit_middleware"):
            loop.run_until_complete(scenario(loop))
    finally:
        loop.close()
    assert [record.getMessage().count("never having run it") for record in caplog.records] == [1]
