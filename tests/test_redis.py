"""The Redis backend beyond the shared contract: clients, key layout, scripts, round trips, TTLs, time.

Every behaviour test of the other modules already runs on Redis and async Redis through the ``storage``
fixture; here are the facts only Redis has, all against the session's real redis-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.cluster
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from ratelimit_middleware import (
    ALGORITHMS,
    MemoryStorage,
    MultiTierRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    RedisStorage,
)
from ratelimit_middleware.backends.redis.keyspace import escape, rule_key_maker
from ratelimit_middleware.backends.redis.scripts import script_for
from ratelimit_middleware.backends.redis.storage import CLOCK_TTL_PAD_MS
from ratelimit_middleware.errors import RateLimiterUnavailable
from ratelimit_middleware.policy import Policy

from .conftest import CONTRACT_TIMEOUT, FakeClock, live_server, unique_prefix
from .redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    yield client
    client.close()


def keys_under(client: redis.Redis, prefix: str) -> list[bytes]:
    return sorted(client.scan_iter(match=f"{prefix}:*", count=1000))


def window_of(key: bytes) -> float:
    """The window in a key name: ``...:<limit>/<window>:...``."""
    segment = next(part for part in key.split(b":") if b"/" in part)
    return float(segment.split(b"/")[1].split(b"#")[0])


def redis_tag(key: bytes) -> bytes:
    """What Redis Cluster hashes: the text in the first ``{...}`` if non-empty, else the whole key."""
    start = key.find(b"{")
    end = key.find(b"}", start + 1)
    return key[start + 1 : end] if start >= 0 and end > start + 1 else key


# -- the API -------------------------------------------------------------------------------------------


def test_issue_example_works_as_written(redis_server: RedisServer) -> None:
    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    limiter = RedisRateLimiter(client)
    try:
        assert limiter.allow("alice", "gpt-4")
        decision = limiter.check("alice", "gpt-4")
        assert (decision.limit, decision.window_seconds, decision.remaining) == (100, 3600.0, 98)
        assert limiter.policy.algorithm == "sliding_log"
        key = b"ratelimit:sliding_log:per_user_model:100/3600:{alice}:gpt-4"
        assert client.zcard(key) == 2
    finally:
        limiter.reset("alice", "gpt-4")
        client.close()


def test_exports_are_lazy_and_the_package_imports_without_redis() -> None:
    code = """
import sys
import ratelimit_middleware
assert "redis" not in sys.modules, "importing the package must not import redis"
assert ratelimit_middleware.RedisRateLimiter.__name__ == "RedisRateLimiter"
assert "RedisStorage" in dir(ratelimit_middleware)
for name in [n for n in sys.modules if n == "redis" or n.startswith(("redis.", "ratelimit_middleware"))]:
    del sys.modules[name]
sys.modules["redis"] = None  # as if redis were not installed
import ratelimit_middleware
assert ratelimit_middleware.RateLimiter(1, 60).allow("u", "m")
try:
    from ratelimit_middleware import RedisRateLimiter
except ImportError as error:
    print(error)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "pip install 'ratelimit-middleware[redis]'" in result.stdout


def test_lua_scripts_ship_as_package_data() -> None:
    lua = files("ratelimit_middleware.backends.redis") / "lua"
    names = sorted(entry.name for entry in lua.iterdir() if entry.name.endswith(".lua"))
    assert names == sorted(
        ["common.lua", "concurrency.lua", "driver.lua", *(f"{name}.lua" for name in ALGORITHMS)]
    )
    assert '"backends/redis/lua/*.lua"' in (ROOT / "pyproject.toml").read_text()
    for name in ALGORITHMS:
        assert "local function evaluate" in script_for(name).source


def test_redis_rate_limiter_is_a_rate_limiter_on_redis_storage(client: redis.Redis) -> None:
    limiter = RedisRateLimiter(
        client, limit="2/minute", algorithm="gcra", key_prefix=unique_prefix(), timeout=CONTRACT_TIMEOUT
    )
    assert isinstance(limiter, RateLimiter) and isinstance(limiter.storage, RedisStorage)
    assert limiter.allow("u", "m") and limiter.allow("u", "m") and not limiter.allow("u", "m")
    with pytest.raises(TypeError, match="not both"):
        RedisRateLimiter(client, 10, limit="7/hour")


def test_len_is_not_available_on_redis(client: redis.Redis) -> None:
    limiter = MultiTierRateLimiter(per_model="5/minute", storage=RedisStorage(client))
    with pytest.raises(TypeError, match="keys live in Redis"):
        len(limiter)
    assert limiter  # an empty limiter is still truthy


