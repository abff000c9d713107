"""Token budgets and concurrency limits on Redis: what only Redis has (the behaviour itself runs on Redis,
asyncio Redis and Redis Cluster in ``test_reservations.py`` through the ``storage`` fixture).

Concurrency slots are leases in a ZSET that expire, so that a worker that dies holding one cannot leak it,
and that a running response renews; tokens and slots have keys of their own; a reservation and its
settlement are one round trip each; the ``on_error`` policies hold for reservations (and mark their
decisions); on a Redis Cluster a reservation spread over slots is all or nothing.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import redis
import redis.asyncio.cluster
from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit_middleware import (
    ALGORITHMS,
    Limits,
    MemoryStorage,
    MultiTierRateLimiter,
    RateLimiter,
    RedisStorage,
)
from ratelimit_middleware.asgi import RateLimitMiddleware, Receive, Scope, Send
from ratelimit_middleware.backends.redis import coalescer
from ratelimit_middleware.backends.redis.clients import RedisClient
from ratelimit_middleware.backends.redis.storage import CLOCK_TTL_PAD_MS
from ratelimit_middleware.errors import LocalDecision, RateLimiterUnavailable, UncheckedDecision
from ratelimit_middleware.reservation import Reservation

from .asgi_helpers import call, http_scope, status_of
from .conftest import CONTRACT_TIMEOUT, FakeClock, unique_prefix
from .redis_server import RedisCluster, RedisServer


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    yield client
    client.close()


def limiter_on(storage: RedisStorage, **limits: object) -> MultiTierRateLimiter:
    return MultiTierRateLimiter(per_user_model=Limits(**limits), storage=storage)  # type: ignore[arg-type]


def storage_on(server: RedisServer, clock: FakeClock | None, **options: object) -> RedisStorage:
    return RedisStorage(
        server.url,
        key_prefix=unique_prefix(),
        clock=clock,
        timeout=CONTRACT_TIMEOUT,
        **options,  # type: ignore[arg-type]
    )


def test_a_killed_workers_slot_is_freed_when_its_lease_expires(
    redis_server: RedisServer, client: redis.Redis, clock: FakeClock
) -> None:
    storage = storage_on(redis_server, clock, lease=5)
    limiter = limiter_on(storage, max_concurrent=1)
    held = limiter.reserve("u", "m")  # the worker dies: this reservation is never settled
    assert held.allowed
    clock.advance(4.9)
    assert not limiter.reserve("u", "m").allowed
    assert limiter.get_request_count("u", "m", unit="concurrent") == 1
    clock.advance(0.2)  # the lease is over
    assert limiter.get_request_count("u", "m", unit="concurrent") == 0
    fresh = limiter.reserve("u", "m")
    assert fresh.allowed
    held.settle(0, 0)  # a late settlement of the expired lease gives back nothing else
    assert limiter.get_request_count("u", "m", unit="concurrent") == 1
    (key,) = client.keys(f"{storage.key_prefix}:*")
    assert client.type(key) == b"zset" and 0 < client.pttl(key) <= 5_000 + 60_000  # expires in Redis too


def test_a_lease_expires_in_redis_time_without_an_injected_clock(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    storage = storage_on(redis_server, None, lease=0.2)
    limiter = limiter_on(storage, max_concurrent=1)
    assert limiter.reserve("u", "m").allowed
    assert not limiter.reserve("u", "m").allowed
    time.sleep(0.3)  # a short bounded wait: the lease runs on Redis' own clock
    assert limiter.reserve("u", "m").allowed
    assert all(0 < client.pttl(key) <= 200 for key in client.keys(f"{storage.key_prefix}:*"))


def test_leases_at_one_instant_are_released_one_each(redis_server: RedisServer, clock: FakeClock) -> None:
    limiter = limiter_on(storage_on(redis_server, clock), max_concurrent=3)
    reservations = [limiter.reserve("u", "m") for _ in range(3)]  # the injected clock stands still
    assert all(r.allowed for r in reservations) and not limiter.reserve("u", "m").allowed
    for index, reservation in enumerate(reservations):
        reservation.settle(0, 0)
        reservation.settle(0, 0)  # twice changes nothing
        assert limiter.get_request_count("u", "m", unit="concurrent") == 2 - index


def test_token_and_slot_keys_differ_from_request_keys(
    redis_server: RedisServer, client: redis.Redis, clock: FakeClock
) -> None:
    storage = storage_on(redis_server, clock)
    limiter = limiter_on(
        storage, requests="1000/minute", tokens="1000/minute", input_tokens="1000/minute", max_concurrent=2
    )
    assert limiter.reserve("u", "m", input_tokens=10).allowed
    names = {key.decode() for key in client.keys(f"{storage.key_prefix}:*")}
    prefix = storage.key_prefix
    assert names == {
        f"{prefix}:concurrency:concurrent:per_user_model:{{u}}:m",
        f"{prefix}:sliding_log:per_user_model:1000/60:{{u}}:m",
        f"{prefix}:sliding_log:input_tokens:per_user_model:1000/60:{{u}}:m",
        f"{prefix}:sliding_log:tokens:per_user_model:1000/60:{{u}}:m",
    }
    assert limiter.get_request_count("u", "m") == 1
    assert limiter.get_request_count("u", "m", unit="tokens") == 10


def test_a_reservation_and_its_settlement_are_one_round_trip_each(
    redis_server: RedisServer, clock: FakeClock
) -> None:
    storage = storage_on(redis_server, clock)
    limiter = MultiTierRateLimiter(
        per_user_model=Limits(requests="10/minute", tokens="1000/minute", max_concurrent=2),
        per_model=Limits(tokens="5000/minute"),
        global_limit=Limits(max_concurrent=100),
        storage=storage,
    )
    limiter.reserve("u", "m").cancel()  # loads the script
    storage.connection.round_trips = 0
    reservation = limiter.reserve("u", "m", input_tokens=100)
    assert reservation.allowed and storage.connection.round_trips == 1
    reservation.settle(50, 10)
    assert storage.connection.round_trips == 2


def test_a_denial_reports_what_each_rule_counts(redis_server: RedisServer, clock: FakeClock) -> None:
    limiter = limiter_on(storage_on(redis_server, clock), tokens="1000/minute", max_concurrent=5)
    limiter.reserve("u", "m", input_tokens=900).settle(900, 0)
    denied = limiter.reserve("u", "m", input_tokens=200)
    assert not denied.allowed and denied.decision.unit == "tokens"
    assert denied.decision.used == 900
    assert denied.decisions["concurrent"].used == 0
    assert limiter.get_request_count("u", "m", unit="concurrent") == 0  # the denial took no slot


# -- when Redis is gone ----------------------------------------------------------------------------------


def dead_storage(on_error: str, clock: FakeClock) -> RedisStorage:
    return RedisStorage(
        "redis://127.0.0.1:1",
        key_prefix=unique_prefix(),
        timeout=0.1,
        on_error=on_error,  # type: ignore[arg-type]
        clock=clock,
    )


def test_on_error_allow_admits_reservations_unchecked(clock: FakeClock) -> None:
    limiter = limiter_on(dead_storage("allow", clock), tokens="1000/minute", max_concurrent=1)
    for _ in range(3):
        reservation = limiter.reserve("u", "m", input_tokens=900)
        assert reservation.allowed
        assert isinstance(reservation.decision, UncheckedDecision)
        assert all(isinstance(each, UncheckedDecision) for each in reservation.decisions.values())
        assert reservation.renew()  # nothing expires
        reservation.settle(900, 500)  # nothing to settle: no error


def test_on_error_deny_refuses_reservations(clock: FakeClock) -> None:
    limiter = limiter_on(dead_storage("deny", clock), tokens="1000/minute", max_concurrent=1)
    with pytest.raises(RateLimiterUnavailable):
        limiter.reserve("u", "m", input_tokens=10)

    async def scenario() -> None:
        with pytest.raises(RateLimiterUnavailable):
            await limiter.areserve("u", "m", input_tokens=10)

    asyncio.run(scenario())


def test_on_error_local_reserves_and_settles_in_memory(clock: FakeClock) -> None:
    limiter = limiter_on(dead_storage("local", clock), tokens="1000/minute", max_concurrent=1)
    first = limiter.reserve("u", "m", input_tokens=600)
    assert first.allowed and isinstance(first.decision, LocalDecision)
    assert not limiter.reserve("u", "m", input_tokens=10).allowed  # the local slot is taken
    first.settle(100, 0)  # settles in memory: the slot and 500 tokens come back
    second = limiter.reserve("u", "m", input_tokens=900)
    assert second.allowed

    async def scenario() -> None:
        await second.acancel()
        third = await limiter.areserve("u", "m", input_tokens=900)
        assert third.allowed
        await third.acancel()

    asyncio.run(scenario())


def test_a_cluster_reservation_over_several_slots_is_all_or_nothing(redis_cluster: RedisCluster) -> None:
    storage = RedisStorage(redis_cluster.client(), key_prefix=unique_prefix(), timeout=CONTRACT_TIMEOUT)
    limiter = MultiTierRateLimiter(
        per_user_model=Limits(tokens="1000/minute", max_concurrent=5),
        per_model=Limits(tokens="1500/minute", max_concurrent=2),
        storage=storage,
    )
    first = limiter.reserve("a", "m", input_tokens=900)
    assert first.allowed
    assert len(first._charge[1].parts) == 2  # type: ignore[index,attr-defined]  # two slots charged
    denied = limiter.reserve("b", "m", input_tokens=700)  # per_model's tokens deny on its slot
    assert not denied.allowed and denied.decision.tier == "per_model" and denied.decision.used == 900
    # b's own slot allowed and charged, then got its charge back: tokens and the concurrency lease.
    assert limiter.get_request_count("b", "m", tier="per_user_model", unit="tokens") == 0
    assert limiter.get_request_count("b", "m", tier="per_user_model", unit="concurrent") == 0
    second = limiter.reserve("c", "m", input_tokens=100)
    assert second.allowed
    full = limiter.reserve("d", "m", input_tokens=1)  # per_model's two slots are taken
    assert not full.allowed and full.decision.unit == "concurrent"
    assert limiter.get_request_count("d", "m", tier="per_user_model", unit="concurrent") == 0
    first.settle(100, 0)  # settled on both slots, each at the time of its own charge
    assert limiter.get_request_count("a", "m", tier="per_user_model", unit="tokens") == 100
    assert limiter.get_request_count("a", "m", tier="per_model", unit="tokens") == 200
    assert limiter.get_request_count("a", "m", tier="per_model", unit="concurrent") == 1
    assert second.renew() and not first.renew()


def test_a_renewed_lease_outlives_its_first_expiry(redis_server: RedisServer, clock: FakeClock) -> None:
    limiter = limiter_on(storage_on(redis_server, clock, lease=5), max_concurrent=1)
    held = limiter.reserve("u", "m")
    assert held.lease == 5.0
    for _ in range(4):
        clock.advance(4)
        assert held.renew()
        assert not limiter.reserve("u", "m").allowed  # still held at 16 s, long after the first 5
    held.settle(0, 0)
    assert not held.renew()  # settled: nothing left to renew
    assert limiter.reserve("u", "m").allowed


def test_an_expired_lease_is_not_taken_again(redis_server: RedisServer, clock: FakeClock) -> None:
    limiter = limiter_on(storage_on(redis_server, clock, lease=5), max_concurrent=1)
    late = limiter.reserve("u", "m")
    clock.advance(5.1)  # its lease is over: the slot goes to another request
    other = limiter.reserve("u", "m")
    assert other.allowed
    assert not late.renew()
    late.settle(0, 0)  # gives back nothing of the other's
    assert limiter.get_request_count("u", "m", unit="concurrent") == 1
    assert other.renew()


def test_leases_of_one_instant_are_renewed_and_released_each_on_its_own(
    redis_server: RedisServer, clock: FakeClock
) -> None:
    limiter = limiter_on(storage_on(redis_server, clock, lease=5), max_concurrent=2)
    renewed, left = limiter.reserve("u", "m"), limiter.reserve("u", "m")  # the injected clock stands still
    clock.advance(4)
    assert renewed.renew()
    clock.advance(2)  # `left`'s lease is over; `renewed` holds until 9
    assert limiter.get_request_count("u", "m", unit="concurrent") == 1
    left.cancel()
    assert limiter.get_request_count("u", "m", unit="concurrent") == 1
    renewed.settle(0, 0)
    assert limiter.get_request_count("u", "m", unit="concurrent") == 0


def test_renewal_is_one_round_trip_and_fails_quietly_without_redis(
    server: RedisServer, clock: FakeClock
) -> None:
    storage = storage_on(server, clock)
    limiter = MultiTierRateLimiter(
        per_user_model=Limits(max_concurrent=2), global_limit=Limits(max_concurrent=100), storage=storage
    )
    held = limiter.reserve("u", "m")
    storage.connection.round_trips = 0
    assert held.renew() and storage.connection.round_trips == 1
    server.stop()
    assert held.renew() is None  # unknown: Redis is gone (no exception)


def test_lease_must_be_positive(redis_server: RedisServer) -> None:
    with pytest.raises(ValueError, match="lease"):
        RedisStorage(redis_server.url, lease=0)


def test_settling_on_redis_time_gives_the_lease_back(redis_server: RedisServer) -> None:
    limiter = limiter_on(storage_on(redis_server, None), tokens="1000/minute", max_concurrent=1)
    for _ in range(3):
        reservation = limiter.reserve("u", "m", input_tokens=100)
        assert reservation.allowed
        reservation.settle(10, 0)
    assert limiter.get_request_count("u", "m", unit="concurrent") == 0
    assert limiter.get_request_count("u", "m", unit="tokens") == 30

    async def scenario() -> None:
        async with await limiter.areserve("u", "m", input_tokens=5):
            assert await limiter.aget_request_count("u", "m", unit="concurrent") == 1
        assert await limiter.aget_request_count("u", "m", unit="concurrent") == 0

    asyncio.run(scenario())


async def _others_done() -> None:
    """Wait for the loop's other tasks (what a cancelled caller left running) to end, within a bound."""
    me = asyncio.current_task()
    for _ in range(10):
        others = asyncio.all_tasks() - {me}
        if not others:
            return
        _, pending = await asyncio.wait(others, timeout=30)
        assert not pending
    raise AssertionError("the loop's tasks keep making others")


