"""What a limiter needs from a storage, so that the limiters never know where state lives.

A ``Storage`` is the user-facing configuration (``MemoryStorage(max_keys=...)``, later Redis); a limiter binds
it to its policy once, and the resulting ``Backend`` makes each decision atomically: evaluate every rule of
the policy, commit all or nothing, and return ``policy.decide(verdicts, cost)`` (or the policy's denial for an
oversized cost). ``reserve`` does the same over every rule (tokens and concurrency too) with one cost per
rule, and returns the verdicts with a receipt for the charge, which ``adjust`` takes to settle it later and
``renew`` to keep its concurrency slots past their lease. Sync and async methods share one decision logic; a
backend that cannot serve one of the two raises ``TypeError`` saying so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol, cast, runtime_checkable

from ..algorithms import Verdict
from ..decision import Decision
from ..errors import FallbackDecision
from ..policy import Policy, Rule

__all__ = ["Backend", "Reserved", "ReservingBackend", "Storage", "check_storage"]


class Backend(Protocol):
    """Holds the state of one policy's keys."""

    def decide(self, user: str, model: str, cost: int) -> Decision: ...

    async def adecide(self, user: str, model: str, cost: int) -> Decision: ...

    def used(self, user: str, model: str, rule: Rule) -> int: ...

    async def aused(self, user: str, model: str, rule: Rule) -> int: ...

    def reset(self, user: str, model: str, rules: tuple[Rule, ...]) -> None: ...

    async def areset(self, user: str, model: str, rules: tuple[Rule, ...]) -> None: ...

    def __len__(self) -> int: ...


class Reserved(NamedTuple):
    """What ``reserve`` returns."""

    verdicts: list[Verdict]
    """One per rule of ``policy.all_rules``."""
    receipt: object
    """What identifies the charge to the backend that made it (``adjust`` and ``renew`` take it back)."""
    used: list[int] | None = None
    """On denial, the units each rule already counted (``None`` when allowed or when the backend cannot
    tell)."""
    fallback: type[FallbackDecision] | None = None
    """Set when a storage's failure policy answered instead of the storage: its decisions are marked so."""


@runtime_checkable
class ReservingBackend(Backend, Protocol):
    """A backend that also enforces token and concurrency limits (reserve, then settle)."""

    def reserve(self, user: str, model: str, costs: Sequence[int]) -> Reserved: ...

    async def areserve(self, user: str, model: str, costs: Sequence[int]) -> Reserved: ...

    lease: float | None
    """Seconds a concurrency slot is held unless renewed; ``None`` when slots never expire."""

    def adjust(self, user: str, model: str, receipt: object, deltas: Sequence[int]) -> None: ...

    async def aadjust(self, user: str, model: str, receipt: object, deltas: Sequence[int]) -> None: ...

    def renew(self, user: str, model: str, receipt: object) -> bool | None: ...

    async def arenew(self, user: str, model: str, receipt: object) -> bool | None: ...


class Storage(Protocol):
    """Where limiter state lives; ``bind`` makes the backend for one limiter's policy."""

    def bind(self, policy: Policy) -> Backend: ...


def check_storage(storage: object) -> Storage:
    """``storage`` if it is a storage (an instance with ``bind``); else the ``TypeError`` naming it."""
    if isinstance(storage, type):
        raise TypeError(f"storage must be a storage instance, got the class {storage.__name__}: call it")
    if not callable(getattr(storage, "bind", None)):
        hint = ": for a Redis URL, pass RedisStorage(url)" if isinstance(storage, str) else ""
        raise TypeError(
            "storage must be a storage such as MemoryStorage() or RedisStorage(client), "
            f"got {storage!r}{hint}"
        )
    return cast(Storage, storage)
