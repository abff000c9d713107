"""Reservations and settlements that Redis does not answer in time, or whose caller is cancelled: nothing they
take is held with no request behind it.

A reservation that times out is answered by ``on_error``, but Redis, busy meanwhile, may make it later all
the same: its concurrency slots are given back then (its undo follows it on its connection), and so is
everything when its reply lands after all. A settlement of a request whose task is cancelled is made at once
through the sync connections: a server may end its process right after cancelling its requests.

Redis is made busy by stopping its process (SIGSTOP), as a long script or a fork would keep it from reading:
what was written to it waits in its socket, and runs when it reads again. The cluster's node that holds the
user's slot is stopped the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
import redis.asyncio
import redis.asyncio.cluster
from redis.crc import key_slot

from ratelimit_middleware import Limits, MultiTierRateLimiter, RateLimiter, RedisStorage
from ratelimit_middleware.errors import LocalDecision, UncheckedDecision
from ratelimit_middleware.reservation import Reservation

from .conftest import unique_prefix
from .redis_server import RedisCluster, RedisServer, Slots
from .servers import ROOT, free_port, stop, wait_until_up
from .stalling_proxy import StallingProxy

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


def in_memory(limiter: RateLimiter) -> tuple[int, ...]:
    """What on_error="local"'s in-memory limiter counts for user ``u`` (requests, tokens, slots)."""
    local = limiter._backend._fallback._local  # type: ignore[attr-defined]
    return tuple(local.used("u", "m", rule) for rule in limiter.policy.all_rules)


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_reservation_answered_in_memory_after_its_timeout_is_held_in_memory_alone(
    busy: tuple[str, RedisServer], api: str
) -> None:
    """on_error="local": a reservation that times out is made in memory and settled there; Redis, which
    makes it late, counts its request (which ran: each store counts it once, and each decides alone) and
    gives its slot back at once (its undo), so the slot is held in one place only and freed by the
    settlement, with nothing left held. Its tokens stay counted in Redis as estimated until their window
    passes: settling them there needs the reply's time of the charge (DESIGN.md)."""
    url, server = busy
    storage = RedisStorage(url, key_prefix=unique_prefix(), timeout=TIMEOUT, on_error="local")
    limiter = RateLimiter(limit="10/minute", tokens="1000/minute", max_concurrent=1, storage=storage)
    assert counts(limiter) == (0, 0, 0)

    def made_late() -> None:
        eventually(lambda: counts(limiter)[0] == 1, "Redis never made the reservation")
        eventually(lambda: counts(limiter)[2] == 0, "the slot of the reservation Redis made late is held")
        assert counts(limiter) == (1, 100, 0)
        assert in_memory(limiter) == (1, 100, 1)

    async def areserve() -> Reservation:
        await limiter.aget_request_count("u", "m")  # the event loop's connections
        with stopped(server):
            reservation = await limiter.areserve("u", "m", input_tokens=100)
        await asyncio.to_thread(made_late)
        await reservation.asettle(10, 0)
        await limiter.storage.aclose()
        return reservation

    if api == "sync":
        with stopped(server):
            reservation = limiter.reserve("u", "m", input_tokens=100)
        made_late()
        reservation.settle(10, 0)
    else:
        reservation = asyncio.run(areserve())
    assert isinstance(reservation.decision, LocalDecision)
    assert in_memory(limiter) == (1, 10, 0)
    assert counts(limiter) == (1, 100, 0)
    assert limiter.reserve("u", "m").allowed  # max_concurrent=1: no slot held anywhere


def test_a_check_answered_in_memory_after_its_timeout_counts_once_in_each_store(
    busy: tuple[str, RedisServer],
) -> None:
    """on_error="local": a check that times out is decided in memory, and Redis counts it when it runs it
    late. Once in each: memory decides while Redis does not answer, Redis once it does, neither adds the
    other's count (a request admitted in memory meanwhile is one Redis never sees)."""
    url, server = busy
    storage = RedisStorage(url, key_prefix=unique_prefix(), timeout=TIMEOUT, on_error="local")
    limiter = RateLimiter(limit="3/minute", storage=storage)
    assert limiter.get_request_count("u", "m") == 0
    with stopped(server):
        assert isinstance(limiter.check("u", "m"), LocalDecision)
    eventually(lambda: limiter.get_request_count("u", "m") == 1, "Redis never made the check")
    assert in_memory(limiter) == (1,)
    assert [limiter.check("u", "m").allowed for _ in range(3)] == [True, True, False]


