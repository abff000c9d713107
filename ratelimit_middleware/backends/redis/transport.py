"""Sending commands: one round trip for a batch on a standalone Redis, one per command on a cluster.

``send(commands)`` returns one reply per command, in order, with a command's error reply (a
``ResponseError``, such as NOSCRIPT) in its place; a connection error or timeout is raised for the whole
batch. The sync transports also take the call's ``deadline`` (``time.monotonic()``): every socket wait of the
call is cut to what is left of it, connecting included, and on a cluster mapping it again too (see
``with_deadlines``); a first mapping of the cluster is waited for until then only.

A standalone Redis is reached through a pool of our own: a batch is written at once and its replies
read in order on one connection, which is closed (never reused) if anything goes wrong midway, so that a
late reply can never be read as the answer to a later command. A cluster is mapped by redis-py's cluster
client, whose node pools the commands then go through one by one (sync) or which sends them (asyncio).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Protocol

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
import redis.connection
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

_pack_command: Callable[[tuple[Any, ...]], Any] | None
try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - the redis extra installs hiredis
    _pack_command = None
else:
    _pack_command = _hiredis_pack

__all__ = [
    "AsyncCluster",
    "AsyncPool",
    "AsyncTransport",
    "Command",
    "SyncCluster",
    "SyncPool",
    "SyncTransport",
    "pack",
    "with_deadlines",
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


class SyncTransport(Protocol):
    pipelined: bool
    """True when a batch is one round trip (a standalone Redis); False when each command is one."""

    def send(self, commands: Sequence[Command], deadline: float) -> list[Any]: ...

    def close(self) -> None: ...


class AsyncTransport(Protocol):
    pipelined: bool

    async def send(self, commands: Sequence[Command]) -> list[Any]: ...

    async def aclose(self) -> None: ...


def _left(deadline: float) -> float:
    """Seconds left until ``deadline``; ``TimeoutError`` once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise RedisTimeoutError("the limiter's timeout ran out")
    return left


def _wait_until(connection: Any, deadline: float) -> None:
    """Let ``connection``'s next socket operation wait only until ``deadline``."""
    left = _left(deadline)
    sock = connection._sock  # redis-py's socket: its timeout bounds every read and write
    if sock is not None:
        sock.settimeout(left)


def _exchange(pool: redis.ConnectionPool, commands: Sequence[Command]) -> list[Any]:
    """``commands`` written at once on a connection of ``pool``, and their replies read in order (error
    replies in place); the connection is closed if anything goes wrong midway. Run it ``_until`` the
    call's deadline: the pool's connections are ``with_deadlines``, so that every wait ends by it."""
    connection: Any = pool.get_connection()
    try:
        connection.send_packed_command([pack(commands)])
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(connection.read_response())
            except ResponseError as error:  # the reply was read whole: the connection is in step
                replies.append(error)
        return replies
    except BaseException:
        connection.disconnect()
        raise
    finally:
        pool.release(connection)


class SyncPool:
    """A standalone Redis, for the sync methods: every batch pipelined on one pooled connection."""

    pipelined = True

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self.pool = pool

    def send(self, commands: Sequence[Command], deadline: float) -> list[Any]:
        with _until(deadline):  # every wait of the pool's ``with_deadlines`` connections, connecting included
            return _exchange(self.pool, commands)

    def close(self) -> None:
        self.pool.disconnect()


class AsyncPool:
    """``SyncPool`` for one event loop."""

    pipelined = True

    def __init__(self, pool: redis.asyncio.ConnectionPool) -> None:
        self.pool = pool

    async def send(self, commands: Sequence[Command]) -> list[Any]:
        pool: Any = self.pool
        connection: Any = await pool.get_connection()
        try:
            await connection.send_packed_command(pack(commands))
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as error:
                    replies.append(error)
            return replies
        except BaseException:  # a timeout or a cancellation midway: never reuse this connection
            await connection.disconnect(nowait=True)
            raise
        finally:
            await pool.release(connection)

    async def aclose(self) -> None:
        await self.pool.disconnect()


