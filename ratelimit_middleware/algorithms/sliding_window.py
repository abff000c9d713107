"""Sliding window counter: the current aligned window's count plus a weighted share of the previous one.

At a fraction ``f`` into window ``k`` the estimate is ``previous * (1 - f) + current``, as if the previous
window's units had been spread evenly over it. O(1) memory and smooth at boundaries. Its documented
approximation: it never admits more than the limit in one aligned window, and never more than twice the limit
in any sliding window of the same length (the worst case is a previous window whose units all came at its
very end); with evenly spread traffic it is exact. The state packs ``(k, previous, current)`` into one int.
"""

from __future__ import annotations

from math import ceil, floor

from .base import Algorithm, Verdict, wait_until


class SlidingWindow(Algorithm[int]):
    """O(1) memory; approximate sliding window."""

    name = "sliding_window"
    __slots__ = ("base", "span", "tolerance")

    def __init__(self, limit: int, window: float) -> None:
        super().__init__(limit, window)
        self.base = limit + 1
        self.span = self.base * self.base  # the states of one window
        # `fits_at` is computed in window k and again in window k + 1 after waiting for it: allow for the
        # rounding between the two forms, far below a microsecond.
        self.tolerance = window * 1e-9

    def _counts(self, state: int | None, k: int) -> tuple[int, int]:
        """``(previous, current)`` as seen from window ``k``."""
        if state is None:
            return 0, 0
        # The states of window k are k * base**2 + previous * base + current: the offset from the first
        # of them is `(previous, current)` in base `base`, below 0 for the window before.
        offset = state - k * self.span
        if 0 <= offset < self.span:
            return divmod(offset, self.base)
        if -self.span <= offset < 0:
            return (offset + self.span) % self.base, 0  # window k - 1: its current is now previous
        return 0, 0

    def _fits_at(self, start: float, previous: int, current: int, cost: int) -> float:
        """The earliest time a request of ``cost`` fits in the window starting at ``start``, or later.

        A moment in the next window (``current + cost`` over the limit) may round to this window's end, less
        than the tolerance away at large counts: the callers admit only while ``current + cost`` fits.
        """
        window = self.window
        # The share of `previous` shrinks linearly over the window.
        room = self.limit - current - cost
        if room >= 0:
            return start + window * (1 - room / previous) if previous > room else start
        # Only in the next window, where `current` becomes the shrinking previous window.
        return start + window * (2 - (self.limit - cost) / current)

    def evaluate(self, state: int | None, now: float, cost: int) -> Verdict:
        window = self.window
        k = int(now // window)
        start = k * window
        previous, current = self._counts(state, k)
        fits_at = self._fits_at(start, previous, current, cost)
        if current + cost <= self.limit and now >= fits_at - self.tolerance:
            return True, self._remaining(start, previous, current + cost, now), 0.0, start + 2 * window - now
        reset = (start + 2 * window if current else start + window) - now
        return False, 0, self._wait(state, now, cost, fits_at), reset

    def _remaining(self, start: float, previous: int, current: int, now: float) -> int:
        """Units left at ``now`` in the window starting at ``start`` by the estimate, ``current`` counting
        this request."""
        estimate = previous * (1 - (now - start) / self.window) + current
        return max(int(self.limit - estimate + 1e-9), 0)

    def figures(self, state: int, now: float, cost: int) -> tuple[int, float]:
        window = self.window
        k = int(now // window)
        start = k * window
        previous, current = self._counts(state, k)
        return self._remaining(start, previous, current, now), start + 2 * window - now

    def _wait(self, state: int | None, now: float, cost: int, fits_at: float) -> float:
        """The wait until ``fits_at``, admitted by ``evaluate`` at ``now`` plus it (a method of its own: a
        closure in ``evaluate`` would slow every call of it)."""
        return wait_until(now, fits_at - now, lambda later: self._admits(state, later, cost))

    def _admits(self, state: int | None, now: float, cost: int) -> bool:
        """Whether ``evaluate`` would allow ``cost`` at ``now``: a retry may fall in the next window, where
        the moment it fits is computed in another form, a few ulps apart at large clock values."""
        window = self.window
        k = int(now // window)
        previous, current = self._counts(state, k)
        fits_at = self._fits_at(k * window, previous, current, cost)
        return current + cost <= self.limit and now >= fits_at - self.tolerance

    def commit(self, state: int | None, now: float, cost: int) -> int:
        k = int(now // self.window)
        previous, current = self._counts(state, k)
        return (k * self.base + previous) * self.base + current + cost

    def admit(self, state: int | None, now: float, cost: int) -> int | None:
        # All the work of `allow`: the common case (a state already in window k, which then only grows by
        # `cost`, and room for the request) skips the calls to `_counts` and `_fits_at`.
        window, base = self.window, self.base
        k = floor(now // window)  # int(now // window), in half the time
        first = k * self.span  # window k's state with nothing counted
        if state is not None and first <= state < first + self.span:
            previous, current = divmod(state - first, base)
        else:
            previous, current = self._counts(state, k)  # current is 0: nothing counted in window k yet
            state = first + previous * base
        room = self.limit - current - cost
        if room < 0:
            return None
        fits_at = k * window  # the window's start: what `_fits_at` answers while `previous` leaves room
        if previous > room:
            fits_at = self._fits_at(fits_at, previous, current, cost)
        return None if now < fits_at - self.tolerance else state + cost

    def used(self, state: int | None, now: float) -> int:
        k = int(now // self.window)
        previous, current = self._counts(state, k)
        share = previous * (1 - (now - k * self.window) / self.window)
        # Whole units, rounded up but for a hair (`share + 1 - 1e-9` rounds up a share of 2**52 - 1); never
        # more than the limit, which a settled overage can push the estimate past.
        return min(current + ceil(share - 1e-9), self.limit) if share > 0 else current

    def idle(self, state: int, now: float) -> bool:
        return state // self.span < int(now // self.window) - 1

    def adjust(self, state: int | None, now: float, at: float, charged: int, delta: int) -> int | None:
        k = int(now // self.window)
        previous, current = self._counts(state, k)
        charged_in = int(at // self.window)
        if charged_in == k:
            current = min(max(current + delta, 0), self.limit)
        elif charged_in == k - 1:
            previous = min(max(previous + delta, 0), self.limit)
        else:
            return state  # the charge no longer counts
        return (k * self.base + previous) * self.base + current