@pytest.mark.parametrize("where", ["one Redis", "a cluster slot", "cluster slots"])
@pytest.mark.parametrize("cancel", ["the task", "a cancel scope"])
def test_a_reservation_whose_caller_is_cancelled_once_it_is_sent_is_cancelled_once_made(
    request: pytest.FixtureRequest, clock: FakeClock, cancel: str, where: str
) -> None:
    """A request cancelled while its reservation is on its way to Redis (a server cancelling the task of a
    request whose client left; an outer timeout, such as anyio.fail_after, a cancel scope): the caller is
    cancelled at once, Redis makes the reservation all the same, and it is cancelled when its reply comes,
    its tokens refunded and its slots given back, instead of held until their lease expires. The request
    stays counted, as for any request admitted and then abandoned. On one Redis the call is coalesced; on a
    cluster it is one script on one slot, or one per slot (a shared tier beside the user's)."""
    if where == "one Redis":
        client: RedisClient = request.getfixturevalue("redis_server").url
    else:
        port = request.getfixturevalue("redis_cluster").ports[0]
        client = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=port)
    storage = RedisStorage(client, key_prefix=unique_prefix(), clock=clock, timeout=CONTRACT_TIMEOUT)
    tiers = {"per_user_model": Limits(requests="10/minute", tokens="1000/minute", max_concurrent=1)}
    if where == "cluster slots":
        tiers["per_model"] = Limits(tokens="5000/minute", max_concurrent=5)
    limiter = MultiTierRateLimiter(**tiers, storage=storage)  # type: ignore[arg-type]
    connection = storage.connection
    scopes: list[anyio.CancelScope] = []

    async def caller() -> Reservation | None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            return await limiter.areserve("u", "m", input_tokens=100, output_tokens=200)
        return None

    async def held(unit: str, tier: str = "per_user_model") -> int:
        return await limiter.aget_request_count("u", "m", tier, unit)

    async def scenario() -> None:
        await limiter.aget_request_count("warm", "up")
        sent = connection.round_trips
        task = asyncio.ensure_future(caller())
        for _ in range(100):  # until the reservation is on its way to Redis
            if connection.round_trips > sent:
                break
            await asyncio.sleep(0)
        assert connection.round_trips > sent
        if cancel == "the task":
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            scopes[0].cancel()
            assert await task is None
        await _others_done()
        assert [await held("requests"), await held("tokens"), await held("concurrent")] == [1, 0, 0]
        if where == "cluster slots":
            assert [await held("tokens", "per_model"), await held("concurrent", "per_model")] == [0, 0]
        assert (await limiter.areserve("u", "m", input_tokens=1000)).allowed  # the slot and tokens are free
        await storage.aclose()

    asyncio.run(scenario())


