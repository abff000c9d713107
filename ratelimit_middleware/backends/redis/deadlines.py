"""Deadlines on redis-py's connections, and new connections set up apart from the calls.

A call runs ``until`` its deadline (a ``time.monotonic()`` reading). Sync: every socket wait of a
``with_deadlines`` connection in it (writes, reads) is cut to what is left of it. Async: the call has a hard
deadline (``within``, set by its caller).

Setting up a new connection costs several round trips (the TCP connect, a TLS handshake, AUTH or HELLO,
CLIENT SETINFO twice, SELECT for a database other than 0): more than a call's timeout allows on a link a few
tens of milliseconds long. A connection set up within a call, and closed when the call ran out of time,
was lost, and the next call started over: such a Redis was never used. So a new connection is set up apart
(on a thread of its own, or in a task of its own), within a budget of its own (``setup`` seconds), while
the calls that need it wait for it until their own deadline only: a setup that outlasts its call still
ends, and its connection, left in its pool, serves the next call.

A call uses a connection whose setup it waited for only when what is left of its time is at least a round
trip (``_worth_using``), since a call takes one once Redis has its script, so that a call on a new connection
does not run out of time midway (which would close the connection, and start the setups over) because of the
link's length. That round trip is what the call waited for the setup (the call that starts a setup waits a
round trip at least, three with CLIENT SETINFO), or for a sync connection the quickest of its setup's
commands if shorter (CLIENT SETINFO twice, AUTH...): in a thread, the wait is no measure of the link, since
the thread and the setup's own wait for the interpreter's lock too, for as long as the process' other
threads keep it (a burst of calls, each setting up a connection of its own). A connection a call does not use
is left, connected, to the next call.

A call that ends before it sent anything never reached Redis, and says nothing of its health: it raises
``NotRun``, which the circuit breaker does not count. So does a sync call whose time ran out before it could
write (its thread waited for the interpreter's lock meanwhile), one that waited for a setup that ended but
with too little time left to be used, and one whose deadline came while it waited for a setup that Redis
had not kept waiting for ``_KEPT`` of a call's timeout (the setup had not started, or its thread waited for
the lock: the process was too busy). One whose setup Redis kept waiting that long (a Redis that accepts
connections but does not answer) is a failure of Redis (``redis.TimeoutError``), as a call without a reply.
"""

from __future__ import annotations

import _thread
import asyncio
import contextlib
import math
import sys
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from concurrent import futures
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextvars import ContextVar
from typing import Any, TypeVar

from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .misconfig import causes

__all__ = [
    "REFUSED_FOR",
    "NotRun",
    "again",
    "left",
    "refusal",
    "seen",
    "timed",
    "unsent",
    "until",
    "with_deadlines",
    "with_setup",
    "within",
]

T = TypeVar("T")


class NotRun(RedisError):
    """A call that Redis never ran, for a reason that says nothing about Redis' health: its time ran out
    before it could be sent (an event loop blocked past it, a thread that waited for the interpreter's lock,
    a new connection whose setup the process was too busy to finish in time), or its cluster slot was being
    migrated until then (TRYAGAIN). The storage answers it by its policy; the circuit breaker does not count
    it."""


_deadline: ContextVar[float | None] = ContextVar("ratelimit_redis_deadline", default=None)
"""The deadline of the call running in this thread (sync) or task (async), if any."""

_setting_up: ContextVar[object | None] = ContextVar("ratelimit_redis_setting_up", default=None)
"""The asyncio connection whose setup this task runs, if any."""


if sys.version_info >= (3, 11):

    async def within(work: Callable[[], Awaitable[T]], seconds: float) -> T:
        """``work()`` cancelled after ``seconds`` (``asyncio.TimeoutError``), in the calling task."""
        async with asyncio.timeout(seconds):  # in the calling task: a batch is sent before anything else runs
            return await work()

else:  # pragma: no cover - Python 3.10

    async def within(work: Callable[[], Awaitable[T]], seconds: float) -> T:
        return await asyncio.wait_for(work(), seconds)


@contextlib.contextmanager
def until(deadline: float) -> Iterator[None]:
    """While it lasts, the calls of this thread or task end by ``deadline``."""
    token = _deadline.set(deadline)
    try:
        yield
    finally:
        _deadline.reset(token)


def left(deadline: float) -> float:
    """Seconds left until ``deadline``; ``TimeoutError`` once it has passed."""
    seconds = deadline - time.monotonic()
    if seconds <= 0:
        raise RedisTimeoutError("the limiter's timeout ran out")
    return seconds


def unsent(deadline: float) -> float:
    """``left``, for a call that has sent nothing yet: ``NotRun`` once ``deadline`` has passed."""
    seconds = deadline - time.monotonic()
    if seconds <= 0:
        raise NotRun(
            "the limiter's timeout ran out before the call was sent: the process was too busy (its threads "
            "waited for the interpreter's lock)"
        )
    return seconds