# -- clients -------------------------------------------------------------------------------------------


def test_a_sync_client_serves_the_sync_methods_only(client: redis.Redis) -> None:
    limiter = RedisRateLimiter(client, 2, 60, key_prefix=unique_prefix(), timeout=CONTRACT_TIMEOUT)
    assert limiter.allow("u", "m")

    async def scenario() -> None:
        calls: list[Callable[[], Any]] = [
            lambda: limiter.aallow("u", "m"),
            lambda: limiter.acheck("u", "m", cost=100),  # even a cost that needs no round trip
            lambda: limiter.aget_request_count("u", "m"),
            lambda: limiter.areset("u", "m"),
        ]
        for call in calls:
            with pytest.raises(TypeError, match=r"sync client \(redis.Redis or .*use the sync methods"):
                await call()

    asyncio.run(scenario())
    assert limiter.get_request_count("u", "m") == 1


def test_an_asyncio_client_serves_the_async_methods_only(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        client = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            limiter = RedisRateLimiter(client, 2, 60, key_prefix=unique_prefix(), timeout=CONTRACT_TIMEOUT)
            assert await limiter.aallow("u", "m")
            assert await limiter.aget_request_count("u", "m") == 1
            calls: list[Callable[[], Any]] = [
                lambda: limiter.allow("u", "m"),
                lambda: limiter.check("u", "m", cost=100),
                lambda: limiter.get_request_count("u", "m"),
                lambda: limiter.reset("u", "m"),
            ]
            for call in calls:
                with pytest.raises(TypeError, match=r"asyncio client.*use the async methods"):
                    call()
            await limiter.areset("u", "m")
            assert await limiter.aget_request_count("u", "m") == 0
        finally:
            await client.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", ["redis", "unix"])
def test_a_url_serves_both_kinds_of_method(redis_server: RedisServer, kind: str) -> None:
    url = redis_server.url if kind == "redis" else f"unix://{redis_server.socket_path}"
    storage = RedisStorage(url, key_prefix=unique_prefix(), timeout=CONTRACT_TIMEOUT)
    limiter = MultiTierRateLimiter(per_user="3/minute", storage=storage)
    assert limiter.allow("u", "a")[0]

    async def scenario(expected: int) -> None:
        assert (await limiter.aallow("u", "b"))[0]
        assert await limiter.aget_request_count("u", "c") == expected
        await storage.aclose()

    asyncio.run(scenario(2))
    asyncio.run(scenario(3))  # a new event loop gets an asyncio client of its own
    assert limiter.get_request_count("u", "d") == 3 and not limiter.allow("u", "d")[0]
    storage.close()


@pytest.mark.parametrize("scheme", ["REDIS", "Redis", "UNIX"])
def test_url_schemes_are_case_insensitive(redis_server: RedisServer, scheme: str) -> None:
    """redis-py takes its schemes in lower case only: "REDIS://..." was refused as a URL of no scheme."""
    rest = redis_server.url.partition("://")[2] if scheme != "UNIX" else redis_server.socket_path
    url = f"{scheme}://{rest}"
    limiter = RedisRateLimiter(url, limit="1/minute", key_prefix=unique_prefix(), timeout=CONTRACT_TIMEOUT)
    assert [limiter.allow("u", "m") for _ in range(2)] == [True, False]

    async def scenario() -> None:
        assert not await limiter.aallow("u", "m")
        await limiter.storage.aclose()

    asyncio.run(scenario())
    limiter.storage.close()


def test_a_tls_url_is_tls_in_any_case() -> None:
    storage = RedisStorage("Rediss://127.0.0.1:1?ssl_cert_reqs=none")  # nothing listens: never connected
    assert issubclass(storage.connection.endpoint.sync_pool().connection_class, redis.SSLConnection)


@pytest.mark.parametrize("options", [{"decode_responses": True}, {"protocol": 3}, {"protocol": 2}])
def test_client_options_do_not_change_decisions(redis_server: RedisServer, options: dict[str, Any]) -> None:
    client = redis_server.client(**options)
    clock = FakeClock()
    limiter = RedisRateLimiter(
        client, 2, 10, key_prefix=unique_prefix(), clock=clock, timeout=CONTRACT_TIMEOUT
    )
    memory = RateLimiter(2, 10, clock=clock)
    for _ in range(3):
        assert limiter.check("u", "m") == memory.check("u", "m")
        clock.advance(0.3)
    assert limiter.get_request_count("u", "m") == 2
    client.close()


@pytest.mark.parametrize("url", ["http://localhost:6379", "localhost:6379", ""])
def test_bad_urls_name_the_schemes(url: str) -> None:
    with pytest.raises(ValueError, match=r"redis://, rediss://, unix://"):
        RedisStorage(url)


@pytest.mark.parametrize(
    ("query", "named"),
    [("timeout=0.5", "'timeout'"), ("ssl=true", "'ssl'.*rediss://"), ("cluster=true", "'cluster'"),
     ("ssl_cert_reqs=none", "'ssl_cert_reqs'"), ("readonly=true", "'readonly'"),
     ("protocol=4", "protocol must be"), ("socket_timeout=abc", "'socket_timeout'"),
     ("encoding=bogus-enc", "unknown encoding: bogus-enc"),
     ("max_connections=10", "'max_connections' is not an option the limiter takes .*not capped")],
)  # fmt: skip
def test_url_options_the_connections_do_not_take_fail_at_construction(query: str, named: str) -> None:
    """redis-py passes the options it does not know to the connections, which rejected them (TypeError) on
    every call: outside the errors a failure policy answers, so even on_error="deny" let requests through."""
    url = f"redis://:s3cret@127.0.0.1:6379/0?{query}"
    with pytest.raises(
        ValueError, match=rf"^Redis URL 'redis://:\*\*\*@127\.0\.0\.1:6379/0\?{query}': .*{named}"
    ):
        RedisStorage(url, on_error="deny")


def test_a_database_that_is_no_number_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="the database must be a number, got 'abc'"):
        RedisStorage("redis://127.0.0.1:6379/abc")  # redis-py ignored it: database 0


