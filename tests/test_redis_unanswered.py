"""Reservations and settlements that Redis does not answer in time: nothing they take is held with no request
behind it.

A reservation that times out is answered by ``on_error``, but Redis, busy meanwhile, may make it later all
the same: its concurrency slots are given back then (its undo follows it on its connection), and so is
everything when its reply lands after all.

Redis is made busy by stopping its process (SIGSTOP), as a long script or a fork would keep it from reading:
what was written to it waits in its socket, and runs when it reads again. The cluster's node that holds the
user's slot is stopped the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import redis

from ratelimit_middleware import RateLimiter, RedisStorage
from ratelimit_middleware.errors import UncheckedDecision

from .conftest import unique_prefix
from .redis_server import RedisCluster, RedisServer

TIMEOUT = 0.5
"""The storages' timeout here: Redis stays stopped until the calls that must time out have."""

USER_KEY = b"{u}"
"""A key in the slot of user ``u``'s keys."""


def eventually(condition: Callable[[], bool], what: str) -> None:
    """Wait for ``condition`` (Redis catching up with what was written to it), within a bound."""
    deadline = time.monotonic() + 15
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)  # Redis works on its own: there is no clock to inject


def counts(limiter: RateLimiter) -> tuple[int, int, int]:
    return (
        limiter.get_request_count("u", "m", unit="requests"),
        limiter.get_request_count("u", "m", unit="tokens"),
        limiter.get_request_count("u", "m", unit="concurrent"),
    )


def warnings(caplog: pytest.LogCaptureFixture, start: str) -> int:
    return sum(
        record.name == "ratelimit_middleware"
        and record.levelno == logging.WARNING
        and record.getMessage().startswith(start)
        for record in caplog.records
    )


@pytest.fixture(params=["one Redis", "a cluster"])
def busy(request: pytest.FixtureRequest) -> Iterator[tuple[str, RedisServer]]:
    """A URL, and the server to stop for user ``u``'s keys: a Redis of the test's own, or the node of the
    cluster that holds them."""
    if request.param == "one Redis":
        server: RedisServer = request.getfixturevalue("server")
        yield server.url, server
        return
    cluster: RedisCluster = request.getfixturevalue("redis_cluster")
    for node in cluster.nodes:
        client = node.client()
        try:
            client.get(USER_KEY)
        except redis.ResponseError:  # MOVED: another node holds it
            continue
        finally:
            client.close()
        yield f"redis+cluster://127.0.0.1:{node.port}", node
        return
    raise AssertionError("no node of the cluster holds the user's slot")


@contextmanager
def stopped(server: RedisServer) -> Iterator[None]:
    server.pause()
    try:
        yield
    finally:
        server.resume()


def limiter_on(url: str) -> RateLimiter:
    storage = RedisStorage(url, key_prefix=unique_prefix(), timeout=TIMEOUT)
    return RateLimiter(limit="10/minute", tokens="1000/minute", max_concurrent=1, storage=storage)


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_reservation_redis_makes_after_its_timeout_gives_its_slot_back(
    busy: tuple[str, RedisServer], api: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A reservation written to a Redis busy past the timeout is let through unchecked (on_error="allow"),
    and Redis makes it once it reads again: its slot is given back then, not held with no request behind it
    until its lease expires (the user's next request, max_concurrent=1, is served). Its tokens stay counted
    until their window passes (telling them apart needs the reply); the request is counted, as any request
    admitted. The fallback is logged as a warning."""
    url, server = busy
    limiter = limiter_on(url)
    assert counts(limiter) == (0, 0, 0)  # connected, the scripts loaded

    async def areserve() -> UncheckedDecision:
        await limiter.aget_request_count("u", "m")  # the event loop's connections
        with stopped(server):
            reservation = await limiter.areserve("u", "m", input_tokens=100)
        await reservation.acancel()
        await limiter.storage.aclose()
        return reservation.decision  # type: ignore[return-value]

    if api == "sync":
        with stopped(server):
            reservation = limiter.reserve("u", "m", input_tokens=100)
        reservation.cancel()
        decision = reservation.decision
    else:
        decision = asyncio.run(areserve())
    assert isinstance(decision, UncheckedDecision)  # timed out: let through by on_error="allow"
    eventually(lambda: counts(limiter)[0] == 1, "Redis never made the reservation")
    eventually(lambda: counts(limiter)[2] == 0, "the slot of the reservation Redis made late is held")
    assert counts(limiter) == (1, 100, 0)
    assert warnings(caplog, "a reservation got no answer from Redis") == 1
    assert limiter.reserve("u", "m").allowed


def test_a_reservation_whose_reply_lands_after_its_batch_deadline_is_cancelled_once_made(
    server: RedisServer,
) -> None:
    """The reply of a coalesced reservation that lands after its batch's deadline answered the caller (by
    on_error), before the batch's task was cut: it goes to the reservation's orphan, which cancels it (its
    slot given back, its tokens refunded), as for a caller cancelled once it was sent. The task's cut is
    pushed back here to open that window, which in production lasts from one timer to the next."""
    limiter = limiter_on(server.url)

    async def scenario() -> None:
        await limiter.aget_request_count("u", "m")
        coalescer = limiter.storage.connection._loop_state().coalescer
        assert coalescer is not None
        flush = coalescer._flush
        coalescer._flush = lambda calls, seconds: flush(calls, seconds + 30)  # type: ignore[method-assign]
        with stopped(server):
            reservation = await limiter.areserve("u", "m", input_tokens=100)
        assert isinstance(reservation.decision, UncheckedDecision)
        for _ in range(1500):  # the reply lands, and its orphan's cancellation is made
            if await limiter.aget_request_count("u", "m", unit="concurrent") == 0:
                break
            await asyncio.sleep(0.01)  # Redis works on its own: there is no clock to inject
        await limiter.storage.aclose()

    asyncio.run(scenario())
    assert counts(limiter) == (1, 0, 0)
    assert limiter.reserve("u", "m", input_tokens=1000).allowed


def test_a_settlement_that_times_out_is_logged(server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """A settlement Redis does not answer in time is let go (it may still be made), and logged as a warning,
    once a minute, saying what it may leave held."""
    limiter = limiter_on(server.url)
    first, second = limiter.reserve("u", "m", input_tokens=10), limiter.reserve("v", "m", input_tokens=10)
    with stopped(server):
        first.cancel()
        second.cancel()
    assert warnings(caplog, "a settlement got no answer from Redis") == 1
    eventually(lambda: counts(limiter)[2] == 0, "the late settlement was never made")
