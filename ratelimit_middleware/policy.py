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
from .config import LimitSpec, Window, as_config
from .decision import Decision

__all__ = ["TIERS", "Policy", "Rule"]

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
    """One window of one tier, with its algorithm bound to that window."""

    __slots__ = ("algorithm", "identity", "index", "limit", "seconds", "tier", "window")

    def __init__(self, index: int, tier: str, window: Window, algorithm: str) -> None:
        self.index = index
        self.tier = tier
        self.window = window
        self.limit = window.max_requests
        self.seconds = window.seconds
        self.identity = _IDENTITY[tier]
        # A limit of 0 never evaluates an algorithm: every cost >= 1 is denied before (see `Policy`).
        self.algorithm: Algorithm[Any] = algorithm_class(algorithm)(max(self.limit, 1), window.seconds)

    def decision(self, verdict: Verdict, cost: int) -> Decision:
        allowed, remaining, retry_after, reset_after = verdict
        # tuple.__new__ skips the generated keyword __new__: this runs once per request.
        return _new_tuple(
            Decision,
            (allowed, self.limit, remaining, retry_after, reset_after, self.tier, self.seconds, cost),
        )

    def __repr__(self) -> str:
        return f"Rule({self.tier!r}, {self.window}, {self.algorithm.name!r})"


class Policy:
    """The ordered rules of a limiter and the logic that turns their verdicts into one ``Decision``."""

    __slots__ = ("algorithm", "min_limit", "rules")

    def __init__(self, tiers: Sequence[tuple[str, LimitSpec | None]], algorithm: str) -> None:
        algorithm_class(algorithm)  # fail early on a bad name, even with no tiers
        rules: list[Rule] = []
        for tier, spec in tiers:
            if tier not in _IDENTITY:
                raise ValueError(f"unknown tier {tier!r}: choose from {', '.join(TIERS)}")
            if spec is None:
                continue
            name = "global_limit" if tier == "global" else tier
            for window in as_config(spec, name).windows:
                rules.append(Rule(len(rules), tier, window, algorithm))
        if not rules:
            raise ValueError("a limiter needs at least one tier with a limit")
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.algorithm = algorithm
        self.min_limit = min(rule.limit for rule in rules)

    def oversized(self, cost: int) -> Decision:
        """The denial for a cost above ``min_limit``: it exceeds a limit outright and can never pass."""
        rule = next(rule for rule in self.rules if cost > rule.limit)
        return rule.decision((False, 0, math.inf, 0.0), cost)

    def decide(self, verdicts: Sequence[Verdict], cost: int) -> Decision:
        """Combine one verdict per rule (in rule order): all must allow.

        Denied: the binding rule is the denying one with the longest wait. Allowed: the one with the fewest
        units left. Ties go to the earlier rule, so the most specific tier is named first.
        """
        if len(verdicts) == 1:
            return self.rules[0].decision(verdicts[0], cost)
        binding = 0
        if all(verdict[0] for verdict in verdicts):
            for index, verdict in enumerate(verdicts):
                if verdict[1] < verdicts[binding][1]:
                    binding = index
        else:
            binding = -1
            for index, verdict in enumerate(verdicts):
                if not verdict[0] and (binding < 0 or verdict[2] > verdicts[binding][2]):
                    binding = index
        return self.rules[binding].decision(verdicts[binding], cost)

    def rules_for(self, tier: str | None) -> tuple[Rule, ...]:
        """The rules of ``tier``; with ``None``, those keyed by the user (per_user_model, per_user)."""
        if tier is None:
            return tuple(rule for rule in self.rules if rule.tier in _USER_TIERS)
        if tier not in _IDENTITY:
            raise ValueError(f"unknown tier {tier!r}: choose from {', '.join(TIERS)}")
        found = tuple(rule for rule in self.rules if rule.tier == tier)
        if not found:
            configured = sorted({rule.tier for rule in self.rules}, key=TIERS.index)
            raise ValueError(f"tier {tier!r} has no limit here; configured: {', '.join(configured)}")
        return found
