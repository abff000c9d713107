"""Redis Cluster: clients, slots, and all-or-nothing decisions across slots (reserve, then refund).

Every behaviour test already runs on the cluster through the ``redis-cluster`` storage; here are the facts
only a cluster has, on the session's real local cluster of three masters.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio.cluster
import redis.asyncio.connection
import redis.cluster
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from ratelimit_middleware import (
    MemoryStorage,
    MultiTierRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    RedisStorage,
)
from ratelimit_middleware.backends.redis import CircuitBreaker
from ratelimit_middleware.errors import RateLimiterUnavailable

from .conftest import CONTRACT_TIMEOUT, FakeClock, unique_prefix
from .redis_server import RedisCluster


@pytest.fixture
def cluster_client(redis_cluster: RedisCluster) -> Iterator[redis.cluster.RedisCluster]:
    client = redis_cluster.client()
    yield client
    client.close()


def cluster_keys(cluster: RedisCluster, prefix: str) -> dict[bytes, int]:
    """Every key under ``prefix`` on every node, with the port of the node that holds it."""
    found: dict[bytes, int] = {}
    for node in cluster.nodes:
        client = node.client()
        found.update(dict.fromkeys(client.scan_iter(match=f"{prefix}:*", count=1000), node.port))
        client.close()
    return found


def test_a_sync_cluster_client_serves_the_sync_methods(cluster_client: redis.cluster.RedisCluster) -> None:
    limiter = RedisRateLimiter(cluster_client, 2, 60, key_prefix=unique_prefix(), timeout=CONTRACT_TIMEOUT)
    assert limiter.allow("u", "m") and limiter.allow("u", "m") and not limiter.allow("u", "m")
    with pytest.raises(TypeError, match="sync client"):
        asyncio.run(limiter.aallow("u", "m"))
    limiter.reset("u", "m")
    assert limiter.get_request_count("u", "m") == 0


def test_an_asyncio_cluster_client_serves_the_async_methods(redis_cluster: RedisCluster) -> None:
    async def scenario() -> None:
        client = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=redis_cluster.ports[1])
        limiter = RedisRateLimiter(client, 2, 60, key_prefix=unique_prefix(), timeout=CONTRACT_TIMEOUT)
        assert await limiter.aallow("u", "m") and await limiter.aallow("u", "m")
        assert not await limiter.aallow("u", "m")
        with pytest.raises(TypeError, match="asyncio client"):
            limiter.allow("u", "m")
        await limiter.areset("u", "m")
        assert await limiter.aget_request_count("u", "m") == 0
        await limiter.storage.aclose()
        await client.aclose()

    asyncio.run(scenario())


def test_a_cluster_url_serves_both_kinds_of_methods_across_slots(redis_cluster: RedisCluster) -> None:
    """``redis+cluster://`` names a cluster by any of its nodes (no URL did: a node's redis:// URL made a
    standalone limiter, which failed on every key of another node): the sync and async methods share its
    keys, each on its slot's node."""
    prefix = unique_prefix()
    storage = RedisStorage(
        f"redis+cluster://127.0.0.1:{redis_cluster.ports[1]}", key_prefix=prefix, timeout=CONTRACT_TIMEOUT
    )
    limiter = MultiTierRateLimiter(per_user_model="2/minute", per_model="5/minute", storage=storage)
    users = ["alice", "bob", "carol", "dave", "erin"]
    assert [limiter.allow(user, "m")[0] for user in users[:3]] == [True] * 3

    async def scenario() -> list[bool]:
        allowed = [(await limiter.aallow(user, "m"))[0] for user in ["alice", "alice", *users[3:]]]
        await storage.aclose()
        return allowed

    assert asyncio.run(scenario()) == [True, False, True, False]  # alice's third; the model's sixth
    assert len(set(cluster_keys(redis_cluster, prefix).values())) >= 2  # on several nodes
    storage.close()


