"""A sync call on a Redis Cluster ends by its deadline: stalled, killed and busy nodes, first use, redirects.

On the session's real local cluster of three masters. Each test asserts that every call takes less than its
timeout plus a scheduling slack, that the ``on_error`` policy answered the calls that could not be served,
and that the limiter answers again once the node does. The caller's client has long timeouts of its own:
the limiter's timeout bounds its calls whatever they are. Slots moved by a test are moved back, paused nodes
resumed and killed ones restarted before it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
import redis.asyncio.cluster
import redis.asyncio.connection
import redis.backoff
import redis.cluster
import redis.connection
import redis.retry
from redis.crc import key_slot

from ratelimit_middleware import MultiTierRateLimiter, RedisRateLimiter, RedisStorage
from ratelimit_middleware.backends.redis import CircuitBreaker
from ratelimit_middleware.backends.redis.deadlines import with_deadlines, within
from ratelimit_middleware.backends.redis.transport import AsyncCluster, SyncCluster
from ratelimit_middleware.decision import Decision
from ratelimit_middleware.errors import RateLimiterUnavailable, UncheckedDecision

from .conftest import unique_prefix
from .redis_server import LoopThread, RedisCluster, Slots
from .stalling_proxy import StallingProxy

TIMEOUT = 0.2
SLACK = 1.0
"""Scheduling slack on top of the timeout: a call takes less than ``TIMEOUT + SLACK``. What these tests tell
apart is a call ended by the limiter's deadline from one left to the caller's client (30 s, below), or
retried past its deadline: the slack is generous so that a loaded machine's scheduling does not count."""

_names = itertools.count()


@pytest.fixture
def caller(redis_cluster: RedisCluster) -> Iterator[redis.cluster.RedisCluster]:
    """The caller's cluster client, with timeouts far longer than the limiter's."""
    client = redis_cluster.client(socket_timeout=30, socket_connect_timeout=30)
    yield client
    client.close()


def limiter(client: redis.cluster.RedisCluster, on_error: Any = "deny", timeout: float = TIMEOUT) -> Any:
    """A fresh limiter (nothing mapped yet) whose breaker never opens, so that every call goes to Redis."""
    return RedisRateLimiter(
        client,
        100,
        60,
        key_prefix=unique_prefix(),
        timeout=timeout,
        on_error=on_error,
        breaker=CircuitBreaker(failures=1000),
    )


def node_of(cluster: RedisCluster, client: redis.cluster.RedisCluster, name: str) -> int:
    """The index of the node that holds the slot of ``name`` (a user or a model: their hash tag)."""
    return cluster.ports.index(client.get_node_from_key(name).port)


def name_on(cluster: RedisCluster, client: redis.cluster.RedisCluster, index: int) -> str:
    """A new name whose slot is on node ``index``."""
    return next(
        name
        for name in (f"n{next(_names)}" for _ in itertools.count())
        if node_of(cluster, client, name) == index
    )


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    """How long ``call()`` took, and what it returned (or the ``RateLimiterUnavailable`` it raised)."""
    started = time.perf_counter()
    try:
        result = call()
    except RateLimiterUnavailable as error:
        result = error
    return time.perf_counter() - started, result


@contextlib.contextmanager
def paused(cluster: RedisCluster, *indexes: int) -> Iterator[None]:
    for index in indexes:
        cluster.nodes[index].pause()
    try:
        yield
    finally:
        for index in indexes:
            cluster.nodes[index].resume()


