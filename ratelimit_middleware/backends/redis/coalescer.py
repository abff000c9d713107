"""Coalescing: the calls that arrive together in an event loop go to Redis together, in one round trip.

Under concurrent load, a round trip per decision makes the Python process the bottleneck (each command costs
a write, a read and the parser's work). A ``Coalescer`` queues the calls of an event loop and sends them in
batches of at most ``max_batch``, one pipelined write and one read of all replies each:

- A lone call waits for nothing but the next loop iteration.
- Consecutive calls of a batch that run one script go as one call of it, in its ``batch`` mode (driver.lua):
  Redis then sets up one script run for them all, not one each (that setup costs about as much as a short
  script's own work), and this process packs one command and reads one reply. The calls still run one after
  another, in order, each all or nothing, and each gets its own reply or error; those that take Redis' time
  share one reading of it.
- One batch is in flight at a time. Redis runs commands one after another anyway, so a second batch in
  flight would not be served sooner; instead, the calls that arrive meanwhile form the next batch, sent the
  moment the reply comes, before that reply's callers resume. Redis then works on one batch while this
  process handles the other's results: the two overlap, instead of taking turns.
- Time spent queued counts against the timeout: a batch gets what is left of its oldest call's ``timeout``,
  so no call waits longer than ``timeout`` in all. None left (the event loop was blocked, or the batch
  before took it all): the batch is never sent and its calls fail at once with ``NotRun``, which the
  storage answers by its policy without counting Redis as failing.
- A caller cancelled before its batch is sent is dropped; after, its reply is ignored.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from itertools import groupby
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from .connection import Arg, Call

__all__ = ["MAX_BATCH", "Coalescer"]

T = TypeVar("T", bound="Call")

MAX_BATCH = 64
"""Calls per round trip at most. A burst larger than this is split into batches that take turns, which
keeps Redis and this process busy at the same time (and each batch's script short)."""


def _merged(calls: Sequence[T]) -> tuple[list[T], list[int]]:
    """The calls to send for ``calls``, in order, each run of calls to one script as one call of it in
    ``batch`` mode; and how many of ``calls`` each carries."""
    sent: list[T] = []
    counts: list[int] = []
    for _, group in groupby(calls, key=attrgetter("script")):
        run = list(group)
        sent.append(run[0] if len(run) == 1 else _batch(run))
        counts.append(len(run))
    return sent, counts


def _batch(calls: Sequence[T]) -> T:
    """One call of ``calls``' script that runs them all (see driver.lua)."""
    keys: list[bytes] = []
    args: list[Arg] = ["batch"]
    previous: Sequence[Arg] = ()
    for call in calls:
        keys += call.keys
        if call.args == previous:  # the same arguments as the call before (one policy, one cost): sent once
            args += (str(len(call.keys)), "0")
        else:
            args += (str(len(call.keys)), str(len(call.args)), *call.args)
            previous = call.args
    return calls[0]._replace(keys=keys, args=args)


def _split(replies: Sequence[Any], counts: Sequence[int]) -> list[Any]:
    """One reply per call, from the replies to the calls sent for them (an error in place of a batch's reply
    goes to each of its calls)."""
    split: list[Any] = []
    for count, reply in zip(counts, replies, strict=True):
        if count == 1:
            split.append(reply)
        elif isinstance(reply, Exception):
            split += [reply] * count
        else:
            split += reply
    return split


class Coalescer(Generic[T]):
    """Batches the script calls of one event loop; ``submit`` returns a future of the call's reply.

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
        sent, counts = _merged([call for call, _, _ in batch])
        try:
            replies: list[Any] | BaseException = _split(await self._flush(sent, seconds), counts)
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
