"""A circuit breaker: stop calling a Redis that keeps failing, try it again now and then, recover by itself.

- **Closed** (Redis answers): every call goes to Redis. ``failures`` failures in a row open the breaker.
- **Open**: calls fail fast, without touching Redis (the storage's ``on_error`` policy answers them), for
  ``recovery`` seconds.
- **Half-open**: then one call, the probe, goes to Redis. If it succeeds the breaker closes; if it fails the
  breaker stays open for another ``recovery`` seconds. Any success closes it, so calls that were already on
  their way when it opened can close it too.

The clock is injectable (``clock=``, seconds), so tests move time instead of sleeping. Thread-safe; the
closed state, the common one, is read without taking the lock.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from ...hooks import checked_clock

__all__ = ["CircuitBreaker"]


class CircuitBreaker:
    """Opens after ``failures`` consecutive failures; lets one probe through every ``recovery`` seconds."""

    def __init__(
        self, failures: int = 3, recovery: float = 1.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if isinstance(failures, bool) or not isinstance(failures, int) or failures < 1:
            raise ValueError(f"failures must be an int >= 1, got {failures!r}")
        if (
            isinstance(recovery, bool)
            or not isinstance(recovery, (int, float))
            or not 0 < recovery < math.inf
        ):
            raise ValueError(f"recovery must be a number of seconds > 0, got {recovery!r}")
        self.failures = failures
        self.recovery = float(recovery)
        self.clock = checked_clock(clock)
        self._lock = threading.Lock()
        self._failed = 0  # consecutive failures
        self._opened_at: float | None = None  # None: closed
        self._probe_at = 0.0  # when open: the time the next probe may go

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def allow(self) -> bool:
        """May this call go to Redis? Always when closed; when open, only the probe."""
        if self._opened_at is None:
            return True
        with self._lock:
            if self._opened_at is None:
                return True
            now = self.clock()
            if now < self._probe_at:
                return False
            self._probe_at = now + self.recovery  # this call is the probe: the next one waits its turn
            return True

    def succeeded(self) -> float | None:
        """Record a success; if it closes an open breaker, the seconds it was open."""
        if self._opened_at is None and not self._failed:
            return None
        with self._lock:
            self._failed = 0
            opened_at, self._opened_at = self._opened_at, None
        return None if opened_at is None else max(self.clock() - opened_at, 0.0)

    def failed(self) -> bool:
        """Record a failure; True if it opens the breaker."""
        with self._lock:
            now = self.clock()
            self._failed += 1
            if self._opened_at is not None:
                self._probe_at = max(self._probe_at, now + self.recovery)  # a failed probe: wait again
                return False
            if self._failed < self.failures:
                return False
            self._opened_at = now
            self._probe_at = now + self.recovery
            return True

    def retry_after(self) -> float:
        """Seconds until Redis is tried again: 0 when closed."""
        if self._opened_at is None:
            return 0.0
        return max(self._probe_at - self.clock(), 0.0)

    def __repr__(self) -> str:
        state = "open" if self.is_open else "closed"
        return f"CircuitBreaker(failures={self.failures}, recovery={self.recovery:g}, {state})"