_KEPT = 0.9
"""The share of a call's timeout for which Redis must have kept a new connection's setup waiting (to connect,
or for a reply) for a call whose deadline came while it waited for that setup to be a failure of Redis: so
it is in a Redis that accepts connections but does not answer, whereas a setup that the process was too
busy to run is not waiting on Redis (hardly ever for that long: only while its thread, the reply read, waits
for the interpreter's lock)."""

_ARRIVED = 1e-6
"""Seconds a read whose call's deadline has passed waits: none, but what has arrived is read (a socket's
timeout of 0 would make it non-blocking, which redis-py takes for a broken connection)."""


def _wait_until(connection: Any, seconds: float) -> None:
    """Let ``connection``'s next socket operation wait only ``seconds``."""
    sock = connection._sock  # redis-py's socket: its timeout bounds every read and write
    if sock is not None:
        sock.settimeout(seconds)


def _worth_using(round_trip: float, deadline: float) -> bool:
    """Whether a call may use a connection whose setup it waited for, a round trip of the link taking
    ``round_trip`` seconds: what is left of its time, until ``deadline``, is at least that."""
    return deadline - time.monotonic() >= round_trip


REFUSED_FOR = 1.0
"""Seconds a setup or mapping that Redis refused is reported to the calls (from the first that learns of it)
before one is tried again; the refusal is still reported until the new one ends. Tried again within the
next call, on a slow link it would outlast it, whose timeout would be taken for an outage: the calls would
alternate between the two, and the circuit breaker's failures with them."""

_refused: weakref.WeakKeyDictionary[Future[Any] | asyncio.Future[Any], float] = weakref.WeakKeyDictionary()
"""When a call first learned of each work that Redis refused."""


def refusal(work: Future[Any] | asyncio.Future[Any]) -> BaseException | None:
    """The error of ``work`` (run apart: a connection's setup, a cluster's mapping), if Redis refused it: a
    wrong password, a database that does not exist, a Redis that is no cluster... (redis-py's cluster client
    raises such a refusal from an error of its own)."""
    if not work.done() or work.cancelled():
        return None
    error = work.exception()
    if error is not None and any(
        isinstance(cause, (AuthenticationError, ResponseError)) for cause in causes(error)
    ):
        return error
    return None


def again(work: Future[Any] | asyncio.Future[Any]) -> bool:
    """Whether work run apart that has ended is to be started again rather than reported to the call: it
    failed, and not because Redis refused it (``refusal``), or Redis refused it ``REFUSED_FOR`` seconds ago
    or more (its caller then starts it again, and reports the refusal until it ends: see ``REFUSED_FOR``).
    A failure that ended unseen, the calls that waited for it having run out of time first, is so reported
    too."""
    if not work.done():
        return False
    if work.cancelled():
        return True
    if refusal(work) is None:
        return work.exception() is not None
    return time.monotonic() - _refused.setdefault(work, time.monotonic()) >= REFUSED_FOR


def _late(since: float) -> NotRun:
    return NotRun(
        f"a new connection to Redis was set up, but the call that waited "
        f"{(time.monotonic() - since) * 1000:.0f} ms for it had less than a round trip left to use it: it "
        "serves the next call"
    )


# -- sync ---------------------------------------------------------------------------------------------------


