"""The limiter's own connection pools: as many connections as its calls in flight need, and a pool found full
is no failure of Redis.

redis-py 8 caps a pool at 100 connections unless told (each node's, on a cluster). The limiter's pools
are its own, and a call that found one full failed at once with Redis healthy: in a burst of 150
settlements in flight, 50 were dropped (their tokens left at the estimate, their concurrency slots held
until their leases expired) and counted toward the circuit breaker. Here every call of such a burst is held
by a proxy in front of Redis until all are in flight, so that each needs a connection of its own at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio.cluster
import redis.cluster
from redis.crc import key_slot

from ratelimit_middleware import RateLimiter, RedisStorage
from ratelimit_middleware.backends.redis import CircuitBreaker, clients
from ratelimit_middleware.decision import Decision
from ratelimit_middleware.errors import LocalDecision, RateLimiterUnavailable, UncheckedDecision
from ratelimit_middleware.reservation import Reservation

from .conftest import unique_prefix
from .redis_server import RedisCluster, RedisServer
from .stalling_proxy import StallingProxy

IN_FLIGHT = 150
"""Settlements in flight at once: more than redis-py's default pool holds (100)."""

SETTLEMENT = b"$6\r\nadjust\r\n"  # the script's mode argument: held back by the proxies
WAIT = 60.0
"""Seconds the burst may take to be in flight (150 new connections on a loaded machine): a bound on a wait
for the proxies to hold every settlement, not a measure. The calls' own timeout is as long, so that none
runs out while it waits for a connection's setup."""


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "the burst did not end up in flight"
        time.sleep(0.01)  # waits for other threads' progress: no clock of ours decides it


async def await_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "the burst did not end up in flight"
        await asyncio.sleep(0.01)


class Burst:
    """Reservations on a storage reached through ``proxies``, settled all at once; ``redis_clients`` read
    what Redis holds."""

    def __init__(self, storage: RedisStorage, proxies: list[StallingProxy], redis_clients: list[Any]) -> None:
        self.storage = storage
        self.limiter = RateLimiter(
            limit="1000/minute", tokens="1000000/minute", max_concurrent=1, storage=storage
        )
        self.proxies = proxies
        self.redis_clients = redis_clients
        self.settled = 0  # settlements that returned

    @property
    def stalled(self) -> int:
        return sum(proxy.stalled for proxy in self.proxies)

    def in_flight(self) -> bool:
        """Whether every settlement is held by a proxy, or has returned without reaching Redis."""
        return self.stalled + self.settled == IN_FLIGHT

    def release(self) -> None:
        for proxy in self.proxies:
            proxy.release()

    def leases(self) -> int:
        pattern = f"{self.storage.key_prefix}:*concurren*"
        return sum(
            client.zcard(key) for client in self.redis_clients for key in client.scan_iter(match=pattern)
        )

    def check_settled(self, users: list[str], tokens: list[int]) -> None:
        """Every settlement reached Redis (each held a connection of its own while the others were in flight)
        and was made: its tokens settled, its concurrency slot given back."""
        assert self.stalled == IN_FLIGHT
        assert tokens == [20] * len(users)
        assert self.leases() == 0


def sync_burst(burst: Burst, users: list[str]) -> None:
    limiter = burst.limiter
    reservations = [limiter.reserve(user, "m", input_tokens=100) for user in users]
    assert all(type(reservation.decision) is Decision and reservation.allowed for reservation in reservations)
    lock = threading.Lock()

    def settle(reservation: Reservation) -> None:
        reservation.settle(10, 10)
        with lock:
            burst.settled += 1

    threads = [threading.Thread(target=settle, args=(reservation,)) for reservation in reservations]
    for thread in threads:
        thread.start()
    try:
        wait_for(burst.in_flight)
    finally:
        burst.release()
        for thread in threads:
            thread.join()
    burst.check_settled(users, [limiter.get_request_count(user, "m", unit="tokens") for user in users])


async def async_burst(burst: Burst, users: list[str]) -> None:
    limiter = burst.limiter
    reservations = await asyncio.gather(*(limiter.areserve(user, "m", input_tokens=100) for user in users))
    assert all(type(reservation.decision) is Decision and reservation.allowed for reservation in reservations)

    async def settle(reservation: Reservation) -> None:
        await reservation.asettle(10, 10)
        burst.settled += 1

    settling = asyncio.gather(*(settle(reservation) for reservation in reservations))
    try:
        await await_for(burst.in_flight)
    finally:
        burst.release()
        await settling
    tokens = [await limiter.aget_request_count(user, "m", unit="tokens") for user in users]
    await burst.storage.aclose()
    burst.check_settled(users, tokens)


