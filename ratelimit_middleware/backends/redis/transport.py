"""Sending commands: one round trip for a batch on a standalone Redis, one per command on a cluster.

``send(commands)`` returns one reply per command, in order, with a command's error reply (a
``ResponseError``, such as NOSCRIPT) in its place; a connection error or timeout is raised for the whole
batch. The sync transports also take the call's ``deadline`` (``time.monotonic()``): every socket wait of
a standalone Redis is shortened to what is left of it, and a cluster sends no further command once it has
passed.

A standalone Redis is reached through a pool of our own: a batch is written at once and its replies
read in order on one connection, which is closed (never reused) if anything goes wrong midway, so that a
late reply can never be read as the answer to a later command. A cluster is reached through redis-py's
cluster client, which routes each command to its slot's node and follows MOVED and ASK redirections.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.exceptions import ResponseError
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


def _wait_until(connection: Any, deadline: float) -> None:
    """Let ``connection``'s next socket operation wait only until ``deadline``."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise RedisTimeoutError("the limiter's timeout ran out")
    sock = connection._sock  # redis-py's socket: its timeout bounds every read and write
    if sock is not None:
        sock.settimeout(left)


class SyncPool:
    """A standalone Redis, for the sync methods: every batch pipelined on one pooled connection."""

    pipelined = True

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self.pool = pool

    def send(self, commands: Sequence[Command], deadline: float) -> list[Any]:
        pool = self.pool
        connection: Any = pool.get_connection()  # connecting waits at most the timeout itself
        try:
            _wait_until(connection, deadline)
            connection.send_packed_command([pack(commands)])
            replies: list[Any] = []
            for _ in commands:
                _wait_until(connection, deadline)
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


class SyncCluster:
    """A Redis Cluster, for the sync methods: each command to its slot's node, one after the other.

    The cluster client is made on first use (it maps the cluster when created), so that constructing a
    limiter never contacts Redis; a failure to make it is a failure of that call, tried again on the next.
    """

    pipelined = False

    def __init__(self, make: Callable[[], redis.cluster.RedisCluster]) -> None:
        self._make = make
        self._client: redis.cluster.RedisCluster | None = None
        self._lock = threading.Lock()

    def _cluster(self) -> redis.cluster.RedisCluster:
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make()
                client = self._client
        return client

    def send(self, commands: Sequence[Command], deadline: float) -> list[Any]:
        client: Any = self._cluster()
        replies: list[Any] = []
        for index, command in enumerate(commands):
            # The first command always goes (mapping the cluster on first use is not a wait on Redis);
            # after it, none once the deadline has passed.
            if index and time.monotonic() >= deadline:
                raise RedisTimeoutError("the limiter's timeout ran out")
            try:
                replies.append(client.execute_command(*command))
            except ResponseError as error:
                replies.append(error)
        return replies

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
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
