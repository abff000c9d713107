"""A misconfigured limiter, on real servers: a wrong password, ACL permissions, a replica, a database that
does not exist, a cluster node taken for a standalone Redis and the other way round.

Such a failure will not pass by itself: it is logged at error level from the first one, saying what to
change, and named by ``RateLimiterUnavailable`` (its ``__cause__`` the Redis error); the policy still
answers it. And a Redis user with exactly the ACL the docs give can do everything the limiter does.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from ratelimit_middleware import ALGORITHMS, Limits, MultiTierRateLimiter, RateLimiter, RedisStorage
from ratelimit_middleware.backends.redis import CircuitBreaker
from ratelimit_middleware.backends.redis.misconfig import CLUSTER_COMMANDS, COMMANDS, acl
from ratelimit_middleware.errors import RateLimiterUnavailable, UncheckedDecision

from .conftest import FakeClock, unique_prefix
from .redis_server import RedisCluster, RedisServer
from .stalling_proxy import StallingProxy

ROOT = Path(__file__).resolve().parent.parent
LUA = ROOT / "ratelimit_middleware" / "backends" / "redis" / "lua"


@pytest.fixture
def admin(server: RedisServer) -> Iterator[redis.Redis]:
    client = server.client()
    yield client
    client.close()


def add_user(admin: redis.Redis, name: str, *rules: str) -> None:
    admin.execute_command("ACL", "SETUSER", name, "reset", "on", ">pw", *rules)


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "ratelimit_middleware" and record.levelno == logging.ERROR
    ]


def denied(limiter: Any) -> RateLimiterUnavailable:
    """The error of a decision that ``on_error="deny"`` answered."""
    with pytest.raises(RateLimiterUnavailable) as raised:
        limiter.check("alice", "m")
    return raised.value


def storage(url: str, prefix: str | None = None, timeout: float = 2.0, **options: Any) -> RedisStorage:
    options.setdefault("on_error", "deny")
    return RedisStorage(url, key_prefix=prefix or unique_prefix(), timeout=timeout, **options)


# -- the ACL a limiter's user needs --------------------------------------------------------------------------


def test_the_commands_named_are_those_the_scripts_and_the_storage_send() -> None:
    called = set()
    for script in LUA.glob("*.lua"):
        called |= {name.lower() for name in re.findall(r"redis\.call\('([A-Z]+)'", script.read_text())}
        called |= {name.lower() for name in re.findall(r"chunked\('([A-Z]+)'", script.read_text())}
    assert set(COMMANDS) == called | {"evalsha", "eval", "del"}  # the scripts, NOSCRIPT's EVAL, reset's DEL


def test_the_docs_give_the_acl() -> None:
    text = (ROOT / "INTEGRATION.md").read_text()
    assert f"ACL SETUSER limiter on >secret {acl('myapi')}\n" in text
    assert " ".join(f"+{command}" for command in CLUSTER_COMMANDS) in text


@pytest.mark.parametrize("database", [0, 3])
def test_a_user_with_exactly_the_documented_acl_can_do_everything(
    server: RedisServer, admin: redis.Redis, database: int
) -> None:
    """Every algorithm's decisions, reservations (tokens, concurrency leases), settlement, renewal, counts
    and reset, with Redis' own clock (TIME) and the scripts loaded by EVAL (a fresh server)."""
    prefix = unique_prefix()
    add_user(admin, "limiter", *acl(prefix).split(), *(["+select"] if database else []))
    url = f"redis://limiter:pw@127.0.0.1:{server.port}/{database}"
    for algorithm in sorted(ALGORITHMS):
        limiter = MultiTierRateLimiter(
            per_user=Limits(requests="5/minute", tokens="100/minute", max_concurrent=2),
            per_model="50/minute",
            algorithm=algorithm,
            storage=storage(url, prefix),
        )
        assert type(limiter.check("alice", "m")).__name__ == "Decision"
        reservation = limiter.reserve("alice", "m", input_tokens=10, output_tokens=5)
        assert reservation.allowed and reservation.renew()
        reservation.settle(3, 2)
        counts = {(rule.tier, rule.unit): used for rule, used in limiter.counts("alice", "m")}
        assert counts[("per_user", "requests")] == 2 and counts[("per_user", "tokens")] == 5
        limiter.reset("alice", "m")
        assert all(used == 0 for rule, used in limiter.counts("alice", "m") if rule.tier == "per_user")

        async def decide(limiter: MultiTierRateLimiter = limiter) -> bool:
            allowed, _ = await limiter.aallow("bob", "m")
            await limiter.storage.aclose()  # type: ignore[attr-defined]
            return allowed

        assert asyncio.run(decide())


