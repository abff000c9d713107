"""Redis storage: limiter state shared by every process and machine that uses one Redis, exact and atomic.

Every decision is one round trip: a Lua script (one per algorithm, see ``scripts``) evaluates every rule of
the policy on its key, writes only if all allow, and returns one verdict per rule; ``Policy.decide`` then
picks the binding one exactly as for the in-memory backend. Time comes from Redis (``TIME`` in the script),
so application servers whose clocks disagree still agree on every limit. Each key gets a TTL of at most one
window (two for the sliding window counter) and so leaves Redis once its user goes idle.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ...algorithms import Verdict
from ...decision import Decision
from ...policy import Policy, Rule
from .connection import Arg, Connection, RedisClient
from .keyspace import check_prefix, rule_key_maker
from .scripts import script_for

__all__ = ["CLOCK_TTL_PAD_MS", "RedisBackend", "RedisStorage"]

CLOCK_TTL_PAD_MS = 60_000
"""With an injected ``clock``, Redis still expires keys on its own clock: every TTL is lengthened by this
much, so that state cannot vanish while the injected time stands still."""


class RedisStorage:
    """State in Redis, shared by every limiter (in any process) with the same Redis, prefix and limits.

    ``client`` is a ``redis.Redis`` (for the sync methods), a ``redis.asyncio.Redis`` (for the async ones) or
    a ``redis://``, ``rediss://`` or ``unix://`` URL (both, clients made on first use). ``key_prefix`` starts
    every key. ``clock`` is a testing hook: a zero-argument callable returning seconds that replaces Redis'
    ``TIME`` (so tests can move time without sleeping; TTLs then get ``CLOCK_TTL_PAD_MS`` extra); leave it
    unset in production, where Redis' clock is the one clock every process agrees on. Constructing a
    storage never contacts Redis. Needs Redis 5 or later (Valkey too); tested on Redis 7.
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        key_prefix: str = "ratelimit",
        clock: Callable[[], float] | None = None,
    ) -> None:
        if clock is not None and not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, got {clock!r}")
        self.key_prefix = check_prefix(key_prefix)
        self.clock = clock
        self.connection = Connection(client)

    def bind(self, policy: Policy) -> RedisBackend:
        return RedisBackend(policy, self.connection, key_prefix=self.key_prefix, clock=self.clock)

    def close(self) -> None:
        """Close the sync client this storage made from a URL; a client passed in is the caller's."""
        self.connection.close()

    async def aclose(self) -> None:
        """Close the asyncio client this storage made from a URL for the running event loop."""
        await self.connection.aclose()

    def __repr__(self) -> str:
        return f"RedisStorage(key_prefix={self.key_prefix!r})"


def _verdicts(reply: Sequence[Any]) -> list[Verdict]:
    """The script's flat reply (allowed, remaining, retry_after, reset_after per rule) as verdicts."""
    return [
        (reply[i] == 1, int(reply[i + 1]), float(reply[i + 2]), float(reply[i + 3]))
        for i in range(0, len(reply), 4)
    ]


class RedisBackend:
    """Decides one policy's requests in Redis; sync or async according to the storage's client."""

    def __init__(
        self,
        policy: Policy,
        connection: Connection,
        *,
        key_prefix: str,
        clock: Callable[[], float] | None,
    ) -> None:
        self._policy = policy
        self._connection = connection
        self._clock = clock
        self._script = script_for(policy.algorithm)
        self._key = rule_key_maker(key_prefix, policy)
        self._pad = "0" if clock is None else str(CLOCK_TTL_PAD_MS)
        # The algorithm's own limit (at least 1: a limit of 0 denies before any script runs) and window.
        self._rule_args = [[str(rule.algorithm.limit), repr(rule.algorithm.window)] for rule in policy.rules]
        self._all_rule_args = [arg for args in self._rule_args for arg in args]

    def _args(self, mode: str, cost: int, rule_args: list[str]) -> list[Arg]:
        now = "" if self._clock is None else repr(float(self._clock()))
        return [mode, now, str(cost), self._pad, *rule_args]

    def _keys(self, user: str, model: str) -> list[bytes]:
        key = self._key
        return [key(rule, user, model) for rule in self._policy.rules]

    # -- decisions -----------------------------------------------------------------------------------

    def decide(self, user: str, model: str, cost: int) -> Decision:
        """Evaluate every rule in one script; it commits all or nothing."""
        self._connection.check_sync()
        policy = self._policy
        if cost > policy.min_limit:
            return policy.oversized(cost)
        reply = self._connection.evaluate(
            self._script, self._keys(user, model), self._args("decide", cost, self._all_rule_args)
        )
        return policy.decide(_verdicts(reply), cost)

    async def adecide(self, user: str, model: str, cost: int) -> Decision:
        """``decide`` for event loops, on the asyncio client."""
        self._connection.check_async()
        policy = self._policy
        if cost > policy.min_limit:
            return policy.oversized(cost)
        reply = await self._connection.aevaluate(
            self._script, self._keys(user, model), self._args("decide", cost, self._all_rule_args)
        )
        return policy.decide(_verdicts(reply), cost)

    def used(self, user: str, model: str, rule: Rule) -> int:
        """Units that ``rule`` counts for this user and model now."""
        key = self._key(rule, user, model)
        args = self._args("used", 0, self._rule_args[rule.index])
        return int(self._connection.evaluate(self._script, [key], args))

    async def aused(self, user: str, model: str, rule: Rule) -> int:
        key = self._key(rule, user, model)
        args = self._args("used", 0, self._rule_args[rule.index])
        return int(await self._connection.aevaluate(self._script, [key], args))

    def reset(self, user: str, model: str, rules: tuple[Rule, ...]) -> None:
        """Delete the keys that ``rules`` hold for this user and model (one command)."""
        self._connection.check_sync()
        if rules:
            self._connection.delete([self._key(rule, user, model) for rule in rules])

    async def areset(self, user: str, model: str, rules: tuple[Rule, ...]) -> None:
        self._connection.check_async()
        if rules:
            await self._connection.adelete([self._key(rule, user, model) for rule in rules])

    def __len__(self) -> int:
        raise TypeError(
            "len() is not available for a limiter on Redis: its keys live in Redis, shared with other "
            "processes, and expire there; count them with SCAN MATCH '<key_prefix>:*' if needed"
        )
