"""A process forked while the limiter waits on work of its own (gunicorn's ``--preload``) uses Redis.

The sync cluster's first mapping runs on a thread; a child forked meanwhile has no such thread, and the
storage's transports are dropped in it, to be made again by its own calls. On the session's real cluster,
its nodes paused while the parent forks so that the mapping is under way then; the child reports through a
pipe, and every wait is bounded.
"""

from __future__ import annotations

import os
import select
import threading

from ratelimit_middleware import RedisRateLimiter
from ratelimit_middleware.backends.redis import CircuitBreaker
from ratelimit_middleware.errors import RateLimiterUnavailable

from .conftest import unique_prefix
from .redis_server import RedisCluster

ATTEMPTS = 20
"""Calls the child makes (each up to its timeout) before it gives up on Redis."""


def _served(limiter: RedisRateLimiter) -> bool:
    """Whether one of ``ATTEMPTS`` calls is answered by Redis (``on_error="deny"`` denies the others)."""
    for _ in range(ATTEMPTS):
        try:
            if limiter.check("alice", "m").allowed:
                return True
        except RateLimiterUnavailable:
            pass
    return False


def _child(limiter: RedisRateLimiter, write: int) -> None:
    try:
        os.write(write, b"served" if _served(limiter) else b"never")
    finally:
        os._exit(0)


def test_a_child_forked_while_the_cluster_is_first_mapped_uses_redis(redis_cluster: RedisCluster) -> None:
    limiter = RedisRateLimiter(
        f"redis+cluster://127.0.0.1:{redis_cluster.ports[0]}",
        100,
        60,
        key_prefix=unique_prefix("fork"),
        timeout=0.5,
        on_error="deny",
        breaker=CircuitBreaker(failures=1000),
    )
    read, write = os.pipe()
    for node in redis_cluster.nodes:
        node.pause()
    try:
        caller = threading.Thread(target=limiter.check, args=("alice", "m"))  # starts the mapping, stalled
        caller.start()
        while caller.is_alive() and not any(
            thread.name == "ratelimit-cluster-map" and thread.is_alive() for thread in threading.enumerate()
        ):
            pass
        assert caller.is_alive()
        pid = os.fork()  # while the mapping waits for a node's reply (up to the timeout)
        if pid == 0:
            _child(limiter, write)
    finally:
        for node in redis_cluster.nodes:
            node.resume()
    caller.join()
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], 30)
        assert ready, "the child never reported"
        assert os.read(read, 16) == b"served"
    finally:
        os.close(read)
        if os.waitpid(pid, os.WNOHANG) == (0, 0):
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    assert _served(limiter)  # and the parent's mapping still serves the parent
    limiter.storage.close()
