"""When Redis is slow or gone: timeouts, the on_error policies, the circuit breaker, logging, HTTP answers.

Each fault test gets a redis-server of its own to kill, restart, pause (SIGSTOP) and resume. The breaker's
clock is injected, so recovery is driven by moving it, never by sleeping; the only waits are the limiter's
own timeouts (0.1 s) and a restarting server.
"""

from __future__ import annotations

import asyncio
import logging
import select
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.connection
from starlette.testclient import TestClient
from werkzeug.test import Client

from ratelimit_middleware import MultiTierRateLimiter, RedisRateLimiter, RedisStorage
from ratelimit_middleware.asgi import RateLimitMiddleware
from ratelimit_middleware.backends.redis import CircuitBreaker, deadlines
from ratelimit_middleware.backends.redis.deadlines import NotRun, until, with_deadlines
from ratelimit_middleware.backends.redis.transport import SyncPool
from ratelimit_middleware.decision import Decision
from ratelimit_middleware.errors import LocalDecision, RateLimiterUnavailable, UncheckedDecision
from ratelimit_middleware.wsgi import RateLimitWSGI

from .conftest import FakeClock, unique_prefix
from .redis_server import RedisServer
from .stalling_proxy import StallingProxy

TIMEOUT = 0.1
LATENCY_BOUND = 1.0
"""What a call may take with Redis paused: ten timeouts, far below redis-py's default seconds."""

POLICIES = ["allow", "deny", "local"]


@pytest.fixture
def breaker_clock() -> FakeClock:
    return FakeClock()


def make_limiter(
    target: Any, on_error: str, breaker_clock: FakeClock, *, limit: int = 2, **options: Any
) -> RedisRateLimiter:
    breaker = CircuitBreaker(failures=3, recovery=5.0, clock=breaker_clock)
    return RedisRateLimiter(
        target,
        limit,
        60,
        key_prefix=unique_prefix(),
        timeout=TIMEOUT,
        on_error=on_error,  # type: ignore[arg-type]
        breaker=breaker,
        **options,
    )


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    """``(result or the exception raised, seconds taken)``."""
    started = time.perf_counter()
    try:
        result = call()
    except RateLimiterUnavailable as error:
        result = error
    return result, time.perf_counter() - started


def check_policy(on_error: str, outcomes: list[Any]) -> None:
    """What a run of decisions during an outage looks like under each policy (limit 2, one allowed before
    the outage, which the local limiter never saw)."""
    if on_error == "allow":
        assert all(isinstance(outcome, UncheckedDecision) and outcome.allowed for outcome in outcomes)
    elif on_error == "deny":
        assert all(isinstance(outcome, RateLimiterUnavailable) for outcome in outcomes)
        assert all(outcome.retry_after >= 1 for outcome in outcomes)
    else:
        assert all(isinstance(outcome, LocalDecision) for outcome in outcomes)
        assert [outcome.allowed for outcome in outcomes] == [True, True] + [False] * (len(outcomes) - 2)


def outage_logs(caplog: pytest.LogCaptureFixture) -> tuple[int, int]:
    """(outage warnings, recovery warnings) on the ratelimit_middleware logger."""
    records = [r for r in caplog.records if r.name == "ratelimit_middleware" and r.levelno >= logging.WARNING]
    down = sum("cannot be reached" in r.getMessage() for r in records)
    up = sum(r.getMessage().startswith("Redis answers again") for r in records)
    return down, up


# -- the breaker alone -------------------------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_and_probes_once_per_recovery() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failures=3, recovery=2.0, clock=clock)
    assert not breaker.failed() and not breaker.failed()
    assert breaker.succeeded() is None  # a success in between starts the count again
    assert not breaker.failed() and not breaker.failed() and breaker.failed()
    assert breaker.is_open and not breaker.allow() and breaker.retry_after() == 2.0
    clock.advance(1.5)
    assert not breaker.allow() and breaker.retry_after() == 0.5
    clock.advance(0.5)
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one
    assert not breaker.failed()  # the probe failed: wait again, no second "opened"
    assert not breaker.allow()
    clock.advance(2.0)
    assert breaker.allow()
    assert breaker.succeeded() == pytest.approx(4.0)  # open for four seconds
    assert not breaker.is_open and breaker.allow() and breaker.retry_after() == 0.0