def test_a_batch_ends_by_its_deadline_when_its_second_node_stalls_after_a_slow_first(
    redis_cluster: RedisCluster, caller: redis.cluster.RedisCluster
) -> None:
    """One decision on two slots is two commands in turn: the first node answers late, the second not at
    all; the second waits only for what the first left (not a timeout of its own)."""
    timeout = 0.5  # longer than the slack: a second full timeout would show
    user = name_on(redis_cluster, caller, 0)
    model = name_on(redis_cluster, caller, 1)
    storage = RedisStorage(
        caller,
        key_prefix=unique_prefix(),
        timeout=timeout,
        on_error="deny",
        breaker=CircuitBreaker(failures=1000),
    )
    rate = MultiTierRateLimiter(per_user_model="10/minute", per_model="100/minute", storage=storage)
    assert rate.allow(user, model)[0]
    with paused(redis_cluster, 1):
        late = threading.Timer(0.35, redis_cluster.nodes[0].resume)  # node 0 answers after 0.35 s
        redis_cluster.nodes[0].pause()
        late.start()
        try:
            elapsed, decision = timed(lambda: rate.check(user, model))
        finally:
            late.join()
        assert elapsed < timeout + SLACK
        assert isinstance(decision, RateLimiterUnavailable)
    assert rate.allow(user, model)[0]
    storage.close()


def test_first_use_while_a_startup_node_stalls_ends_by_the_deadline(
    redis_cluster: RedisCluster, caller: redis.cluster.RedisCluster
) -> None:
    """The first call maps the cluster, asking the startup nodes in turn: a stalled one costs the call at
    most its timeout (it may then fail), and a later call maps it again."""
    user = name_on(redis_cluster, caller, 1)
    limiters = [limiter(caller) for _ in range(4)]
    with paused(redis_cluster, 0):
        for rate in limiters:
            elapsed, decision = timed(lambda rate=rate: rate.check(user, "m"))
            assert elapsed < TIMEOUT + SLACK
            assert isinstance(decision, RateLimiterUnavailable) or decision.allowed
    for rate in limiters:
        assert served(lambda rate=rate: rate.check(user, "m")).allowed  # mapped again once resumed
        rate.storage.close()


def test_first_use_while_every_node_stalls_ends_by_the_deadline(
    redis_cluster: RedisCluster, caller: redis.cluster.RedisCluster
) -> None:
    """However many startup nodes there are to try, mapping the cluster waits only for what is left."""
    rate = limiter(caller)
    user = name_on(redis_cluster, caller, 0)
    with paused(redis_cluster, 0, 1, 2):
        elapsed, decision = timed(lambda: rate.check(user, "m"))
        assert elapsed < TIMEOUT + SLACK
        assert isinstance(decision, RateLimiterUnavailable)
    assert served(lambda: rate.check(user, "m")).allowed
    rate.storage.close()


def served(
    check: Callable[[], Any], bound: float = TIMEOUT + SLACK, within: float = 10, poll: float = 0.05
) -> Any:
    """The first decision ``check()`` makes with Redis (not by its policy), trying every ``poll`` seconds for
    ``within`` seconds, each call within ``bound``: a server getting ready (there is no clock to inject), or
    a fresh limiter, whose first calls may run out of their timeout while the cluster is mapped and their
    first connections are set up apart, on a loaded machine (the policy answers them)."""
    give_up = time.monotonic() + within
    while True:
        elapsed, decision = timed(check)
        assert elapsed < bound
        if not isinstance(decision, (RateLimiterUnavailable, UncheckedDecision)):
            return decision
        assert time.monotonic() < give_up, "the cluster never served the call"
        time.sleep(poll)


def test_a_mapping_longer_than_the_timeout_goes_on_and_serves_the_next_calls(
    redis_cluster: RedisCluster, caller: redis.cluster.RedisCluster
) -> None:
    """Mapping the cluster (CLUSTER SLOTS, then COMMAND and its long reply) takes milliseconds: with a
    shorter timeout the first calls answer by the policy, and the mapping, going on without them, serves
    the next ones."""
    timeout = 0.002
    rate = limiter(caller, timeout=timeout)
    user = name_on(redis_cluster, caller, 0)
    decision = served(
        lambda: rate.check(user, "m"), timeout + SLACK, within=5, poll=0.01
    )  # mapping meanwhile
    assert decision.allowed
    rate.storage.close()


