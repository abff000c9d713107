"""The one place that sends a storage's commands: scripts by SHA, in as few round trips as possible, in time.

A ``Connection`` serves the sync methods through one transport (a pool, or a cluster client) and the async
methods through one per event loop (an asyncio connection belongs to the loop that opened it), all built by
``clients.Endpoint`` with the limiter's timeout and without retries. Scripts go by EVALSHA; after a Redis
restart or ``SCRIPT FLUSH`` (NOSCRIPT) they go again by EVAL, which also caches them: a script that got
NOSCRIPT did not run, so it is never run twice. On a standalone Redis the async calls of an event loop are
coalesced into pipelined batches (see ``coalescer``).

Time bounds: a sync call has one deadline of ``timeout`` for all its round trips, each socket wait cut to
what is left of it (on a cluster too: see ``transport``); an async call has a
hard deadline of ``timeout`` for all of its round trips (``asyncio.timeout``, in the calling task, or in its
batch's: a coalesced call is answered by its batch's deadline whatever becomes of that task), after which
its connection is closed; one whose time ran out before it could be sent (its event loop was blocked
meanwhile; a sync call's thread, or the setup of its new connection, waited for the interpreter's lock) is
never sent, and raises ``NotRun``. A new connection is set up apart from the calls, within
``setup`` seconds, and waited for until the call's deadline only (see ``deadlines``). Errors are redis-py's
(``ConnectionError``, ``TimeoutError``, ``ResponseError``...) and ``NotRun``: the storage decides what they
mean.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple, TypeVar

from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .clients import Endpoint, RedisClient
from .coalescer import Coalescer, Orphan
from .deadlines import within
from .keyspace import slot_groups
from .orphans import Orphans
from .scripts import Script
from .transport import (
    AsyncCluster,
    AsyncPool,
    AsyncTransport,
    Command,
    NotRun,
    SyncCluster,
    SyncPool,
    SyncTransport,
    Undos,
)

__all__ = ["Arg", "Call", "Connection"]

_LEAST_TO_SEND = 0.1
"""The share of its timeout a call must still have to be sent (async): less, and it is ``NotRun``."""

T = TypeVar("T")
Arg = bytes | str


class Call(NamedTuple):
    """One script call: the script, its keys (one slot on a cluster) and its arguments; and the commands that
    undo it if its reply never comes (see ``transport``): a reservation's undo gives its leases back."""

    script: Script
    keys: Sequence[bytes]
    args: Sequence[Arg]
    undo: tuple[Command, ...] = ()

    def by_sha(self) -> Command:
        return ("EVALSHA", self.script.sha, len(self.keys), *self.keys, *self.args)

    def by_source(self) -> Command:
        return ("EVAL", self.script.source, len(self.keys), *self.keys, *self.args)


def _raised(reply: Any) -> Any:
    if isinstance(reply, Exception):
        raise reply
    return reply


def _undos(calls: Sequence[Call]) -> Undos:
    """The undos of ``calls``, for the transport (``()`` when none has any)."""
    return [call.undo for call in calls] if any(call.undo for call in calls) else ()


def _succeeded(reply: Any, orphan: Orphan) -> None:
    if not isinstance(reply, Exception):
        orphan(reply)


_LIVE: weakref.WeakSet[Connection] = weakref.WeakSet()
"""The connections of this process, forgotten in a child it forks (``Connection.forget``)."""


def _forked() -> None:
    for connection in list(_LIVE):
        connection.forget()


os.register_at_fork(after_in_child=_forked)


class _LoopState(NamedTuple):
    transport: AsyncTransport
    coalescer: Coalescer[Call] | None


