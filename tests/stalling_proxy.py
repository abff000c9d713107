"""A TCP proxy in front of one redis-server: a network fault (Redis itself untouched), for the deadline tests.

It can hold back the requests containing given bytes (a fault for one kind of call) until ``release``, and
delay every chunk each way (a Redis some distance away).
"""

from __future__ import annotations

import socket
import threading
import time


class StallingProxy:
    """Forwards both ways between its port and ``target_port``; a client chunk that contains ``stall_on``
    is held back (its reply does not come) until ``release``, and every chunk waits ``delay`` seconds before
    it goes on (a round trip through the proxy takes ``2 * delay`` more)."""

    def __init__(self, target_port: int, stall_on: bytes | None = None, *, delay: float = 0.0) -> None:
        self._target = ("127.0.0.1", target_port)
        self._stall_on = stall_on
        self._delay = delay
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.stalled = 0
        self._held: list[tuple[socket.socket, bytes]] = []
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self._target)
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, destination: socket.socket, upstream: bool) -> None:
        try:
            while data := source.recv(65536):
                if upstream and self._held_back(destination, data):
                    continue
                if self._delay:
                    time.sleep(self._delay)  # the link's latency, not a wait of the test's
                destination.sendall(data)
        except OSError:
            pass

    def _held_back(self, destination: socket.socket, data: bytes) -> bool:
        with self._lock:
            if self._stall_on is None or self._stall_on not in data:
                return False
            self.stalled += 1
            self._held.append((destination, data))
            return True

    def release(self) -> None:
        """Forward the chunks held back, in order, and hold back no more."""
        with self._lock:
            self._stall_on, held, self._held = None, self._held, []
        for destination, data in held:
            destination.sendall(data)

    def close(self) -> None:
        self._listener.close()
        for connection in self._sockets:
            connection.close()
