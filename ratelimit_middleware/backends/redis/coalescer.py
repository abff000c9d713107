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
- A caller cancelled before its batch is sent is dropped; after, its reply is ignored, or goes to the call's
  ``orphan`` if it has one (a reservation, which Redis makes all the same, and which must then be undone).
  So does the reply of a call whose batch's deadline passed just before it landed: its caller was answered
  without it. A batch that gets no reply in time is closed with the undos of its calls written after it
  (see ``transport``).
- Every call is answered by its batch's deadline, whatever becomes of the batch's task: one cancelled
  before it could start (a shutdown hook cancelling a loop's tasks) fails its calls with ``NotRun`` at once,
  and one with no reply by the deadline fails its calls with ``expired()`` then; either way the next batch
  goes out, so a lost batch never leaves its loop's later calls waiting for ever.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from itertools import groupby
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .transport import NotRun

if TYPE_CHECKING:
    from .connection import Arg, Call

__all__ = ["MAX_BATCH", "Coalescer", "Orphan"]

T = TypeVar("T", bound="Call")

Orphan = Callable[[Any], object]
"""Takes the reply of a call whose caller did not get it (cancelled once the call was sent, or answered by the
deadline just before the reply landed), unless it failed."""

_Queued = tuple[T, "asyncio.Future[Any]", float, "Orphan | None"]
"""A call, the future of its reply, when it was queued (loop time) and its orphan."""

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
    return calls[0]._replace(keys=keys, args=args, undo=tuple(undo for call in calls for undo in call.undo))


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
    ``seconds``, or raises for the whole batch, and every call of the batch gets that error. ``expired()``
    is the error of the calls of a batch that has no reply by its deadline.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        flush: Callable[[list[T], float], Awaitable[list[Any]]],
        timeout: float,
        expired: Callable[[], Exception],
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._loop = loop
        self._flush = flush
        self._timeout = timeout
        self._expired = expired
        self._max_batch = max_batch
        self._queue: deque[_Queued[T]] = deque()
        self._flight: asyncio.Task[None] | None = None  # the task of the batch in flight
        self._scheduled = False  # a dispatch is due on the next iteration
        self._tasks: set[asyncio.Task[None]] = set()  # strong references to the batches' tasks

    def submit(self, call: T, orphan: Orphan | None = None) -> asyncio.Future[Any]:
        """Queue ``call`` for the next batch (``orphan``: see ``Orphan``)."""
        future = self._loop.create_future()
        self._queue.append((call, future, self._loop.time(), orphan))
        if self._flight is None and not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._dispatch)
        return future

    def _dispatch(self) -> None:
        self._scheduled = False
        if self._flight is not None:
            return
        queue = self._queue
        batch: list[_Queued[T]] = []
        while queue and len(batch) < self._max_batch:
            entry = queue.popleft()
            if not entry[1].done():  # a caller cancelled before its call was sent: never sent
                batch.append(entry)
        if not batch:
            return
        loop = self._loop
        deadline = batch[0][2] + self._timeout
        futures = [entry[1] for entry in batch]
        task = loop.create_task(self._deliver(batch, futures, deadline - loop.time()))
        self._flight = task
        self._tasks.add(task)
        late = loop.call_at(deadline, self._abandon, task, futures, self._expired)
        task.add_done_callback(functools.partial(self._ended, futures, late))

    def _ended(
        self, futures: list[asyncio.Future[Any]], late: asyncio.TimerHandle, task: asyncio.Task[None]
    ) -> None:
        """``task`` is done: the calls it left unanswered were never sent (it was cancelled before it could
        start)."""
        self._tasks.discard(task)
        late.cancel()
        self._abandon(task, futures, _unsent)

    def _abandon(
        self, task: asyncio.Task[None], futures: list[asyncio.Future[Any]], error: Callable[[], Exception]
    ) -> None:
        """The next batch goes if ``task``'s is still in flight; its calls still unanswered fail with one
        ``error()`` (one error per batch: the storage logs it once)."""
        self._landed(task)
        pending = [future for future in futures if not future.done()]
        if pending:
            shared = error()
            for future in pending:
                future.set_exception(shared)

    def _landed(self, task: asyncio.Task[Any] | None) -> None:
        """``task``'s batch is no longer in flight: the next one goes out."""
        if self._flight is task:
            self._flight = None
            self._dispatch()

    async def _deliver(
        self,
        batch: list[_Queued[T]],
        futures: list[asyncio.Future[Any]],
        seconds: float,
    ) -> None:
        sent, counts = _merged([entry[0] for entry in batch])
        try:
            replies: list[Any] | BaseException = _split(await self._flush(sent, seconds), counts)
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise
        except Exception as error:
            replies = error
        finally:
            self._landed(asyncio.current_task())  # the next batch goes out before this one's callers resume
        if isinstance(replies, BaseException):
            for future in futures:
                if not future.done():
                    future.set_exception(replies)
            return
        for (_, future, _, orphan), reply in zip(batch, replies, strict=True):
            if not future.done():  # its caller may have been cancelled meanwhile, or the deadline passed
                future.set_result(reply)
            elif orphan is not None and not isinstance(reply, Exception):  # its caller never got it
                self._loop.call_soon(orphan, reply)  # apart: an orphan that fails fails alone


def _unsent() -> NotRun:
    return NotRun("the limiter's call was never sent: its batch was cancelled before it could start")