@pytest.mark.parametrize("url", ["unix://", "unix:///", "UNIX://?db=1", "unix://redis.sock"])
def test_a_unix_url_that_names_no_socket_fails_at_construction(url: str) -> None:
    """It was accepted, and every call then failed to connect (to the socket path "", which redis-py reads
    from the URL's path only), which the failure policy answered."""
    with pytest.raises(ValueError, match=rf"^Redis URL '{re.escape(url)}': it names no socket"):
        RedisStorage(url)


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:1/3?socket_timeout=7&client_name=api", "unix:///tmp/r.sock?db=2"]
)
def test_url_options_the_connections_take_are_accepted(url: str) -> None:
    RedisStorage(url)


@pytest.mark.parametrize("client", [6379, None, object(), b"redis://localhost"])
def test_other_objects_are_not_clients(client: object) -> None:
    with pytest.raises(TypeError, match=r"client must be a redis\.Redis"):
        RedisRateLimiter(client)  # type: ignore[arg-type]


def test_pipelines_are_refused(client: redis.Redis) -> None:
    with pytest.raises(TypeError, match="not a pipeline"):
        RedisStorage(client.pipeline())


@pytest.mark.parametrize(("prefix", "error"), [("", ValueError), ("a{b}", ValueError), (5, TypeError)])
def test_bad_key_prefixes(client: redis.Redis, prefix: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="key_prefix"):
        RedisStorage(client, key_prefix=prefix)  # type: ignore[arg-type]


def test_clock_must_be_callable(client: redis.Redis) -> None:
    with pytest.raises(TypeError, match="clock"):
        RedisStorage(client, clock=12.0)  # type: ignore[arg-type]


def test_construction_never_contacts_redis() -> None:
    RedisRateLimiter("redis://127.0.0.1:1", 5, 60)
    RedisRateLimiter("rediss://cache.invalid:6380/0", 5, 60)
    RedisRateLimiter(redis.asyncio.Redis(port=1), 5, 60)
    limiter = MultiTierRateLimiter(
        per_model="5/minute", storage=RedisStorage(redis.Redis(port=1), on_error="deny")
    )
    with pytest.raises(RateLimiterUnavailable) as raised:
        limiter.allow("u", "m")  # the first call is the first contact
    assert isinstance(raised.value.__context__, redis.ConnectionError)


# -- keys ----------------------------------------------------------------------------------------------

ALL_TIERS = [("per_user_model", "5/minute"), ("per_model", "100/hour"), ("per_user", "10/minute;50/hour")]