def test_a_reservation_whose_caller_is_cancelled_as_its_reply_lands_is_cancelled_once_made(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller cancelled in the loop iteration in which its reply arrives (an outer timeout expiring
    then): the reply is on its future, which is not cancelled, so the coalescer gave it to no orphan."""
    storage = RedisStorage(redis_server.url, key_prefix=unique_prefix(), timeout=CONTRACT_TIMEOUT)
    limiter = RateLimiter(limit="10/minute", tokens="1000/minute", max_concurrent=1, storage=storage)
    victims: list[asyncio.Task[Reservation]] = []
    submit = coalescer.Coalescer.submit

    def cancel_as_the_reply_lands(self: Any, call: Any, orphan: Any = None) -> Any:
        future = submit(self, call, orphan)
        if orphan is not None and victims:
            future.add_done_callback(lambda _: victims[0].cancel())
        return future

    async def scenario() -> None:
        await limiter.aget_request_count("warm", "up")
        monkeypatch.setattr(coalescer.Coalescer, "submit", cancel_as_the_reply_lands)
        victims.append(asyncio.ensure_future(limiter.areserve("u", "m", input_tokens=100, output_tokens=200)))
        with pytest.raises(asyncio.CancelledError):
            await victims[0]
        monkeypatch.undo()
        await _others_done()
        counts = [await limiter.aget_request_count("u", "m", unit=unit) for unit in ("tokens", "concurrent")]
        assert counts == [0, 0]
        assert (await limiter.areserve("u", "m", input_tokens=1000)).allowed
        await storage.aclose()

    asyncio.run(scenario())


def test_a_request_cancelled_while_reserving_leaves_its_slot_to_the_next(redis_server: RedisServer) -> None:
    """Through the ASGI middleware: a request whose task is cancelled while its reservation is on its way
    (its app never runs) does not keep the user's only slot, so the user's next request is served, not
    denied for the lease's 60 seconds."""
    storage = storage_on(redis_server, None)
    limiter = limiter_on(storage, tokens="100000/minute", max_concurrent=1)
    started: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        started.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    middleware = RateLimitMiddleware(app, limiter=limiter, user_key=lambda request: "alice")
    body = json.dumps({"model": "m", "max_tokens": 500}).encode()

    async def scenario() -> None:
        await limiter.aget_request_count("warm", "up", unit="tokens")
        sent = storage.connection.round_trips
        cancelled = asyncio.ensure_future(call(middleware, http_scope(), [body]))
        for _ in range(100):  # until the reservation is on its way to Redis
            if storage.connection.round_trips > sent:
                break
            await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await _others_done()
        assert status_of(await call(middleware, http_scope(), [body])) == 200
        assert len(started) == 1
        await storage.aclose()

    asyncio.run(scenario())


@settings(max_examples=40, deadline=None)
@given(
    algorithm=st.sampled_from(sorted(ALGORITHMS)),
    steps=st.lists(
        st.tuples(
            st.integers(0, 40).map(lambda n: n / 4),  # clock step
            st.integers(0, 400),  # input tokens reserved
            st.one_of(st.none(), st.integers(0, 600)),  # tokens used, None: cancel
            st.integers(0, 3),  # how many steps later it settles
        ),
        min_size=1,
        max_size=30,
    ),
)
def test_redis_reserves_and_settles_exactly_as_memory(
    redis_server: RedisServer, algorithm: str, steps: list[tuple[float, int, int | None, int]]
) -> None:
    clock = FakeClock(1000.0)
    limiters = [
        MultiTierRateLimiter(
            per_user_model=Limits(requests="20/10 seconds", tokens="1000/10 seconds", max_concurrent=3),
            algorithm=algorithm,
            storage=storage,
        )
        for storage in (MemoryStorage(clock=clock), storage_on(redis_server, clock))
    ]
    pending: list[tuple[int, list[Reservation], int | None]] = []
    for index, (step, estimate, actual, delay) in enumerate(steps):
        clock.advance(step)
        reservations = [limiter.reserve("u", "m", input_tokens=estimate) for limiter in limiters]
        memory, on_redis = (r.decision for r in reservations)
        assert (on_redis.allowed, on_redis.unit, on_redis.remaining, on_redis.used) == (
            memory.allowed,
            memory.unit,
            memory.remaining,
            memory.used,
        )
        assert on_redis.retry_after == memory.retry_after
        if memory.allowed:
            pending.append((index + delay, reservations, actual))
        for due in [p for p in pending if p[0] <= index]:
            pending.remove(due)
            for reservation in due[1]:
                if due[2] is None:
                    reservation.cancel()
                else:
                    reservation.settle(due[2], 0)
        for unit in ("requests", "tokens", "concurrent"):
            counts = [limiter.get_request_count("u", "m", unit=unit) for limiter in limiters]
            assert counts[0] == counts[1], unit


def test_a_sliding_log_key_expires_with_the_entries_a_settlement_leaves(
    redis_server: RedisServer, client: redis.Redis, clock: FakeClock
) -> None:
    """A cancelled reservation's entry goes, and with it its hold on the key: the key expires one window
    after the newest entry left (30 s from now, not the cancelled one's 60), and goes with its last."""
    storage = storage_on(redis_server, clock)
    limiter = RateLimiter(input_tokens="100/minute", storage=storage)
    kept = limiter.reserve("u", "m", input_tokens=10)
    clock.advance(30)
    limiter.reserve("u", "m", input_tokens=10).cancel()
    [key] = client.keys(f"{storage.key_prefix}:*")
    assert CLOCK_TTL_PAD_MS + 29_000 < client.pttl(key) <= CLOCK_TTL_PAD_MS + 30_000
    kept.settle(0, 0)
    assert client.keys(f"{storage.key_prefix}:*") == []


def test_a_settlement_drops_the_empty_entries_an_earlier_version_kept(
    redis_server: RedisServer, client: redis.Redis, clock: FakeClock
) -> None:
    """Entries of cost 0 that an earlier version left in a sliding log (members ending with their time) go
    when a settlement rewrites them, instead of becoming alike members of one another: the count stays
    exact and the key holds what it counts."""
    storage = storage_on(redis_server, clock)
    limiter = RateLimiter(input_tokens="100/minute", storage=storage)
    first = limiter.reserve("u", "m", input_tokens=10)
    [key] = client.keys(f"{storage.key_prefix}:*")
    client.zadd(key, {"B10:0:1001": 1001, "B10:0:1002": 1002})  # two reservations of 1001 and 1002 cancelled
    clock.now = 1003.0
    assert limiter.reserve("u", "m", input_tokens=5).allowed
    first.settle(15, 0)
    assert client.zrange(key, 0, -1, withscores=True) == [(b"A0:15", 1000.0), (b"B15:5", 1003.0)]
    assert limiter.get_request_count("u", "m", unit="input_tokens") == 20


def test_a_shorter_lease_elsewhere_never_shortens_the_slots_key(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """Two processes with other ``lease`` settings share a key (a rolling deploy): the key lives as long as
    its latest lease, so the long lease's slot is not lost when the short one's time is up."""
    long = storage_on(redis_server, None, lease=600)
    short = RedisStorage(redis_server.url, key_prefix=long.key_prefix, timeout=CONTRACT_TIMEOUT, lease=1)
    held = limiter_on(long, max_concurrent=2).reserve("u", "m")
    assert held.allowed and limiter_on(short, max_concurrent=2).reserve("u", "m").allowed
    [key] = client.keys(f"{long.key_prefix}:*")
    assert client.pttl(key) > 590_000
