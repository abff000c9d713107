"""The limiter's own connections to the caller's Redis: same server and credentials, its own timeout.

A limiter call must never block longer than its timeout, whatever the client it was given says (redis-py's
defaults are 5 s socket timeouts and 10 retries with backoff), and must not change that client for its other
uses. So a storage never sends through the client it is given: it reads the client's connection settings
(or parses the URL) and builds pools, and cluster clients, of its own, with ``socket_timeout`` set to the
limiter's timeout, connections set up apart from the calls within ``setup`` seconds (see ``deadlines``), and
every retry off: a script that may already have run is never sent twice. Nothing here connects: a pool
connects on its first command, and a cluster client (which maps the cluster as soon as it is created) is
made on first use by the caller of ``sync_cluster`` / ``async_cluster``.

A URL is ``redis://``, ``rediss://`` (TLS) or ``unix://`` for a standalone Redis, ``redis+cluster://`` or
``rediss+cluster://`` for a Redis Cluster (any node of it: the others are found from it), the scheme in any
case. Its options are checked here (redis-py passes those it does not know to the connections, which reject
them when the first call connects): one the connections do not take fails now, naming it.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol
from urllib.parse import parse_qs, urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.client
import redis.asyncio.cluster
import redis.asyncio.connection
import redis.asyncio.retry
import redis.client
import redis.cluster
import redis.connection
import redis.retry
from redis.backoff import NoBackoff

from .deadlines import with_deadlines, with_setup

try:
    from redis.maint_notifications import MaintNotificationsConfig
except ImportError:  # pragma: no cover - redis-py without maintenance notifications: nothing to turn off
    _QUIET: dict[str, Any] = {}
else:
    # Maintenance notifications would relax the socket timeouts (to 10 s by default) during a failover,
    # and cost a command on every new connection: off.
    _QUIET = {"maint_notifications_config": MaintNotificationsConfig(enabled=False)}

__all__ = ["AsyncClient", "Endpoint", "RedisClient", "SyncClient"]


class SyncClient(Protocol):
    """A ``redis.Redis`` or ``redis.cluster.RedisCluster`` (only its settings are read)."""

    def execute_command(self, *args: Any, **options: Any) -> Any: ...


class AsyncClient(Protocol):
    """A ``redis.asyncio.Redis`` or ``redis.asyncio.cluster.RedisCluster`` (only its settings are read)."""

    async def execute_command(self, *args: Any, **options: Any) -> Any: ...


RedisClient = SyncClient | AsyncClient | str
"""A ``redis.Redis``, a ``redis.asyncio.Redis``, either's ``RedisCluster``, or a URL."""

_CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
"""The URL schemes of a Redis Cluster: ``redis+cluster://host:port`` names any node of it."""
_SCHEMES = (
    "its scheme must be one of redis://, rediss://, unix:// (one Redis), redis+cluster://, rediss+cluster:// "
    "(a Redis Cluster)"
)

# Per-pool state redis-py keeps in a pool's connection settings: never carried over to our pools.
_POOL_STATE = frozenset(
    {
        "cache",
        "cache_config",
        "event_dispatcher",
        "himport_registry",
        "maint_notifications_config",
        "maint_notifications_pool_handler",
        "orig_host_address",
        "orig_socket_connect_timeout",
        "orig_socket_timeout",
        "oss_cluster_maint_notifications_handler",
        "retry_on_timeout",
    }
)
# What a cluster client must not be given from a node's settings: the limiter sets these, or the cluster
# client sets them for each node itself.
_NOT_FOR_CLUSTER = frozenset(
    {
        "connection_class",
        "connection_pool",
        "connection_pool_class",
        "db",
        "health_check_interval",
        "host",
        "max_connections",
        "path",
        "port",
        "redis_connect_func",
        "response_callbacks",
        "retry",
        "retry_on_error",
        "startup_nodes",
        *_POOL_STATE,
    }
)
_SYNC_CLUSTER_OPTIONS = frozenset(redis.cluster.REDIS_ALLOWED_KEYS)
_ASYNC_CLUSTER_OPTIONS = frozenset(inspect.signature(redis.asyncio.cluster.RedisCluster).parameters)
_URL_CLUSTER_OPTIONS = (_SYNC_CLUSTER_OPTIONS & _ASYNC_CLUSTER_OPTIONS) - _NOT_FOR_CLUSTER - {"ssl"}
"""The options a cluster URL may have: those both cluster clients take (TLS is the ``rediss+cluster``
scheme)."""
_URL_PARTS = frozenset({"host", "port", "username", "password", "db", "connection_class"})
_HINTS = {
    "cluster": "name a Redis Cluster with a redis+cluster:// URL",
    "ssl": "use a rediss:// URL for TLS",
    "timeout": "the limiter's timeout is RedisStorage(timeout=...)",
    "max": "the limiter's pools are not capped, as a call that found one full would fail with Redis healthy; "
    "Redis' maxclients bounds its connections",
}
_PIPELINES = (redis.client.Pipeline, redis.asyncio.client.Pipeline)

