"""Sliding window log: the exact algorithm, and the default.

Every admitted request is logged with its time; a request admitted at ``t`` counts against every check
in ``[t, t + window)``. A request of ``cost`` fits when the units logged in ``(now - window, now]`` plus
``cost`` stay within the limit, and when it does not, ``retry_after`` is exactly the time until enough old
entries leave the window. Memory grows with the number of admitted requests in a window (never with their
cost): the log is one ``bytearray`` of float64 pairs ``[time, cumulative cost, ...]``, 16 bytes per request
(a bytearray has a smaller header than an ``array``), and the cumulative costs make every count a binary
search, not a sum.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from struct import Struct

from .base import Algorithm, Verdict

_ENTRY = Struct("dd")  # (time, cumulative cost), native float64
_FLOAT = Struct("d")
_float_at = _FLOAT.unpack_from  # (value,) at a byte offset
# Every _COMPACT_AT appends, expired entries are cut from the front of a log when at least that many have
# piled up, or half the log: at most about twice the live entries plus 2 * _COMPACT_AT are kept.
_COMPACT_AT = 32


class SlidingLog(Algorithm[bytearray]):
    """Exact; memory proportional to the requests admitted in one window."""

    name = "sliding_log"
    __slots__ = ()

    def _live(self, log: bytearray, now: float) -> tuple[int, float, float]:
        """``(index of the first live entry, cumulative cost before it, cumulative cost of the log)``."""
        total = _float_at(log, len(log) - 8)[0]
        if _float_at(log, 0)[0] > now - self.window:
            return 0, 0.0, total  # nothing has expired: no search needed
        with memoryview(log) as raw, raw.cast("d") as values:
            first = bisect_right(values[::2], now - self.window)
            return first, values[2 * first - 1], total

    def evaluate(self, state: bytearray | None, now: float, cost: int) -> Verdict:
        if not state:
            return True, self.limit - cost, 0.0, self.window if cost else 0.0
        first, before, total = self._live(state, now)
        used = total - before
        last_expiry = max(_ENTRY.unpack_from(state, len(state) - 16)[0] + self.window - now, 0.0)
        if used + cost <= self.limit:
            after = int(used) + cost
            return True, self.limit - after, 0.0, (self.window if cost else last_expiry)
        # Entries up to and including index `k` must leave the window: the first whose cumulative cost
        # reaches `total + cost - limit`.
        with memoryview(state) as raw, raw.cast("d") as values:
            k = bisect_left(values[1::2], total + cost - self.limit, first)
            return False, 0, values[2 * k] + self.window - now, last_expiry

    def commit(self, state: bytearray | None, now: float, cost: int) -> bytearray:
        if state is None:
            return bytearray(_ENTRY.pack(now, cost))
        return self._append(state, now, _float_at(state, len(state) - 8)[0] + cost)

    def admit(self, state: bytearray | None, now: float, cost: int) -> bytearray | None:
        if not state:
            return bytearray(_ENTRY.pack(now, cost))
        total = _float_at(state, len(state) - 8)[0]
        # `_live` without a call and a tuple when nothing has expired (the common case on a busy key).
        before = 0.0 if _float_at(state, 0)[0] > now - self.window else self._live(state, now)[1]
        if total - before + cost > self.limit:
            return None
        return self._append(state, now, total + cost)

    def _append(self, state: bytearray, now: float, cumulative: float) -> bytearray:
        """``state`` with an entry for ``now`` at ``cumulative`` cost, after cutting expired entries."""
        if len(state) % (16 * _COMPACT_AT) == 0:  # every _COMPACT_AT entries, look for expired ones
            first = self._live(state, now)[0]
            # Cut expired entries but keep the last of them: its cumulative cost is the base of the rest.
            expired = first - 1
            if expired > 0 and (expired >= _COMPACT_AT or 2 * expired >= len(state) // 16):
                del state[: 16 * expired]
        state += _ENTRY.pack(now, cumulative)
        return state

    def used(self, state: bytearray | None, now: float) -> int:
        if not state:
            return 0
        _, before, total = self._live(state, now)
        return int(total - before)

    def idle(self, state: bytearray, now: float) -> bool:
        return not state or _ENTRY.unpack_from(state, len(state) - 16)[0] + self.window <= now

    def adjust(self, state: bytearray | None, now: float, at: float, delta: int) -> bytearray | None:
        if at <= now - self.window:
            return state  # the charge no longer counts
        if state is None:
            state = bytearray()
        with memoryview(state) as raw, raw.cast("d") as values:
            first, end = bisect_left(values[::2], at), bisect_right(values[::2], at)
            base = values[2 * first - 1] if first else 0.0
        if first == end:  # nothing was logged at `at` (a reservation of 0): log the overage there
            if delta <= 0:
                return state or None
            state[16 * first : 16 * first] = _ENTRY.pack(at, base)
            end += 1
        with memoryview(state) as raw, raw.cast("d") as values:
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
        return state
