"""Concurrency leases renewed while responses run: by ``LeaseKeeper`` (threads), ``keep`` (event loops) and
the middlewares around real apps, on a real Redis.

A lease runs on Redis' clock unless a clock is injected. ``LeaseKeeper.renew_due`` is driven with an
injected clock; the event loop's timers and the keeper's thread run in real time, so those tests use leases
of a fraction of a second and wait a few of them (short, bounded waits: the behaviour under test is time).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ratelimit_middleware import Limits, MemoryStorage, MultiTierRateLimiter, RedisStorage
from ratelimit_middleware.asgi import RateLimitMiddleware
from ratelimit_middleware.renewal import LeaseKeeper, keep
from ratelimit_middleware.wsgi import RateLimitWSGI

from . import redis_workers
from .conftest import CONTRACT_TIMEOUT, FakeClock, unique_prefix
from .redis_server import RedisServer

LEASE = 0.3  # seconds: renewed every 0.1 s


def slots(
    redis_server: RedisServer, clock: FakeClock | None = None, lease: float = LEASE
) -> MultiTierRateLimiter:
    storage = RedisStorage(
        redis_server.url, key_prefix=unique_prefix(), clock=clock, timeout=CONTRACT_TIMEOUT, lease=lease
    )
    return MultiTierRateLimiter(per_user_model=Limits(max_concurrent=1), storage=storage)


def test_the_keeper_renews_what_is_due_until_stopped(redis_server: RedisServer, clock: FakeClock) -> None:
    limiter = slots(redis_server, clock, lease=6)
    keeper = LeaseKeeper(clock, background=False)  # renew_due runs here only
    held = limiter.reserve("u", "m")
    stop = keeper.keep(held)
    assert len(keeper) == 1
    for _ in range(5):
        clock.advance(2.5)
        keeper.renew_due()
        assert not limiter.reserve("u", "m").allowed  # still held at 12.5 s, long after its first 6
    stop()
    assert len(keeper) == 0
    clock.advance(6.1)  # no renewal since it stopped: the lease runs out
    assert limiter.reserve("u", "m").allowed


def test_nothing_is_kept_for_slots_that_never_expire(clock: FakeClock) -> None:
    limiter = MultiTierRateLimiter(
        per_user_model=Limits(max_concurrent=1), storage=MemoryStorage(clock=clock)
    )
    keeper = LeaseKeeper(clock, background=False)  # renew_due runs here only
    held = limiter.reserve("u", "m")
    assert held.lease is None
    keeper.keep(held)()
    assert len(keeper) == 0


def test_the_keepers_thread_renews_in_real_time(redis_server: RedisServer) -> None:
    limiter = slots(redis_server)
    keeper = LeaseKeeper()
    held = limiter.reserve("u", "m")
    stop = keeper.keep(held)
    time.sleep(4 * LEASE)
    assert not limiter.reserve("u", "m").allowed  # renewed three times over
    thread = keeper._thread
    assert thread is not None and thread.is_alive()
    stop()
    thread.join(timeout=30)
    assert not thread.is_alive()  # nothing left to renew: no thread outlives its use
    held.settle(0, 0)
    again = limiter.reserve("u", "m")
    assert again.allowed
    keeper.keep(again)  # and a new one starts when there is
    assert keeper._thread is not None and keeper._thread.is_alive()


def test_keep_renews_on_the_event_loop(redis_server: RedisServer) -> None:
    limiter = slots(redis_server)

    async def scenario() -> None:
        held = await limiter.areserve("u", "m")
        stop = keep(held)
        await asyncio.sleep(4 * LEASE)
        assert not (await limiter.areserve("u", "m")).allowed
        stop()
        await asyncio.sleep(2 * LEASE)  # not renewed any more: the lease runs out
        assert (await limiter.areserve("u", "m")).allowed

    asyncio.run(scenario())


def test_the_asgi_middleware_holds_a_streams_slot_past_its_lease(redis_server: RedisServer) -> None:
    limiter = slots(redis_server)
    streaming = asyncio.Event()

    async def endpoint(request: Request) -> Response:
        if request.url.path == "/quick":
            return PlainTextResponse("quick")

        async def chunks() -> AsyncIterator[str]:
            streaming.set()
            for _ in range(8):
                await asyncio.sleep(LEASE / 2)
                yield "data: x\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/stream", endpoint), Route("/quick", endpoint)])
    app.add_middleware(RateLimitMiddleware, limiter=limiter)

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            stream = asyncio.create_task(client.get("/stream", headers={"x-user-id": "u"}))
            await streaming.wait()
            await asyncio.sleep(3 * LEASE)  # the stream has run for three leases
            during = await client.get("/quick", headers={"x-user-id": "u"})
            assert during.status_code == 429 and "concurrent" in during.json()["error"]["message"]
            assert (await stream).status_code == 200
            after = await client.get("/quick", headers={"x-user-id": "u"})
            assert after.status_code == 200

    asyncio.run(scenario())


def test_the_wsgi_middleware_holds_a_streams_slot_past_its_lease(redis_server: RedisServer) -> None:
    limiter = slots(redis_server)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"chunk"]

    wsgi = RateLimitWSGI(app, limiter=limiter)

    def call() -> tuple[str, Any]:
        statuses: list[str] = []
        environ = {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": "/",
            "HTTP_X_USER_ID": "u",
            "REMOTE_ADDR": "127.0.0.1",
            "wsgi.input": None,
        }
        body = wsgi(environ, lambda status, headers, exc_info=None: statuses.append(status))
        return statuses[0] if statuses else "", body

    status, body = call()  # until the body ends (or the server closes it), it is still being sent
    assert status.startswith("200")
    assert next(iter(body)) == b"chunk"
    assert len(wsgi.leases) == 1
    time.sleep(4 * LEASE)
    assert call()[0].startswith("429")  # three leases later, the slot is still held
    body.close()
    assert len(wsgi.leases) == 0
    assert call()[0].startswith("200")


def test_a_killed_workers_slot_frees_up_once_it_stops_renewing(redis_server: RedisServer) -> None:
    """A real worker process holds the slot for many leases while alive, and loses it within one lease of
    being killed (SIGKILL: no settlement, no cleanup)."""
    prefix = unique_prefix()
    limiter = MultiTierRateLimiter(
        per_user_model=Limits(max_concurrent=1),
        storage=RedisStorage(redis_server.url, key_prefix=prefix, timeout=CONTRACT_TIMEOUT, lease=LEASE),
    )
    context = multiprocessing.get_context("spawn")
    held = context.Event()
    worker = context.Process(target=redis_workers.hold_a_slot, args=(redis_server.url, prefix, LEASE, held))
    worker.start()
    try:
        assert held.wait(30)
        time.sleep(4 * LEASE)
        assert not limiter.reserve("u", "m").allowed  # alive: still held, renewed
        os.kill(worker.pid or 0, signal.SIGKILL)
        worker.join(10)
        time.sleep(LEASE + 0.1)  # at most one lease after its last renewal
        assert limiter.reserve("u", "m").allowed
    finally:
        worker.kill()
        worker.join(10)


def test_the_keeper_warns_of_an_expired_lease_but_not_of_each_renewal_in_an_outage(
    server: RedisServer, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A lease lost is worth a warning; Redis being gone is the storage's to log, once per outage."""
    limiter = slots(server, clock, lease=6)
    keeper = LeaseKeeper(clock, background=False)  # renew_due runs here only
    late, kept = limiter.reserve("u", "m"), limiter.reserve("v", "m")
    keeper.keep(late)
    clock.advance(6.1)  # `late`'s lease ran out before its turn came
    with caplog.at_level(logging.WARNING, logger="ratelimit_middleware"):
        keeper.renew_due()
    assert [r.getMessage() for r in caplog.records if "expired before it was renewed" in r.getMessage()]
    keeper.keep(kept)
    server.stop()
    caplog.clear()
    for _ in range(3):
        clock.advance(2.5)
        with caplog.at_level(logging.WARNING, logger="ratelimit_middleware"):
            keeper.renew_due()
    assert kept.renew() is None
    assert not [r for r in caplog.records if "lease" in r.getMessage()]