def test_a_reservation_cut_off_while_its_write_drains_gives_its_slot_back(
    busy: tuple[str, RedisServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An asyncio write hands the reservation's bytes to its connection's transport, then waits in drain()
    while the transport's buffer is above its high-water mark (Redis not reading a large write). A deadline
    that lands there cancels the wait with the bytes written: the connection is closed, which sends them
    first, and Redis makes the reservation. Its undo must be written after them before that, though redis-py's
    write had not returned: the slot is given back, not held until its lease expires. drain() is held here
    by a buffer that never drains (the bytes reached Redis at once), the point where the deadline cuts it."""
    url, _ = busy
    limiter = limiter_on(url)

    async def full(writer: asyncio.StreamWriter) -> None:
        await asyncio.get_running_loop().create_future()  # the transport's buffer never drains

    async def areserve() -> UncheckedDecision:
        await limiter.aget_request_count("u", "m")  # connected, the scripts loaded
        with monkeypatch.context() as patch:
            patch.setattr(asyncio.StreamWriter, "drain", full)
            reservation = await limiter.areserve("u", "m", input_tokens=100)
        await limiter.storage.aclose()
        return reservation.decision  # type: ignore[return-value]

    assert isinstance(asyncio.run(areserve()), UncheckedDecision)  # cut off: let through by on_error
    eventually(lambda: counts(limiter)[0] == 1, "Redis never made the reservation")
    eventually(lambda: counts(limiter)[2] == 0, "the slot of the reservation cut off while draining is held")
    assert counts(limiter) == (1, 100, 0)


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_reservation_over_cluster_slots_one_of_which_does_not_answer_gives_every_slot_back(
    redis_cluster: RedisCluster, api: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A reservation over two cluster slots (the user's tier and a shared per-model one, on two nodes) whose
    model node does not answer in time: the user's slot answered, and its lease is given back too (by its
    lease id, apart), not only the one Redis makes late on the stopped node."""
    holder = {node.port: node for node in redis_cluster.nodes}
    client = redis_cluster.client()
    user_node = client.get_node_from_key(USER_KEY).port
    model = next(f"m{n}" for n in range(1000) if client.get_node_from_key(f"{{m{n}}}").port != user_node)
    model_node = holder[client.get_node_from_key(f"{{{model}}}").port]
    client.close()
    url = f"redis+cluster://127.0.0.1:{user_node}"
    storage = RedisStorage(url, key_prefix=unique_prefix(), timeout=TIMEOUT)
    limiter = MultiTierRateLimiter(
        per_user_model=Limits(tokens="1000/minute", max_concurrent=1),
        per_model=Limits(tokens="5000/minute", max_concurrent=5),
        storage=storage,
    )

    def held(tier: str) -> int:
        return limiter.get_request_count("u", model, tier, "concurrent")

    async def areserve() -> UncheckedDecision:
        await limiter.aget_request_count("u", model, "per_model", "concurrent")
        with stopped(model_node):
            reservation = await limiter.areserve("u", model, input_tokens=100)
        await storage.aclose()
        return reservation.decision  # type: ignore[return-value]

    assert held("per_user_model") == held("per_model") == 0  # connected, the cluster mapped
    if api == "sync":
        with stopped(model_node):
            decision = limiter.reserve("u", model, input_tokens=100).decision
    else:
        decision = asyncio.run(areserve())
    assert isinstance(decision, UncheckedDecision)
    eventually(lambda: limiter.get_request_count("u", model, "per_model", "tokens") == 100, "never made")
    eventually(lambda: held("per_model") == 0, "the slot Redis made late on the stopped node is held")
    eventually(lambda: held("per_user_model") == 0, "the user's slot, which answered, is held")
    assert limiter.reserve("u", model).allowed


RELEASE_LOST = "the concurrency slots of a reservation answered with on_error could not be given back"


def apart_from_global(cluster: RedisCluster) -> tuple[str, RedisServer, RedisServer]:
    """A user whose slot is on another node than the shared ``{global}`` slot, that node, and the global's."""
    client = cluster.client()
    holder = {node.port: node for node in cluster.nodes}
    shared = holder[client.get_node_from_key("{global}").port]
    user = next(
        name for name in (f"g{n}" for n in range(1000)) if client.get_node_from_key(name).port != shared.port
    )
    user_node = holder[client.get_node_from_key(user).port]
    client.close()
    return user, user_node, shared


def spread_limiter(storage: RedisStorage) -> MultiTierRateLimiter:
    return MultiTierRateLimiter(
        per_user=Limits(max_concurrent=1), global_limit=Limits(max_concurrent=50), storage=storage
    )


async def reserve_with_every_connection_taken(
    limiter: MultiTierRateLimiter, user: str, user_node: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> UncheckedDecision:
    """Reserve for ``user`` with the user's node stopped, every connection the reservation uses kept taken
    (as by other calls in flight), so that what follows it on the cluster needs new connections."""
    await limiter.aget_request_count(user, "m", "global", "concurrent")  # mapped, connected
    with monkeypatch.context() as patch:
        patch.setattr(redis.asyncio.cluster.ClusterNode, "release", lambda node, connection: None)
        user_node.pause()
        reservation = await limiter.areserve(user, "m")
    return reservation.decision  # type: ignore[return-value]


def test_closing_a_storage_waits_for_the_slots_a_reservation_over_cluster_slots_gives_back(
    redis_cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A reservation over the user's slot and the shared ``{global}`` one (on another node, a slow link away
    here: 20 ms a round trip through a delaying proxy) whose user's node is stopped: it times out, and the
    global slot, which answered, is given back apart, in a task of its own. When that needs a new connection,
    ``aclose`` right after the reservation returned closed it before the release was written: the slot was
    held until its lease expired, and nothing was logged. ``aclose`` now waits for the release. The user's
    slot, whose node is still stopped, cannot be given back so: that is logged (its undo, written after the
    reservation, gives it back once the node reads again)."""
    user, user_node, shared = apart_from_global(redis_cluster)
    proxies = {
        port: StallingProxy(port, delay=0.01 if port == shared.port else 0.0) for port in redis_cluster.ports
    }

    def remap(address: tuple[str, int]) -> tuple[str, int]:
        host, port = address
        return (host, proxies[port].port) if port in proxies else address

    prefix = unique_prefix()
    client = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=user_node.port, address_remap=remap)
    storage = RedisStorage(client, key_prefix=prefix, timeout=TIMEOUT)
    reader = spread_limiter(
        RedisStorage(f"redis+cluster://127.0.0.1:{shared.port}", key_prefix=prefix, timeout=TIMEOUT)
    )

    async def reserve_then_close() -> tuple[UncheckedDecision, int]:
        decision = await reserve_with_every_connection_taken(
            spread_limiter(storage), user, user_node, monkeypatch
        )
        await storage.aclose()
        return decision, reader.get_request_count(user, "m", "global", "concurrent")  # before the loop turns

    assert reader.get_request_count(user, "m", "global", "concurrent") == 0  # mapped, connected
    try:
        decision, held = asyncio.run(reserve_then_close())
        assert isinstance(decision, UncheckedDecision)
        assert held == 0
        assert warnings(caplog, RELEASE_LOST) == 1
    finally:
        user_node.resume()
        for proxy in proxies.values():
            proxy.close()
    eventually(
        lambda: reader.get_request_count(user, "m", "per_user", "concurrent") == 0,
        "the slot Redis made late on the stopped node is held",
    )


def test_the_slots_a_reservation_over_cluster_slots_gives_back_are_given_back_when_its_loop_ends(
    redis_cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The same reservation, its event loop ended right after it returned, without ``aclose``: ``asyncio.run``
    cancelled the task giving back the global slot before it was written (it waited for a new connection).
    The release is then made at once through the sync connections, as a settlement cancelled is."""
    user, user_node, shared = apart_from_global(redis_cluster)
    storage = RedisStorage(
        f"redis+cluster://127.0.0.1:{shared.port}", key_prefix=unique_prefix(), timeout=TIMEOUT
    )
    limiter = spread_limiter(storage)

    def held(tier: str) -> int:
        return limiter.get_request_count(user, "m", tier, "concurrent")

    assert held("per_user") == held("global") == 0  # the sync connections too
    try:
        decision = asyncio.run(reserve_with_every_connection_taken(limiter, user, user_node, monkeypatch))
        assert isinstance(decision, UncheckedDecision)
        assert held("global") == 0  # at once: given back as the loop ended
        eventually(lambda: warnings(caplog, RELEASE_LOST) == 1, "the stopped node's release failed unseen")
    finally:
        user_node.resume()
    eventually(lambda: held("per_user") == 0, "the slot Redis made late on the stopped node is held")
    storage.close()


def test_closing_a_storage_waits_for_the_slots_a_sync_reservation_over_cluster_slots_gives_back(
    redis_cluster: RedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Sync: the user's slot answered, and the global one's node is stopped (the sync calls of a cluster go
    one after the other). Each slot is given back on a thread of its own (the stopped node's release must not
    use up the user's slot's time), which ``close`` right after the reservation returned waits for: closed
    under it, the release failed, and the slot was held until its lease expired."""
    user, user_node, shared = apart_from_global(redis_cluster)
    url, prefix = f"redis+cluster://127.0.0.1:{user_node.port}", unique_prefix()
    storage = RedisStorage(url, key_prefix=prefix, timeout=TIMEOUT)
    limiter = spread_limiter(storage)
    reader = spread_limiter(RedisStorage(url, key_prefix=prefix, timeout=TIMEOUT))

    def held(tier: str) -> int:
        return reader.get_request_count(user, "m", tier, "concurrent")

    assert limiter.get_request_count(user, "m", "global", "concurrent") == held("per_user") == 0  # mapped
    with stopped(shared):
        decision = limiter.reserve(user, "m").decision
        storage.close()
        assert isinstance(decision, UncheckedDecision)
        assert held("per_user") == 0  # at once: given back before the connections closed
        eventually(lambda: warnings(caplog, RELEASE_LOST) == 1, "the stopped node's release failed unseen")
    eventually(lambda: held("global") == 0, "the slot Redis made late on the stopped node is held")


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_reservation_redis_makes_late_on_a_slots_importing_node_gives_its_slot_back(
    redis_cluster: RedisCluster, api: str
) -> None:
    """The user's slot is being migrated, its keys moved already: the slot's node answers ASK, and the
    reservation goes to the importing node after ASKING, where it runs late (the node busy past the
    timeout). Its undo, written after it, must go after ASKING too: without it the node refuses it (MOVED:
    the slot is not its own yet), and the slot stayed held until its lease expired."""
    slots = Slots(redis_cluster)
    client = redis_cluster.client()
    home, importing = redis_cluster.nodes[0], redis_cluster.nodes[2]

    def on(node: RedisServer, name: str) -> bool:
        return bool(client.get_node_from_key(name).port == node.port)

    user = next(
        name
        for name in (f"ask{n}" for n in range(10_000))
        if on(home, name) and not slots.keys(key_slot(name.encode()), 0)
    )
    neighbour = next(name for name in (f"ask{n}" for n in range(10_000)) if on(importing, name))
    client.close()
    slot = key_slot(user.encode())
    storage = RedisStorage(
        f"redis+cluster://127.0.0.1:{home.port}", key_prefix=unique_prefix(), timeout=TIMEOUT
    )
    limiter = RateLimiter(limit="10/minute", tokens="1000/minute", max_concurrent=2, storage=storage)

    def held() -> int:
        return limiter.get_request_count(user, "m", unit="concurrent")

    async def areserve() -> UncheckedDecision:
        await limiter.areserve(neighbour, "m")  # connected to the importing node
        with stopped(importing):
            reservation = await limiter.areserve(user, "m", input_tokens=100)
        await storage.aclose()
        return reservation.decision  # type: ignore[return-value]

    try:
        first = limiter.reserve(user, "m", input_tokens=100)  # the keys exist: they move with the slot
        limiter.reserve(neighbour, "m")  # connected to the importing node, the script loaded there
        slots.begin(slot, 0, 2)
        slots.migrate(slot, 0, 2)
        assert held() == 1  # read on the importing node, after ASK
        if api == "sync":
            with stopped(importing):
                decision = limiter.reserve(user, "m", input_tokens=100).decision
        else:
            decision = asyncio.run(areserve())
        assert isinstance(decision, UncheckedDecision)
        eventually(lambda: limiter.get_request_count(user, "m") == 2, "Redis never made the reservation")
        eventually(lambda: held() == 1, "the slot of the reservation made late on the importing node is held")
        first.cancel()
        assert held() == 0
    finally:
        slots.give_back(slot, 2)
        slots.close()
        storage.close()


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


def test_a_settlement_cancelled_before_it_is_sent_gives_its_slot_back(server: RedisServer) -> None:
    """A settlement whose task is cancelled before it was written to Redis (here while its new connection
    is being set up; a server cancelling the request as it settles, about to end its process) gives the
    slot back at once through the sync connections, instead of leaving it held until its lease expires."""
    limiter = limiter_on(server.url)

    async def scenario() -> None:
        reservation = await limiter.areserve("u", "m", input_tokens=100)
        assert reservation.allowed
        await limiter.storage.aclose()  # the settlement needs a new connection
        settling = asyncio.ensure_future(reservation.acancel())
        await asyncio.sleep(0)  # it waits for the connection
        settling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await settling
        assert limiter.get_request_count("u", "m", unit="concurrent") == 0  # at once, before the loop turns
        await limiter.storage.aclose()

    asyncio.run(scenario())
    assert limiter.reserve("u", "m").allowed


CANCELLING = pytest.mark.skipif(
    sys.version_info < (3, 11), reason="Python 3.10 does not say whether a task is being cancelled"
)


@CANCELLING
def test_a_storage_without_sync_connections_warns_of_a_settlement_by_a_cancelled_task(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Given an asyncio client, the storage has no sync connections to settle at once for a request being
    cancelled: the settlement goes through the event loop (and is made if the loop runs on), and the risk is
    logged as a warning, once a minute."""

    async def scenario() -> None:
        client = redis.asyncio.Redis(port=server.port)
        storage = RedisStorage(client, key_prefix=unique_prefix(), timeout=TIMEOUT)
        limiter = RateLimiter(tokens="1000/minute", max_concurrent=1, storage=storage)

        async def request(reservation: Reservation) -> None:
            try:
                await asyncio.sleep(600)
            finally:
                await reservation.acancel()

        for _ in range(2):
            reservation = await limiter.areserve("u", "m", input_tokens=10)
            assert reservation.allowed
            task = asyncio.ensure_future(request(reservation))
            await asyncio.sleep(0)  # the request runs
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await limiter.aget_request_count("u", "m", unit="concurrent") == 0
        await storage.aclose()
        await client.aclose()

    asyncio.run(scenario())
    assert warnings(caplog, "a reservation was settled by a task being cancelled") == 1


GRACEFUL_APP = """
import asyncio
import os

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from ratelimit_middleware import Limits, MultiTierRateLimiter, RateLimiter, RedisStorage
from ratelimit_middleware.asgi import RateLimitMiddleware


async def slow(request):
    await asyncio.sleep(600)
    return JSONResponse({})


async def health(request):
    return JSONResponse({})


storage = RedisStorage(os.environ["REDIS_URL"], key_prefix=os.environ["PREFIX"], timeout=5)
app = RateLimitMiddleware(
    Starlette(routes=[Route("/slow", slow), Route("/health", health)]),
    limiter=RateLimiter(tokens="100000/minute", max_concurrent=5, storage=storage),
    user_key=lambda request: "u",
    exempt_paths=["/health"],
)
"""


@CANCELLING
def test_a_server_cancelling_its_requests_on_shutdown_gives_their_slots_back(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """uvicorn --timeout-graceful-shutdown: on SIGTERM, requests still running after the timeout are
    cancelled, and the process ends a few turns of its event loop later (uvicorn raises the signal again),
    before a settlement could make its round trip. Their settlements are made at once, through the sync
    connections, so the slots are not held for the lease's 60 seconds."""
    prefix = unique_prefix()
    (tmp_path / "graceful_app.py").write_text(GRACEFUL_APP)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "graceful_app:app", "--app-dir", str(tmp_path), "--port", str(port),
         "--host", "127.0.0.1", "--no-access-log", "--timeout-graceful-shutdown", "1"],
        env={**os.environ, "REDIS_URL": redis_server.url, "PREFIX": prefix, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    mine = RateLimiter(
        tokens="100000/minute",
        max_concurrent=5,
        storage=RedisStorage(redis_server.url, key_prefix=prefix, timeout=5),
    )

    def held() -> int:
        return mine.get_request_count("u", "default", unit="concurrent")

    def request() -> None:
        with contextlib.suppress(OSError):  # the server cuts it off
            urllib.request.urlopen(f"http://127.0.0.1:{port}/slow", timeout=60).close()

    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", process)
        for _ in range(3):
            threading.Thread(target=request, daemon=True).start()
        eventually(lambda: held() == 3, "the requests never got their slots")
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    finally:
        stop(process)
    assert held() == 0