@pytest.mark.parametrize(
    ("url", "problem"),
    [("redis+cluster://127.0.0.1:7000/2", "database 0 only"), ("redis+cluster:///", "names no host"),
     ("redis+cluster://127.0.0.1:7000?ssl=true", "'ssl'.*rediss://"),
     ("redis+cluster://127.0.0.1:7000?frobnicate=1", "'frobnicate' is not an option a Redis Cluster client"),
     ("redis+cluster://127.0.0.1:7000?max_connections=10", "'max_connections' .*not capped"),
     ("rediss+cluster://:pw@127.0.0.1:7000?socket_timeout=x", "Invalid value for 'socket_timeout'"),
     ("redis+cluster://127.0.0.1:7000/abc", "the database must be a number, got 'abc'"),
     ("redis+cluster://127.0.0.1:7000?protocol=9", "protocol must be either 2 or 3"),
     ("rediss+cluster://:pw@127.0.0.1:7000?ssl_cert_reqs=bogus", "Certificate Requirements Flag: bogus"),
     ("redis+cluster://127.0.0.1:7000?encoding=bogus-enc", "unknown encoding: bogus-enc"),
     ("redis+sentinel://127.0.0.1:26379", "redis://, rediss://, unix://")],
)  # fmt: skip
def test_bad_cluster_urls_fail_at_construction(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=rf"^Redis URL '[^']+': .*{problem}") as raised:
        RedisStorage(url)
    assert ":pw@" not in str(raised.value)


def test_a_tls_cluster_url_makes_tls_connections_with_its_credentials() -> None:
    storage = RedisStorage("rediss+cluster://bob:pw@127.0.0.1:7000?ssl_cert_reqs=none")
    client = storage.connection.endpoint.async_cluster()  # the limiter's own (it connects on first use)
    settings = client.connection_kwargs
    assert settings["connection_class"] is redis.asyncio.connection.SSLConnection
    assert (settings["username"], settings["password"], settings["ssl_cert_reqs"]) == ("bob", "pw", "none")
    assert [(node.host, node.port) for node in client.nodes_manager.startup_nodes.values()] == [
        ("127.0.0.1", 7000)
    ]


def test_constructing_on_a_cluster_never_contacts_it() -> None:
    client = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=1)  # nothing listens there
    limiter = RedisRateLimiter(client, 5, 60, on_error="deny", timeout=0.1)
    with pytest.raises(RateLimiterUnavailable):
        asyncio.run(limiter.acheck("u", "m"))


def test_one_script_per_slot_and_user_keys_share_one(
    redis_cluster: RedisCluster, cluster_client: redis.cluster.RedisCluster
) -> None:
    prefix = unique_prefix()
    storage = RedisStorage(cluster_client, key_prefix=prefix, timeout=CONTRACT_TIMEOUT)
    limiter = MultiTierRateLimiter(
        per_user_model="5/minute;20/hour",
        per_model="100/minute",
        per_user="10/minute",
        global_limit="1000/minute",
        storage=storage,
    )
    assert limiter.allow("alice", "gpt-4")[0]
    keys = cluster_keys(redis_cluster, prefix)
    assert len(keys) == 5
    slots = {key: key_slot(key) for key in keys}
    user_slots = {slot for key, slot in slots.items() if b":per_user" in key}
    assert user_slots == {key_slot(b"{alice}")}  # every key of alice on one slot, whatever the model
    assert len(set(slots.values())) == 3  # alice, gpt-4, global
    storage.connection.round_trips = 0  # the first decision also loaded the script on each node (EVAL)
    assert limiter.allow("alice", "gpt-4")[0]
    assert storage.connection.round_trips == 3  # one script per slot