def test_key_names_read_as_prefix_algorithm_tier_limit_and_identity(client: redis.Redis) -> None:
    prefix = unique_prefix()
    limiter = MultiTierRateLimiter(
        per_user_model="5/minute",
        per_model="100/hour",
        per_user="10/minute;50/hour",
        global_limit="2/1.5 seconds",  # a window in decimals; its key lives 0.75 s (1000 per 0.5 s: 0.5 ms)
        algorithm="gcra",
        storage=RedisStorage(client, key_prefix=prefix, timeout=CONTRACT_TIMEOUT),
    )
    limiter.allow("alice", "gpt-4")
    assert keys_under(client, prefix) == sorted(
        f"{prefix}:gcra:{name}".encode()
        for name in [
            "per_user_model:5/60:{alice}:gpt-4",
            "per_model:100/3600:{gpt-4}",
            "per_user:10/60:{alice}",
            "per_user:50/3600:{alice}",
            "global:2/1.5:{global}",
        ]
    )


@pytest.mark.parametrize(
    ("text", "escaped"),
    [
        ("alice", b"alice"),
        ("a:b", b"a%3Ab"),
        ("{tag}", b"%7Btag%7D"),
        ("100%", b"100%25"),
        ("%3A", b"%253A"),
        ("", b"%"),
        ("\u00e9\x00", "\u00e9\x00".encode()),
        ("\ud800", b"\xed\xa0\x80"),  # a lone surrogate still gets a key of its own
    ],
)
def test_escaping(text: str, escaped: bytes) -> None:
    assert escape(text) == escaped


def _keys_of(user: str, model: str) -> list[bytes]:
    policy = Policy([*ALL_TIERS, ("global", "1/second")], "sliding_log")
    key = rule_key_maker("p", policy)
    return [key(rule, user, model) for rule in policy.rules]


@settings(max_examples=150, deadline=None)
@given(first=st.tuples(st.text(), st.text()), second=st.tuples(st.text(), st.text()))
def test_distinct_identities_never_share_a_key(first: tuple[str, str], second: tuple[str, str]) -> None:
    if first != second:
        assert _keys_of(*first)[0] != _keys_of(*second)[0]  # per_user_model, both parts
    if first[0] != second[0]:
        assert _keys_of(*first)[3] != _keys_of(*second)[3]  # per_user
    if first[1] != second[1]:
        assert _keys_of(*first)[1] != _keys_of(*second)[1]  # per_model


@settings(max_examples=150, deadline=None)
@given(user=st.text(), model=st.text(), other=st.text())
def test_user_input_cannot_choose_the_hash_tag(user: str, model: str, other: str) -> None:
    """The tag is always the escaped user (or model): input with braces cannot move a key to another slot,
    and every key of one user, whatever the model, shares one slot."""
    per_user_model, per_model, per_user, per_user_hour, global_ = _keys_of(user, model)
    assert redis_tag(per_user_model) == redis_tag(per_user) == redis_tag(per_user_hour) == escape(user)
    assert redis_tag(per_model) == escape(model)
    assert redis_tag(global_) == b"global"
    slot = key_slot(per_user_model)
    assert key_slot(_keys_of(user, other)[0]) == slot == key_slot(per_user)


def test_braces_in_user_input_do_not_form_a_tag() -> None:
    per_user_model = _keys_of("x}{evil", "{evil}")[0]
    assert per_user_model == b"p:sliding_log:per_user_model:5/60:{x%7D%7Bevil}:%7Bevil%7D"
    assert key_slot(per_user_model) == key_slot(b"{x%7D%7Bevil}")


def test_repeated_windows_get_keys_of_their_own(client: redis.Redis) -> None:
    prefix = unique_prefix()
    limiter = RateLimiter(
        limit="2/minute;2/minute", storage=RedisStorage(client, key_prefix=prefix, timeout=CONTRACT_TIMEOUT)
    )
    assert limiter.allow("u", "m") and limiter.allow("u", "m") and not limiter.allow("u", "m")
    base = f"{prefix}:sliding_log:per_user_model:2/60"
    assert keys_under(client, prefix) == [f"{base}#2:{{u}}:m".encode(), f"{base}:{{u}}:m".encode()]


# -- scripts and round trips ---------------------------------------------------------------------------


def command_calls(client: redis.Redis, *names: str) -> dict[str, int]:
    """How many times the server has run each command, from INFO commandstats."""
    stats = client.info("commandstats")
    return {name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in names}