@pytest.mark.parametrize("on_error", ["allow", "local"])
def test_a_refund_that_fails_leaves_the_denial_and_the_deadline(
    redis_cluster: RedisCluster, caller: redis.cluster.RedisCluster, on_error: str
) -> None:
    """A request allowed on its user's slot and denied on its model's: the refund of the user's charge is
    sent within what is left of the deadline, and when it cannot be, the request stays denied."""
    user = name_on(redis_cluster, caller, 0)
    model = name_on(redis_cluster, caller, 1)
    user_port = redis_cluster.ports[0]
    proxy = StallingProxy(user_port, stall_on=b"$6\r\nrefund\r\n")  # the argument, not the script
    client = redis_cluster.client(
        address_remap=lambda address: ("127.0.0.1", proxy.port) if int(address[1]) == user_port else address
    )
    timeout = 1.0  # a loaded machine must not turn the decision's own round trip into a fallback
    storage = RedisStorage(client, key_prefix=unique_prefix(), timeout=timeout, on_error=on_error)
    rate = MultiTierRateLimiter(per_user_model="10/minute", per_model="1/minute", storage=storage)
    try:
        assert rate.check(name_on(redis_cluster, caller, 2), model).allowed  # the model's one request
        assert rate.check(user, "another model").allowed  # connected and scripts loaded through the proxy
        elapsed, decision = timed(lambda: rate.check(user, model))
        assert proxy.stalled == 1 and elapsed < timeout + SLACK
        assert not decision.allowed and type(decision).__name__ == "Decision"
        assert decision.tier == "per_model"
    finally:
        storage.close()
        client.close()
        proxy.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_migrating_slot_is_tried_again_within_the_deadline_and_never_opens_the_breaker(
    redis_cluster: RedisCluster, caller: redis.cluster.RedisCluster, mode: str
) -> None:
    """A new user's script on two keys of a slot being migrated (none moved yet): the source answers ASK, the
    target TRYAGAIN (the keys are on neither side). Neither ran it, and Redis is healthy: the call tries
    again until its deadline, then follows the policy, and the breaker (3 failures) stays closed, so other
    slots' calls are served; once the migration ends, a call trying again meanwhile is served."""
    slots = Slots(redis_cluster)
    user = next(
        name
        for name in (name_on(redis_cluster, caller, 0) for _ in itertools.count())
        if not slots.keys(key_slot(name.encode()), 0)
    )
    other = name_on(redis_cluster, caller, 1)
    slot = key_slot(user.encode())
    loop = LoopThread() if mode == "async" else None
    client: Any = caller
    if loop is not None:
        client = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0])
    storage = RedisStorage(client, key_prefix=unique_prefix(), timeout=TIMEOUT, on_error="allow")
    rate = MultiTierRateLimiter(per_user_model="10/minute", per_user="100/minute", storage=storage)

    def check(name: str) -> Any:
        return rate.check(name, "m") if loop is None else loop.run(rate.acheck(name, "m"))

    try:
        assert type(served(lambda: check(other))) is Decision  # the cluster mapped: the slot on node 0
        slots.begin(slot, 0, 2)
        for _ in range(4):
            elapsed, decision = timed(lambda: check(user))
            assert elapsed < TIMEOUT + SLACK and isinstance(decision, UncheckedDecision)
        assert not storage.breaker.is_open
        assert type(check(other)) is Decision
        ended = threading.Timer(TIMEOUT / 10, slots.end, (slot, 2))  # while the next call tries again
        ended.start()
        try:
            elapsed, decision = timed(lambda: check(user))
        finally:
            ended.join()
        assert elapsed < TIMEOUT + SLACK and type(decision) is Decision and decision.remaining == 9
    finally:
        slots.give_back(slot, 2)
        slots.close()
        if loop is None:
            storage.close()
        else:
            loop.run(storage.aclose())
            loop.stop()


# -- failures on both clients: the caller's sync cluster client and an asyncio one -----------------------


