"""What a limiter needs from a storage, so that the limiters never know where state lives.

A ``Storage`` is the user-facing configuration (``MemoryStorage(max_keys=...)``, later Redis); a limiter binds
it to its policy once, and the resulting ``Backend`` makes each decision atomically: evaluate every rule of
the policy, commit all or nothing, and return ``policy.decide(verdicts, cost)`` (or the policy's denial for an
oversized cost). Sync and async methods share one decision logic; a backend that cannot serve one of the two
raises ``TypeError`` saying so.
"""

from __future__ import annotations

from typing import Protocol

from ..decision import Decision
from ..policy import Policy, Rule

__all__ = ["Backend", "Storage"]


class Backend(Protocol):
    """Holds the state of one policy's keys."""

    def decide(self, user: str, model: str, cost: int) -> Decision: ...

    async def adecide(self, user: str, model: str, cost: int) -> Decision: ...

    def used(self, user: str, model: str, rule: Rule) -> int: ...

    async def aused(self, user: str, model: str, rule: Rule) -> int: ...

    def reset(self, user: str, model: str, rules: tuple[Rule, ...]) -> None: ...

    async def areset(self, user: str, model: str, rules: tuple[Rule, ...]) -> None: ...

    def __len__(self) -> int: ...


class Storage(Protocol):
    """Where limiter state lives; ``bind`` makes the backend for one limiter's policy."""

    def bind(self, policy: Policy) -> Backend: ...