def test_one_round_trip_per_decision_whatever_the_tiers(client: redis.Redis, algorithm: str) -> None:
    storage = RedisStorage(client, key_prefix=unique_prefix(), timeout=CONTRACT_TIMEOUT)
    limiter = MultiTierRateLimiter(
        per_user_model="5/minute;20/hour",
        per_model="100/minute;1000/hour",
        per_user="10/minute;50/hour",
        global_limit="1000/minute;9000/hour",
        algorithm=algorithm,
        storage=storage,
    )
    limiter.check("alice", "gpt-4")
    assert storage.connection.round_trips in (1, 2)  # EVAL loads the script on its first use
    before = command_calls(client, "evalsha", "eval", "del")
    storage.connection.round_trips = 0
    for _ in range(7):
        limiter.check("alice", "gpt-4")
    assert limiter.get_request_count("alice", "gpt-4", tier="per_user") == 5
    limiter.reset("alice", "gpt-4")
    assert storage.connection.round_trips == 7 + 2
    after = command_calls(client, "evalsha", "eval", "del")
    assert {name: after[name] - before[name] for name in after} == {"evalsha": 8, "eval": 0, "del": 1}


def test_a_denied_request_writes_nothing(client: redis.Redis, algorithm: str) -> None:
    prefix = unique_prefix()
    storage = RedisStorage(client, key_prefix=prefix, timeout=CONTRACT_TIMEOUT)
    limiter = MultiTierRateLimiter(
        per_user_model="5/minute", per_model="1/minute", algorithm=algorithm, storage=storage
    )
    limiter.allow("alice", "gpt-4")
    before = {key: client.dump(key) for key in keys_under(client, prefix)}
    for _ in range(5):
        assert not limiter.allow("alice", "gpt-4")[0]
    assert {key: client.dump(key) for key in keys_under(client, prefix)} == before


def test_scripts_recover_after_script_flush(client: redis.Redis, algorithm: str) -> None:
    # an hour: Redis's own clock runs on, and a minute's GCRA frees a request every 20 s of a slow run
    limiter = RedisRateLimiter(
        client, 3, 3600, algorithm=algorithm, key_prefix=unique_prefix(), timeout=CONTRACT_TIMEOUT
    )
    connection = limiter.storage.connection
    assert limiter.allow("u", "m")
    client.script_flush()  # as after a Redis restart
    connection.round_trips = 0
    before = command_calls(client, "evalsha", "eval")
    assert limiter.allow("u", "m")
    after = command_calls(client, "evalsha", "eval")
    # NOSCRIPT, then EVAL, which caches the script again; the script ran once.
    assert (after["evalsha"] - before["evalsha"], after["eval"] - before["eval"]) == (1, 1)
    assert connection.round_trips == 2
    assert client.script_exists(script_for(algorithm).sha) == [True]
    assert limiter.allow("u", "m") and not limiter.allow("u", "m")
    assert connection.round_trips == 4
    assert limiter.get_request_count("u", "m") == 3