class _Deadlines:
    """The waits of ``with_deadlines`` connections (a mixin of redis-py's connection classes)."""

    socket_connect_timeout: float | None
    socket_timeout: float | None
    setup: float
    """Seconds a new connection's setup may take (set by ``with_deadlines``)."""
    _setup: Future[None] | None = None  # the setup under way, or finished unseen by any call
    _sock: Any
    _round_trip: float | None = None
    """The quickest round trip of a command on this connection (seconds), if it made one: in its setup,
    CLIENT SETINFO's (not the TCP connect's, which a proxy next to the process answers)."""
    _waiting: float | None = None
    """Since when this connection has been waiting on Redis (to connect, or for a reply), if it is."""
    _sent = 0.0  # when its last command was written

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        parent: Any = super()
        parent.__init__(*args, **kwargs)
        self._timeout: float = self.socket_timeout or self.setup
        """A call's timeout: the limiter's pools give their connections that as ``socket_timeout`` (which a
        setup changes while it connects)."""

    def connect(self) -> None:
        """Connect, if not connected: within a call, apart from it (see the module)."""
        parent: Any = super()  # untyped in redis-py
        deadline = _deadline.get()
        setup, refused = self._setup, None
        if deadline is None:  # not within a call (a cluster being mapped on a thread of its own)
            if setup is not None:
                # A setup begun by a call that gave up waiting for it is under way on its own thread, the
                # socket already open: a command written meanwhile would be read in its place (its replies
                # and the setup's crossed). Its end, whatever it was, is waited for (its waits end within
                # ``setup`` seconds); a connection it left closed is then connected here.
                futures.wait((setup,))
            parent.connect()
            return
        if setup is not None and again(setup):
            refused, setup = refusal(setup), None
        if setup is None:
            if self._sock is not None:
                return
            setup = Future()
            # Not ``threading.Thread.start``, which waits for the thread to run: in a burst of calls, each
            # setting up a connection, that was a wait for the interpreter's lock, twice, before any wait of
            # the call's own.
            try:
                _thread.start_new_thread(self._set_up, (setup,))
            except RuntimeError as error:  # out of threads: kept, the setup would never end
                raise NotRun(f"no thread could be started to set up a connection: {error}") from error
            self._setup = setup
        if refused is not None:
            raise refused  # until the new setup ends
        waited = not setup.done()
        since = time.monotonic()
        try:
            setup.result(unsent(deadline))
        except FutureTimeout:
            raise self._unfinished() from None
        self._setup = None  # a failure stays, for ``again`` to judge
        round_trip = min(time.monotonic() - since, self._round_trip or math.inf)
        if waited and not _worth_using(round_trip, deadline):
            raise _late(since)  # redis-py's pool keeps the connection, connected, for the next call

    def _unfinished(self) -> BaseException:
        """The error of a call whose deadline came while it waited for this connection's setup: a failure
        of Redis if Redis has kept the setup waiting for ``_KEPT`` of a call's timeout, else ``NotRun``."""
        waiting = self._waiting
        if waiting is not None and time.monotonic() - waiting >= _KEPT * self._timeout:
            return RedisTimeoutError(
                f"Redis has not answered a new connection's setup within the limiter's timeout "
                f"({self._timeout:g} s; the setup goes on for up to {self.setup:g} s)"
            )
        return NotRun(
            "a new connection to Redis was still being set up when the limiter's timeout ran out, Redis not "
            "having kept it waiting: the process was too busy (the setup goes on and serves the next call)"
        )

    def _set_up(self, setup: Future[None]) -> None:
        """Connect within ``setup`` seconds (on a thread of its own): every wait cut to what is left."""
        parent: Any = super()
        try:
            with until(time.monotonic() + self.setup):
                parent.connect()
        except BaseException as error:  # redis-py closed the connection
            setup.set_exception(error)
        else:
            setup.set_result(None)

    def _connect(self) -> Any:
        parent: Any = super()
        deadline = _deadline.get()
        if deadline is None:
            return parent._connect()
        timeouts = self.socket_connect_timeout, self.socket_timeout
        self.socket_connect_timeout = self.socket_timeout = left(deadline)
        self._waiting = time.monotonic()
        try:
            return parent._connect()
        finally:
            self._waiting = None
            self.socket_connect_timeout, self.socket_timeout = timeouts

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        """Write ``command``; ``NotRun`` if the call's deadline has passed (nothing is written)."""
        deadline = _deadline.get()
        if deadline is not None:
            _wait_until(self, unsent(deadline))
        parent: Any = super()
        parent.send_packed_command(command, check_health)
        self._sent = time.monotonic()

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        """Read a reply, waiting until the call's deadline only; once it has passed, a reply that has
        arrived is still read (Redis ran the command: the thread was not given the interpreter's lock to read
        it in time), without waiting for one."""
        deadline = _deadline.get()
        if deadline is not None:
            _wait_until(self, max(deadline - time.monotonic(), _ARRIVED))
        parent: Any = super()
        self._waiting = time.monotonic()
        try:
            reply = parent.read_response(*args, **kwargs)
        finally:
            self._waiting = None
        round_trip = time.monotonic() - self._sent
        self._round_trip = round_trip if self._round_trip is None else min(self._round_trip, round_trip)
        return reply


_MADE: dict[tuple[type[Any], type[Any], float], type[Any]] = {}


def _made(mixin: type[Any], connection_class: type[Any], setup: float) -> type[Any]:
    """``connection_class`` with ``mixin``, its setups given ``setup`` seconds (one class each, made once)."""
    key = mixin, connection_class, setup
    made = _MADE.get(key)
    if made is None:
        name = f"{mixin.__name__.strip('_')}{connection_class.__name__}"
        made = _MADE[key] = type(name, (mixin, connection_class), {"setup": setup})
    return made


