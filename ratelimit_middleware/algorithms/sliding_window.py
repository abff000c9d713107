"""Sliding window counter: the current aligned window's count plus a weighted share of the previous one.

At a fraction ``f`` into window ``k`` the estimate is ``previous * (1 - f) + current``, as if the previous
window's units had been spread evenly over it. O(1) memory and smooth at boundaries. Its documented
approximation: it never admits more than the limit in one aligned window, and never more than twice the limit
in any sliding window of the same length (the worst case is a previous window whose units all came at its
very end); with evenly spread traffic it is exact. The state packs ``(k, previous, current)`` into one int.
"""

from __future__ import annotations

from .base import Algorithm, Verdict


class SlidingWindow(Algorithm[int]):
    """O(1) memory; approximate sliding window."""

    name = "sliding_window"
    __slots__ = ("base", "tolerance")

    def __init__(self, limit: int, window: float) -> None:
        super().__init__(limit, window)
        self.base = limit + 1
        # `fits_at` is computed in window k and again in window k + 1 after waiting for it: allow for the
        # rounding between the two forms, far below a microsecond.
        self.tolerance = window * 1e-9

    def _counts(self, state: int | None, k: int) -> tuple[int, int]:
        """``(previous, current)`` as seen from window ``k``."""
        if state is None:
            return 0, 0
        rest, current = divmod(state, self.base)
        state_k, previous = divmod(rest, self.base)
        if state_k == k:
            return previous, current
        if state_k == k - 1:
            return current, 0
        return 0, 0

    def evaluate(self, state: int | None, now: float, cost: int) -> Verdict:
        window = self.window
        k = int(now // window)
        start = k * window
        previous, current = self._counts(state, k)
        # The earliest time this request fits: the share of `previous` shrinks linearly over window k.
        room = self.limit - current - cost
        if room >= 0:
            fits_at = start + window * (1 - room / previous) if previous > room else start
        else:  # only in window k + 1, where `current` becomes the shrinking previous window
            fits_at = start + window * (2 - (self.limit - cost) / current)
        if now >= fits_at - self.tolerance:
            estimate = previous * (1 - (now - start) / window) + current + cost
            remaining = max(int(self.limit - estimate + 1e-9), 0)
            return True, remaining, 0.0, start + 2 * window - now
        reset = (start + 2 * window if current else start + window) - now
        return False, 0, fits_at - now, reset

    def commit(self, state: int | None, now: float, cost: int) -> int:
        k = int(now // self.window)
        previous, current = self._counts(state, k)
        return (k * self.base + previous) * self.base + current + cost

    def used(self, state: int | None, now: float) -> int:
        k = int(now // self.window)
        previous, current = self._counts(state, k)
        share = previous * (1 - (now - k * self.window) / self.window)
        return current + int(share + 1 - 1e-9) if share > 0 else current

    def idle(self, state: int, now: float) -> bool:
        return state // (self.base * self.base) < int(now // self.window) - 1

    def adjust(self, state: int | None, now: float, at: float, delta: int) -> int | None:
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