# The sync cluster relies on redis-py internals, all named here: a connection's ``_sock`` (``_wait_until``)
# and ``_connect``, which opens the socket with ``socket_connect_timeout`` and leaves it (for a TLS handshake
# too) with ``socket_timeout`` (``with_deadlines``); the cluster client's ``nodes_manager``, its map of
# the slots (``SyncCluster._send``); and its building of each node's pool from the connection class it is
# given along with a URL (``clients.Endpoint.sync_cluster``).


class _Call(threading.local):
    deadline: float | None = None
    """The deadline of the sync call running on this thread, if any."""


_call = _Call()


@contextlib.contextmanager
def _until(deadline: float) -> Iterator[None]:
    """While it lasts, every wait of a ``with_deadlines`` connection on this thread ends by ``deadline``."""
    _call.deadline = deadline
    try:
        yield
    finally:
        _call.deadline = None


class _Deadlines:
    """The waits of ``with_deadlines`` connections (a mixin of redis-py's connection classes)."""

    socket_connect_timeout: float | None
    socket_timeout: float | None

    def _connect(self) -> Any:
        parent: Any = super()  # untyped in redis-py
        deadline = _call.deadline
        if deadline is None:
            return parent._connect()
        timeouts = self.socket_connect_timeout, self.socket_timeout
        self.socket_connect_timeout = self.socket_timeout = _left(deadline)
        try:
            return parent._connect()
        finally:
            self.socket_connect_timeout, self.socket_timeout = timeouts

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        deadline = _call.deadline
        if deadline is not None:
            _wait_until(self, deadline)
        parent: Any = super()
        parent.send_packed_command(command, check_health)

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        deadline = _call.deadline
        if deadline is not None:
            _wait_until(self, deadline)
        parent: Any = super()
        return parent.read_response(*args, **kwargs)


_WITH_DEADLINES: dict[type[Any], type[Any]] = {}


def with_deadlines(connection_class: type[Any]) -> type[Any]:
    """``connection_class`` (a redis-py connection class) whose waits end by the deadline of the sync call
    on their thread.

    redis-py waits on its own within a call: connecting and the handshake that follows (CLIENT SETINFO,
    AUTH...), and on a cluster mapping it again (CLUSTER SLOTS on one node after another). While a sync
    transport's ``send`` runs on a thread, every connect, write and read of that thread is cut to what is
    left of the call's deadline, and fails at once when nothing is: a call never outlasts its deadline,
    however many waits it takes. On any other thread it is the plain class (its own timeouts).
    """
    made = _WITH_DEADLINES.get(connection_class)
    if made is None:  # one per class, made once
        made = type(f"Deadline{connection_class.__name__}", (_Deadlines, connection_class), {})
        _WITH_DEADLINES[connection_class] = made
    return made


_REDIRECTS = 5
"""MOVED or ASK replies a command follows (each a round trip within its deadline) before it fails."""


_new_node: Any = redis.cluster.ClusterNode  # untyped in redis-py


def _slot(command: Command) -> int:
    """The slot of a command's keys (which share one): after the script and its key count for EVAL and
    EVALSHA, first for the others."""
    return key_slot(_encode(command[3] if command[0] in ("EVAL", "EVALSHA") else command[1]))


