"""The answer to one rate limit check, immutable, the same whichever backend or algorithm made it."""

from __future__ import annotations

import math
from typing import NamedTuple

from .config import describe_seconds

__all__ = ["Allowed", "Decision", "ShadowDecision"]


class Allowed(NamedTuple):
    """``MultiTierRateLimiter.allow``'s answer: ``allowed, reason = limiter.allow(...)``, and true only when
    allowed, so that ``if limiter.allow(...)`` limits as it does with ``RateLimiter`` (a plain tuple of two
    is always true)."""

    allowed: bool
    reason: str | None
    """Which tier and limit denied the request; ``None`` when allowed."""

    def __bool__(self) -> bool:
        return self.allowed


class Decision(NamedTuple):
    """Whether a request may pass, and the figures clients need to back off.

    For several tiers or windows, the figures are those of the *binding* one: on denial the limit that forces
    the longest wait, otherwise the one with the fewest units left. ``retry_after`` is ``math.inf`` when the
    cost is larger than the limit itself: such a request can never pass, however long it waits.
    """

    allowed: bool
    limit: int
    """Units allowed per window by the binding limit."""
    remaining: int
    """Units left after this request (0 when denied)."""
    retry_after: float
    """Seconds until this request, with its cost, would be allowed (0.0 when allowed)."""
    reset_after: float
    """Seconds until the binding key has fully recovered."""
    tier: str
    """The binding tier: ``per_user_model``, ``per_model``, ``per_user`` or ``global``."""
    window_seconds: float
    """The binding window's length."""
    cost: int
    """The units this request asked for."""
    unit: str = "requests"
    """What the binding limit counts: ``requests``, ``tokens``, ``input_tokens``, ``output_tokens`` or
    ``concurrent`` (requests in flight; its ``window_seconds`` is 0)."""
    used: int | None = None
    """Units already counted before this request, when the backend reports it (for messages)."""

    def __bool__(self) -> bool:
        return self.allowed

    @property
    def limit_text(self) -> str:
        """The binding limit in words: ``"per_model limit of 100 requests per 1 minute"``."""
        if self.unit == "concurrent":
            return f"{self.tier} limit of {self.limit} concurrent requests"
        unit = self.unit.replace("_", " ")
        return f"{self.tier} limit of {self.limit} {unit} per {describe_seconds(self.window_seconds)}"

    @property
    def reason(self) -> str | None:
        """Why the request was denied, naming the tier and its limit; ``None`` when allowed."""
        if self.allowed:
            return None
        if math.isinf(self.retry_after):
            return f"a cost of {self.cost} exceeds the {self.limit_text}; it can never be allowed"
        return f"{self.limit_text} exceeded; retry in {self.retry_after:.3f}s"


class ShadowDecision(Decision):
    """A denial let through by shadow mode: ``allowed`` is True, every other figure is the denial's.

    Nothing was counted for it (a denied request charges nothing). Observers see it as a shadow denial.
    """

    __slots__ = ()
