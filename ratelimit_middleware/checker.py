"""What the HTTP and gRPC layers need of a limiter, and how they tell a reserving one.

``RateLimiter``, ``MultiTierRateLimiter``, ``Plans``, ``Shadow`` and ``Both`` all fit ``Checker``; those
with token or concurrency limits (``uses_reservations``) fit ``Reserver`` too: their requests are reserved,
then settled when the response ends.
"""

from __future__ import annotations

from typing import Protocol

from .config import RateLimitConfig
from .decision import Decision
from .limiter import RateLimiter
from .reservation import Reservation

__all__ = ["Checker", "LimiterSpec", "Reserver", "as_checker", "reserver_of"]


class Checker(Protocol):
    """A limiter that decides requests: ``RateLimiter`` and ``MultiTierRateLimiter`` both fit."""

    def check(self, user: str, model: str, cost: int = 1) -> Decision: ...

    async def acheck(self, user: str, model: str, cost: int = 1) -> Decision: ...


class Reserver(Checker, Protocol):
    """A limiter with token or concurrency limits: requests go through ``reserve`` and are settled later."""

    @property
    def uses_reservations(self) -> bool: ...

    def reserve(
        self, user: str, model: str, *, input_tokens: int = 0, output_tokens: int = 0
    ) -> Reservation: ...

    async def areserve(
        self, user: str, model: str, *, input_tokens: int = 0, output_tokens: int = 0
    ) -> Reservation: ...


LimiterSpec = Checker | RateLimitConfig | str
"""A limiter, or a limit (config or string such as ``"10/minute"``) for a new in-memory ``RateLimiter``."""


def is_limiter(spec: object) -> bool:
    """Whether ``spec`` is a limiter: an instance with ``check`` and ``acheck`` (a class has them too)."""
    return (
        not isinstance(spec, type)
        and callable(getattr(spec, "check", None))
        and callable(getattr(spec, "acheck", None))
    )


def as_checker(spec: LimiterSpec, what: str = "limiter") -> Checker:
    """A limiter from a limiter, a config or a limit string."""
    if isinstance(spec, (str, RateLimitConfig)):
        return RateLimiter(limit=spec)
    if is_limiter(spec):
        return spec
    if isinstance(spec, type):
        raise TypeError(f"{what} must be a limiter instance, got the class {spec.__name__}: call it")
    raise TypeError(
        f"{what} must be a limiter, a RateLimitConfig or a limit string like '10/minute', got {spec!r}"
    )


def reserver_of(limiter: Checker) -> Reserver | None:
    """``limiter`` when it has token or concurrency limits (requests are then reserved), else ``None``."""
    # An attribute look-up, not isinstance(): a runtime-checkable Protocol costs microseconds per check (and
    # no cast() to tell mypy: a call per request).
    if getattr(limiter, "uses_reservations", False) is True:
        return limiter  # type: ignore[return-value]
    return None