def storage(target: Any) -> RedisStorage:
    return RedisStorage(
        target, key_prefix=unique_prefix(), timeout=WAIT, breaker=CircuitBreaker(failures=10**6)
    )


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_more_settlements_in_flight_than_a_redis_py_pool_holds_all_reach_redis(
    redis_server: RedisServer, mode: str
) -> None:
    proxy = StallingProxy(redis_server.port, stall_on=SETTLEMENT)
    check = redis_server.client()
    users = [f"user{index}" for index in range(IN_FLIGHT)]
    try:
        burst = Burst(storage(proxy.url), [proxy], [check])
        if mode == "sync":
            sync_burst(burst, users)
        else:
            asyncio.run(async_burst(burst, users))
    finally:
        proxy.close()
        check.close()


@pytest.fixture
def proxied_cluster(redis_cluster: RedisCluster) -> Iterator[tuple[list[StallingProxy], Callable[..., Any]]]:
    """A proxy in front of every node of the cluster (named by ``address_remap``), holding settlements."""
    proxies = {port: StallingProxy(port, stall_on=SETTLEMENT) for port in redis_cluster.ports}

    def remap(address: tuple[str, int]) -> tuple[str, int]:
        host, port = address
        return (host, proxies[port].port) if port in proxies else address

    try:
        yield list(proxies.values()), remap
    finally:
        for proxy in proxies.values():
            proxy.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_more_settlements_in_flight_on_one_cluster_node_than_its_pool_holds_all_reach_redis(
    redis_cluster: RedisCluster, proxied_cluster: tuple[list[StallingProxy], Callable[..., Any]], mode: str
) -> None:
    proxies, remap = proxied_cluster
    check = redis_cluster.client()
    node = check.nodes_manager.get_node_from_slot(key_slot(b"user0"))
    users = [
        name
        for name in (f"user{index}" for index in range(20 * IN_FLIGHT))
        if check.nodes_manager.get_node_from_slot(key_slot(name.encode())) is node
    ][:IN_FLIGHT]
    assert len(users) == IN_FLIGHT  # all on one node: its pool holds every connection of the burst
    address = {"host": "127.0.0.1", "port": redis_cluster.ports[0], "address_remap": remap}
    try:
        if mode == "sync":
            sync_burst(Burst(storage(redis.cluster.RedisCluster(**address)), proxies, [check]), users)
        else:
            client = redis.asyncio.cluster.RedisCluster(**address)
            asyncio.run(async_burst(Burst(storage(client), proxies, [check]), users))
    finally:
        check.close()


@pytest.mark.parametrize("on_error", ["allow", "deny", "local"])
def test_a_call_that_finds_its_pool_full_is_answered_by_the_policy_and_is_no_failure_of_redis(
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    on_error: Any,
) -> None:
    """Should a pool of the limiter's be full (a cap of 1 here, its one connection taken), the call never
    reaches Redis: the policy answers it, a warning says why, and the breaker (opened by one failure here)
    does not count it; the next call, with the connection back, is decided by Redis."""
    monkeypatch.setattr(clients, "_MAX_CONNECTIONS", 1)
    target = RedisStorage(
        redis_server.url, key_prefix=unique_prefix(), on_error=on_error, breaker=CircuitBreaker(failures=1)
    )
    limiter = RateLimiter(limit="10/minute", storage=target)
    assert type(limiter.check("alice", "m")) is Decision
    pool: Any = target.connection._sync_transport().pool
    taken = pool.get_connection()
    with caplog.at_level(logging.WARNING, logger="ratelimit_middleware"):
        try:
            decision: Any = limiter.check("alice", "m")
        except RateLimiterUnavailable as error:
            decision = error
    expected = {"allow": UncheckedDecision, "deny": RateLimiterUnavailable, "local": LocalDecision}[on_error]
    assert isinstance(decision, expected)
    assert not target.breaker.is_open
    assert "connection pool being full" in caplog.text
    assert "cannot be reached" not in caplog.text
    pool.release(taken)
    decision = limiter.check("alice", "m")
    assert type(decision) is Decision and decision.remaining == 8
    target.close()