_MAX_CONNECTIONS = 2**31
"""The connections each of the limiter's pools (per standalone Redis, per cluster node; sync and asyncio) may
hold: no practical cap, as redis-py's pools once had by default. redis-py 8 caps them at 100 unless told,
and a call that finds its pool full fails at once (``MaxConnectionsError``) with Redis healthy: a burst of
more than 100 calls in flight (threads, or asyncio calls that are not coalesced: settlements, renewals,
every call on a cluster) had the rest answered by ``on_error``, their settlements dropped. A pool holds as
many connections as calls were in flight at once; Redis' own ``maxclients`` (10000 by default) is the real
bound, and its refusal is a failure of Redis."""


class _Pool(NamedTuple):
    """How to make connections to one standalone Redis: a connection class and its settings.

    Not the pool's ``max_connections``: the caller sized it for its own use, and a limiter call that found
    the pool full would fail (and fail open) with Redis healthy. The limiter's pools have
    ``_MAX_CONNECTIONS``."""

    connection_class: type[Any]
    settings: Mapping[str, Any]


class _Cluster(NamedTuple):
    """How to reach one Redis Cluster: where to start, and the settings of every node's connections."""

    nodes: list[tuple[str, int]]
    settings: Mapping[str, Any]
    address_remap: Any


def _pool_of(pool: Any) -> _Pool:
    return _Pool(pool.connection_class, dict(pool.connection_kwargs))


def _cluster_of(cluster: Any) -> _Cluster:
    manager = cluster.nodes_manager
    nodes = cluster.get_nodes() or list(manager.startup_nodes.values())
    settings = getattr(cluster, "connection_kwargs", None)  # asyncio: the nodes' settings
    if settings is None:  # sync: read them from a node's pool
        pools = [node.redis_connection.connection_pool for node in nodes if node.redis_connection]
        settings = (
            dict(pools[0].connection_kwargs, connection_class=pools[0].connection_class) if pools else {}
        )
    return _Cluster(
        [(node.host, int(node.port)) for node in nodes],
        dict(settings),
        getattr(manager, "address_remap", None),
    )


def _is_tls(connection_class: object) -> bool:
    return isinstance(connection_class, type) and issubclass(
        connection_class, (redis.connection.SSLConnection, redis.asyncio.connection.SSLConnection)
    )


def _masked(url: str) -> str:
    """``url`` with its password, if it has one, written ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user, _, address = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user.partition(':')[0]}:***@{address}"))


def _bad_url(url: str, problem: str) -> ValueError:
    return ValueError(f"Redis URL {_masked(url)!r}: {problem}")


def _option_problem(error: Exception, what: str) -> str:
    """What is wrong with a URL whose settings ``what`` rejected with ``error``."""
    match = re.search(r"unexpected keyword argument '(\w+)'", str(error))
    if match is None:
        return str(error)
    return _unknown_option(match.group(1), what)


def _unknown_option(name: str, what: str) -> str:
    hint = _HINTS.get(name.partition("_")[0])
    return f"{name!r} is not an option {what} takes" + (f" ({hint})" if hint else "")


def _cluster_of_url(url: str) -> _Cluster:
    """The cluster a ``redis+cluster://`` or ``rediss+cluster://`` URL names, its options checked."""
    scheme, _, rest = url.partition("://")
    parse: Any = redis.connection.parse_url  # untyped in redis-py
    try:
        settings: dict[str, Any] = parse(f"{scheme.lower().removesuffix('+cluster')}://{rest}")
    except ValueError as error:
        raise _bad_url(url, str(error)) from None
    unknown = sorted(set(settings) - _URL_PARTS - _URL_CLUSTER_OPTIONS)
    if unknown:
        raise _bad_url(url, _unknown_option(unknown[0], "a Redis Cluster client"))
    if settings.get("db", 0) != 0:
        raise _bad_url(url, f"a Redis Cluster has database 0 only, got {settings['db']}")
    if not settings.get("host"):
        raise _bad_url(url, "it names no host (any node of the cluster will do)")
    host, port = settings.pop("host"), int(settings.pop("port", 6379))
    return _Cluster([(host, port)], settings, None)