def test_async_scripts_recover_after_script_flush(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        client = redis.asyncio.Redis.from_url(redis_server.url)
        limiter = RedisRateLimiter(client, 3, 60, key_prefix=unique_prefix(), timeout=CONTRACT_TIMEOUT)
        try:
            assert await limiter.aallow("u", "m")
            await client.script_flush()
            assert await limiter.aallow("u", "m")
            assert await limiter.aget_request_count("u", "m") == 2
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_a_large_cost_is_one_entry(client: redis.Redis, algorithm: str) -> None:
    prefix = unique_prefix()
    limiter = RedisRateLimiter(
        client, 10**6, 3600, algorithm=algorithm, key_prefix=prefix, timeout=CONTRACT_TIMEOUT
    )
    assert limiter.allow("u", "m", cost=50_000) and limiter.allow("u", "m", cost=50_000)
    [key] = keys_under(client, prefix)
    if algorithm == "sliding_log":
        assert client.zcard(key) == 2  # one member per request, whatever its cost
    else:
        assert client.type(key) == b"string" and client.strlen(key) < 40
    assert client.memory_usage(key) < 300


# -- TTLs and memory -------------------------------------------------------------------------------------


def test_every_key_expires_within_about_one_window(client: redis.Redis, algorithm: str) -> None:
    prefix = unique_prefix()
    limiter = MultiTierRateLimiter(
        per_user_model="3/10 seconds",
        per_model="50/20 seconds",
        per_user="20/10 seconds;40/40 seconds",
        global_limit="100/30 seconds",
        algorithm=algorithm,
        storage=RedisStorage(client, key_prefix=prefix, timeout=CONTRACT_TIMEOUT),
    )
    for _ in range(3):  # a full burst: GCRA's per_user_model key then needs the whole window to recover
        assert limiter.allow("alice", "gpt-4")[0]
    keys = keys_under(client, prefix)
    assert len(keys) == 5
    windows = 2 if algorithm == "sliding_window" else 1  # the counter needs the previous window too
    for key in keys:
        ttl = client.pttl(key) / 1000
        assert 0 < ttl <= windows * window_of(key), (key, ttl)
        if algorithm == "sliding_log":
            assert ttl > window_of(key) - 1  # one window after the newest entry
    if algorithm == "gcra":
        per_user_model = next(key for key in keys if b"per_user_model" in key)
        assert client.pttl(per_user_model) / 1000 > 9


def test_an_injected_clock_pads_ttls(client: redis.Redis, algorithm: str) -> None:
    prefix = unique_prefix()
    limiter = RedisRateLimiter(
        client, 3, 10, algorithm=algorithm, key_prefix=prefix, clock=FakeClock(), timeout=CONTRACT_TIMEOUT
    )
    limiter.allow("u", "m")
    [key] = keys_under(client, prefix)
    assert CLOCK_TTL_PAD_MS < client.pttl(key) <= CLOCK_TTL_PAD_MS + 20_000


def test_memory_returns_to_baseline_once_users_go_idle(redis_server: RedisServer) -> None:
    """Short windows and Redis' own expiry: the only test that waits, since TTLs run on Redis' clock."""
    client = redis_server.client(db=1)  # a database of its own, so that DBSIZE counts only these keys
    client.flushdb()
    for algorithm in ALGORITHMS:
        limiter = MultiTierRateLimiter(
            per_user_model="3/0.3 seconds",
            per_model="500/0.3 seconds",
            per_user="5/0.2 seconds;9/0.3 seconds",
            global_limit="900/0.3 seconds",
            algorithm=algorithm,
            storage=RedisStorage(client, key_prefix=algorithm, timeout=CONTRACT_TIMEOUT),
        )
        for user in range(40):
            for model in ("a", "b"):
                assert limiter.allow(f"user-{user}", model, cost=2)[0]
    assert client.dbsize() > 0
    assert all(client.pttl(key) != -1 for key in client.scan_iter(count=1000)), "a key without a TTL"
    deadline = time.monotonic() + 3.0  # all expire within 0.6 s; Redis' active expiry then removes them
    while client.dbsize() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.dbsize() == 0, "keys outlived their TTLs"
    client.close()


# -- time ----------------------------------------------------------------------------------------------

_CLOCKS = ["time", "monotonic", "perf_counter"]


@contextlib.contextmanager
def local_clocks_off_by(seconds: float) -> Iterator[None]:
    """Every clock of this process reads ``seconds`` away from the truth."""
    saved: dict[str, Callable[[], Any]] = {}
    for name in _CLOCKS:
        for variant, shift in ((name, seconds), (f"{name}_ns", int(seconds * 1e9))):
            real = saved[variant] = getattr(time, variant)
            setattr(time, variant, lambda real=real, shift=shift: real() + shift)
    try:
        yield
    finally:
        for variant, real in saved.items():
            setattr(time, variant, real)


def test_limiters_whose_clocks_differ_by_minutes_agree(client: redis.Redis, algorithm: str) -> None:
    prefix = unique_prefix()
    ahead = RedisRateLimiter(client, 4, 60, algorithm=algorithm, key_prefix=prefix, timeout=CONTRACT_TIMEOUT)
    behind = RedisRateLimiter(
        live_server().url, 4, 60, algorithm=algorithm, key_prefix=prefix, timeout=CONTRACT_TIMEOUT
    )
    decisions = []
    for turn in range(6):
        limiter, skew = (ahead, 7 * 60.0) if turn % 2 == 0 else (behind, -7 * 60.0)
        with local_clocks_off_by(skew):
            decisions.append(limiter.check("u", "m"))
    assert [decision.allowed for decision in decisions] == [True] * 4 + [False] * 2
    first, second = decisions[4], decisions[5]
    assert 0 < first.retry_after <= 2 * 60 and abs(first.retry_after - second.retry_after) < 1
    assert ahead.get_request_count("u", "m") == behind.get_request_count("u", "m") == 4
    if algorithm == "sliding_log":  # entries carry Redis' time, not either process's
        [key] = keys_under(client, prefix)
        assert all(abs(stamp - time.time()) < 5 for _, stamp in client.zrange(key, 0, -1, withscores=True))
    behind.storage.close()


def test_redis_time_stepping_back_never_readmits(client: redis.Redis, algorithm: str) -> None:
    """Redis' clock can step back (NTP, failover to a replica): a key's state never counts as older."""
    clock = FakeClock(105.0)
    storage = RedisStorage(client, key_prefix=unique_prefix(), clock=clock, timeout=CONTRACT_TIMEOUT)
    limiter = RateLimiter(2, 10, algorithm=algorithm, storage=storage)
    assert limiter.allow("u", "m") and limiter.allow("u", "m") and not limiter.allow("u", "m")
    clock.now = 99.0  # back across a window boundary
    assert not limiter.allow("u", "m")
    if algorithm != "gcra":  # GCRA's count grows as time steps back: it only gets stricter
        assert limiter.get_request_count("u", "m") == 2


# -- the two implementations agree ---------------------------------------------------------------------

CONFIGS = [
    {"per_user_model": "3/4 seconds"},
    {"per_user_model": "2/1 second;5/10 seconds"},
    {"per_user_model": "3/0.7 seconds", "per_model": "5/3 seconds"},
    {"per_user_model": "3/2 seconds", "per_user": "5/4 seconds", "global_limit": "8/8 seconds"},
    {"per_user_model": "2/1 second;2/1 second"},
    {"per_model": "4/2 seconds", "per_user": "0/1 second"},
    {"global_limit": "7/3 seconds"},
    {"per_user_model": "40/3 seconds;90/10 seconds"},  # long logs: the binary search on denial
    {"per_user_model": "200/0.02 seconds"},  # GCRA at Unix times: the rounding allowance capped
]
operations = st.lists(
    st.tuples(
        st.integers(0, 25).map(lambda n: n / 10),  # steps of 0.1 s: inexact floats, on purpose
        st.sampled_from(["a", "b"]),
        st.sampled_from(["x", "y"]),
        st.integers(0, 5),
        st.sampled_from(["check", "check", "check", "check", "count", "reset"]),
    ),
    max_size=50,
)


@settings(max_examples=80, deadline=None)
@given(
    algorithm=st.sampled_from(sorted(ALGORITHMS)),
    config=st.sampled_from(CONFIGS),
    start=st.sampled_from([0.0, 1000.0, 1_750_000_000.123]),
    ops=operations,
)
def test_redis_decides_exactly_as_memory(
    redis_server: RedisServer, algorithm: str, config: dict[str, str], start: float, ops: list[Any]
) -> None:
    """The Lua scripts and the Python algorithms are two implementations of one definition: under the same
    traffic and clock, every decision (floats included, to the bit) and every count are equal."""
    clock = FakeClock(start)
    memory = MultiTierRateLimiter(**config, algorithm=algorithm, storage=MemoryStorage(clock=clock))
    storage = RedisStorage(
        live_server().url, key_prefix=unique_prefix(), clock=clock, timeout=CONTRACT_TIMEOUT
    )
    on_redis = MultiTierRateLimiter(**config, algorithm=algorithm, storage=storage)
    tiers = sorted({rule.tier for rule in memory.policy.rules})
    for step, user, model, cost, operation in ops:
        clock.advance(step)
        if operation == "check":
            assert on_redis.check(user, model, cost) == memory.check(user, model, cost)
        elif operation == "count":
            for tier in tiers:
                expected = memory.get_request_count(user, model, tier)
                assert on_redis.get_request_count(user, model, tier) == expected
        else:
            memory.reset(user, model)
            on_redis.reset(user, model)
    storage.close()


def test_long_busy_keys_agree_with_memory(algorithm: str) -> None:
    """Saturated keys with long logs (hundreds of entries): the denial path's binary search and compaction."""
    traffic = random.Random(4)
    clock = FakeClock(1_750_000_000.0)
    memory = RateLimiter(limit="150/5 seconds;400/20 seconds", algorithm=algorithm, clock=clock)
    storage = RedisStorage(
        live_server().url, key_prefix=unique_prefix(), clock=clock, timeout=CONTRACT_TIMEOUT
    )
    on_redis = RateLimiter(limit="150/5 seconds;400/20 seconds", algorithm=algorithm, storage=storage)
    denied = 0
    for _ in range(1500):
        clock.advance(traffic.choice([0.0, 0.0, 0.01, 0.03, 0.1]))
        cost = traffic.randint(0, 8)
        decision = on_redis.check("u", "m", cost)
        assert decision == memory.check("u", "m", cost)
        denied += not decision.allowed
    assert denied > 300  # the denial path was exercised
    assert on_redis.get_request_count("u", "m") == memory.get_request_count("u", "m")
    storage.close()


def test_the_callers_pool_size_does_not_bound_the_limiter(redis_server: RedisServer) -> None:
    """The caller's client allows 2 connections; 16 threads at once still get exact decisions (a full pool
    would fail them, and fail open)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    client = redis.Redis(
        connection_pool=redis.BlockingConnectionPool(port=redis_server.port, max_connections=2)
    )
    limiter = RedisRateLimiter(client, 10, 60, key_prefix=unique_prefix(), timeout=CONTRACT_TIMEOUT)
    start = threading.Barrier(16)

    def burst(_: int) -> list[bool]:
        start.wait(timeout=30)
        return [limiter.allow("u", "m") for _ in range(10)]

    with ThreadPoolExecutor(16) as pool:
        allowed = sum(sum(answers) for answers in pool.map(burst, range(16)))
    assert allowed == 10
    assert limiter.get_request_count("u", "m") == 10
    client.close()


def test_next_up_is_pythons_nextafter(client: redis.Redis) -> None:
    """common.lua's next_up (Lua 5.1 has no nextafter) gives math.nextafter(x, inf) to the bit: powers of two
    either side of zero, subnormals, the largest float, Unix times."""
    source = (files("ratelimit_middleware.backends.redis") / "lua" / "common.lua").read_text(encoding="utf-8")
    script = (
        f"{source}\nlocal out = {{}}\nfor i, x in ipairs(ARGV) do out[i] = fmt(next_up(tonumber(x))) end\n"
    )
    script += "return out"
    values = [0.0, 5e-324, 2.2250738585072014e-308, 1.0, 0.5, 0.1, 3.0, -1.0, -0.5, -0.1, -5e-324]
    values += [2.0**52, 1.7976931348623157e308, 1750000000.123, 130171.52032118298, 1e300, -1e-310]
    replies = client.eval(script, 0, *(repr(value) for value in values))
    assert [float(reply) for reply in replies] == [math.nextafter(value, math.inf) for value in values]


@pytest.mark.parametrize("window", [0.1, 0.7])
def test_busy_keys_at_unix_times_and_decimal_windows_agree_with_memory(algorithm: str, window: float) -> None:
    """Denials at large clocks and decimal windows, where the waits are raised to the next floats until a
    retry is admitted: the scripts raise them exactly as the Python algorithms do."""
    traffic = random.Random(7)
    clock = FakeClock(1_750_000_000.0 + traffic.random())
    memory = RateLimiter(7, window, algorithm=algorithm, clock=clock)
    storage = RedisStorage(
        live_server().url, key_prefix=unique_prefix(), clock=clock, timeout=CONTRACT_TIMEOUT
    )
    on_redis = RateLimiter(7, window, algorithm=algorithm, storage=storage)
    denied = 0
    for _ in range(600):
        clock.advance(traffic.random() * window / 5)
        cost = traffic.randint(1, 7)
        decision = on_redis.check("u", "m", cost)
        assert decision == memory.check("u", "m", cost)
        if not decision.allowed:
            denied += 1
            clock.advance(decision.retry_after)
            retried = on_redis.check("u", "m", cost)
            assert retried.allowed and retried == memory.check("u", "m", cost)
    assert denied > 100
    storage.close()


MEMORY_ROW = re.compile(r"^\| (\w+) \| (\d+) \| (\d+) B \|", re.MULTILINE)


def test_the_memory_per_key_design_gives_is_what_redis_reports(server: RedisServer) -> None:
    """DESIGN.md's MEMORY USAGE of our keys (medians, with the default key prefix): a few bytes more or less
    of key or value can cross a size class of Redis' allocator (16 bytes apart here)."""
    rows = MEMORY_ROW.findall((ROOT / "DESIGN.md").read_text())
    assert {algorithm for algorithm, _, _ in rows} == set(ALGORITHMS)
    admin = server.client()
    for algorithm, requests, usage in rows:
        admin.flushall()
        limiter = RateLimiter(1000, 3600, algorithm=algorithm, storage=RedisStorage(server.url, timeout=5))
        users = 301 if requests == "1" else 21  # a one-entry log is 136 B for about 38% (its score's digits)
        for user in range(1000, 1000 + users):
            for _ in range(int(requests)):
                limiter.check(f"user-{user}", "m")
        keys = admin.keys("*")
        assert len(keys) == users and all(key.startswith(b"ratelimit:") for key in keys)
        assert statistics.median(admin.memory_usage(key, samples=0) for key in keys) == int(usage), algorithm
        limiter.storage.close()  # type: ignore[attr-defined]
    admin.close()