class Driven:
    """A limiter on the session's cluster, driven from sync code whichever client it has: the caller's sync
    client (``"sync"``), or an asyncio cluster client (``"async"``) whose async methods run on a loop of its
    own; so that ``timed``, ``served``, ``paused`` and ``Slots`` drive both alike."""

    def __init__(
        self,
        mode: str,
        cluster: RedisCluster,
        caller: redis.cluster.RedisCluster,
        on_error: Any = "deny",
        timeout: float = TIMEOUT,
    ) -> None:
        self.loop: LoopThread | None = None
        self.client: redis.asyncio.cluster.RedisCluster | None = None
        if mode == "sync":
            self.rate = limiter(caller, on_error, timeout)
            return
        self.loop = LoopThread()
        node = redis.asyncio.cluster.ClusterNode("127.0.0.1", cluster.ports[0])
        self.client = redis.asyncio.cluster.RedisCluster(
            startup_nodes=[node], socket_timeout=30, socket_connect_timeout=30
        )
        self.rate = limiter(self.client, on_error, timeout)

    def check(self, user: str, model: str) -> Any:
        if self.loop is None:
            return self.rate.check(user, model)
        return self.loop.run(self.rate.acheck(user, model))

    def allow(self, user: str, model: str) -> bool:
        if self.loop is None:
            return bool(self.rate.allow(user, model))
        return bool(self.loop.run(self.rate.aallow(user, model)))

    def get_request_count(self, user: str, model: str) -> int:
        if self.loop is None:
            return int(self.rate.get_request_count(user, model))
        return int(self.loop.run(self.rate.aget_request_count(user, model)))

    def close(self) -> None:
        if self.loop is None or self.client is None:
            self.rate.storage.close()
            return
        try:
            self.loop.run(self.rate.storage.aclose())
            self.loop.run(self.client.aclose())
        finally:
            self.loop.stop()


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("on_error", ["deny", "allow"])
def test_a_stalled_node_costs_its_calls_the_timeout_and_no_others(
    redis_cluster: RedisCluster, caller: redis.cluster.RedisCluster, on_error: str, mode: str
) -> None:
    """Calls on a paused node end by their deadline and follow the policy, twice in a row (the cluster
    mapped again apart from them, the node having failed); the others are served at once (the cluster is not
    mapped again within them); all are served once the node resumes."""
    rate = Driven(mode, redis_cluster, caller, on_error)
    stalled = name_on(redis_cluster, caller, 0)
    other = name_on(redis_cluster, caller, 1)
    try:
        for user in (stalled, other):
            assert served(lambda user=user: rate.check(user, "m")).allowed
        with paused(redis_cluster, 0):
            for _ in range(2):
                elapsed, decision = timed(lambda: rate.check(stalled, "m"))
                assert elapsed < TIMEOUT + SLACK
                if on_error == "deny":
                    assert isinstance(decision, RateLimiterUnavailable)
                else:
                    assert isinstance(decision, UncheckedDecision) and decision.allowed
            elapsed, decision = timed(lambda: rate.check(other, "m"))
            assert elapsed < TIMEOUT + SLACK
            assert not isinstance(decision, (RateLimiterUnavailable, UncheckedDecision)) and decision.allowed
        assert rate.get_request_count(stalled, "m") >= 1  # answers again
        assert rate.allow(other, "m")
    finally:
        rate.close()


