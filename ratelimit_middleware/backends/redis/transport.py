"""Sending commands: one round trip for a batch on a standalone Redis, one per command on a cluster.

``send(commands, deadline, undos)`` returns one reply per command, in order, with a command's error reply (a
``ResponseError``, such as NOSCRIPT) in its place; a connection error or timeout is raised for the whole
batch. ``deadline`` is the call's (``time.monotonic()``). The sync transports cut every socket wait of the
call to what is left of it (see ``deadlines``); a first mapping of the cluster is waited for until then only,
and one again (after a node failed) goes on apart from the calls. The async ones run within a hard deadline
set by their caller, and use ``deadline`` only to judge a new connection (below) and to pause on a cluster
(TRYAGAIN). A new connection is set up apart from the calls, within ``setup`` seconds of its own, and waited
for until the call's deadline only: one that outlasts its call serves the next one (see ``deadlines``).

``undos`` holds, per command, the commands that undo it, harmless whether or not it ran (a reservation's
undo gives its concurrency leases back). A command written whose reply never came (a timeout, a
cancellation) may still run: Redis, busy meanwhile, reads it later. Its undos are then written after it on
its connection before that is closed, so that Redis, which runs the commands of one connection in order,
runs them after it (on another connection they might run first, and undo nothing).

A standalone Redis is reached through a pool of our own: a batch is written at once and its replies
read in order on one connection, which is closed (never reused) if anything goes wrong midway, so that a
late reply can never be read as the answer to a later command. A cluster is mapped by redis-py's cluster
client, whose nodes' connections the commands then go through, each to its slot's node, following MOVED,
ASK and TRYAGAIN themselves (``_Route``, shared by the sync and async clusters).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Protocol

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
import redis.connection
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError, RedisError, ResponseError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .deadlines import NotRun, again, refusal, seen, timed, unsent, until, with_setup

_pack_command: Callable[[tuple[Any, ...]], Any] | None
try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - the redis extra installs hiredis
    _pack_command = None
else:
    _pack_command = _hiredis_pack

__all__ = [
    "UNDO_WRITE",
    "AsyncCluster",
    "AsyncPool",
    "AsyncTransport",
    "Command",
    "NotRun",
    "SyncCluster",
    "SyncPool",
    "SyncTransport",
    "Undos",
    "pack",
]

Command = tuple[Any, ...]
"""A command and its arguments (str, bytes or int): ``("EVALSHA", sha, 1, key, ...)``."""


def _encode(arg: object) -> bytes:
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    return str(arg).encode()


def _pack_one(command: Command) -> bytes:
    """A command in the Redis protocol (RESP): hiredis' packer, or the same in Python."""
    if _pack_command is not None:
        return bytes(_pack_command(command))
    parts = [b"*%d\r\n" % len(command)]
    for arg in command:
        data = _encode(arg)
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def pack(commands: Sequence[Command]) -> bytes:
    """Commands in the Redis protocol, ready to be written at once (redis-py's own packer costs far more
    than the rest of a decision)."""
    return b"".join(_pack_one(command) for command in commands)


Undos = Sequence[Sequence[Command]]
"""Per command, the commands that undo it (none for most: ``()`` for all)."""


class SyncTransport(Protocol):
    pipelined: bool
    """True when a batch is one round trip (a standalone Redis); False when each command is one."""

    def send(self, commands: Sequence[Command], deadline: float, undos: Undos = ()) -> list[Any]: ...

    def close(self) -> None: ...


class AsyncTransport(Protocol):
    pipelined: bool

    async def send(self, commands: Sequence[Command], deadline: float, undos: Undos = ()) -> list[Any]: ...

    async def aclose(self) -> None: ...


UNDO_WRITE = 0.05
"""Seconds the write of the undos of commands left unanswered may take (sync): a few hundred bytes, which a
socket takes at once unless its buffer is full (then they are not written, and the command's effect stays
until it expires: a lease after ``lease`` seconds)."""


def _flat(undos: Undos) -> list[Command]:
    return [command for undo in undos for command in undo]


