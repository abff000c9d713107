"""What a limiter answers when its storage cannot be reached: fail closed, or fail open.

A storage that can fail (Redis) takes a policy for it. Failing closed, the limiter raises
``RateLimiterUnavailable`` (the HTTP middlewares answer 503 with ``Retry-After``, whatever their own
``on_error``). Failing open, it returns an ``UncheckedDecision``: allowed, but decided without the limit, so
the middlewares send no rate limit headers with it (they would describe a count nobody made). Deciding in
memory meanwhile, it returns a ``LocalDecision``. Both are ``FallbackDecision``s, which observers count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .decision import Decision

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["FallbackDecision", "LocalDecision", "RateLimiterUnavailable", "UncheckedDecision"]


class RateLimiterUnavailable(Exception):
    """The limiter cannot reach its storage and its policy is to deny (fail closed).

    ``retry_after``: seconds until the storage is tried again (a client should wait at least that).
    """

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class FallbackDecision(Decision):
    """A decision made by a storage's failure policy instead of the storage (its storage is unreachable)."""

    __slots__ = ()
    policy = ""
    """The ``on_error`` policy that made it."""

    @classmethod
    def of(cls, decision: Decision) -> Self:
        """``decision``, marked as made by this fallback."""
        return cls._make(decision)


class UncheckedDecision(FallbackDecision):
    """An allowed decision made without checking the limit (fail open: the storage cannot be reached).

    Its figures are those of the first limit as if nothing had been counted.
    """

    __slots__ = ()
    policy = "allow"


class LocalDecision(FallbackDecision):
    """A decision made by an in-memory limiter of the same limits while the storage cannot be reached."""

    __slots__ = ()
    policy = "local"