def test_an_async_call_just_after_a_stalled_node_resumes_is_served(
    redis_cluster: RedisCluster, caller: redis.cluster.RedisCluster
) -> None:
    """Rounds of a node stalling through two calls (the first cut off waiting for its reply, which closes its
    connection; the second waiting for a new one's setup, which goes on) and then resuming: the next call,
    made on the loop at once, is served on the connection set up meanwhile. An asyncio setup's every read
    was cut to the call's timeout (redis-py's, on a cluster's node), so that it failed as the node resumed,
    and the next call, which waited for it, failed with it (mapping the cluster again within that call had
    hidden it, as the sync setups run within ``connect_timeout`` of their own)."""
    rate = Driven("async", redis_cluster, caller)
    user = name_on(redis_cluster, caller, 0)

    async def rounds() -> None:
        for _ in range(5):
            with paused(redis_cluster, 0):
                for _ in range(2):
                    with pytest.raises(RateLimiterUnavailable):
                        await rate.rate.acheck(user, "m")
            assert await rate.rate.aallow(user, "m")

    try:
        assert served(lambda: rate.check(user, "m")).allowed
        assert rate.loop is not None
        rate.loop.run(rounds())
    finally:
        rate.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_killed_node_fails_fast_and_its_calls_recover_after_a_restart(
    redis_cluster: RedisCluster, caller: redis.cluster.RedisCluster, mode: str
) -> None:
    """Refused connections, then the restarted master's refusals (CLUSTERDOWN until it may serve again, about
    2 s): every call within the bound, the other nodes serving throughout."""
    rate = Driven(mode, redis_cluster, caller)
    user = name_on(redis_cluster, caller, 2)
    other = name_on(redis_cluster, caller, 0)
    try:
        assert served(lambda: rate.check(user, "m")).allowed
        node = redis_cluster.nodes[2]
        node.kill()
        try:
            for _ in range(2):  # the cluster mapped again meanwhile, apart (the node failed)
                elapsed, decision = timed(lambda: rate.check(user, "m"))
                assert elapsed < TIMEOUT + SLACK and isinstance(decision, RateLimiterUnavailable)
            assert rate.allow(other, "m")
        finally:
            node.restart()
        assert served(lambda: rate.check(user, "m")).allowed  # a restarting master
        assert rate.allow(other, "m")
    finally:
        rate.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_moving_or_moved_slot_is_followed_within_the_deadline(
    redis_cluster: RedisCluster, caller: redis.cluster.RedisCluster, mode: str
) -> None:
    """ASK while a slot migrates and MOVED once it has (the limiter's map is then stale) are redirects, not
    failures: the command goes to the node named. A redirect to a stalled node costs the timeout, no more."""
    rate = Driven(mode, redis_cluster, caller)
    stale = Driven(mode, redis_cluster, caller)
    slots = Slots(redis_cluster)
    user = next(
        name
        for name in (name_on(redis_cluster, caller, 0) for _ in itertools.count())
        if not slots.keys(key_slot(name.encode()), 0)  # an empty slot: it moves without keys to carry
    )
    slot = key_slot(user.encode())
    try:
        elsewhere = name_on(redis_cluster, caller, 1)
        for mapped in (rate, stale):  # both map the cluster: the slot on node 0
            assert served(lambda mapped=mapped: mapped.check(elsewhere, "m")).allowed
        slots.begin(slot, 0, 2)
        elapsed, allowed = timed(lambda: rate.allow(user, "m"))  # ASK: node 0 lacks the key
        assert elapsed < TIMEOUT + SLACK and allowed is True
        assert slots.keys(slot, 2)  # the script ran on node 2, which imports the slot
        slots.end(slot, 2)
        elapsed, allowed = timed(lambda: rate.allow(user, "m"))  # MOVED
        assert elapsed < TIMEOUT + SLACK and allowed is True
        assert rate.get_request_count(user, "m") == 2  # mapped again: the slot on node 2
        with paused(redis_cluster, 2):
            elapsed, decision = timed(lambda: stale.check(user, "m"))  # MOVED, to a stalled node
            assert elapsed < TIMEOUT + SLACK and isinstance(decision, RateLimiterUnavailable)
        assert stale.allow(user, "m") and stale.get_request_count(user, "m") == 1  # mapped again
    finally:
        slots.give_back(slot, 2)
        slots.close()
        rate.close()
        stale.close()


@pytest.mark.parametrize("stalled", [(0,), (0, 1, 2)])
def test_async_first_use_while_nodes_stall_ends_by_the_deadline(
    redis_cluster: RedisCluster, caller: redis.cluster.RedisCluster, stalled: tuple[int, ...]
) -> None:
    """The first calls map the cluster while the startup node, or every node, is stalled: each ends by its
    deadline (mapping cut short, it may fail), and once the nodes answer the next call maps it again."""
    user = name_on(redis_cluster, caller, 1)
    limiters = [Driven("async", redis_cluster, caller) for _ in range(2)]
    try:
        with paused(redis_cluster, *stalled):
            for rate in limiters:
                for _ in range(2):
                    elapsed, decision = timed(lambda rate=rate: rate.check(user, "m"))
                    assert elapsed < TIMEOUT + SLACK
                    assert isinstance(decision, RateLimiterUnavailable) or decision.allowed
        for rate in limiters:  # mapped again by a call once the nodes answer (a first may still time out)
            assert served(lambda rate=rate: rate.check(user, "m")).allowed
    finally:
        for rate in limiters:
            rate.close()


