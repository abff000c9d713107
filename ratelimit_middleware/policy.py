"""The rules a limiter enforces: which tiers, which windows, keyed by what, and how verdicts combine.

A policy is the one definition every backend shares. It flattens the tiers (each a ``RateLimitConfig`` of one
or more windows) into rules, one per (tier, window), in a fixed order. A backend evaluates all rules of a
decision atomically and hands the verdicts back to ``Policy.decide``, which picks the binding one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from .algorithms import Algorithm, Verdict, algorithm_class
from .algorithms.concurrency import Concurrency
from .config import Limits, TierSpec, as_config
from .decision import Decision

__all__ = ["TIERS", "CounterName", "Policy", "Rule", "binding", "counter_names"]

TIERS = ("per_user_model", "per_model", "per_user", "global")
"""Tier names in evaluation order. The keyword for ``global`` is ``global_limit``."""

# What identifies a key within each tier. Tiers never share a store, so identities cannot collide across
# tiers, and tuples keep ("a:b", "c") apart from ("a", "b:c").
_IDENTITY: dict[str, Callable[[str, str], Hashable]] = {
    "per_user_model": lambda user, model: (user, model),
    "per_model": lambda user, model: model,
    "per_user": lambda user, model: user,
    "global": lambda user, model: "",
}
_USER_TIERS = frozenset({"per_user_model", "per_user"})
_new_tuple = tuple.__new__


class Rule:
    """One window of one tier counting one unit, with its algorithm bound to that window."""

    __slots__ = ("algorithm", "identity", "index", "limit", "seconds", "tier", "unit")

    def __init__(self, index: int, tier: str, unit: str, limit: int, seconds: float, algorithm: str) -> None:
        self.index = index
        self.tier = tier
        self.unit = unit
        self.limit = limit
        self.seconds = seconds
        self.identity = _IDENTITY[tier]
        # A limit of 0 never evaluates an algorithm: every cost >= 1 is denied before (see `Policy`).
        kind = Concurrency if unit == "concurrent" else algorithm_class(algorithm)
        self.algorithm: Algorithm[Any] = kind(max(limit, 1), seconds)

    def decision(self, verdict: Verdict, cost: int) -> Decision:
        allowed, remaining, retry_after, reset_after = verdict
        # tuple.__new__ skips the generated keyword __new__: this runs once per request.
        return _new_tuple(
            Decision,
            (
                allowed,
                self.limit,
                remaining,
                retry_after,
                reset_after,
                self.tier,
                self.seconds,
                cost,
                self.unit,
                None,
            ),
        )

    def __repr__(self) -> str:
        return f"Rule({self.tier!r}, {self.unit!r}, {self.limit}/{self.seconds:g}, {self.algorithm.name!r})"


CounterName = tuple[str, str, str, int | None, float, int]
"""``(algorithm, unit, tier, limit, window, n)``: see ``counter_names``."""


def counter_names(policy: Policy) -> tuple[CounterName, ...]:
    """What names the counters of each of ``policy.all_rules`` beyond one limiter.

    A rule's name is its algorithm, unit, tier, limit and window, and ``n``, its rank among the rules of the
    policy named alike (``"10/minute;10/minute"`` has two counters). Limiters bound to one storage count a
    rule of one name in one counter per identity, whatever else their policies hold: the Redis keys are made
    of these names (``backends.redis.keyspace``), and a ``MemoryStorage`` shares its stores by them.

    A concurrency limit's name has no limit (``None``): the slots held are the same whatever it is, and
    each limiter compares their count with its own, so that processes with an old and a new
    ``max_concurrent`` (a rollout) count one user's slots together.
    """
    seen: dict[tuple[str, str, str, int | None, float], int] = {}
    names = []
    for rule in policy.all_rules:
        limit = None if rule.unit == "concurrent" else rule.limit
        base = (rule.algorithm.name, rule.unit, rule.tier, limit, rule.seconds)
        seen[base] = seen.get(base, 0) + 1
        names.append((*base, seen[base]))
    return tuple(names)


def binding(decisions: Sequence[Decision]) -> Decision:
    """The binding one of several decisions on one request: all must allow.

    Denied: the denying one with the longest wait. Allowed: the one with the fewest units left. Ties go to
    the earlier one, so the most specific tier is named first.
    """
    if all(decision.allowed for decision in decisions):
        return min(decisions, key=lambda decision: decision.remaining)
    return max((d for d in decisions if not d.allowed), key=lambda decision: decision.retry_after)


class Policy:
    """The ordered rules of a limiter and the logic that turns their verdicts into one ``Decision``.

    ``rules`` are the request limits, which ``check`` evaluates; ``all_rules`` add the token and concurrency
    limits (indexes continue after the request rules), which ``reserve`` evaluates together.
    """

    __slots__ = ("_units", "algorithm", "all_rules", "min_limit", "rules")

    def __init__(self, tiers: Sequence[tuple[str, TierSpec | None]], algorithm: str) -> None:
        algorithm_class(algorithm)  # fail early on a bad name, even with no tiers
        limits: list[tuple[str, str, int, float]] = []
        for tier, spec in tiers:
            if tier not in _IDENTITY:
                raise ValueError(f"unknown tier {tier!r}: choose from {', '.join(TIERS)}")
            if spec is None:
                continue
            name = "global_limit" if tier == "global" else tier
            units = spec.configs() if isinstance(spec, Limits) else [("requests", as_config(spec, name))]
            limits += [
                (tier, unit, w.max_requests, w.seconds) for unit, config in units for w in config.windows
            ]
            if isinstance(spec, Limits) and spec.max_concurrent is not None:
                limits.append((tier, "concurrent", spec.max_concurrent, 0.0))
        if not limits:
            raise ValueError("a limiter needs at least one tier with a limit")
        ordered = [limit for limit in limits if limit[1] == "requests"]
        ordered += [limit for limit in limits if limit[1] != "requests"]
        self.all_rules = tuple(Rule(index, *limit, algorithm) for index, limit in enumerate(ordered))
        self.rules = tuple(rule for rule in self.all_rules if rule.unit == "requests")
        self.algorithm = algorithm
        self.min_limit = min((rule.limit for rule in self.rules), default=0)
        by_unit: dict[str, list[int]] = {}
        for rule in self.all_rules:
            by_unit.setdefault(rule.unit, []).append(rule.index)
        self._units = {unit: tuple(indexes) for unit, indexes in by_unit.items()}

    def oversized(self, cost: int) -> Decision:
        """The denial for a cost above ``min_limit``: it exceeds a limit outright and can never pass."""
        rule = next(rule for rule in self.rules if cost > rule.limit)
        return rule.decision((False, 0, math.inf, 0.0), cost)

    def decide(self, verdicts: Sequence[Verdict], cost: int) -> Decision:
        """Combine one verdict per request rule (in rule order) for a request of ``cost``."""
        if len(verdicts) == 1:
            return self.rules[0].decision(verdicts[0], cost)
        return binding(
            [rule.decision(verdict, cost) for rule, verdict in zip(self.rules, verdicts, strict=True)]
        )

    def costs(self, requests: int, input_tokens: int, output_tokens: int) -> tuple[int, ...]:
        """What a reservation charges each of ``all_rules``."""
        per_unit = {
            "requests": requests,
            "tokens": input_tokens + output_tokens,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "concurrent": 1,
        }
        return tuple(per_unit[rule.unit] for rule in self.all_rules)

    def cancellation(self, costs: Sequence[int]) -> tuple[int, ...]:
        """The adjustment of each of ``all_rules`` that cancels a reservation which charged them ``costs``:
        every rule gives its cost back (the tokens reserved, the concurrency slot) but the request rules (the
        request stays counted)."""
        return tuple(
            0 if rule.unit == "requests" else -cost for rule, cost in zip(self.all_rules, costs, strict=True)
        )

    def settlement(self, reserved: tuple[int, int], actual: tuple[int, int] | None) -> tuple[int, ...]:
        """The adjustment of each of ``all_rules`` that settles a reservation.

        ``reserved`` and ``actual`` are ``(input_tokens, output_tokens)``; ``actual=None`` cancels (refunds
        every token reserved: ``cancellation``). Token limits move by actual minus reserved (a refund never
        exceeds what was reserved, since actual usage is at least 0), concurrency slots are given back,
        requests stay counted.
        """
        if actual is None:
            return self.cancellation(self.costs(1, *reserved))
        reserved_in, reserved_out = reserved
        actual_in, actual_out = actual
        per_unit = {
            "requests": 0,
            "tokens": actual_in + actual_out - reserved_in - reserved_out,
            "input_tokens": actual_in - reserved_in,
            "output_tokens": actual_out - reserved_out,
            "concurrent": -1,
        }
        return tuple(per_unit[rule.unit] for rule in self.all_rules)

    def oversized_reservation(self, costs: Sequence[int]) -> Decision | None:
        """The denial for a reservation with a cost above its rule's limit (it can never pass), else None."""
        for rule, cost in zip(self.all_rules, costs, strict=True):
            if cost > rule.limit:
                return rule.decision((False, 0, math.inf, 0.0), cost)
        return None

    def reservation(
        self, verdicts: Sequence[Verdict], costs: Sequence[int], used: Sequence[int] | None = None
    ) -> tuple[Decision, dict[str, Decision]]:
        """The binding decision of a reservation over ``all_rules``, and the binding one of each unit.

        ``used`` (one per rule, when the backend reported it) fills ``Decision.used`` for messages. A denied
        reservation charged nothing: the rules that would have allowed it report what they had left before.
        """
        if not all(verdict[0] for verdict in verdicts):
            verdicts = [
                (True, min(rule.limit, verdict[1] + cost), verdict[2], verdict[3]) if verdict[0] else verdict
                for rule, verdict, cost in zip(self.all_rules, verdicts, costs, strict=True)
            ]
        decisions = [rule.decision(v, c) for rule, v, c in zip(self.all_rules, verdicts, costs, strict=True)]
        if used is not None:
            decisions = [d._replace(used=u) for d, u in zip(decisions, used, strict=True)]
        by_unit = {unit: binding([decisions[i] for i in indexes]) for unit, indexes in self._units.items()}
        return binding(decisions), by_unit

    def rules_for(self, tier: str | None, unit: str | None = "requests") -> tuple[Rule, ...]:
        """The rules of ``tier`` counting ``unit`` (any unit for ``None``).

        With ``tier=None``: the tiers keyed by the user (per_user_model, per_user).
        """
        rules = (
            self.all_rules if unit is None else tuple(rule for rule in self.all_rules if rule.unit == unit)
        )
        if tier is None:
            return tuple(rule for rule in rules if rule.tier in _USER_TIERS)
        if not isinstance(tier, str):  # a list would fail the look-up below as "unhashable type"
            raise TypeError(f"tier must be a tier name ({', '.join(TIERS)}) or None, got {tier!r}")
        if tier not in _IDENTITY:
            raise ValueError(f"unknown tier {tier!r}: choose from {', '.join(TIERS)}")
        found = tuple(rule for rule in rules if rule.tier == tier)
        if not found:
            configured = sorted(
                {(rule.tier, rule.unit) for rule in self.all_rules}, key=lambda t: TIERS.index(t[0])
            )
            listing = ", ".join(f"{t} ({u})" for t, u in configured)
            what = f"{unit} limit" if unit else "limit"
            raise ValueError(f"tier {tier!r} has no {what} here; configured: {listing}")
        return found