@pytest.mark.parametrize("denying", ["per_model", "per_user_model"])
def test_a_denial_on_one_slot_charges_no_other_slot(
    redis_cluster: RedisCluster, cluster_client: redis.cluster.RedisCluster, algorithm: str, denying: str
) -> None:
    clock = FakeClock()
    prefix = unique_prefix()
    tiers = {"per_user_model": "3/minute", "per_model": "100/minute"}
    if denying == "per_model":
        tiers = {"per_user_model": "100/minute", "per_model": "3/minute"}
    storage = RedisStorage(cluster_client, key_prefix=prefix, clock=clock, timeout=CONTRACT_TIMEOUT)
    limiter = MultiTierRateLimiter(**tiers, algorithm=algorithm, storage=storage)
    users = ["a", "a", "a"] if denying == "per_user_model" else ["a", "b", "c"]
    assert all(limiter.allow(user, "m")[0] for user in users)
    before = {key: cluster_client.dump(key) for key in cluster_keys(redis_cluster, prefix)}
    for _ in range(3):
        allowed, reason = limiter.allow("a" if denying == "per_user_model" else "d", "m")
        assert not allowed and reason is not None and reason.startswith(denying)
    # The slot that allowed was charged, then refunded: every key as before, no key for "d" left behind.
    after = {key: cluster_client.dump(key) for key in cluster_keys(redis_cluster, prefix)}
    if algorithm == "gcra":  # a refund restores the arrival time up to float rounding
        assert after.keys() == before.keys()
    else:
        assert after == before
    other = "per_model" if denying == "per_user_model" else "per_user_model"
    assert limiter.get_request_count("d" if denying == "per_model" else "a", "m", tier=other) == (
        0 if denying == "per_model" else 3
    )


CONFIGS = [
    {"per_user_model": "3/2 seconds", "per_model": "4/3 seconds"},
    {"per_user_model": "2/1 second;5/10 seconds", "global_limit": "6/4 seconds"},
    {"per_user": "4/2 seconds", "per_model": "3/1 second", "global_limit": "9/5 seconds"},
]


@settings(max_examples=30, deadline=None)
@given(
    algorithm=st.sampled_from(["sliding_log", "sliding_window", "fixed_window", "gcra"]),
    config=st.sampled_from(CONFIGS),
    ops=st.lists(
        st.tuples(
            st.integers(0, 15).map(lambda n: n / 10),
            st.sampled_from(["a", "b", "c"]),
            st.sampled_from(["x", "y"]),
            st.integers(0, 3),
        ),
        max_size=40,
    ),
)
def test_a_cluster_decides_as_one_redis(
    redis_cluster: RedisCluster, algorithm: str, config: dict[str, str], ops: list[Any]
) -> None:
    """Sequential decisions spread over slots, with refunds, are those of the in-memory limiter."""
    clock = FakeClock()
    memory = MultiTierRateLimiter(**config, algorithm=algorithm, storage=MemoryStorage(clock=clock))
    client = redis_cluster.client()
    storage = RedisStorage(client, key_prefix=unique_prefix(), clock=clock, timeout=CONTRACT_TIMEOUT)
    on_cluster = MultiTierRateLimiter(**config, algorithm=algorithm, storage=storage)
    for step, user, model, cost in ops:
        clock.advance(step)
        got, expected = on_cluster.check(user, model, cost), memory.check(user, model, cost)
        if algorithm == "gcra":  # refunds restore arrival times up to float rounding
            assert got._replace(retry_after=0.0, reset_after=0.0) == expected._replace(
                retry_after=0.0, reset_after=0.0
            )
            assert got.retry_after == pytest.approx(expected.retry_after, abs=1e-9)
            assert got.reset_after == pytest.approx(expected.reset_after, abs=1e-9)
        else:
            assert got == expected
    storage.close()
    client.close()


def node_of(cluster: RedisCluster, client: redis.cluster.RedisCluster, tag: bytes) -> int:
    """The index of the node that holds the slot of ``tag``."""
    port = client.get_node_from_key(tag).port
    return cluster.ports.index(port)


