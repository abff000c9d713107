"""The clients a Redis storage talks through, and the one place that sends them commands.

A storage is given a ``redis.Redis`` (sync methods only), a ``redis.asyncio.Redis`` (async methods only) or a
URL (``redis://``, ``rediss://``, ``unix://``): then a sync client serves the sync methods and an asyncio
client the async ones, each created on first use (one per event loop, since an asyncio connection belongs to
the loop that opened it). Nothing here contacts Redis before the first command.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import redis
import redis.asyncio
import redis.asyncio.client
import redis.asyncio.cluster
import redis.client
import redis.cluster
import redis.connection
from redis.exceptions import NoScriptError

from .scripts import Script

__all__ = ["AsyncClient", "Connection", "RedisClient", "SyncClient"]


class SyncClient(Protocol):
    """What a sync client must offer: ``redis.Redis`` and its look-alikes."""

    def execute_command(self, *args: Any, **options: Any) -> Any: ...


class AsyncClient(Protocol):
    """What an asyncio client must offer: ``redis.asyncio.Redis`` and its look-alikes."""

    async def execute_command(self, *args: Any, **options: Any) -> Any: ...


RedisClient = SyncClient | AsyncClient | str
"""A ``redis.Redis``, a ``redis.asyncio.Redis``, or a URL."""

_CLUSTER_TYPES = (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster)
_PIPELINE_TYPES = (redis.client.Pipeline, redis.asyncio.client.Pipeline)
_parse_url: Callable[[str], object] = redis.connection.parse_url
Arg = bytes | str


class Connection:
    """The sync and asyncio clients of one storage; every command goes through ``evaluate``/``delete``."""

    def __init__(self, client: RedisClient) -> None:
        self._url: str | None = None
        self._sync: SyncClient | None = None
        self._async: AsyncClient | None = None
        self._lock = threading.Lock()
        self._own_sync: redis.Redis | None = None
        self._loop_clients: dict[asyncio.AbstractEventLoop, redis.asyncio.Redis] = {}
        if isinstance(client, str):
            _parse_url(client)  # a bad URL fails here, naming the schemes; nothing connects yet
            self._url = client
        elif isinstance(client, _CLUSTER_TYPES):
            raise TypeError(
                "Redis Cluster clients are not supported yet: pass a redis.Redis, a redis.asyncio.Redis or a "
                "redis:// URL"
            )
        elif isinstance(client, _PIPELINE_TYPES):
            raise TypeError("pass a Redis client, not a pipeline: the limiter sends its own commands")
        elif inspect.iscoroutinefunction(getattr(client, "execute_command", None)):
            self._async = client
        elif callable(getattr(client, "execute_command", None)):
            self._sync = client
        else:
            raise TypeError(
                f"client must be a redis.Redis, a redis.asyncio.Redis or a redis://, rediss:// or unix:// "
                f"URL, got {client!r}"
            )

    # -- clients -------------------------------------------------------------------------------------

    def sync_client(self) -> SyncClient:
        """The client for sync calls; ``TypeError`` if the storage was given an asyncio client."""
        client = self._sync if self._sync is not None else self._own_sync
        if client is not None:
            return client
        if self._url is None:
            raise TypeError(
                "this Redis limiter was given an asyncio client (redis.asyncio.Redis): use the async "
                "methods (acheck, aallow, aget_request_count, areset), or pass a redis.Redis or a URL"
            )
        with self._lock:
            if self._own_sync is None:
                self._own_sync = redis.Redis.from_url(self._url)
            return self._own_sync

    def async_client(self) -> AsyncClient:
        """The client for async calls in the running loop; ``TypeError`` if given a sync client."""
        client = self._async
        if client is not None:
            return client
        if self._url is None:
            raise TypeError(
                "this Redis limiter was given a sync client (redis.Redis): use the sync methods (check, "
                "allow, get_request_count, reset), or pass a redis.asyncio.Redis or a URL"
            )
        loop = asyncio.get_running_loop()
        with self._lock:
            own = self._loop_clients.get(loop)
            if own is None:
                # Clients of loops that have closed can serve no one: forget them (``aclose`` them before
                # their loop ends to close their connections cleanly).
                for old in [old for old in self._loop_clients if old.is_closed()]:
                    del self._loop_clients[old]
                own = self._loop_clients[loop] = redis.asyncio.Redis.from_url(self._url)
            return own

    def check_sync(self) -> None:
        """Raise the ``TypeError`` of ``sync_client`` without creating a client."""
        if self._sync is None and self._url is None:
            self.sync_client()

    def check_async(self) -> None:
        """Raise the ``TypeError`` of ``async_client`` without creating a client."""
        if self._async is None and self._url is None:
            self.async_client()

    def close(self) -> None:
        """Close the sync client made from the URL (a client passed in belongs to the caller)."""
        with self._lock:
            client, self._own_sync = self._own_sync, None
        if client is not None:
            client.close()

    async def aclose(self) -> None:
        """Close the asyncio client made from the URL for the running loop."""
        with self._lock:
            client = self._loop_clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    # -- commands ------------------------------------------------------------------------------------

    def evaluate(self, script: Script, keys: Sequence[bytes], args: Sequence[Arg]) -> Any:
        """Run ``script`` by EVALSHA; after a Redis restart or ``SCRIPT FLUSH`` (NOSCRIPT), by EVAL, which
        also caches it again. Either way the script ran exactly once."""
        client = self.sync_client()
        try:
            return client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return client.execute_command("EVAL", script.source, len(keys), *keys, *args)

    async def aevaluate(self, script: Script, keys: Sequence[bytes], args: Sequence[Arg]) -> Any:
        """``evaluate`` for event loops."""
        client = self.async_client()
        try:
            return await client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await client.execute_command("EVAL", script.source, len(keys), *keys, *args)

    def delete(self, keys: Sequence[bytes]) -> None:
        """Delete ``keys`` (one command)."""
        self.sync_client().execute_command("DEL", *keys)

    async def adelete(self, keys: Sequence[bytes]) -> None:
        """``delete`` for event loops."""
        await self.async_client().execute_command("DEL", *keys)