def _exchange(
    pool: redis.ConnectionPool, commands: Sequence[Command], undo: Sequence[Command] = ()
) -> list[Any]:
    """``commands`` written at once on a connection of ``pool``, and their replies read in order (error
    replies in place); the connection is closed if anything goes wrong midway, once ``undo`` is written on
    it if ``commands`` were (Redis, which may run them still, then runs ``undo`` after them: on another
    connection it might run first). Run it ``until`` the call's deadline: the pool's connections are
    ``with_deadlines``, so that every wait ends by it."""
    connection: Any = pool.get_connection()
    written = False
    try:
        connection.send_packed_command([pack(commands)])
        written = True
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(connection.read_response(disconnect_on_error=False))
            except ResponseError as error:  # the reply was read whole: the connection is in step
                replies.append(error)
        return replies
    except NotRun:  # raised before anything was written (see ``deadlines``): the connection is in step
        raise
    except BaseException:
        if written and undo and connection._sock is not None:  # redis-py closes it when a write fails
            with until(time.monotonic() + UNDO_WRITE), contextlib.suppress(RedisError, OSError):
                connection.send_packed_command([pack(undo)], check_health=False)
        connection.disconnect()
        raise
    finally:
        pool.release(connection)


class SyncPool:
    """A standalone Redis, for the sync methods: every batch pipelined on one pooled connection."""

    pipelined = True

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self.pool = pool

    def send(self, commands: Sequence[Command], deadline: float, undos: Undos = ()) -> list[Any]:
        with until(deadline):  # every wait of the pool's ``with_deadlines`` connections
            return _exchange(self.pool, commands, _flat(undos))

    def close(self) -> None:
        self.pool.disconnect()


async def _aexchange(connection: Any, commands: Sequence[Command], undo: Sequence[Command] = ()) -> list[Any]:
    """``_exchange`` for event loops, on an asyncio ``connection`` its caller holds (and releases); ``undo``
    is written without waiting (into the connection's buffer, which closing it sends first).

    The commands go into the connection's transport here, not through redis-py's ``send_packed_command``:
    that may be cancelled (the call's deadline) after its write, while it waits for the buffer to drain, and
    it then closes the connection, whose transport still sends the commands; the undo would not follow them.
    Here the commands count as written from the moment they are in the transport."""
    written = False
    try:
        connection._writer.write(pack(commands))
        written = True
        try:
            await connection._writer.drain()  # at once, unless Redis is not reading a large write
        except OSError as error:  # the connection was lost: redis-py's error, as send_packed_command raises
            raise RedisConnectionError(f"Error while writing to Redis: {error}") from error
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await connection.read_response(disconnect_on_error=False))
            except ResponseError as error:
                replies.append(error)
        return replies
    except BaseException:  # a timeout or a cancellation midway: never reuse this connection
        if written and undo and connection.is_connected:  # redis-py closes it when a write fails
            connection._writer.write(pack(undo))
        await connection.disconnect(nowait=True)
        raise


class AsyncPool:
    """``SyncPool`` for one event loop (its hard deadline is its caller's; the pool's connections are
    ``with_setup``, and read the deadline to judge a new connection)."""

    pipelined = True

    def __init__(self, pool: redis.asyncio.ConnectionPool) -> None:
        self.pool = pool

    async def send(self, commands: Sequence[Command], deadline: float, undos: Undos = ()) -> list[Any]:
        pool: Any = self.pool
        with until(deadline):
            connection: Any = await pool.get_connection()
        try:
            return await _aexchange(connection, commands, _flat(undos))
        finally:
            await pool.release(connection)

    async def aclose(self) -> None:
        await self.pool.disconnect()


# The transports rely on redis-py internals, all named here: a sync connection's ``_sock`` (its waits, in
# ``deadlines``; and whether ``_exchange`` may write undos on it) and an asyncio one's ``_writer``
# (``_aexchange`` writes its commands and undos there);
# for the sync cluster, a connection's ``_connect``, which opens the socket with ``socket_connect_timeout``
# and leaves it (for a TLS handshake too) with ``socket_timeout`` (``with_deadlines``); the cluster client's
# ``nodes_manager``, its map of the slots (``SyncCluster._send``); and its building of each node's pool from
# the connection class it is given along with a URL (``clients.Endpoint.sync_cluster``); for the asyncio
# cluster, its client's connection settings (``nodes_manager.connection_kwargs``, from which it makes its
# nodes) and its startup nodes' ``connection_class`` (``AsyncCluster``).


_REDIRECTS = 5
"""MOVED or ASK replies a command follows in a row (each a round trip within its deadline) before it fails."""

_PAUSE = 0.005
"""Seconds before a command that got TRYAGAIN goes again: long enough for a migration to move some keys,
short beside a call's timeout."""


_new_node: Any = redis.cluster.ClusterNode  # untyped in redis-py

