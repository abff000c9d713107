"""Keeping the concurrency slots of running responses: their leases are renewed every third of the lease.

On Redis a concurrency slot is a lease that expires, so that a worker that dies cannot hold it for ever; a
response that runs longer than the lease (a long stream, a slow model) renews it until it ends. ``keep``
does so on an event loop (a timer per reservation, renewing through the asyncio client); ``LeaseKeeper``
does it for threaded servers (WSGI, sync gRPC) from one daemon thread. In memory slots never expire, and
neither does anything here: both return at once.

A renewal never disturbs the response: if it comes too late (the lease had expired, and the slot may have
gone to another request) or raises, it is logged and the response goes on; while Redis is unreachable the
storage logs its outage once, not every renewal.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable

from .reservation import Reservation

__all__ = ["LeaseKeeper", "Stop", "keep"]

logger = logging.getLogger("ratelimit_middleware")

Stop = Callable[[], None]


def _renewal_every(reservation: Reservation) -> float | None:
    return None if reservation.lease is None else reservation.lease / 3


def _reported(reservation: Reservation, held: bool | BaseException | None) -> None:
    """Log a renewal that raised or came too late (a settled reservation has nothing left to renew; None:
    the storage could not be reached, and logs that itself)."""
    if isinstance(held, BaseException):
        logger.warning("renewing a concurrency lease failed (%s: %s)", type(held).__name__, held)
    elif held is False and not reservation.settled:
        logger.warning(
            "a concurrency lease of user %r on model %r expired before it was renewed: the response goes "
            "on, its slot may be taken by another request",
            reservation.user,
            reservation.model,
        )


def _nothing() -> None:
    """Nothing to stop: the reservation holds no lease."""


def keep(reservation: Reservation) -> Stop:
    """Renew ``reservation``'s leases on the running event loop until the returned function is called."""
    every = _renewal_every(reservation)
    if every is None:
        return _nothing
    loop = asyncio.get_running_loop()
    running: set[asyncio.Task[None]] = set()  # tasks are only weakly held by the loop

    async def renew() -> None:
        try:
            held: bool | BaseException | None = await reservation.arenew()
        except Exception as error:
            held = error
        _reported(reservation, held)

    def tick() -> None:
        task = loop.create_task(renew())
        running.add(task)
        task.add_done_callback(running.discard)
        timers[0] = loop.call_later(every, tick)

    timers = [loop.call_later(every, tick)]  # the one pending: each tick schedules the next

    def stop() -> None:
        try:
            here = asyncio.get_running_loop() is loop
        except RuntimeError:  # another thread (grpc.aio ends calls from its own)
            here = False
        if here:
            timers[0].cancel()
        else:
            loop.call_soon_threadsafe(lambda: timers[0].cancel())

    return stop


class LeaseKeeper:
    """Renews the leases of the reservations it keeps, from one daemon thread started on first need.

    ``clock`` (seconds) schedules the renewals; ``renew_due`` is what the thread runs each time it wakes.
    ``background=False``: no thread, whoever owns the keeper calls ``renew_due`` (a scheduler of its own,
    or a test with an injected clock, which a thread waiting in real time would race).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, background: bool = True) -> None:
        self._clock = clock
        self._background = background
        self._due: dict[Reservation, float] = {}  # when each kept reservation renews next
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._wakes_at = math.inf  # when the thread wakes next, on the clock

    def keep(self, reservation: Reservation) -> Stop:
        """Renew ``reservation``'s leases until the returned function is called."""
        every = _renewal_every(reservation)
        if every is None:
            return _nothing
        with self._changed:
            due = self._due[reservation] = self._clock() + every
            if self._background:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="ratelimit-leases", daemon=True)
                    self._thread.start()
                elif due < self._wakes_at:
                    self._changed.notify()

        def stop() -> None:
            with self._changed:
                if self._due.pop(reservation, None) is not None and not self._due:
                    self._changed.notify()  # nothing left to renew: the thread ends

        return stop

    def __len__(self) -> int:
        """The number of reservations kept."""
        return len(self._due)

    def renew_due(self) -> None:
        """Renew every kept reservation whose turn has come, and schedule its next renewal."""
        now = self._clock()
        with self._changed:
            due = [reservation for reservation, at in self._due.items() if at <= now]
            for reservation in due:
                self._due[reservation] = now + (_renewal_every(reservation) or 0.0)
        for reservation in due:  # outside the lock: a renewal is a round trip
            try:
                held: bool | BaseException | None = reservation.renew()
            except Exception as error:
                held = error
            _reported(reservation, held)

    def _run(self) -> None:
        while True:
            self.renew_due()
            with self._changed:  # computed and waited under one lock, so that `keep` cannot miss it
                if not self._due:  # idle: the thread ends (`keep` starts another), none outlives its use
                    self._thread = None
                    return
                self._wakes_at = min(self._due.values())
                wait = self._wakes_at - self._clock()
                if wait > 0:
                    self._changed.wait(wait)
