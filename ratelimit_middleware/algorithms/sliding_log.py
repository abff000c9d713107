"""Sliding window log: the exact algorithm, and the default.

Every admitted request is logged with its time; a request admitted at ``t`` counts against every check
in ``[t, t + window)``. A request of ``cost`` fits when the units logged in ``(now - window, now]`` plus
``cost`` stay within the limit, and when it does not, ``retry_after`` is exactly the time until enough old
entries leave the window. Memory grows with the number of admitted requests in a window (never with their
cost), and never with those settled at a cost of zero: a settlement removes the entries it empties, so that
every entry costs at least 1. A log has one of three layouts, told apart by type, and only ever moves down
this list:

- a ``float``, the time of a single request of cost 1: a key seen once in a window, the most common log,
  costs 24 bytes instead of a container;
- ``bytes`` of float64 times, a few requests of cost 1 each (up to ``_FEW``): 33 bytes and 8 per request,
  copied on every append (a few dozen bytes), and cut to the live entries then;
- an ``array('d')`` of times, more requests of cost 1 each: 8 bytes per request (plus an 80-byte header and
  up to 1/16 spare), appended in place. In these two the cumulative cost up to entry ``i`` is implicit,
  ``i + 1``;
- a ``bytearray`` of float64 pairs ``[time, cumulative cost, ...]``, for any costs: 16 bytes per request (a
  bytearray has a smaller header than an ``array``). A log takes this layout when it first logs a cost other
  than 1 or settles a charge (``adjust``, token reservations).

In every layout the cumulative costs (explicit or implicit) make every count a binary search, not a sum.
Float64 holds every integer up to 2**53 (``MAX_AMOUNT``) exactly, and no further: before a cumulative cost
would pass it, the expired entries go and the rest count from the first live one (``_rebase``); sums that
may pass it are compared as differences (``used <= limit - cost``); and an overage settled after the fact
stops at ``MAX_AMOUNT`` units in the window.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from itertools import count
from struct import Struct
from typing import TypeAlias

from ..config import MAX_AMOUNT
from .base import Algorithm, Verdict, wait_until

Times: TypeAlias = "float | bytes | array[float]"
"""A log of requests of cost 1 each."""
Log: TypeAlias = "Times | bytearray"
"""A sliding log in one of its layouts (see the module docstring)."""

_ENTRY = Struct("dd")  # (time, cumulative cost), native float64
_FLOAT = Struct("d")
_float_at = _FLOAT.unpack_from  # (value,) at a byte offset
# Every _COMPACT_AT appends, expired entries are cut from the front of a log when at least that many have
# piled up, or half the log: at most about twice the live entries plus 2 * _COMPACT_AT are kept.
_COMPACT_AT = 32
_FEW = 16  # at most this many times are kept in `bytes`, more in an `array`


class SlidingLog(Algorithm[Log]):
    """Exact; memory proportional to the requests admitted in one window."""

    name = "sliding_log"
    __slots__ = ()

    # -- every layout --------------------------------------------------------------------------------

    def evaluate(self, state: Log | None, now: float, cost: int) -> Verdict:
        if state is None:
            return True, self.limit - cost, 0.0, self.window if cost else 0.0
        if isinstance(state, bytearray):
            return self._evaluate_pairs(state, now, cost)
        times = _times(state)
        used = len(times) - self._first_live(times, now)
        last_expiry = max(times[-1] + self.window - now, 0.0)
        if used + cost <= self.limit:
            return True, self.limit - used - cost, 0.0, (self.window if cost else last_expiry)
        # With a cost of 1 per entry, entries up to and including index `k` must leave the window, where
        # `k + 1` (the cumulative cost there) reaches `len(times) + cost - limit`.
        k = len(times) + cost - self.limit - 1
        return False, 0, self._until_expired(times[k], now), last_expiry

    def commit(self, state: Log | None, now: float, cost: int) -> Log:
        if isinstance(state, bytearray):
            return self._append(state, now, cost)
        if cost == 1:
            return self._log_one(state, now)
        if state is None:
            return bytearray(_ENTRY.pack(now, cost))
        return self._append(_pairs(state), now, cost)  # the first cost other than 1: pairs from now on

    def admit(self, state: Log | None, now: float, cost: int) -> Log | None:
        if type(state) is array and cost == 1:  # request counting on a busy key: the common case
            start = now - self.window
            live = len(state) - (0 if state[0] > start else bisect_right(state, start))
            if live >= self.limit:
                return None
            if len(state) % _COMPACT_AT:  # `_log_one` without a call, between two looks for expired entries
                state.append(now)
                return state
            return self._log_one(state, now)
        if type(state) is bytes and cost == 1:  # the same for a key with a few requests in its window
            start = now - self.window
            first = 0 if _float_at(state, 0)[0] > start else bisect_right(memoryview(state).cast("d"), start)
            if len(state) // 8 - first >= self.limit:
                return None
            return _with_time(state[8 * first :] if first else state, now)
        if isinstance(state, bytearray):
            total = _float_at(state, len(state) - 8)[0]
            # `_live` without a call and a tuple when nothing has expired (the common case on a busy key).
            before = 0.0 if _float_at(state, 0)[0] > now - self.window else self._live(state, now)[1]
            if total - before > self.limit - cost:
                return None
            return self._append(state, now, cost)
        if cost != 1:
            return super().admit(state, now, cost)  # evaluate, then commit (which moves the log to pairs)
        if state is None:
            return now
        return None if self.used(state, now) >= self.limit else self._log_one(state, now)

    def figures(self, state: Log, now: float, cost: int) -> tuple[int, float]:
        # A request resets the key a whole window ahead.
        if type(state) is array:  # a busy key: `used` without its look at the layout
            return self.limit - len(state) + self._first_live(state, now), self.window
        return self.limit - self.used(state, now), self.window

    def used(self, state: Log | None, now: float) -> int:
        if state is None:
            return 0
        if isinstance(state, bytearray):
            _, before, total = self._live(state, now)
            return int(total - before)
        times = _times(state)
        return len(times) - self._first_live(times, now)

    def idle(self, state: Log, now: float) -> bool:
        # Not `last + window <= now`: that sum rounds, and may call idle an entry the window's own test
        # (live while `time > now - window`) still counts; a sweep would then forget it.
        last: float = (
            _float_at(state, len(state) - 16)[0] if isinstance(state, bytearray) else _times(state)[-1]
        )
        return last <= now - self.window

    def adjust(self, state: Log | None, now: float, at: float, charged: int, delta: int) -> Log | None:
        if at <= now - self.window:
            return state  # the charge no longer counts
        if delta > 0:  # an overage: counted up to MAX_AMOUNT units in the window
            delta = min(delta, MAX_AMOUNT - self.used(state, now))
            if not delta:
                return state
        log = state if isinstance(state, bytearray) else _pairs(state)
        if log and _float_at(log, len(log) - 8)[0] > MAX_AMOUNT - delta:
            self._rebase(log, now)  # the charge at `at` is live: it stays
        with memoryview(log) as raw, raw.cast("d") as values:
            first, end = bisect_left(values[::2], at), bisect_right(values[::2], at)
            base = values[2 * first - 1] if first else 0.0
        if first == end:  # nothing was logged at `at` (a reservation of 0): log the overage there
            if delta <= 0:
                return state
            log[16 * first : 16 * first] = _ENTRY.pack(at, base)
            end += 1
        emptied = 0  # entries at the end of the run that the refund takes to a cost of zero
        with memoryview(log) as raw, raw.cast("d") as values:
            # Entries charged at the same instant expire together, so settle them as one: an overage goes on
            # the last of them, a refund takes from the last ones first, never below a cost of zero.
            changes: list[float] = []  # per entry from the end of the run backwards
            if delta >= 0:
                changes.append(delta)
            else:
                owed = float(-delta)
                for i in range(end - 1, first - 1, -1):
                    cost = values[2 * i + 1] - (values[2 * i - 1] if i else 0.0)
                    taken = min(cost, owed)
                    changes.append(-taken)
                    emptied += taken == cost
                    owed -= taken
                    if not owed:
                        break
            start = end - len(changes)
            running = 0.0
            for offset, change in enumerate(reversed(changes)):
                running += change
                values[2 * (start + offset) + 1] += running
            for position in range(2 * end + 1, len(values), 2):
                values[position] += running
        # Emptied entries go (no later cumulative cost changes): a reservation settled at zero or cancelled
        # leaves nothing, and a log with nothing left is forgotten.
        del log[16 * (end - emptied) : 16 * end]
        return log or None

    def _until_expired(self, time: float, now: float) -> float:
        """Seconds from ``now`` until an entry logged at ``time`` has left the window, by the very test that
        the window applies (live while ``time > now - window``): a retry after that wait finds it gone."""
        window = self.window
        wait = time + window - now
        if now + wait - window >= time:  # nearly always: no search, no closure (a denial's hot path)
            return wait
        return wait_until(now, wait, lambda later: later - window >= time)

    # -- times: a float, bytes or an array('d') ------------------------------------------------------

    def _first_live(self, times: Sequence[float], now: float) -> int:
        """The index of the first entry of ``times`` still in the window."""
        start = now - self.window
        return 0 if times[0] > start else bisect_right(times, start)

    def _log_one(self, state: Times | None, now: float) -> Times:
        """``state`` with a request of cost 1 at ``now``, after cutting expired entries."""
        if state is None:
            return now
        if isinstance(state, array):
            if len(state) % _COMPACT_AT == 0:  # every _COMPACT_AT entries, look for expired ones
                expired = self._first_live(state, now)
                if expired >= _COMPACT_AT or 2 * expired >= len(state):
                    del state[:expired]
            state.append(now)
            return state
        if isinstance(state, bytes):
            return _with_time(state[8 * self._first_live(_times(state), now) :], now)
        # One request: replaced once expired, else joined by this one.
        return now if state <= now - self.window else _FLOAT.pack(state) + _FLOAT.pack(now)

    # -- pairs: a bytearray of (time, cumulative cost) -----------------------------------------------

    def _live(self, log: bytearray, now: float) -> tuple[int, float, float]:
        """``(index of the first live entry, cumulative cost before it, cumulative cost of the log)``."""
        total = _float_at(log, len(log) - 8)[0]
        if _float_at(log, 0)[0] > now - self.window:
            return 0, 0.0, total  # nothing has expired: no search needed
        with memoryview(log) as raw, raw.cast("d") as values:
            first = bisect_right(values[::2], now - self.window)
            return first, values[2 * first - 1], total

    def _evaluate_pairs(self, log: bytearray, now: float, cost: int) -> Verdict:
        first, before, total = self._live(log, now)
        used = total - before
        last_expiry = max(_ENTRY.unpack_from(log, len(log) - 16)[0] + self.window - now, 0.0)
        if used <= self.limit - cost:
            after = int(used) + cost
            return True, self.limit - after, 0.0, (self.window if cost else last_expiry)
        # Entries up to and including index `k` must leave the window: the first whose cumulative cost
        # reaches `total + cost - limit`.
        with memoryview(log) as raw, raw.cast("d") as values:
            k = bisect_left(values[1::2], total - (self.limit - cost), first)
            return False, 0, self._until_expired(values[2 * k], now), last_expiry

    def _append(self, log: bytearray, now: float, cost: int) -> bytearray:
        """``log`` with an entry of ``cost`` at ``now`` (that fits), after cutting expired entries."""
        total = _float_at(log, len(log) - 8)[0]
        if total > MAX_AMOUNT - cost:
            total = self._rebase(log, now)
        elif len(log) % (16 * _COMPACT_AT) == 0:  # every _COMPACT_AT entries, look for expired ones
            first = self._live(log, now)[0]
            # Cut expired entries but keep the last of them: its cumulative cost is the base of the rest.
            expired = first - 1
            if expired > 0 and (expired >= _COMPACT_AT or 2 * expired >= len(log) // 16):
                del log[: 16 * expired]
        log += _ENTRY.pack(now, total + cost)
        return log

    def _rebase(self, log: bytearray, now: float) -> float:
        """Cut every expired entry and count the cumulative costs from the first live one; the new total
        (the units in the window).

        Cumulative costs only grow, and past 2**53 floats skip integers: a log whose total would pass it
        starts again from the units in the window, at most ``MAX_AMOUNT``.
        """
        first, before, _ = self._live(log, now)
        del log[: 16 * first]
        with memoryview(log) as raw, raw.cast("d") as values:
            for position in range(1, len(values), 2):
                values[position] -= before
            return values[-1] if len(values) else 0.0


def _with_time(live: bytes, now: float) -> Times:
    """The live times of a ``bytes`` log with ``now`` appended: alone as a float when none is left, bytes
    up to ``_FEW`` times, an array from then on."""
    if not live:
        return now
    if len(live) < 8 * _FEW:
        return live + _FLOAT.pack(now)
    times = array("d", live)
    times.append(now)
    return times


def _times(state: Times | None) -> Sequence[float]:
    """The times of a log of unit costs, as a sequence (none for no log)."""
    if state is None:
        return ()
    if isinstance(state, array):
        return state
    if isinstance(state, bytes):
        return memoryview(state).cast("d")
    return (state,)


def _pairs(state: Times | None) -> bytearray:
    """A log of unit costs in the pair layout: entry ``i`` at cumulative cost ``i + 1`` (empty for no log)."""
    return bytearray(b"".join(map(_ENTRY.pack, _times(state), count(1))))
