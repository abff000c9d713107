"""Work that must not be lost when its caller is cancelled: a reservation that Redis makes all the same.

A caller cancelled while awaiting a script (an outer timeout, a server cancelling the task of a request whose
client left) cannot stop the script once it was sent. ``Orphans.kept(work, orphan)`` runs ``work`` in a task
of its own, which the caller's cancellation does not stop: the caller gets its ``CancelledError`` at once,
and ``orphan`` gets the result when it comes (a call on a standalone Redis needs no task: the coalescer hands
its reply to its orphan). ``detached(work, what)`` runs what an orphan starts (undoing a reservation, giving
back the leases of one that failed) with no one awaiting it, and logs its failure; ``apart(work)`` runs such
work of the sync methods on a thread of its own.

One ``Orphans`` holds the work of one storage's connections under way, so that closing them first waits for
it (``finish`` for an event loop's, ``join`` for the threads'): closed under it, the work failed (a new
connection it was setting up was closed, its task cancelled), and a reservation's leases were held until
they expired. An event loop holds its tasks only weakly: these are held here until they end.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["Orphans"]

T = TypeVar("T")

logger = logging.getLogger("ratelimit_middleware")


class Orphans:
    """The work under way apart from the calls of one storage's connections (thread-safe: a storage serves
    several event loops and threads)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()

    async def kept(self, work: Coroutine[Any, Any, T], orphan: Callable[[T], object]) -> T:
        """``work``'s result; if the caller is cancelled meanwhile, ``work`` goes on and ``orphan`` gets its
        result (nothing if it fails: its error has no one to go to)."""
        task = asyncio.ensure_future(work)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self._hold(task)
            task.add_done_callback(functools.partial(_orphaned, orphan))
            raise

    def detached(self, work: Coroutine[Any, Any, object], what: str) -> None:
        """Run ``work`` to its end, awaited by no one; a failure is logged as ``what`` failing."""
        task = asyncio.ensure_future(work)
        self._hold(task)
        task.add_done_callback(functools.partial(_ended, what))

    def apart(self, work: Callable[[], object]) -> None:
        """Run ``work`` (which handles its own failures) on a thread of its own."""
        thread = threading.Thread(target=self._run, args=(work,), daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _run(self, work: Callable[[], object]) -> None:
        try:
            work()
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _hold(self, task: asyncio.Task[Any]) -> None:
        with self._lock:
            self._tasks.add(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[Any]) -> None:
        with self._lock:
            self._tasks.discard(task)

    async def finish(self, seconds: float) -> None:
        """Wait until the running event loop's work has ended, the work it starts included (an orphan's
        reservation is then cancelled), ``seconds`` at most unless some of it ends meanwhile: every call has
        a deadline of that many seconds, and work past its own is not waited for."""
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                pending = [task for task in self._tasks if task.get_loop() is loop]
            if not pending:
                return
            done, _ = await asyncio.wait(pending, timeout=seconds)
            if not done:
                return

    def join(self, seconds: float) -> None:
        """Wait until the threads' work has ended, ``seconds`` at most."""
        deadline = time.monotonic() + seconds
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.0))


def _orphaned(orphan: Callable[[T], object], task: asyncio.Task[T]) -> None:
    if not task.cancelled() and task.exception() is None:
        orphan(task.result())


def _ended(what: str, task: asyncio.Task[Any]) -> None:
    error = None if task.cancelled() else task.exception()
    if error is not None:
        logger.warning("%s failed (%s: %s)", what, type(error).__name__, error)
