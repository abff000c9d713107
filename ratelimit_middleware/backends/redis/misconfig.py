"""Redis errors that mean the limiter is misconfigured, not that Redis is down, and what to change for each.

An outage passes: the circuit breaker probes until Redis answers. A wrong password, a missing permission,
a replica, a database that does not exist, a cluster node taken for a standalone Redis (or the other way
round) do not: every call fails the same way until someone changes the configuration. ``misconfiguration``
tells them apart, so that the failure policy can log them at error level from the first one, with what to
change; they are still answered by the policy (``on_error``), so the service keeps its configured behaviour.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from redis.exceptions import (
    AskError,
    AuthenticationError,
    ClusterCrossSlotError,
    ClusterDownError,
    NoPermissionError,
    ReadOnlyError,
    ResponseError,
)

__all__ = ["CLUSTER_COMMANDS", "COMMANDS", "Misconfiguration", "acl", "causes", "misconfiguration"]

COMMANDS = (
    "evalsha",
    "eval",
    "time",
    "get",
    "set",
    "pexpire",
    "del",
    "zadd",
    "zrange",
    "zrangebyscore",
    "zrevrangebyscore",
    "zremrangebyscore",
    "zcount",
    "zcard",
    "zrem",
    "zscore",
)
"""The commands the limiter runs: EVALSHA and EVAL (after NOSCRIPT) for its scripts, which run the others
(``TIME`` unless a ``clock`` is injected), and DEL for ``reset``."""

CLUSTER_COMMANDS = ("cluster|slots", "command", "asking")
"""And on a Redis Cluster: redis-py's cluster client maps it (CLUSTER SLOTS, then COMMAND), and a command
redirected by ASK while its slot migrates goes with ASKING."""


def acl(key_prefix: str, *, cluster: bool = False) -> str:
    """The ACL rules a Redis user of the limiter needs (``SELECT`` too for a database other than 0)."""
    commands = COMMANDS + CLUSTER_COMMANDS if cluster else COMMANDS
    return " ".join(f"+{command}" for command in commands) + f" ~{key_prefix}:*"


class Misconfiguration(NamedTuple):
    """What is wrong, as one of a few ``kind``s (the policy logs each kind at most once a minute), and
    ``advice``: the error and what to change."""

    kind: str
    advice: str


def causes(error: BaseException) -> Iterator[BaseException]:
    """``error``, then each error it was raised from (its ``__cause__``, else its ``__context__``)."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        yield cause
        cause = (
            cause.__cause__
            if cause.__cause__ is not None or cause.__suppress_context__
            else cause.__context__
        )


def misconfiguration(error: BaseException, *, cluster: bool, key_prefix: str) -> Misconfiguration | None:
    """What ``error`` (or an error it was raised from: redis-py's cluster client reports any error reply to
    CLUSTER SLOTS as "Cluster mode is not enabled") says is wrong with the limiter's configuration, or
    ``None`` for a failure that passes (a connection lost or refused, a timeout, Redis out of memory...)."""
    for cause in causes(error):
        problem = _diagnosis(cause, cluster, key_prefix)
        if problem is not None:
            return problem
    return None


def _diagnosis(error: BaseException, cluster: bool, key_prefix: str) -> Misconfiguration | None:
    said = f"{type(error).__name__}: {error}"
    if isinstance(error, AuthenticationError):
        return Misconfiguration("credentials", f"Redis refused the limiter's credentials ({said})")
    if isinstance(error, NoPermissionError) or (
        isinstance(error, ResponseError) and "can't run this command" in str(error)  # one a script runs
    ):
        return Misconfiguration(
            "permissions",
            f"the limiter's Redis user lacks a permission ({said}); it needs the ACL rules "
            f"'{acl(key_prefix, cluster=cluster)}'"
            + ("" if cluster else ", and +select for a database other than 0"),
        )
    if isinstance(error, ReadOnlyError):
        return Misconfiguration("replica", f"this Redis is a read-only replica ({said}): use the primary")
    if isinstance(error, ResponseError) and "DB index is out of range" in str(error):
        return Misconfiguration("database", f"this Redis has no such database ({said})")
    if not cluster and isinstance(error, (AskError, ClusterCrossSlotError, ClusterDownError)):
        return Misconfiguration(
            "cluster node",
            f"this Redis is a Redis Cluster node ({said}): name the cluster with a redis+cluster:// URL or "
            "pass a RedisCluster client",
        )
    if cluster and isinstance(error, ResponseError) and "cluster support disabled" in str(error):
        return Misconfiguration(
            "not a cluster",
            f"this Redis is not a Redis Cluster ({said}): use a redis:// URL or a redis.Redis client",
        )
    return None