@pytest.mark.parametrize(
    ("removed", "named"),
    [("-time", "can't run this command"), ("-evalsha", "'evalsha'"), ("-select", "'select'")],
)
def test_a_missing_permission_is_named_from_the_first_failure(
    server: RedisServer, admin: redis.Redis, caplog: pytest.LogCaptureFixture, removed: str, named: str
) -> None:
    prefix = unique_prefix()
    add_user(admin, "limiter", *acl(prefix).split(), "+select", removed)
    limiter = RateLimiter(
        limit="5/minute", storage=storage(f"redis://limiter:pw@127.0.0.1:{server.port}/2", prefix)
    )
    error = denied(limiter)
    assert isinstance(error.__cause__, redis.ResponseError)
    for said in (str(error), *errors(caplog)):
        assert "lacks a permission" in said and named in said and "+evalsha +eval +time" in said
        assert f"~{prefix}:*" in said and "+select" in said
    assert len(errors(caplog)) == 1  # the first failure, at error level


def test_keys_out_of_the_users_reach_are_named(
    server: RedisServer, admin: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = unique_prefix()
    add_user(admin, "limiter", *acl("other").split())
    limiter = RateLimiter(
        limit="5/minute", storage=storage(f"redis://limiter:pw@127.0.0.1:{server.port}", prefix)
    )
    error = denied(limiter)
    assert "no permissions to access one of the keys" in str(error) and f"~{prefix}:*" in str(error)
    assert len(errors(caplog)) == 1


# -- credentials, replicas, databases ------------------------------------------------------------------------


def test_wrong_credentials_are_named_and_logged_once_a_minute(
    server: RedisServer, admin: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    add_user(admin, "limiter", "~*", "+@all")
    breaker_clock = FakeClock()
    limiter = RateLimiter(
        limit="5/minute",
        storage=storage(
            f"redis://limiter:wrong@127.0.0.1:{server.port}",
            breaker=CircuitBreaker(failures=100, clock=breaker_clock),
        ),
    )
    error = denied(limiter)
    assert isinstance(error.__cause__, redis.AuthenticationError)
    assert "refused the limiter's credentials" in str(error) and "wrong" not in str(error)
    assert len(errors(caplog)) == 1 and "refused the limiter's credentials" in errors(caplog)[0]
    assert "cannot be reached" not in caplog.text  # no outage: Redis answered
    denied(limiter)
    breaker_clock.advance(30)
    denied(limiter)
    assert len(errors(caplog)) == 1
    breaker_clock.advance(31)
    denied(limiter)
    assert len(errors(caplog)) == 2


def test_wrong_credentials_are_named_over_a_slow_link(
    server: RedisServer, admin: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """The refusal of a connection's setup longer than a call may wait (120 ms round trips, a 0.1 s timeout)
    reaches the next call, which names it: it is not lost with the call that ran out of time."""
    add_user(admin, "limiter", "~*", "+@all")
    proxy = StallingProxy(server.port, delay=0.06)
    url = f"redis://limiter:wrong@127.0.0.1:{proxy.port}"
    limiter = RateLimiter(
        limit="5/minute", storage=storage(url, timeout=0.1, breaker=CircuitBreaker(failures=100))
    )
    try:
        said = [str(denied(limiter)) for _ in range(3)]
    finally:
        proxy.close()
    assert "TimeoutError" in said[0]  # the first call cannot see the setup's end
    assert any("refused the limiter's credentials" in message for message in said[1:]), said
    assert len(errors(caplog)) == 1


@pytest.mark.parametrize("methods", ["sync", "async"])
@pytest.mark.parametrize(
    ("cluster", "path", "named"), [(False, "/42", "no such database"), (True, "", "is not a Redis Cluster")]
)
def test_a_refusal_over_a_slow_link_is_named_by_every_call_after_it(
    server: RedisServer, methods: str, cluster: bool, path: str, named: str
) -> None:
    """A setup (or a first mapping) refused after its calls ran out of time, three 60 ms round trips against
    a 0.15 s timeout, is named by the calls after it: not thrown away (a mapping was), and not tried again
    at once, which would outlast the next call too and read as an outage, alternating with the refusal."""
    proxy = StallingProxy(server.port, delay=0.03)
    scheme = "redis+cluster" if cluster else "redis"
    url = f"{scheme}://127.0.0.1:{proxy.port}{path}"
    limiter = RateLimiter(
        limit="5/minute", storage=storage(url, timeout=0.15, breaker=CircuitBreaker(failures=100))
    )

    async def said_async() -> list[str]:
        said = []
        for _ in range(15):
            with pytest.raises(RateLimiterUnavailable) as raised:
                await limiter.acheck("alice", "m")
            said.append(str(raised.value))
        return said

    try:
        said = asyncio.run(said_async()) if methods == "async" else [str(denied(limiter)) for _ in range(15)]
    finally:
        proxy.close()
    first = next((index for index, message in enumerate(said) if named in message), len(said))
    assert first < 10, said
    assert all(named in message for message in said[first:]), said


def test_a_replica_is_named(server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    replica = RedisServer(tmp_path / "replica", "--replicaof", "127.0.0.1", str(server.port))
    (tmp_path / "replica").mkdir()
    replica.start()
    try:
        limiter = RateLimiter(limit="5/minute", storage=storage(replica.url, on_error="allow"))
        assert isinstance(limiter.check("alice", "m"), UncheckedDecision)  # the policy still answers
        assert len(errors(caplog)) == 1 and "read-only replica" in errors(caplog)[0]
        assert "use the primary" in errors(caplog)[0]
    finally:
        replica.stop()


def test_a_database_that_does_not_exist_is_named(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    error = denied(RateLimiter(limit="5/minute", storage=storage(f"{server.url}/99")))
    assert "no such database" in str(error) and "DB index is out of range" in str(error)
    assert len(errors(caplog)) == 1


def test_an_outage_names_its_error_too(server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    limiter = RateLimiter(limit="5/minute", storage=storage(server.url))
    server.kill()
    error = denied(limiter)
    assert str(error).startswith("the rate limiter cannot reach Redis (ConnectionError: ")
    assert isinstance(error.__cause__, redis.ConnectionError)
    assert errors(caplog) == []  # an outage passes: the breaker's warning says it, not an error


# -- clusters ------------------------------------------------------------------------------------------------


def test_a_cluster_node_taken_for_a_standalone_redis_is_named(
    redis_cluster: RedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A node's redis:// URL answers the keys of its own slots and MOVED for the others: those failed open,
    logged as "Redis cannot be reached"; a decision with keys on two slots got CROSSSLOT."""
    node = redis_cluster.nodes[0]
    client = redis_cluster.client()
    try:
        elsewhere = next(
            user for user in (f"user{i}" for i in range(100))
            if client.get_node_from_key(user).port != node.port
        )  # fmt: skip
    finally:
        client.close()
    limiter = RateLimiter(limit="5/minute", storage=storage(node.url))
    with pytest.raises(
        RateLimiterUnavailable, match=r"is a Redis Cluster node \(MovedError: .*redis\+cluster://"
    ):
        limiter.check(elsewhere, "m")
    assert len(errors(caplog)) == 1 and "redis+cluster://" in errors(caplog)[0]
    tiers = MultiTierRateLimiter(per_user="5/minute", per_model="9/minute", storage=storage(node.url))
    user = next(f"u{i}" for i in range(1000) if key_slot(f"u{i}".encode()) != key_slot(b"m"))
    with pytest.raises(
        RateLimiterUnavailable, match=r"is a Redis Cluster node \((MovedError|ClusterCrossSlotError)"
    ):
        tiers.check(user, "m")


@pytest.fixture
def cluster_user(redis_cluster: RedisCluster) -> Iterator[str]:
    """A key prefix of its own, and a user ``limiter`` (password ``pw``) on every node, deleted after."""
    yield unique_prefix()
    for node in redis_cluster.nodes:
        client = node.client()
        client.execute_command("ACL", "DELUSER", "limiter")
        client.close()


def set_cluster_user(redis_cluster: RedisCluster, *rules: str) -> str:
    for node in redis_cluster.nodes:
        client = node.client()
        add_user(client, "limiter", *rules)
        client.close()
    return f"redis+cluster://limiter:pw@127.0.0.1:{redis_cluster.ports[0]}"


def test_a_cluster_user_with_exactly_the_documented_acl_can_do_everything(
    redis_cluster: RedisCluster, cluster_user: str
) -> None:
    url = set_cluster_user(redis_cluster, *acl(cluster_user, cluster=True).split())
    limiter = MultiTierRateLimiter(
        per_user=Limits(requests="5/minute", tokens="100/minute", max_concurrent=2),
        per_model="50/minute",  # on another slot: reservations and refunds across slots
        storage=storage(url, cluster_user),
    )
    assert type(limiter.check("alice", "m")).__name__ == "Decision"
    reservation = limiter.reserve("alice", "m", input_tokens=10, output_tokens=5)
    assert reservation.allowed and reservation.renew()
    reservation.settle(3, 2)
    limiter.reset("alice", "m")
    assert all(used == 0 for rule, used in limiter.counts("alice", "m") if rule.tier == "per_user")

    async def decide() -> bool:
        allowed, _ = await limiter.aallow("bob", "m")
        await limiter.storage.aclose()  # type: ignore[attr-defined]
        return allowed

    assert asyncio.run(decide())


def test_a_missing_cluster_permission_is_named(
    redis_cluster: RedisCluster, cluster_user: str, caplog: pytest.LogCaptureFixture
) -> None:
    """redis-py's cluster client reports a refused CLUSTER SLOTS as "Cluster mode is not enabled"."""
    url = set_cluster_user(redis_cluster, *acl(cluster_user).split())  # the standalone rules only
    error = denied(RateLimiter(limit="5/minute", storage=storage(url, cluster_user)))
    assert "lacks a permission" in str(error) and "'cluster|slots'" in str(error)
    assert "+cluster|slots +command +asking" in str(error) and len(errors(caplog)) == 1


def test_a_standalone_redis_taken_for_a_cluster_is_named(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = RateLimiter(limit="5/minute", storage=storage(f"redis+cluster://127.0.0.1:{server.port}"))
    error = denied(limiter)
    assert "is not a Redis Cluster" in str(error) and "use a redis:// URL" in str(error)
    assert len(errors(caplog)) == 1