@pytest.mark.parametrize(
    ("options", "error"),
    [({"failures": 0}, ValueError), ({"recovery": 0}, ValueError), ({"recovery": float("inf")}, ValueError),
     ({"failures": True}, ValueError), ({"clock": 3}, TypeError)],
)  # fmt: skip
def test_breaker_options_are_checked(options: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        CircuitBreaker(**options)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [({"timeout": 0}, ValueError, "timeout"), ({"timeout": 61}, ValueError, "timeout"),
     ({"timeout": "1"}, ValueError, "timeout"), ({"on_error": "ignore"}, ValueError, "on_error"),
     ({"breaker": object()}, TypeError, "breaker"), ({"connect_timeout": 0}, ValueError, "connect_timeout"),
     ({"connect_timeout": True}, ValueError, "connect_timeout")],
)  # fmt: skip
def test_storage_options_are_checked(options: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        RedisStorage("redis://127.0.0.1:1", **options)
    with pytest.raises(error, match=match):  # the limiter passes each on
        RedisRateLimiter("redis://127.0.0.1:1", 5, 60, **options)


def test_the_limiter_passes_connect_timeout_on() -> None:
    assert RedisRateLimiter("redis://127.0.0.1:1", 5, 60, connect_timeout=3).storage.connect_timeout == 3


# -- the caller's client -------------------------------------------------------------------------------------


class CountingRedis(redis.Redis):
    """A client that counts the commands sent through it."""

    sent = 0

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent += 1
        return super().execute_command(*args, **options)


def test_the_callers_client_is_neither_used_nor_changed(
    server: RedisServer, breaker_clock: FakeClock
) -> None:
    client = CountingRedis(port=server.port, socket_timeout=5)
    settings = dict(client.connection_pool.connection_kwargs)
    limiter = make_limiter(client, "deny", breaker_clock)
    assert limiter.allow("u", "m")
    assert client.sent == 0
    assert client.connection_pool.connection_kwargs == settings
    assert client.get_connection_kwargs()["socket_timeout"] == 5  # not the limiter's timeout
    assert client.ping() and client.sent == 1  # and it still works for its own uses
    client.close()


# -- Redis paused past the timeout ---------------------------------------------------------------------------


@pytest.mark.parametrize("on_error", POLICIES)
def test_a_paused_redis_costs_at_most_the_timeout_and_the_limiter_recovers(
    server: RedisServer, breaker_clock: FakeClock, caplog: pytest.LogCaptureFixture, on_error: str
) -> None:
    client = redis.Redis(port=server.port)  # redis-py's defaults would wait 5 s per try, 11 tries
    limiter = make_limiter(client, on_error, breaker_clock)
    assert limiter.allow("u", "m")
    connection = limiter.storage.connection
    before = connection.round_trips
    server.pause()
    try:
        outcomes, seconds = zip(*(timed(lambda: limiter.check("u", "m")) for _ in range(5)), strict=True)
        sent = connection.round_trips
        assert sent - before == 3  # three calls waited for their timeout, then the breaker opened
        assert limiter.storage.breaker.is_open
        more, more_seconds = zip(*(timed(lambda: limiter.check("u", "m")) for _ in range(3)), strict=True)
        assert connection.round_trips == sent  # open: nothing more was sent to the paused server
    finally:
        server.resume()
    assert max(seconds + more_seconds) < LATENCY_BOUND
    check_policy(on_error, [*outcomes, *more])
    assert outage_logs(caplog) == (1, 0)
    # Redis answers again: the next probe goes through and the limiter recovers by itself.
    breaker_clock.advance(5.0)
    assert limiter.check("v", "m").allowed
    assert not limiter.storage.breaker.is_open
    assert outage_logs(caplog) == (1, 1)
    # The replies that came late were never read as answers to later commands: counts are exact.
    assert limiter.allow("v", "m") and not limiter.allow("v", "m")
    assert limiter.get_request_count("v", "m") == 2
    assert 1 <= limiter.get_request_count("u", "m") <= 2  # the timed-out scripts ran once Redis woke up
    limiter.storage.close()
    client.close()


def test_a_sync_call_waits_only_for_what_is_left_of_its_deadline(redis_server: RedisServer) -> None:
    """Every socket wait of a sync call is shortened to what is left of the call's one deadline, whatever
    the connection's own timeout; a call whose deadline has passed sends nothing."""
    pool = redis.ConnectionPool.from_url(
        redis_server.url,
        socket_timeout=5.0,
        connection_class=with_deadlines(redis.connection.Connection, 1.0),
    )  # the connections of the limiter's own pools
    transport = SyncPool(pool)
    connection: Any = pool.get_connection()
    pool.release(connection)
    key = f"{unique_prefix()}:late"
    with pytest.raises(NotRun, match="before the call was sent"):  # no failure of Redis
        transport.send([("INCR", key)], time.monotonic() - 0.001)
    assert connection._sock is not None  # nothing was written: the connection stays, in step
    assert transport.send([("GET", key)], time.monotonic() + 0.5) == [None]  # the late INCR was never sent
    assert connection._sock.gettimeout() <= 0.5  # not the connection's 5 s
    transport.close()


def test_a_reply_that_has_arrived_is_read_after_the_deadline(redis_server: RedisServer) -> None:
    """A thread that did not get the interpreter's lock back before its call's deadline (a burst of threads)
    still reads the reply Redis sent in time: the command ran, and reading it waits for nothing. Taken for a
    timeout, it was counted as a failure of Redis, and the decision Redis made was answered by the policy."""
    pool = redis.ConnectionPool.from_url(
        redis_server.url, connection_class=with_deadlines(redis.connection.Connection, 1.0)
    )
    connection: Any = pool.get_connection()  # outside a call: set up at once
    connection.send_command("PING")
    assert select.select([connection._sock], [], [], 5.0)[0]  # the reply is here
    with until(time.monotonic() - 0.001):
        assert connection.read_response() == b"PONG"
        with pytest.raises(redis.exceptions.TimeoutError):  # none is on its way: nothing is waited for
            connection.read_response()
    pool.disconnect()


class _BusySetup(redis.connection.Connection):
    """A connection whose setup does not start until ``go`` is set: a process too busy to run it (its
    thread waiting for the interpreter's lock), Redis itself never asked."""

    go = threading.Event()
    done = threading.Event()

    def connect(self) -> None:
        self.go.wait()
        super().connect()
        self.done.set()


@pytest.mark.parametrize("on_error", POLICIES)
def test_calls_that_wait_for_a_setup_the_process_is_too_busy_to_run_are_not_failures_of_redis(
    redis_server: RedisServer, breaker_clock: FakeClock, caplog: pytest.LogCaptureFixture, on_error: str
) -> None:
    """A burst of threads on a fresh process: each call sets up a connection of its own, and the threads
    and the setups' own keep each other waiting for the interpreter's lock past the calls' timeout. Those
    calls never reached Redis: counted as failures, three opened the breaker, and the rest of the burst was
    answered by the policy for a second (unchecked on a healthy Redis, with on_error='allow'). They are
    ``NotRun``: answered by the policy, logged as such, never counted; the setup serves the next call."""
    _BusySetup.go.clear()
    _BusySetup.done.clear()
    pool = redis.ConnectionPool(port=redis_server.port, connection_class=_BusySetup)
    limiter = make_limiter(redis.Redis(connection_pool=pool), on_error, breaker_clock)
    outcomes = [timed(lambda: limiter.check("u", "m"))[0] for _ in range(5)]
    check_policy(on_error, outcomes)
    assert not limiter.storage.breaker.is_open
    said = [r.getMessage() for r in caplog.records if "never having run it" in r.getMessage()]
    assert len(said) == 5 and all("the process was too busy" in message for message in said), said
    assert outage_logs(caplog) == (0, 0)  # no "Redis cannot be reached"
    _BusySetup.go.set()
    assert _BusySetup.done.wait(5.0)
    decision = limiter.check("u", "m")
    assert type(decision) is Decision and decision.allowed  # decided in Redis, on the connection set up
    assert limiter.get_request_count("u", "m") == 1
    limiter.storage.close()


def test_a_setup_whose_thread_cannot_start_leaves_no_setup_behind(
    redis_server: RedisServer, breaker_clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process out of threads: the call is not run (the policy answers it, the breaker does not count
    it), and its connection keeps no setup that never ends, which every later call on it waited for until
    its timeout (and a cluster mapped again, for ever)."""

    def no_thread(*args: object) -> int:
        raise RuntimeError("can't start new thread")

    pool = redis.ConnectionPool(port=redis_server.port, max_connections=1)  # one connection: the same
    limiter = make_limiter(redis.Redis(connection_pool=pool), "deny", breaker_clock)
    with monkeypatch.context() as patched:
        patched.setattr(deadlines._thread, "start_new_thread", no_thread)
        outcome = timed(lambda: limiter.check("u", "m"))[0]
    assert isinstance(outcome, RateLimiterUnavailable)
    assert not limiter.storage.breaker.is_open
    decisions = [limiter.check("u", "m") for _ in range(3)]
    assert [type(decision) for decision in decisions] == [Decision] * 3
    assert [decision.allowed for decision in decisions] == [True, True, False]
    limiter.storage.close()


@pytest.mark.parametrize("on_error", POLICIES)
def test_async_calls_have_a_hard_deadline(
    server: RedisServer, breaker_clock: FakeClock, caplog: pytest.LogCaptureFixture, on_error: str
) -> None:
    async def scenario() -> None:
        client = redis.asyncio.Redis(port=server.port)
        limiter = make_limiter(client, on_error, breaker_clock)
        assert await limiter.aallow("u", "m")
        server.pause()
        try:
            started = time.perf_counter()
            first = await asyncio.gather(
                *(limiter.acheck("u", "m") for _ in range(3)), return_exceptions=True
            )  # three concurrent calls share one timed-out round trip, and open the breaker
            seconds = time.perf_counter() - started
            later = [await asyncio.gather(limiter.acheck("u", "m"), return_exceptions=True) for _ in range(2)]
        finally:
            server.resume()
        assert seconds < LATENCY_BOUND
        check_policy(on_error, [*first, *(outcome for batch in later for outcome in batch)])
        assert limiter.storage.breaker.is_open and outage_logs(caplog) == (1, 0)
        breaker_clock.advance(5.0)
        assert (await limiter.acheck("v", "m")).allowed
        assert await limiter.aallow("v", "m") and not await limiter.aallow("v", "m")
        assert outage_logs(caplog) == (1, 1)
        await limiter.storage.aclose()
        await client.aclose()

    asyncio.run(scenario())


# -- Redis killed mid-run, then restarted --------------------------------------------------------------


@pytest.mark.parametrize("on_error", POLICIES)
def test_a_killed_redis_fails_fast_and_the_limiter_recovers_after_a_restart(
    server: RedisServer, breaker_clock: FakeClock, caplog: pytest.LogCaptureFixture, on_error: str
) -> None:
    limiter = make_limiter(server.url, on_error, breaker_clock)
    assert limiter.allow("u", "m")
    server.kill()
    outcomes, seconds = zip(*(timed(lambda: limiter.check("u", "m")) for _ in range(6)), strict=True)
    assert max(seconds) < LATENCY_BOUND
    check_policy(on_error, list(outcomes))
    assert limiter.storage.breaker.is_open and outage_logs(caplog) == (1, 0)
    with pytest.raises(RateLimiterUnavailable):  # a count is not a decision: never made up
        limiter.get_request_count("u", "m")
    with pytest.raises(RateLimiterUnavailable):
        limiter.reset("u", "m")
    server.restart()  # empty, and without the scripts: NOSCRIPT, then EVAL
    breaker_clock.advance(5.0)
    assert [limiter.allow("u", "m") for _ in range(3)] == [True, True, False]
    assert limiter.get_request_count("u", "m") == 2
    assert outage_logs(caplog) == (1, 1)
    limiter.storage.close()


@pytest.mark.parametrize("on_error", POLICIES)
def test_async_limiters_recover_after_a_restart(
    server: RedisServer, breaker_clock: FakeClock, caplog: pytest.LogCaptureFixture, on_error: str
) -> None:
    limiter = make_limiter(server.url, on_error, breaker_clock)

    async def decisions(count: int) -> list[Any]:
        return await asyncio.gather(*(limiter.acheck("u", "m") for _ in range(count)), return_exceptions=True)

    assert asyncio.run(decisions(1))[0].allowed
    server.kill()
    outcomes = asyncio.run(decisions(5))
    check_policy(on_error, outcomes)
    assert outage_logs(caplog) == (1, 0)
    server.restart()
    breaker_clock.advance(5.0)
    # Half-open: one call probes Redis; the calls made meanwhile still get the policy's answer.
    probe, *meanwhile = asyncio.run(decisions(3))
    assert probe.allowed and type(probe) is Decision
    check_policy(on_error, [*outcomes, *meanwhile])
    assert outage_logs(caplog) == (1, 1)
    assert [decision.allowed for decision in asyncio.run(decisions(2))] == [True, False]


def test_a_redis_that_refuses_writes_follows_the_policy_too(
    server: RedisServer, breaker_clock: FakeClock
) -> None:
    """Redis answers, with an error (out of memory): no exception reaches the caller either."""
    limiter = make_limiter(server.url, "allow", breaker_clock)
    admin = server.client()
    admin.config_set("maxmemory", 1)
    try:
        decision = limiter.check("u", "m")
    finally:
        admin.config_set("maxmemory", 0)
        admin.close()
    assert isinstance(decision, UncheckedDecision) and decision.allowed
    assert limiter.check("u", "m").allowed and type(limiter.check("u", "m")) is Decision


def test_local_fallback_keeps_every_tier(server: RedisServer, breaker_clock: FakeClock) -> None:
    storage = RedisStorage(server.url, key_prefix=unique_prefix(), timeout=TIMEOUT, on_error="local")
    limiter = MultiTierRateLimiter(per_user_model="3/minute", per_model="4/minute", storage=storage)
    server.kill()
    assert [limiter.allow(user, "m")[0] for user in "aab"] == [True, True, True]
    allowed, reason = limiter.allow("b", "m")
    assert allowed
    allowed, reason = limiter.allow("c", "m")
    assert not allowed and reason is not None and "per_model" in reason


# -- over HTTP ----------------------------------------------------------------------------------------------


async def hello(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})


def wsgi_hello(environ: Any, start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


@pytest.mark.parametrize("middleware_on_error", ["allow", "deny"])
def test_fail_closed_is_a_503_with_retry_after_whatever_the_middleware_says(
    server: RedisServer, breaker_clock: FakeClock, middleware_on_error: str
) -> None:
    limiter = make_limiter(server.url, "deny", breaker_clock)
    asgi = TestClient(RateLimitMiddleware(hello, limiter=limiter, on_error=middleware_on_error))  # type: ignore[arg-type]
    wsgi = Client(RateLimitWSGI(wsgi_hello, limiter=limiter, on_error=middleware_on_error))  # type: ignore[arg-type]
    assert asgi.get("/", headers={"X-User-ID": "a"}).status_code == 200
    server.kill()
    for response in [asgi.get("/", headers={"X-User-ID": "a"}) for _ in range(4)]:
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["code"] == "rate_limiter_unavailable"
    response = wsgi.get("/", headers={"X-User-ID": "a"})
    assert response.status_code == 503 and int(response.headers["Retry-After"]) == 5  # the breaker's wait


def test_fail_open_sends_no_rate_limit_headers(server: RedisServer, breaker_clock: FakeClock) -> None:
    limiter = make_limiter(server.url, "allow", breaker_clock)
    client = TestClient(RateLimitMiddleware(hello, limiter=limiter))
    assert "x-ratelimit-remaining-requests" in client.get("/", headers={"X-User-ID": "a"}).headers
    server.kill()
    for _ in range(4):
        response = client.get("/", headers={"X-User-ID": "a"})
        assert response.status_code == 200
        assert not any(name.lower().startswith(("x-ratelimit", "ratelimit")) for name in response.headers)


def test_local_fallback_answers_429_with_headers(server: RedisServer, breaker_clock: FakeClock) -> None:
    limiter = make_limiter(server.url, "local", breaker_clock)
    client = TestClient(RateLimitMiddleware(hello, limiter=limiter))
    server.kill()
    responses = [client.get("/", headers={"X-User-ID": "a"}) for _ in range(3)]
    assert [response.status_code for response in responses] == [200, 200, 429]
    assert responses[1].headers["x-ratelimit-remaining-requests"] == "0"


@pytest.mark.parametrize("deadlines", [True, False], ids=["with_deadlines", "plain"])
def test_connecting_waits_only_until_the_call_s_deadline(server: RedisServer, deadlines: bool) -> None:
    """A new connection's connect and handshake wait what is left of the sync call, not the pool's socket
    timeouts (1.5 s here; a caller's pool may have longer): a stalled server costs the call its deadline
    only. The plain connection class shows what the limiter's pools no longer do."""
    plain = redis.connection.Connection
    pool = redis.ConnectionPool(
        connection_class=with_deadlines(plain, 1.0) if deadlines else plain,
        host="127.0.0.1",
        port=server.port,
        socket_timeout=1.5,
        socket_connect_timeout=1.5,
    )
    server.pause()  # the kernel still accepts the connection: the handshake's reply never comes
    try:
        started = time.monotonic()
        # NotRun with the deadlines: Redis kept the setup waiting for less than 90% of the connection's
        # socket timeout, which the limiter's pools set to its timeout (see ``deadlines._KEPT``)
        with pytest.raises((redis.TimeoutError, redis.ConnectionError, NotRun)):
            SyncPool(pool).send([("PING",)], started + 0.2)
        elapsed = time.monotonic() - started
    finally:
        server.resume()
    assert (elapsed < 0.5) is deadlines
    assert SyncPool(pool).send([("PING",)], time.monotonic() + 5.0) == [b"PONG"]
    pool.disconnect()


# -- a Redis some distance away -----------------------------------------------------------------------------

SLOW_LINK = 0.04
"""Seconds each way through the proxy: an 80 ms round trip. A call (one round trip, two to load the script)
fits in the 0.25 s timeout below; a new connection's setup (CLIENT SETINFO twice) and the call do not."""


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "asyncio"])
def test_a_redis_whose_connection_setup_outlasts_a_call_serves_the_next_calls(
    server: RedisServer, asynchronous: bool
) -> None:
    """A connection set up within a call was closed when the call ran out of time, and the next call started
    over: such a Redis was never used, every decision unchecked. Set up apart, it serves the next call, and
    no call waits longer than its timeout meanwhile."""
    proxy = StallingProxy(server.port, delay=SLOW_LINK)
    limiter = RedisRateLimiter(
        proxy.url, 100, 60, key_prefix=unique_prefix(), timeout=0.25, breaker=CircuitBreaker(failures=100)
    )

    async def adecisions(count: int) -> list[tuple[Any, float]]:
        outcomes = []
        for _ in range(count):
            started = time.perf_counter()
            outcomes.append((await limiter.acheck("u", "m"), time.perf_counter() - started))
        return outcomes

    if asynchronous:
        outcomes = asyncio.run(adecisions(6))
    else:
        outcomes = [timed(lambda: limiter.check("u", "m")) for _ in range(6)]
    kinds = [type(decision) for decision, _ in outcomes]
    assert kinds[0] is UncheckedDecision  # no connection could be set up and used within the first call
    assert kinds[-3:] == [Decision] * 3, kinds
    assert max(seconds for _, seconds in outcomes) < LATENCY_BOUND
    limiter.storage.close()
    proxy.close()