CALLERS = 10


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_cluster_a_slow_link_away_serves_concurrent_callers(redis_cluster: RedisCluster, mode: str) -> None:
    """Every node 60 ms away (a round trip through a delaying proxy, named by ``address_remap``), a 0.15 s
    timeout, ten callers at once on cold pools: their first calls need new connections and run out of time,
    each failure maps the cluster again, and the calls go on meanwhile, so that rounds of calls come to be
    served by Redis whole. Mapped within the calls, on the failed node's next call, the mapping outlasted
    them, and recycled the connections set up meanwhile: such a cluster was hardly ever used."""
    proxies = {port: StallingProxy(port, delay=0.03) for port in redis_cluster.ports}

    def remap(address: tuple[str, int]) -> tuple[str, int]:
        host, port = address
        return (host, proxies[port].port) if port in proxies else address

    prefix = unique_prefix()
    loop = LoopThread() if mode == "async" else None
    if loop is None:
        client: Any = redis.cluster.RedisCluster(
            host="127.0.0.1", port=redis_cluster.ports[0], address_remap=remap
        )
    else:
        client = redis.asyncio.cluster.RedisCluster(
            host="127.0.0.1", port=redis_cluster.ports[0], address_remap=remap
        )
    rate = RedisRateLimiter(
        client,
        1000,
        60,
        key_prefix=prefix,
        timeout=0.15,
        on_error="deny",
        breaker=CircuitBreaker(failures=10**6),
    )

    def one(user: str) -> bool:
        try:
            if loop is None:
                return bool(rate.check(user, "m").allowed)
            return bool(loop.run(rate.acheck(user, "m")).allowed)
        except RateLimiterUnavailable:
            return False

    def round_served() -> bool:
        outcomes: list[bool] = []
        callers = [
            threading.Thread(target=lambda index=index: outcomes.append(one(f"user{index}")))
            for index in range(CALLERS)
        ]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join()
        return all(outcomes)

    try:
        whole = 0
        for _ in range(30):  # rounds: a loaded machine may need several to set the connections up
            whole = whole + 1 if round_served() else 0
            if whole == 3:
                break
        assert whole == 3, "the cluster never served three rounds of callers in a row"
    finally:
        if loop is not None:
            loop.run(rate.storage.aclose())
            loop.run(client.aclose())
            loop.stop()
        else:
            rate.storage.close()
            client.close()
        for proxy in proxies.values():
            proxy.close()


class _HeldSetup(redis.connection.Connection):
    """A connection whose setup, once ``armed``, waits for ``go`` before reading the reply to its first
    command (a link slow to answer it), and which records what other threads write on it meanwhile."""

    armed = threading.Event()
    held = threading.Event()
    go = threading.Event()
    foreign: ClassVar[list[Any]] = []
    setting_up: int | None = None
    """The thread setting it up, if one is."""

    def connect(self) -> None:
        if self._sock is not None:  # connected, or being set up on another thread
            super().connect()
            return
        self.setting_up = threading.get_ident()
        try:
            super().connect()
        finally:
            self.setting_up = None

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if self.setting_up not in (None, threading.get_ident()):
            self.foreign.append(command)
        super().send_packed_command(command, check_health)

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        if self.setting_up == threading.get_ident() and self.armed.is_set() and not self.held.is_set():
            self.held.set()
            self.go.wait()
        return super().read_response(*args, **kwargs)