def test_a_paused_node_costs_at_most_the_timeout(
    redis_cluster: RedisCluster, cluster_client: redis.cluster.RedisCluster
) -> None:
    """A stalled node: calls that need it follow the policy within the bound, sync and async; the others go
    on; and all recover once it answers."""
    clock = FakeClock()
    options: dict[str, Any] = {"timeout": 0.1, "on_error": "deny", "key_prefix": unique_prefix()}
    sync = RedisRateLimiter(cluster_client, 10, 60, breaker=CircuitBreaker(clock=clock), **options)
    node = redis.asyncio.cluster.ClusterNode("127.0.0.1", redis_cluster.ports[0])
    asynchronous = RedisRateLimiter(
        redis.asyncio.cluster.RedisCluster(startup_nodes=[node]),
        10,
        60,
        breaker=CircuitBreaker(clock=clock),
        **options,
    )
    stalled = node_of(redis_cluster, cluster_client, b"alice")
    other = next(
        user
        for user in ("bob", "carol", "dave", "erin")
        if node_of(redis_cluster, cluster_client, user.encode()) != stalled
    )

    async def check(user: str) -> float:
        started = time.perf_counter()
        with contextlib.suppress(RateLimiterUnavailable):
            await asynchronous.acheck(user, "m")
        return time.perf_counter() - started

    async def answered() -> None:
        """Both limiters allow alice, once they answer: a call may run out of its 0.1 s while a fresh client
        maps the cluster (first use), or maps it again after a node resumed (the policy answers it)."""
        give_up = time.monotonic() + 10
        while True:
            try:
                if sync.allow("alice", "m") and await asynchronous.aallow("alice", "m"):
                    return
            except RateLimiterUnavailable:
                pass
            assert time.monotonic() < give_up, "the limiters never answered"
            clock.advance(60)  # past the breakers' cool-down
            await asyncio.sleep(0.05)

    async def scenario() -> None:
        await answered()
        redis_cluster.nodes[stalled].pause()
        try:
            started = time.perf_counter()
            with pytest.raises(RateLimiterUnavailable):
                sync.check("alice", "m")
            assert time.perf_counter() - started < 1.0
            assert await check("alice") < 1.0
            assert sync.allow(other, "m") and await asynchronous.aallow(other, "m")  # other nodes answer
        finally:
            redis_cluster.nodes[stalled].resume()
        await answered()  # recovered by themselves
        await asynchronous.storage.aclose()

    asyncio.run(scenario())
    sync.storage.close()


def test_an_async_first_mapping_that_failed_unseen_is_made_again(redis_cluster: RedisCluster) -> None:
    """The first mapping runs apart from the calls, within ``connect_timeout``: one that fails after every
    call waiting for it ran out of time is made again by the next call, not reported to it as if the
    cluster still could not be mapped."""
    storage = RedisStorage(
        f"redis+cluster://127.0.0.1:{redis_cluster.ports[0]}",
        key_prefix=unique_prefix(),
        timeout=0.1,
        connect_timeout=0.3,
        on_error="deny",
        breaker=CircuitBreaker(failures=100),
    )
    limiter = RateLimiter(5, 60, storage=storage)

    async def decided() -> Any:
        try:
            return await limiter.acheck("alice", "m")
        except RateLimiterUnavailable as error:
            return error

    async def scenario() -> None:
        for node in redis_cluster.nodes:
            node.pause()
        try:
            with pytest.raises(RateLimiterUnavailable):
                await limiter.acheck("alice", "m")  # starts the mapping, and runs out of time
            # The mapping fails meanwhile (its budget of 0.3 s runs out), with no call waiting for it: real
            # time must pass, no clock of ours decides when a stalled server's reply is given up on.
            await asyncio.sleep(0.5)
        finally:
            for node in redis_cluster.nodes:
                node.resume()
        for _ in range(20):  # a loaded machine may take more than one call's 0.1 s to map it again
            outcome = await decided()
            if not isinstance(outcome, RateLimiterUnavailable):
                break
            # Never the stale failure: only a mapping still under way.
            assert isinstance(outcome.__cause__, redis.TimeoutError), repr(outcome.__cause__)
        else:
            pytest.fail("the cluster was never mapped again")
        assert outcome.allowed
        await storage.aclose()

    asyncio.run(scenario())