_KEEP_POOLS: dict[str, bool] = (
    {"disconnect_startup_nodes_pools": False}
    if "disconnect_startup_nodes_pools" in inspect.signature(redis.cluster.NodesManager.initialize).parameters
    else {}
)
"""Mapping a sync cluster again keeps the startup nodes' free connections, where redis-py can (it closes
them by default, connections just set up apart from the calls included)."""


def _slot(command: Command) -> int:
    """The slot of a command's keys (which share one): after the script and its key count for EVAL and
    EVALSHA, first for the others."""
    return key_slot(_encode(command[3] if command[0] in ("EVAL", "EVALSHA") else command[1]))


class _Route:
    """Where one command on a cluster goes next, from the replies it gets (for the sync and async clusters).

    It goes to its slot's node in the map. MOVED (the slot has moved) and ASK (it is moving, and this
    command's keys are not all on the node) name the node to send it to, ASK with ASKING on the same
    connection, and so each command of its undo (an ASKING serves the next command only, and an importing
    node refuses the slot's commands without it); neither ran it. TRYAGAIN (the slot is moving and some keys
    of a command with several are on neither side, a new user's for instance) did not run it either: it goes
    to its slot's node again after a pause of ``_PAUSE``, while the deadline leaves time for the pause and as
    long again for the round trip, and raises ``NotRun`` after that. A healthy cluster moving one slot is no
    Redis failure: counted as one, it would open the breaker for the calls on every other slot.
    """

    def __init__(self, command: Command, deadline: float, undo: Sequence[Command] = ()) -> None:
        self.command = command
        self.deadline = deadline
        self._undo = undo
        self.sent: list[Command] = [command]
        """What to send next (on one connection)."""
        self.undo: Sequence[Command] = undo
        """What undoes ``sent``, written after it on its connection if its reply never comes."""
        self.address: tuple[str, int] | None = None
        """Where: ``None`` for the slot's node in the map, or the (host, port) a redirect named."""
        self.pause = 0.0
        """Seconds to wait before sending."""
        self._redirects = 0

    def done(self, reply: Any) -> bool:
        """Whether ``reply`` is the command's answer; if not, ``sent``, ``address`` and ``pause`` say where
        the command goes next. ``NotRun`` once a migration has outlasted what the deadline leaves."""
        if isinstance(reply, TryAgainError):
            if self.deadline - time.monotonic() < 2 * _PAUSE:
                raise NotRun(f"the cluster slot kept migrating until the limiter's timeout ran out ({reply})")
            self.sent, self.undo, self.address, self.pause = [self.command], self._undo, None, _PAUSE
            self._redirects = 0
            return False
        if not isinstance(reply, AskError) or self._redirects == _REDIRECTS:
            return True
        self._redirects += 1
        if isinstance(reply, MovedError):
            self.sent, self.undo = [self.command], self._undo
        else:
            self.sent = [("ASKING",), self.command]
            self.undo = [command for undo in self._undo for command in (("ASKING",), undo)]
        self.address, self.pause = (reply.host, reply.port), 0.0
        return False