def _check_path(url: str) -> None:
    """``ValueError`` for a path redis-py would take and every call then fail on, or ignore: a ``unix://``
    URL naming no socket, a database that is no number."""
    path = urlsplit(url).path
    if url.lower().startswith("unix:"):
        if not path.strip("/"):
            raise _bad_url(url, "it names no socket: unix:///path/to/redis.sock")
        return
    database = path.strip("/")
    if database and not database.isdigit():
        raise _bad_url(url, f"the database must be a number, got {database!r}")


def _check_connections(url: str, *makes: Callable[[], Any]) -> None:
    """``ValueError`` naming what ``url``'s connections reject: each of ``makes`` makes one, unconnected,
    which encodes a string (an unknown ``encoding`` fails only then)."""
    for make in makes:
        try:
            make().encoder.encode("limiter")
        except (TypeError, ValueError, LookupError, redis.RedisError) as error:
            raise _bad_url(url, _option_problem(error, "a Redis connection")) from None


class Endpoint:
    """What a storage was given, turned into factories of the limiter's own pools and cluster clients.

    ``serves_sync``/``serves_async``: which methods it can serve (a URL serves both); ``cluster``: whether
    it is a Redis Cluster, whose keys of one script must share a slot. ``setup``: seconds a new connection
    may take to be set up, apart from the calls.
    """

    def __init__(self, client: RedisClient, timeout: float, setup: float) -> None:
        self.timeout = timeout
        self.setup = setup
        self._sync_pool: _Pool | None = None
        self._async_pool: _Pool | None = None
        self._cluster: _Cluster | None = None
        self.cluster = False
        self.serves_sync = self.serves_async = False
        if isinstance(client, str):
            # A bad URL fails here, naming the schemes or the option; nothing connects yet.
            scheme, separator, rest = client.partition("://")
            scheme = scheme.lower()  # schemes are case-insensitive; redis-py takes them in lower case only
            if scheme in _CLUSTER_SCHEMES:
                self._cluster = _cluster_of_url(client)
                self.cluster = True
                self._check_cluster(client)
            elif scheme in ("redis", "rediss", "unix"):
                url = f"{scheme}{separator}{rest}"
                if "max_connections" in parse_qs(urlsplit(url).query):
                    raise _bad_url(client, _unknown_option("max_connections", "the limiter"))
                try:
                    self._sync_pool = _pool_of(redis.ConnectionPool.from_url(url))
                    self._async_pool = _pool_of(redis.asyncio.ConnectionPool.from_url(url))
                except ValueError as error:
                    raise _bad_url(client, str(error)) from None
                self._check(client)
            else:
                raise _bad_url(client, _SCHEMES)
            self.serves_sync = self.serves_async = True
        elif isinstance(client, _PIPELINES):
            raise TypeError("pass a Redis client, not a pipeline: the limiter sends its own commands")
        elif isinstance(client, redis.Redis):
            self._sync_pool = _pool_of(client.connection_pool)
            self.serves_sync = True
        elif isinstance(client, redis.asyncio.Redis):
            self._async_pool = _pool_of(client.connection_pool)
            self.serves_async = True
        elif isinstance(client, redis.cluster.RedisCluster):
            self._cluster = _cluster_of(client)
            self.cluster = self.serves_sync = True
        elif isinstance(client, redis.asyncio.cluster.RedisCluster):
            self._cluster = _cluster_of(client)
            self.cluster = self.serves_async = True
        else:
            raise TypeError(
                "client must be a redis.Redis, a redis.asyncio.Redis, a redis.cluster.RedisCluster, a "
                "redis.asyncio.cluster.RedisCluster or a redis://, rediss://, unix://, redis+cluster:// or "
                f"rediss+cluster:// URL, got {client!r}"
            )

    def _check(self, url: str) -> None:
        """``ValueError`` naming what the connections would reject in a standalone Redis's ``url`` (redis-py
        passes the options it does not know to them): one connection of each pool is made, unconnected."""
        _check_path(url)
        _check_connections(url, lambda: self.sync_pool().make_connection(), self.async_pool().make_connection)

    def _check_cluster(self, url: str) -> None:
        """``_check`` for a cluster's ``url``: a connection to its node, sync and asyncio, as each cluster
        client would make it (every call would otherwise fail on it, as if the cluster were down)."""
        assert self._cluster is not None
        _check_path(url)
        (host, port), *_ = self._cluster.nodes
        plain, sync = self._sync_cluster_settings()
        settings: Any = redis.cluster.cleanup_kwargs  # untyped in redis-py: the node pools' settings
        node: Any = redis.asyncio.cluster.ClusterNode
        _check_connections(
            url,
            lambda: redis.ConnectionPool(
                connection_class=plain, host=host, port=port, **settings(**sync)
            ).make_connection(),
            lambda: node(
                host, port, **self.async_cluster().nodes_manager.connection_kwargs
            ).acquire_connection(),
        )

    def _pool_settings(self, pool: _Pool, retry: object, read_timeout: float | None) -> dict[str, Any]:
        settings = {name: value for name, value in pool.settings.items() if name not in _POOL_STATE}
        settings.update(
            socket_timeout=read_timeout,
            socket_connect_timeout=self.setup,
            retry=retry,
            retry_on_error=[],
            health_check_interval=0,
            decode_responses=False,
            **_QUIET,
        )
        return settings

    def _cluster_settings(self, accepted: frozenset[str]) -> dict[str, Any]:
        assert self._cluster is not None
        settings = self._cluster.settings
        options = {
            name: value
            for name, value in settings.items()
            if name in accepted and name not in _NOT_FOR_CLUSTER
        }
        if _is_tls(settings.get("connection_class")):
            options["ssl"] = True
        options.update(
            socket_timeout=self.timeout,
            socket_connect_timeout=self.setup,
            decode_responses=False,
            address_remap=self._cluster.address_remap,
            max_connections=_MAX_CONNECTIONS,  # per node
            **_QUIET,
        )
        return options

    def _sync_cluster_settings(self) -> tuple[type[redis.connection.Connection], dict[str, Any]]:
        """The sync cluster's connection class (TLS or not: redis-py's sync client takes no ``ssl`` with a
        class) and its settings."""
        options = self._cluster_settings(_SYNC_CLUSTER_OPTIONS)
        plain = redis.connection.SSLConnection if options.pop("ssl", False) else redis.connection.Connection
        return plain, options

    def sync_pool(self) -> redis.ConnectionPool:
        """A new pool to the standalone Redis, for the sync methods."""
        assert self._sync_pool is not None
        return redis.ConnectionPool(
            connection_class=with_deadlines(self._sync_pool.connection_class, self.setup),
            max_connections=_MAX_CONNECTIONS,
            **self._pool_settings(self._sync_pool, redis.retry.Retry(NoBackoff(), 0), self.timeout),
        )

    def async_pool(self) -> redis.asyncio.ConnectionPool:
        """A new pool to the standalone Redis, for the async methods (one per event loop)."""
        assert self._async_pool is not None
        return redis.asyncio.ConnectionPool(
            connection_class=with_setup(self._async_pool.connection_class, self.setup),
            max_connections=_MAX_CONNECTIONS,
            # No per-read timeout: every async call has a deadline of ``timeout`` for all its reads.
            **self._pool_settings(self._async_pool, redis.asyncio.retry.Retry(NoBackoff(), 0), None),
        )

    def sync_cluster(self) -> redis.cluster.RedisCluster:
        """A new cluster client (it connects to map the cluster now), for the sync methods: its connections
        are ``with_deadlines``, so that no wait of redis-py's own outlasts the call that made it wait."""
        assert self._cluster is not None
        plain, options = self._sync_cluster_settings()
        (host, port), *others = self._cluster.nodes
        node: Any = redis.cluster.ClusterNode
        return redis.cluster.RedisCluster(
            # Given a URL (its node is one more startup node), redis-py builds each node's pool with the
            # connection class; without one it passes the settings to redis.Redis, which takes none.
            url=f"redis://[{host}]:{port}" if ":" in host else f"redis://{host}:{port}",
            startup_nodes=[node(*address) for address in others],
            connection_class=with_deadlines(plain, self.setup),
            retry=redis.retry.Retry(NoBackoff(), 0),
            **options,
        )

    def async_cluster(self) -> redis.asyncio.cluster.RedisCluster:
        """A new cluster client for the async methods (one per loop; it maps the cluster on first use)."""
        assert self._cluster is not None
        nodes = [redis.asyncio.cluster.ClusterNode(host, port) for host, port in self._cluster.nodes]
        return redis.asyncio.cluster.RedisCluster(
            startup_nodes=nodes,
            retry=redis.asyncio.retry.Retry(NoBackoff(), 0),
            **self._cluster_settings(_ASYNC_CLUSTER_OPTIONS),
        )