def test_a_mapping_again_waits_for_the_setup_under_way_on_a_connection_it_takes(
    redis_cluster: RedisCluster, caller: redis.cluster.RedisCluster
) -> None:
    """A call gave up on a new connection whose setup, on its own thread, waited for a reply; the connection
    went back to its node's pool, and the mapping again that the call's failure starts took it from there.
    That mapping (on a thread of its own, with no deadline) wrote CLUSTER SLOTS on it at once, the setup
    still waiting for its reply: each read the other's, the setup failed (or went on with a wrong answer),
    and a reply left unread answered a later call. The mapping now waits for the setup to end."""
    for event in (_HeldSetup.armed, _HeldSetup.held, _HeldSetup.go):
        event.clear()
    _HeldSetup.foreign.clear()
    port = redis_cluster.ports[0]
    transport = SyncCluster(
        lambda: redis.cluster.RedisCluster(
            url=f"redis://127.0.0.1:{port}",  # with a URL, redis-py gives every node's pool the class
            connection_class=with_deadlines(_HeldSetup, 5.0),
            socket_timeout=TIMEOUT,
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
        )
    )
    key = name_on(redis_cluster, caller, 0)
    try:
        client: Any = transport._cluster(time.monotonic() + 5.0)
        node = client.get_node("127.0.0.1", port)
        client.nodes_manager.startup_nodes = {node.name: node}  # mapped again from it (else a random node)
        client.get_redis_connection(node).connection_pool.disconnect()
        _HeldSetup.armed.set()
        with pytest.raises(redis.exceptions.RedisError):  # it gave up waiting for the new connection
            transport.send([("INCRBY", key, 7)], time.monotonic() + TIMEOUT)
        assert _HeldSetup.held.wait(5.0)
        transport._remap(client)  # as the call's timeout does (if it was taken for a failure of Redis)
        remap = next(thread for thread in threading.enumerate() if thread.name == "ratelimit-cluster-remap")
        # Before, the mapping wrote at once, and ended on the setup's reply: it is given time to (no
        # assertion on how long it takes; a mapping that waits, as it must, simply waits that long).
        remap.join(0.5)
        _HeldSetup.go.set()
        remap.join(5.0)
        assert not remap.is_alive()
        deadline = time.monotonic() + 5.0
        assert transport.send([("INCRBY", key, 7)], deadline) == [7]  # no reply left from the crossing
        assert transport.send([("INCRBY", key, 1)], deadline) == [8]
        assert client.nodes_manager.get_node_from_slot(key_slot(key.encode())).port == port  # mapped
        assert _HeldSetup.foreign == []  # nothing was written on the connection while its setup ran
    finally:
        _HeldSetup.go.set()
        transport.close()
        caller.delete(key)


class _HeldAsyncSetup(redis.asyncio.connection.Connection):
    """``_HeldSetup`` for event loops (its events are set and waited for in one loop)."""

    armed = False
    held: asyncio.Event
    go: asyncio.Event
    foreign: ClassVar[list[Any]] = []
    setting_up: asyncio.Task[Any] | None = None

    async def connect(self) -> None:
        if self.is_connected:  # connected, or being set up in another task
            await super().connect()
            return
        self.setting_up = asyncio.current_task()
        try:
            await super().connect()
        finally:
            self.setting_up = None

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if self.setting_up not in (None, asyncio.current_task()):
            self.foreign.append(command)
        await super().send_packed_command(command, check_health)

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        if self.setting_up is asyncio.current_task() and self.armed and not self.held.is_set():
            self.held.set()
            await self.go.wait()
        return await super().read_response(*args, **kwargs)


