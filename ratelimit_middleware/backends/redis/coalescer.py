"""Coalescing: the calls that arrive together in an event loop go to Redis together, in one round trip.

Under concurrent load, a round trip per decision makes the Python process the bottleneck (each command costs
a write, a read and the parser's work). A ``Coalescer`` queues the calls of an event loop and sends them in
batches of at most ``max_batch``, one pipelined write and one read of all replies each:

- A lone call waits for nothing but the next loop iteration.
- One batch is in flight at a time. Redis runs commands one after another anyway, so a second batch in
  flight would not be served sooner; instead, the calls that arrive meanwhile form the next batch, sent the
  moment the reply comes, before that reply's callers resume. Redis then works on one batch while this
  process handles the other's results: the two overlap, instead of taking turns.
- Time spent queued counts against the timeout: a batch gets what is left of its oldest call's ``timeout``
  (none left: it fails at once), so no call waits longer than ``timeout`` in all.
- A caller cancelled before its batch is sent is dropped; after, its reply is ignored.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

__all__ = ["MAX_BATCH", "Coalescer"]

T = TypeVar("T")

MAX_BATCH = 64
"""Calls per round trip at most. A burst larger than this is split into batches that take turns, which
keeps Redis and this process busy at the same time (and each batch's scripts short)."""


class Coalescer(Generic[T]):
    """Batches the calls of one event loop; ``submit`` returns a future of the call's reply.

    ``flush(calls, seconds)`` returns one reply per call (a call's own error reply in its place) within
    ``seconds``, or raises for the whole batch, and every call of the batch gets that error.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        flush: Callable[[list[T], float], Awaitable[list[Any]]],
        timeout: float,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._loop = loop
        self._flush = flush
        self._timeout = timeout
        self._max_batch = max_batch
        self._queue: deque[tuple[T, asyncio.Future[Any], float]] = deque()
        self._busy = False  # a batch is in flight
        self._scheduled = False  # a dispatch is due on the next iteration
        self._tasks: set[asyncio.Task[None]] = set()  # a strong reference to the batch in flight

    def submit(self, call: T) -> asyncio.Future[Any]:
        """Queue ``call`` for the next batch."""
        future = self._loop.create_future()
        self._queue.append((call, future, self._loop.time()))
        if not self._busy and not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._dispatch)
        return future

    def _dispatch(self) -> None:
        self._scheduled = False
        if self._busy:
            return
        queue = self._queue
        batch: list[tuple[T, asyncio.Future[Any], float]] = []
        while queue and len(batch) < self._max_batch:
            entry = queue.popleft()
            if not entry[1].done():  # a caller cancelled before its call was sent: never sent
                batch.append(entry)
        if not batch:
            return
        left = self._timeout - (self._loop.time() - batch[0][2])
        self._busy = True
        task = self._loop.create_task(self._deliver(batch, left))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, batch: list[tuple[T, asyncio.Future[Any], float]], seconds: float) -> None:
        futures = [future for _, future, _ in batch]
        try:
            replies: list[Any] | BaseException = await self._flush([call for call, _, _ in batch], seconds)
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise
        except Exception as error:
            replies = error
        finally:
            self._busy = False
            self._dispatch()  # the next batch goes out before this one's callers resume
        if isinstance(replies, BaseException):
            for future in futures:
                if not future.done():
                    future.set_exception(replies)
            return
        for future, reply in zip(futures, replies, strict=True):
            if not future.done():  # its caller may have been cancelled meanwhile
                future.set_result(reply)