def with_deadlines(connection_class: type[Any], setup: float) -> type[Any]:
    """``connection_class`` (a sync redis-py connection class) whose waits within a call end by its deadline,
    and whose setup runs apart from the calls, within ``setup`` seconds.

    While a call runs ``until`` its deadline on a thread, every write and read of that thread is
    cut to what is left of it; once nothing is, a write raises ``NotRun`` (nothing was sent) and a read
    takes only a reply that has arrived: a call never outlasts its deadline, however many waits it takes. A
    new connection is set up on a thread of its own, ``until`` a deadline
    ``setup`` seconds away, which the call waits for until its own deadline only. Outside a call (a cluster
    mapped, or mapped again, on a thread of its own) it is the plain class, save that it waits for a setup
    under way (which a call that gave up waiting for it left in the pool) before it uses the connection.
    """
    return _made(_Deadlines, connection_class, setup)


# -- async --------------------------------------------------------------------------------------------------


def seen(work: asyncio.Future[Any]) -> None:
    """Mark the error of ``work`` (a task run apart) as seen: the calls that waited for it may all have run
    out of time first."""
    if not work.cancelled():
        work.exception()


async def timed(work: Callable[[], Awaitable[None]], seconds: float, what: str) -> None:
    """``work()`` within ``seconds``, else ``redis.TimeoutError`` saying ``what`` it was."""
    try:
        await within(work, seconds)
    except asyncio.TimeoutError:
        raise RedisTimeoutError(f"{what} took longer than {seconds:g} s") from None


async def _connected(connection: Any, connect: Callable[[], Awaitable[None]], seconds: float) -> None:
    """``connect()`` within ``seconds``, each of its writes and reads too; ``connection`` is closed if it
    fails midway (redis-py leaves one cancelled in its handshake open, a reply still to come).

    redis-py cuts every write and read of the handshake to the connection's ``socket_timeout``, which on a
    cluster's node is the call's timeout (a stalled node costs redis-py's own mapping no more): a setup
    begun while the node stalled failed with the call that began it, just as the node might answer again,
    and the call after it, waiting for that setup, got its failure at once."""
    read_timeout, connection.socket_timeout = connection.socket_timeout, seconds
    _setting_up.set(connection)  # in the setup's own task
    try:
        await timed(connect, seconds, "setting up a new connection to Redis")
    except BaseException:
        await connection.disconnect(nowait=True)
        raise
    finally:
        connection.socket_timeout = read_timeout


async def set_up(
    connection: Any, connect: Callable[[], Awaitable[None]], seconds: float, deadline: float
) -> None:
    """Connect ``connection`` (an asyncio one), if it is not, with ``connect()``: in a task of its own
    within ``seconds``, which the call (whose hard deadline is ``deadline``) waits for (see the module)."""
    setup: asyncio.Future[None] | None = getattr(connection, "_limiter_setup", None)
    refused = None
    if setup is not None and again(setup):
        refused, setup = refusal(setup), None
    if setup is None:
        if connection.is_connected:
            return
        setup = asyncio.ensure_future(_connected(connection, connect, seconds))
        setup.add_done_callback(seen)
        connection._limiter_setup = setup
    if refused is not None:
        raise refused  # until the new setup ends
    waited = not setup.done()
    since = time.monotonic()
    await asyncio.shield(setup)  # the call's deadline cancels the wait, not the setup
    connection._limiter_setup = None  # a failure stays, for ``again`` to judge
    if waited and not _worth_using(time.monotonic() - since, deadline):
        raise _late(since)


class _SetUpApart:
    """Connections whose setup runs apart from the calls (a mixin of redis-py's asyncio connection classes,
    for a pool or a cluster's nodes: connected within a call that runs ``until`` its deadline)."""

    setup: float
    """Seconds a new connection's setup may take (set by ``with_setup``)."""
    _limiter_setup: asyncio.Future[None] | None = None  # see ``set_up``

    async def connect(self) -> None:
        parent: Any = super()
        deadline = _deadline.get()
        if deadline is None:  # pragma: no cover - the limiter connects them within calls
            await parent.connect()
            return
        await set_up(self, parent.connect, self.setup, deadline)

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        """Write ``command`` once the setup under way, if any, has ended (whatever its end), unless this is
        that setup's own: a call that gave up waiting for it left the connection, connected and its handshake
        under way, to the next, and redis-py's own commands (a cluster mapped again, in a task of its own)
        would be written meanwhile, their replies and the setup's crossed. The limiter's calls write
        their commands once they waited for the setup."""
        setup = self._limiter_setup
        if setup is not None and not setup.done() and _setting_up.get() is not self:
            await asyncio.wait((setup,))
        parent: Any = super()
        await parent.send_packed_command(command, check_health)


def with_setup(connection_class: type[Any], setup: float) -> type[Any]:
    """``connection_class`` (an asyncio redis-py connection class) whose setup runs apart from the calls,
    within ``setup`` seconds, and on which nothing else is written while it runs."""
    return _made(_SetUpApart, connection_class, setup)
