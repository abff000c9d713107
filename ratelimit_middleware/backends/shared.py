"""Several limiters in memory that count the rules they state alike in one counter, as they do on Redis.

On Redis a counter's key is named by its rule (``policy.counter_names``: algorithm, unit, tier, limit,
window), so limiters bound to one ``RedisStorage`` that state the same rule share its counters. A
``MemoryStorage`` gives each limiter stores of its own. ``SharedMemory`` makes memory agree for a set of
policies known up front (those of ``Plans``):

- policies that have no counter name in common with another keep a ``MemoryBackend`` of their own;
- policies that are all alike share one ``MemoryBackend``;
- policies that overlap otherwise share one ``MemoryBackend`` over the union of their rules: each decision
  evaluates that union at once, charging a policy's own rules and 0 to the others (a cost of 0 is always
  allowed and stores nothing), so it stays atomic and a denial still charges nothing.

``max_keys`` then caps the keys of each shared backend, whichever limiters hold them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ..algorithms import Verdict
from ..config import Limits, RateLimitConfig, TierSpec
from ..decision import Decision
from ..policy import CounterName, Policy, Rule, counter_names
from .base import Backend, Reserved
from .memory import MemoryBackend, MemoryStorage

__all__ = ["SharedMemory"]


Names = tuple[CounterName, ...]


class SharedMemory:
    """A storage for a known set of policies: their limiters count rules named alike in one counter."""

    def __init__(self, storage: MemoryStorage, policies: Iterable[Policy]) -> None:
        self.storage = storage
        named = [(counter_names(policy), policy) for policy in policies]
        distinct = dict(named)  # policies alike, once
        self._unions: dict[Names, _Union] = {}
        self._alike: dict[Names, MemoryBackend | None] = {}
        for group in _overlapping(list(distinct)):
            if len(group) > 1:
                union = _Union(storage, [distinct[names] for names in group])
                self._unions.update(dict.fromkeys(group, union))
            elif sum(names == group[0] for names, _ in named) > 1:
                self._alike[group[0]] = None  # bound on first use

    def bind(self, policy: Policy) -> Backend:
        names = counter_names(policy)
        if names in self._unions:
            return self._unions[names].view(policy)
        if names not in self._alike:
            return self.storage.bind(policy)
        backend = self._alike[names]
        if backend is None:
            backend = self._alike[names] = self.storage.bind(policy)
        return backend

    def __repr__(self) -> str:
        return f"SharedMemory({self.storage!r})"


def _overlapping(every: Sequence[Names]) -> list[list[Names]]:
    """``every`` in groups: two policies with a counter name in common are in one group."""
    group_of: dict[CounterName, int] = {}
    groups: dict[int, list[Names]] = {}
    for index, names in enumerate(every):
        joined = {group_of[name] for name in names if name in group_of}
        members = [names]
        for other in joined:
            members += groups.pop(other)
        groups[index] = members
        for member in members:
            group_of.update(dict.fromkeys(member, index))
    return list(groups.values())


def _spec(name: CounterName) -> TierSpec:
    """The limit of a rule of this name, as a tier states it."""
    _, unit, _, limit, seconds, _ = name
    if unit == "concurrent":
        return Limits(max_concurrent=limit)
    config = RateLimitConfig(limit, seconds)
    field: dict[str, Any] = {unit: config}
    return config if unit == "requests" else Limits(**field)


class _Union:
    """One ``MemoryBackend`` over every rule of several policies (each counter name once)."""

    def __init__(self, storage: MemoryStorage, policies: Sequence[Policy]) -> None:
        algorithms = {policy.algorithm for policy in policies}
        if len(algorithms) > 1:
            raise ValueError(f"policies sharing counters need one algorithm, got {sorted(algorithms)}")
        names = list(dict.fromkeys(name for policy in policies for name in counter_names(policy)))
        self.policy = Policy([(name[2], _spec(name)) for name in names], algorithms.pop())
        self.backend = storage.bind(self.policy)
        self.index = {name: index for index, name in enumerate(counter_names(self.policy))}

    def view(self, policy: Policy) -> _View:
        return _View(self, policy, tuple(self.index[name] for name in counter_names(policy)))


class _View:
    """The backend of one policy within a ``_Union``: its rules are the union's rules at ``indexes``."""

    lease: float | None = None  # as MemoryBackend: slots live and die with the process

    def __init__(self, union: _Union, policy: Policy, indexes: tuple[int, ...]) -> None:
        self._backend = union.backend
        self._union_rules = union.policy.all_rules
        self._policy = policy
        self._indexes = indexes
        self._requests = indexes[: len(policy.rules)]  # request rules come first in every policy

    def _spread(self, values: Sequence[int], indexes: Sequence[int]) -> list[int]:
        """One value per union rule: ``values`` at ``indexes``, 0 elsewhere."""
        spread = [0] * len(self._union_rules)
        for index, value in zip(indexes, values, strict=True):
            spread[index] = value
        return spread

    def _rules(self, rules: Iterable[Rule]) -> tuple[Rule, ...]:
        return tuple(self._union_rules[self._indexes[rule.index]] for rule in rules)

    def decide(self, user: str, model: str, cost: int) -> Decision:
        policy = self._policy
        if cost > policy.min_limit:
            return policy.oversized(cost)
        costs = self._spread([cost] * len(self._requests), self._requests)
        verdicts: list[Verdict] = self._backend.reserve(user, model, costs).verdicts
        return policy.decide([verdicts[index] for index in self._requests], cost)

    async def adecide(self, user: str, model: str, cost: int) -> Decision:
        return self.decide(user, model, cost)

    def used(self, user: str, model: str, rule: Rule) -> int:
        return self._backend.used(user, model, self._rules([rule])[0])

    async def aused(self, user: str, model: str, rule: Rule) -> int:
        return self.used(user, model, rule)

    def reset(self, user: str, model: str, rules: tuple[Rule, ...]) -> None:
        self._backend.reset(user, model, self._rules(rules))

    async def areset(self, user: str, model: str, rules: tuple[Rule, ...]) -> None:
        self.reset(user, model, rules)

    def reserve(self, user: str, model: str, costs: Sequence[int]) -> Reserved:
        reply = self._backend.reserve(user, model, self._spread(costs, self._indexes))
        used = None if reply.used is None else [reply.used[index] for index in self._indexes]
        return reply._replace(verdicts=[reply.verdicts[index] for index in self._indexes], used=used)

    async def areserve(self, user: str, model: str, costs: Sequence[int]) -> Reserved:
        return self.reserve(user, model, costs)

    def adjust(self, user: str, model: str, receipt: object, deltas: Sequence[int]) -> None:
        self._backend.adjust(user, model, receipt, self._spread(deltas, self._indexes))

    async def aadjust(self, user: str, model: str, receipt: object, deltas: Sequence[int]) -> None:
        self.adjust(user, model, receipt, deltas)

    def renew(self, user: str, model: str, receipt: object) -> bool:
        return True

    async def arenew(self, user: str, model: str, receipt: object) -> bool:
        return True

    def __len__(self) -> int:
        return len(self._backend)