class SyncCluster:
    """A Redis Cluster, for the sync methods: each command to its slot's node, one after the other.

    redis-py's cluster client maps the slots to nodes and keeps a pool per node, but the commands go through
    those pools here, each written and read within the call's deadline: its ``execute_command`` waits a full
    socket timeout per command and then sleeps or maps the cluster again, whatever time is left. A MOVED or
    ASK reply (the slot moved, or is moving) is no failure: the command goes to the node named, while time is
    left; neither reply ran it, whereas a script that timed out may have run, so that is never sent again.

    A node that failed or answered MOVED is suspect: the cluster is mapped again (in what is left of the
    call) before the next command to it, to learn where its slots went. Only its calls pay for that.

    The cluster client is made on first use, so that constructing a limiter never contacts Redis. Making it
    maps the cluster (CLUSTER SLOTS from one startup node after another, then COMMAND), which can take longer
    than one call may wait: it is made on a thread of its own, each of its waits up to the timeout, and the
    calls wait for it until their deadlines only. A mapping that outlasts a call so still serves the next
    ones; a failure to make it fails the calls waiting for it, and the next call makes it again.
    """

    pipelined = False

    def __init__(self, make: Callable[[], redis.cluster.RedisCluster]) -> None:
        self._make = make
        self._client: redis.cluster.RedisCluster | None = None
        self._making: Future[redis.cluster.RedisCluster] | None = None
        self._lock = threading.Lock()
        self._suspects: set[str] = set()  # names of the nodes to map the cluster again before using

    def _cluster(self, deadline: float) -> redis.cluster.RedisCluster:
        client = self._client
        if client is not None:
            return client
        with self._lock:
            making = self._making
            if making is None:
                making = self._making = Future()
                threading.Thread(
                    target=self._made, args=(making,), name="ratelimit-cluster-map", daemon=True
                ).start()
        try:
            return making.result(_left(deadline))
        except FutureTimeout:
            raise RedisTimeoutError("the limiter's timeout ran out while mapping the cluster") from None

    def _made(self, making: Future[redis.cluster.RedisCluster]) -> None:
        """Make the cluster client for ``making`` (on a thread of its own)."""
        try:
            client = self._make()
        except BaseException as error:
            with self._lock:
                self._making = None  # the next call tries again
            making.set_exception(error)
            return
        with self._lock:
            current = self._making is making
            if current:
                self._client, self._making = client, None
        if not current:  # closed meanwhile
            client.close()
        making.set_result(client)

    def send(self, commands: Sequence[Command], deadline: float) -> list[Any]:
        with _until(deadline):
            client = self._cluster(deadline)
            return [self._send(client, command) for command in commands]

    def _send(self, client: Any, command: Command) -> Any:
        nodes = client.nodes_manager
        slot = _slot(command)
        node = nodes.get_node_from_slot(slot)
        if node.name in self._suspects:
            self._suspects.discard(node.name)
            nodes.initialize()
            node = nodes.get_node_from_slot(slot)
        sent = [command]
        for _ in range(1 + _REDIRECTS):
            try:
                reply = _exchange(client.get_redis_connection(node).connection_pool, sent)[-1]
            except (RedisConnectionError, RedisTimeoutError):
                self._suspects.add(node.name)
                raise
            if not isinstance(reply, AskError):
                return reply
            if isinstance(reply, MovedError):  # the slot has moved: map again before this node's next command
                self._suspects.add(node.name)
                sent = [command]
            else:  # the slot is moving: this command (only) goes to the importing node
                sent = [("ASKING",), command]
            node = client.get_node(reply.host, reply.port) or _new_node(reply.host, reply.port)
        return reply

    def close(self) -> None:
        with self._lock:
            client, self._client, self._making = self._client, None, None
        if client is not None:
            client.close()


class AsyncCluster:
    """A Redis Cluster for one event loop: the commands of a batch sent to their nodes concurrently.

    The cluster is mapped once before the first command: redis-py's asyncio cluster client, left to map it
    lazily, can close connections that concurrent first commands are using.
    """

    pipelined = False

    def __init__(self, client: redis.asyncio.cluster.RedisCluster) -> None:
        self.client = client
        self._mapped = False
        self._lock = asyncio.Lock()

    async def _map(self) -> None:
        async with self._lock:
            if not self._mapped:
                await self.client.initialize()
                self._mapped = True

    async def _one(self, command: Command) -> Any:
        try:
            return await self.client.execute_command(*command)
        except ResponseError as error:
            return error

    async def send(self, commands: Sequence[Command]) -> list[Any]:
        if not self._mapped:
            await self._map()
        if len(commands) == 1:
            return [await self._one(commands[0])]
        return list(await asyncio.gather(*(self._one(command) for command in commands)))

    async def aclose(self) -> None:
        await self.client.aclose()