def test_an_async_mapping_again_waits_for_the_setup_under_way_on_a_connection_it_takes(
    redis_cluster: RedisCluster, caller: redis.cluster.RedisCluster
) -> None:
    """``test_a_mapping_again_waits_for_the_setup_under_way_on_a_connection_it_takes`` for event loops: the
    mapping again (in a task of its own) found the connection connected, its handshake under way in the
    setup's task, and wrote CLUSTER SLOTS on it at once."""
    port = redis_cluster.ports[0]
    key = name_on(redis_cluster, caller, 0)

    async def scenario() -> None:
        _HeldAsyncSetup.armed = False
        _HeldAsyncSetup.held, _HeldAsyncSetup.go = asyncio.Event(), asyncio.Event()
        _HeldAsyncSetup.foreign.clear()
        client = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=port)
        nodes: Any = client.nodes_manager
        nodes.connection_kwargs["connection_class"] = _HeldAsyncSetup  # for the nodes it will make
        for node in nodes.startup_nodes.values():
            node.connection_class = _HeldAsyncSetup
        transport = AsyncCluster(client, 5.0)
        try:
            assert await transport.send([("INCRBY", key, 0)], time.monotonic() + 5.0) == [0]  # mapped
            node = nodes.get_node("127.0.0.1", port)
            nodes.startup_nodes = {node.name: node}  # mapped again from it (else a random node)
            await node.disconnect()  # a new connection needed
            _HeldAsyncSetup.armed = True
            with pytest.raises(asyncio.TimeoutError):  # it gave up waiting for the new connection
                await within(
                    lambda: transport.send([("INCRBY", key, 7)], time.monotonic() + TIMEOUT), TIMEOUT
                )
            await asyncio.wait_for(_HeldAsyncSetup.held.wait(), 5.0)
            transport._remap()  # as the call's timeout does
            remap = transport._remapping
            assert remap is not None
            # Before, the mapping wrote at once: it is given time to (see the sync test).
            await asyncio.wait((remap,), timeout=0.5)
            _HeldAsyncSetup.go.set()
            await asyncio.wait_for(remap, 5.0)
            deadline = time.monotonic() + 5.0
            assert await transport.send([("INCRBY", key, 7)], deadline) == [7]  # no reply left over
            assert await transport.send([("INCRBY", key, 1)], deadline) == [8]
            assert nodes.get_node_from_slot(key_slot(key.encode())).port == port  # mapped
            assert _HeldAsyncSetup.foreign == []  # nothing written on the connection while its setup ran
        finally:
            _HeldAsyncSetup.go.set()
            await transport.aclose()

    try:
        asyncio.run(scenario())
    finally:
        caller.delete(key)


def test_the_end_of_an_event_loop_maps_nothing_again(
    redis_cluster: RedisCluster, caller: redis.cluster.RedisCluster
) -> None:
    """``asyncio.run`` ending while an async cluster call waits for its reply cancels the call. That
    cancellation mapped the cluster again, as the call's deadline does, in a task the ending loop never ran
    to its end ("Task was destroyed but it is pending", "coroutine ... was never awaited"). A call cancelled
    by its caller, before its deadline, says nothing of the node: nothing is mapped again."""
    index = 0
    key = name_on(redis_cluster, caller, index)
    transport: AsyncCluster | None = None

    async def main() -> None:
        nonlocal transport
        transport = AsyncCluster(
            redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0]), 5.0
        )
        assert await transport.send([("INCRBY", key, 1)], time.monotonic() + 5.0) == [1]  # mapped, connected
        redis_cluster.nodes[index].pause()
        call = asyncio.ensure_future(transport.send([("INCRBY", key, 1)], time.monotonic() + 60.0))
        for _ in range(10):  # it writes its command, and waits for the reply; the loop then ends
            await asyncio.sleep(0)
        assert not call.done()

    async def cut() -> None:
        """A call its deadline cuts short, on the same paused node, still has the cluster mapped again."""
        transport = AsyncCluster(
            redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0]), 5.0
        )
        try:
            await transport.send([("INCRBY", key, 1)], time.monotonic() + 5.0)
            redis_cluster.nodes[index].pause()
            try:
                deadline = time.monotonic() + TIMEOUT  # as the storage's calls: before their ``within``
                with pytest.raises(asyncio.TimeoutError):
                    await within(lambda: transport.send([("INCRBY", key, 1)], deadline), TIMEOUT)
            finally:
                redis_cluster.nodes[index].resume()
            assert transport._remapping is not None
            await transport._remapping
        finally:
            await transport.aclose()

    try:
        asyncio.run(main())
        assert transport is not None
        assert transport._remapping is None
        redis_cluster.nodes[index].resume()
        asyncio.run(cut())
    finally:
        redis_cluster.nodes[index].resume()
        caller.delete(key)