class SyncCluster:
    """A Redis Cluster, for the sync methods: each command to its slot's node, one after the other.

    redis-py's cluster client maps the slots to nodes and keeps a pool per node, but the commands go through
    those pools here, each written and read within the call's deadline: its ``execute_command`` waits a full
    socket timeout per command and then sleeps or maps the cluster again, whatever time is left. MOVED, ASK
    and TRYAGAIN replies are no failures (see ``_Route``): none ran the command, whereas a script that timed
    out may have run, so that is never sent again.

    After a node failed or answered MOVED, the cluster is mapped again on a thread of its own (one at a time,
    ``_remap``), to learn where its slots went, while the calls go on with the map they have (following
    MOVED themselves). Mapped within a call, on a link a few tens of milliseconds long, the mapping outlasted
    the call (and redis-py dropped the startup node's free connections with it): the next call to that
    node mapped again, and such a cluster was hardly ever used.

    The cluster client is made on first use, so that constructing a limiter never contacts Redis. Making it
    maps the cluster (CLUSTER SLOTS from one startup node after another, then COMMAND), which can take longer
    than one call may wait: it is made on a thread of its own, each of its waits up to the timeout, and the
    calls wait for it until their deadlines only. A mapping that outlasts a call so still serves the next
    ones; a failure to make it fails the calls waiting for it, and the next call makes it again, unless
    Redis refused it (a wrong password, a Redis that is no cluster): that is reported for a while (``again``).
    """

    pipelined = False

    def __init__(self, make: Callable[[], redis.cluster.RedisCluster]) -> None:
        self._make = make
        self._client: redis.cluster.RedisCluster | None = None
        self._making: Future[redis.cluster.RedisCluster] | None = None
        self._lock = threading.Lock()
        self._remapping = False

    def _cluster(self, deadline: float) -> redis.cluster.RedisCluster:
        client = self._client
        if client is not None:
            return client
        with self._lock:
            making, refused = self._making, None
            if making is None or again(making):  # a mapping that failed unseen is made again
                refused = None if making is None else refusal(making)
                making = self._making = Future()
                threading.Thread(
                    target=self._made, args=(making,), name="ratelimit-cluster-map", daemon=True
                ).start()
        if refused is not None:
            raise refused  # until the new mapping ends
        try:
            return making.result(unsent(deadline))
        except FutureTimeout:
            raise RedisTimeoutError("the limiter's timeout ran out while mapping the cluster") from None

    def _made(self, making: Future[redis.cluster.RedisCluster]) -> None:
        """Make the cluster client for ``making`` (on a thread of its own); a failure stays, for ``again``
        to judge."""
        try:
            client = self._make()
        except BaseException as error:
            making.set_exception(error)
            return
        with self._lock:
            current = self._making is making
            if current:
                self._client, self._making = client, None
        if not current:  # closed meanwhile
            client.close()
        making.set_result(client)

    def send(self, commands: Sequence[Command], deadline: float, undos: Undos = ()) -> list[Any]:
        with until(deadline):
            client = self._cluster(deadline)
            undos = undos or [()] * len(commands)
            return [
                self._send(client, command, deadline, undo)
                for command, undo in zip(commands, undos, strict=True)
            ]

    def _node(self, client: Any, route: _Route) -> Any:
        """The node ``route`` goes to next."""
        if route.address is not None:
            return client.get_node(*route.address) or _new_node(*route.address)
        return client.nodes_manager.get_node_from_slot(_slot(route.command))

    def _remap(self, client: Any) -> None:
        """Map the cluster again on a thread of its own, unless that is under way."""
        with self._lock:
            if self._remapping:
                return
            self._remapping = True
        threading.Thread(
            target=self._remapped, args=(client,), name="ratelimit-cluster-remap", daemon=True
        ).start()

    def _remapped(self, client: Any) -> None:
        try:
            client.nodes_manager.initialize(**_KEEP_POOLS)
        except Exception:  # the map stays as it was; the next failure maps it again
            pass
        finally:
            with self._lock:
                self._remapping = False

    def _send(self, client: Any, command: Command, deadline: float, undo: Sequence[Command]) -> Any:
        route = _Route(command, deadline, undo)
        while True:
            if route.pause:
                time.sleep(route.pause)
            node = self._node(client, route)
            try:
                pool = client.get_redis_connection(node).connection_pool
                reply = _exchange(pool, route.sent, route.undo)[-1]
            except (RedisConnectionError, RedisTimeoutError):
                self._remap(client)
                raise
            if isinstance(reply, MovedError):  # the slot has moved
                self._remap(client)
            if route.done(reply):
                return reply

    def close(self) -> None:
        with self._lock:
            client, self._client, self._making = self._client, None, None
        if client is not None:
            client.close()