class Connection:
    """The transports of one storage, and the commands a backend needs: scripts and deletes.

    ``round_trips`` counts the requests sent to Redis (a pipelined batch counts once), for tests and
    benchmarks. ``orphans`` holds the storage's work under way apart from the calls (see ``orphans``), which
    closing the connections first waits for.
    """

    def __init__(self, client: RedisClient, *, timeout: float, setup: float) -> None:
        self.endpoint = Endpoint(client, timeout, setup)
        self.timeout = timeout
        self.cluster = self.endpoint.cluster
        self.round_trips = 0
        self._sync: SyncTransport | None = None
        self._loops: dict[asyncio.AbstractEventLoop, _LoopState] = {}
        self._lock = threading.Lock()
        self.orphans = Orphans()
        _LIVE.add(self)

    def forget(self) -> None:
        """Drop the transports, unclosed, in a child process just forked (gunicorn's ``--preload``): their
        sockets are the parent's, and the work they wait for (a cluster's first mapping, a connection's
        setup) runs on threads and tasks the child does not have, so that the child's calls would wait for
        it until their deadlines, forever. The child makes its own on its next calls."""
        self._sync, self._loops, self._lock = None, {}, threading.Lock()
        self.orphans = Orphans()

    # -- which methods ---------------------------------------------------------------------------------

    def check_sync(self) -> None:
        """``TypeError`` if this storage was given an asyncio client."""
        if not self.endpoint.serves_sync:
            raise TypeError(
                "this Redis limiter was given an asyncio client (redis.asyncio.Redis or its RedisCluster): "
                "use the async methods (acheck, aallow, aget_request_count, areset), or pass a sync "
                "client or a URL"
            )

    def check_async(self) -> None:
        """``TypeError`` if this storage was given a sync client."""
        if not self.endpoint.serves_async:
            raise TypeError(
                "this Redis limiter was given a sync client (redis.Redis or redis.cluster.RedisCluster): "
                "use the sync methods (check, allow, get_request_count, reset), or pass an asyncio client "
                "or a URL"
            )

    # -- transports ------------------------------------------------------------------------------------

    def _sync_transport(self) -> SyncTransport:
        transport = self._sync
        if transport is None:
            self.check_sync()
            with self._lock:
                if self._sync is None:
                    endpoint = self.endpoint
                    self._sync = (
                        SyncCluster(endpoint.sync_cluster)
                        if endpoint.cluster
                        else SyncPool(endpoint.sync_pool())
                    )
                transport = self._sync
        return transport

    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            self.check_async()
            with self._lock:
                # States of loops that have closed can serve no one: forget them (``aclose`` before a loop
                # ends closes its connections cleanly).
                for old in [old for old in self._loops if old.is_closed()]:
                    del self._loops[old]
                endpoint = self.endpoint
                if endpoint.cluster:
                    state = _LoopState(AsyncCluster(endpoint.async_cluster(), endpoint.setup), None)
                else:
                    coalescer = Coalescer(loop, self._flush, self.timeout, self._no_reply)
                    state = _LoopState(AsyncPool(endpoint.async_pool()), coalescer)
                self._loops[loop] = state
        return state

    def close(self) -> None:
        """Close the sync connections (they reopen on the next call), once the work on threads of their own
        under way has ended (within the timeout: see ``orphans``)."""
        self.orphans.join(self.timeout)
        with self._lock:
            transport, self._sync = self._sync, None
        if transport is not None:
            transport.close()

    async def aclose(self) -> None:
        """Close the running event loop's connections (they reopen on the next call), once its work under way
        apart from the calls has ended (within the timeout: see ``orphans``)."""
        await self.orphans.finish(self.timeout)
        with self._lock:
            state = self._loops.pop(asyncio.get_running_loop(), None)
        if state is not None:
            await state.transport.aclose()

    # -- sync ------------------------------------------------------------------------------------------

    def _send(
        self, transport: SyncTransport, commands: Sequence[Command], deadline: float, undos: Undos = ()
    ) -> list[Any]:
        self.round_trips += 1 if transport.pipelined else len(commands)
        return transport.send(commands, deadline, undos)

    def run(self, calls: Sequence[Call], deadline: float | None = None) -> list[Any]:
        """One reply per call, a call's error reply in its place: one round trip on a standalone Redis (and
        one more for the calls whose script Redis had lost), all within one ``timeout`` (or by ``deadline``,
        a ``time.monotonic()`` reading, for a call that shares another's)."""
        transport = self._sync_transport()
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        replies = self._send(transport, [call.by_sha() for call in calls], deadline, _undos(calls))
        lost = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if lost:
            again = [calls[i] for i in lost]
            for i, reply in zip(
                lost,
                self._send(transport, [call.by_source() for call in again], deadline, _undos(again)),
                strict=True,
            ):
                replies[i] = reply
        return replies

    def evaluate(self, call: Call) -> Any:
        """The reply of one script call."""
        return _raised(self.run([call])[0])

    def evaluate_all(self, calls: Sequence[Call], deadline: float | None = None) -> list[Any]:
        """The replies of several script calls (on a cluster, each to its slot); raises the first error."""
        return [_raised(reply) for reply in self.run(calls, deadline)]

    def _deletions(self, keys: Sequence[bytes]) -> list[Command]:
        groups = slot_groups(keys) if self.cluster else [list(range(len(keys)))]
        return [("DEL", *(keys[i] for i in group)) for group in groups]

    def delete(self, keys: Sequence[bytes]) -> None:
        """Delete ``keys`` (one command per slot on a cluster)."""
        transport = self._sync_transport()
        for reply in self._send(transport, self._deletions(keys), time.monotonic() + self.timeout):
            _raised(reply)

    # -- async -----------------------------------------------------------------------------------------

    async def _deadline(
        self,
        work: Callable[[float], Awaitable[T]],
        seconds: float | None = None,
        *,
        least: float | None = None,
    ) -> T:
        """``work(deadline)`` within ``seconds`` (default: the timeout), else ``redis.TimeoutError``;
        ``NotRun`` without starting it when less than a tenth of the timeout is left (an event loop blocked
        since the call began says nothing about Redis, and a reply in the last sliver would not be judged
        fairly either)."""
        seconds = self.timeout if seconds is None else seconds
        if seconds <= 0 or seconds < (self.timeout * _LEAST_TO_SEND if least is None else least):
            raise NotRun(f"the limiter's timeout ({self.timeout:g} s) ran out before the call was sent")
        deadline = time.monotonic() + seconds
        try:
            return await within(lambda: work(deadline), seconds)
        except asyncio.TimeoutError:
            raise self._no_reply() from None

    def _no_reply(self) -> RedisTimeoutError:
        """The error of a call that Redis did not answer within the timeout."""
        return RedisTimeoutError(f"no reply from Redis within {self.timeout:g} s")

    async def _asend(
        self, transport: AsyncTransport, commands: Sequence[Command], deadline: float, undos: Undos = ()
    ) -> list[Any]:
        self.round_trips += 1 if transport.pipelined else len(commands)
        return await transport.send(commands, deadline, undos)

    async def _arun(self, transport: AsyncTransport, calls: Sequence[Call], deadline: float) -> list[Any]:
        replies = await self._asend(transport, [call.by_sha() for call in calls], deadline, _undos(calls))
        lost = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if lost:
            calls = [calls[i] for i in lost]
            again = await self._asend(
                transport, [call.by_source() for call in calls], deadline, _undos(calls)
            )
            for i, reply in zip(lost, again, strict=True):
                replies[i] = reply
        return replies

    async def _flush(self, calls: list[Call], seconds: float) -> list[Any]:
        """A coalesced batch, within the ``seconds`` its oldest call has left."""
        transport = self._loop_state().transport
        return await self._deadline(lambda deadline: self._arun(transport, calls, deadline), seconds)

    async def aevaluate(self, call: Call, orphan: Orphan | None = None) -> Any:
        """``evaluate`` for event loops: on a standalone Redis, batched with the loop's other calls.

        ``orphan``, for a call whose effect must not be lost (a reservation), gets the reply of the call if
        its caller is cancelled once it was sent, since Redis runs it all the same (unless it failed); on a
        standalone Redis a call whose caller is cancelled before its batch goes out is never sent.
        """
        state = self._loop_state()
        if state.coalescer is not None:
            future = state.coalescer.submit(call, orphan)
            try:
                return _raised(await future)
            except asyncio.CancelledError:
                # Cancelled as its reply landed: the future holds the reply, and the coalescer, which
                # found it answered, gave it to no orphan.
                if (
                    orphan is not None
                    and future.done()
                    and not future.cancelled()
                    and future.exception() is None
                ):
                    _succeeded(future.result(), orphan)
                raise
        work = self._deadline(lambda deadline: self._arun(state.transport, [call], deadline))
        if orphan is None:
            return _raised((await work)[0])
        return _raised((await self.orphans.kept(work, lambda replies: _succeeded(replies[0], orphan)))[0])

    async def aevaluate_all(self, calls: Sequence[Call], deadline: float | None = None) -> list[Any]:
        """``evaluate_all`` for event loops: the calls sent together, within one deadline (``deadline``: one
        shared with an earlier call, such as a decision's refunds, sent with whatever time is left of it)."""
        state = self._loop_state()
        seconds, least = (None, None) if deadline is None else (deadline - time.monotonic(), 0.0)
        replies = await self._deadline(
            lambda until: self._arun(state.transport, calls, until), seconds, least=least
        )
        return [_raised(reply) for reply in replies]

    async def adelete(self, keys: Sequence[bytes]) -> None:
        """``delete`` for event loops."""
        transport = self._loop_state().transport
        deletions = self._deletions(keys)
        for reply in await self._deadline(lambda deadline: self._asend(transport, deletions, deadline)):
            _raised(reply)
