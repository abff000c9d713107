"""Redis key names: one key per (rule, identity), unambiguous and safe for Redis Cluster.

A key is ``<prefix>:<algorithm>:<tier>:<limit>/<window>:<identity>``, for instance
``ratelimit:sliding_log:per_user_model:100/3600:{alice}:gpt-4``: the name of the rule's counter
(``policy.counter_names``). The algorithm is part of the name because each stores a different type; the
limit and window are, so that limiters with different limits never share state (limiters configured alike,
in any process, do: that is the point). Token and concurrency rules add their unit after the algorithm
(``ratelimit:sliding_log:tokens:per_user_model:1000/60:{alice}:gpt-4``), so they never share a request
rule's key. A concurrency rule names no limit and no window (``ratelimit:concurrency:concurrent:per_user:
{alice}``): its leases are the same whatever the limit, so limiters with another ``max_concurrent`` count
them together.

User and model are escaped (``%`` ``:`` ``{`` ``}`` percent-encoded, the empty string written ``%``) so that
``("a:b", "c")`` and ``("a", "b:c")`` stay apart and user input can never open or close a hash tag. The
limiter places one hash tag itself (Redis Cluster hashes only the text in the first ``{...}``):

- ``per_user_model`` ``{user}:model`` and ``per_user`` ``{user}``: every key of one user shares a slot, so
  these tiers are decided in one script on a cluster too;
- ``per_model`` ``{model}`` and ``global`` ``{global}``: shared by all users, on slots of their own.

On a cluster, ``slot_groups`` splits the keys of one decision by slot: one script per slot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from redis.crc import key_slot

from ...policy import Policy, Rule, counter_names

__all__ = ["check_prefix", "escape", "rule_key_maker", "slot_groups"]

_ESCAPES = str.maketrans({"%": "%25", ":": "%3A", "{": "%7B", "}": "%7D"})


def escape(text: str) -> bytes:
    """``text`` with ``% : { }`` percent-encoded, as UTF-8 (lone surrogates kept, so distinct strings stay
    distinct); ``""`` becomes ``%``, which no other string escapes to, so a hash tag is never empty."""
    if not text:
        return b"%"
    return text.translate(_ESCAPES).encode("utf-8", "surrogatepass")


def check_prefix(prefix: object) -> str:
    """A valid ``key_prefix``: a non-empty str without braces (the limiter places the hash tags)."""
    if not isinstance(prefix, str):
        raise TypeError(f"key_prefix must be a str, got {prefix!r}")
    if not prefix or "{" in prefix or "}" in prefix:
        raise ValueError(f"key_prefix must be non-empty and contain no '{{' or '}}', got {prefix!r}")
    return prefix


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def _identities(tier: str) -> Callable[[bytes, str, str], bytes]:
    if tier == "per_user_model":
        return lambda base, user, model: b"%s{%s}:%s" % (base, escape(user), escape(model))
    if tier == "per_user":
        return lambda base, user, model: b"%s{%s}" % (base, escape(user))
    if tier == "per_model":
        return lambda base, user, model: b"%s{%s}" % (base, escape(model))
    return lambda base, user, model: base + b"{global}"


def rule_key_maker(prefix: str, policy: Policy) -> Callable[[Rule, str, str], bytes]:
    """A function ``(rule, user, model) -> key`` for the rules of ``policy``.

    Two rules of one tier with the same limit and window (``"10/minute;10/minute"``) get distinct names
    (``#2``), as the in-memory backend gives every rule its own store.
    """
    bases: list[bytes] = []
    for algorithm, unit, tier, limit, seconds, n in counter_names(policy):
        # Request keys keep their historical name; other units (tokens, concurrency slots) name theirs.
        kind = algorithm if unit == "requests" else f"{algorithm}:{unit}"
        span = "" if limit is None else f":{limit}/{_number(seconds)}"
        base = f"{prefix}:{kind}:{tier}{span}".encode()
        bases.append(base + (b"#%d:" % n if n > 1 else b":"))
    makers = [_identities(rule.tier) for rule in policy.all_rules]

    def key(rule: Rule, user: str, model: str) -> bytes:
        return makers[rule.index](bases[rule.index], user, model)

    return key


def slot_groups(keys: Sequence[bytes]) -> list[list[int]]:
    """The indexes of ``keys`` grouped by Redis Cluster slot, each group in key order."""
    groups: dict[int, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key_slot(key), []).append(index)
    return list(groups.values())