class AsyncCluster:
    """A Redis Cluster for one event loop: the commands of a batch sent to their nodes concurrently.

    redis-py's asyncio cluster client maps the slots and keeps a pool per node; the commands go through
    those pools here, routed as on the sync cluster (``_Route``), within the call's hard deadline: its
    ``execute_command`` retried TRYAGAIN until that deadline cut it short, as if Redis had failed, slept
    0.25 s on CLUSTERDOWN, and sent ASKING apart from the command it was for. The cluster is mapped once
    before the first command (redis-py's client, left to map it lazily, can close connections that
    concurrent first commands are using), and again in a task of its own after a node failed or answered
    MOVED, as on the sync cluster (``_remap``). That first mapping, like the setup of a node's new
    connection, runs apart from the calls, within ``setup`` seconds, and the calls wait for it until their
    deadline only: a mapping that outlasts them serves the next calls, and one that failed is tried again
    (after a while if Redis refused it: see ``again``).
    """

    pipelined = False

    def __init__(self, client: redis.asyncio.cluster.RedisCluster, setup: float) -> None:
        self.client = client
        self.setup = setup
        # Its nodes' connections (those of the nodes it has, and of those it makes from its settings) are
        # ``with_setup``: redis-py's asyncio cluster client takes no connection class.
        nodes: Any = client.nodes_manager
        settings = nodes.connection_kwargs
        settings["connection_class"] = with_setup(settings["connection_class"], setup)
        for node in nodes.startup_nodes.values():
            node.connection_class = settings["connection_class"]
        self._mapping: asyncio.Future[None] | None = None
        self._mapped = False
        self._lock = asyncio.Lock()
        self._remapping: asyncio.Future[None] | None = None

    async def _map(self) -> None:
        mapping, refused = self._mapping, None
        if mapping is None or again(mapping):  # a mapping that failed unseen is made again
            refused = None if mapping is None else refusal(mapping)
            mapping = asyncio.ensure_future(timed(self._initialize, self.setup, "mapping the Redis Cluster"))
            mapping.add_done_callback(seen)
            self._mapping = mapping
        if refused is not None:
            raise refused  # until the new mapping ends
        await asyncio.shield(mapping)  # the call's deadline cancels the wait, not the mapping (it stays)
        self._mapped = True

    async def _initialize(self) -> None:
        async with self._lock:
            await self.client.initialize()

    def _remap(self) -> None:
        """``SyncCluster._remap`` for event loops: in a task of its own, within ``setup`` seconds."""
        if self._remapping is None or self._remapping.done():
            self._remapping = asyncio.ensure_future(self._remapped())

    async def _remapped(self) -> None:
        async def initialize() -> None:
            nodes: Any = self.client.nodes_manager
            async with self._lock:
                await nodes.initialize()
            # redis-py marks every node's connections for reconnect, and a node closes each such connection
            # when it is released: every call would need a new connection, on a slow link longer to set up
            # than the call may wait, and its failure would map the cluster again. The limiter closes a
            # connection itself whenever a command on it fails. Nothing is awaited between redis-py's marks
            # and this, so that no call releases a connection meanwhile.
            for node in nodes.nodes_cache.values():
                for connection in node._connections:
                    getattr(connection, "reset_should_reconnect", lambda: None)()

        with contextlib.suppress(Exception):  # the map stays as it was; the next failure maps it again
            await timed(initialize, self.setup, "mapping the Redis Cluster again")

    def _node(self, route: _Route) -> Any:
        """``SyncCluster._node`` for event loops."""
        nodes: Any = self.client.nodes_manager
        if route.address is not None:
            node = nodes.get_node(*route.address)
            if node is None:  # a node the map has not met: added, as redis-py adds one that MOVED names
                node = redis.asyncio.cluster.ClusterNode(*route.address, **nodes.connection_kwargs)
                nodes.set_nodes(nodes.nodes_cache, {node.name: node})
            return node
        return nodes.get_node_from_slot(_slot(route.command))

    async def _one(self, command: Command, deadline: float, undo: Sequence[Command]) -> Any:
        route = _Route(command, deadline, undo)
        while True:
            if route.pause:
                await asyncio.sleep(route.pause)
            node = self._node(route)
            connection = node.acquire_connection()
            try:
                with until(deadline):  # the node's connections are ``with_setup``
                    await connection.connect()
                reply = (await _aexchange(connection, route.sent, route.undo))[-1]
            except (RedisConnectionError, RedisTimeoutError):
                self._remap()
                raise
            except asyncio.CancelledError:
                # Its deadline (its caller's ``within``, which comes after ``deadline``) cut it short; a
                # cancellation before that is its caller's (the end of the event loop, which would never run
                # a mapping begun then to its end; a client gone), and says nothing of the node.
                if time.monotonic() >= deadline:
                    self._remap()
                raise
            finally:
                node.release(connection)
            if isinstance(reply, MovedError):
                self._remap()
            if route.done(reply):
                return reply

    async def send(self, commands: Sequence[Command], deadline: float, undos: Undos = ()) -> list[Any]:
        if not self._mapped:
            await self._map()
        undos = undos or [()] * len(commands)
        if len(commands) == 1:
            return [await self._one(commands[0], deadline, undos[0])]
        return list(
            await asyncio.gather(
                *(self._one(command, deadline, undo) for command, undo in zip(commands, undos, strict=True))
            )
        )

    async def aclose(self) -> None:
        if self._remapping is not None:
            self._remapping.cancel()
        await self.client.aclose()
