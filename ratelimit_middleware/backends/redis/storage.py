"""Redis storage: limiter state shared by every process and machine that uses one Redis, exact and atomic.

Every decision is one round trip: a Lua script (one per algorithm, see ``scripts``) evaluates every rule of
the policy on its key, writes only if all allow, and returns one verdict per rule; ``Policy.decide`` then
picks the binding one exactly as for the in-memory backend. Time comes from Redis (``TIME`` in the script),
so application servers whose clocks disagree still agree on every limit. Each key gets a TTL of at most one
window (two for the sliding window counter) and so leaves Redis once its user goes idle.

On a Redis Cluster the keys of one user share a slot, but shared tiers (per_model, global) live on slots of
their own. A decision then runs one script per slot, each checking and charging its own rules (a
reservation); if one slot denies while others allowed, the others' charges are refunded (the script's
``refund`` mode, at the time of the charge, which each reply ends with). A denied request so charges
nothing, as on one Redis; meanwhile a reservation may make a concurrent request on the same key see a
fuller window, so a cluster can deny slightly more than one Redis would, never admit more.

When Redis is slow or gone, ``failover`` answers (``on_error``): no Redis exception reaches the caller.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar

from ...algorithms import Verdict
from ...decision import Decision
from ...policy import Policy, Rule
from ..base import Reserved
from .breaker import CircuitBreaker
from .clients import RedisClient
from .connection import Arg, Call, Connection
from .failover import REDIS_ERRORS, Failover, OnError
from .keyspace import check_prefix, rule_key_maker, slot_groups
from .scripts import script_for

__all__ = ["CLOCK_TTL_PAD_MS", "DEFAULT_LEASE", "DEFAULT_TIMEOUT", "RedisBackend", "RedisStorage"]

T = TypeVar("T")

DEFAULT_TIMEOUT = 0.1
"""Seconds a limiter call may wait for Redis (connect, and each reply): a stalled Redis costs a request at
most this before ``on_error`` answers (and the circuit breaker then answers at once)."""

_CACHED_COSTS = 64  # costs whose decision arguments are kept ready

DEFAULT_LEASE = 60.0
"""Seconds a concurrency slot is held at most: a worker that dies without settling its reservation frees
its slot after this long (the lease expires; it is not renewed while a response streams)."""

CLOCK_TTL_PAD_MS = 60_000
"""With an injected ``clock``, Redis still expires keys on its own clock: every TTL is lengthened by this
much, so that state cannot vanish while the injected time stands still."""


class RedisStorage:
    """State in Redis, shared by every limiter (in any process) with the same Redis, prefix and limits.

    ``client`` is a ``redis.Redis`` or ``redis.cluster.RedisCluster`` (for the sync methods), their
    ``redis.asyncio`` twins (for the async ones), or a ``redis://``, ``rediss://`` or ``unix://`` URL (both).
    The limiter never sends through the client it is given: it makes connections of its own to the same
    server with the same credentials, so that ``timeout`` (seconds, default 0.1) bounds every call however
    the client is configured, and nothing is retried. ``key_prefix`` starts every key.

    ``on_error`` says what decisions do when Redis fails or is slower than ``timeout``: ``"allow"`` (the
    default; fail open), ``"deny"`` (fail closed: ``RateLimiterUnavailable``, a 503 in HTTP) or ``"local"``
    (an in-memory limiter with the same limits, per process, until Redis answers again). ``breaker`` stops
    calling a Redis that keeps failing (default ``CircuitBreaker()``: open after 3 failures in a row, one
    probe a second).

    ``clock`` is a testing hook: a zero-argument callable returning seconds that replaces Redis' ``TIME`` (so
    tests can move time without sleeping; TTLs then get ``CLOCK_TTL_PAD_MS`` extra); leave it unset in
    production, where Redis' clock is the one clock every process agrees on. Constructing a storage never
    contacts Redis. Needs Redis 5 or later (Valkey too); tested on Redis 7.

    Token budgets and concurrency limits (``reserve``) work on a standalone Redis; a Redis Cluster refuses
    them (``TypeError``) for now. A concurrency slot is a lease of ``lease`` seconds (default 60): a worker
    that dies holding one frees it when it expires. Leases are not renewed: a response that streams longer
    than ``lease`` seconds stops holding its slot then.
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        key_prefix: str = "ratelimit",
        timeout: float = DEFAULT_TIMEOUT,
        on_error: OnError = "allow",
        breaker: CircuitBreaker | None = None,
        clock: Callable[[], float] | None = None,
        lease: float = DEFAULT_LEASE,
    ) -> None:
        if isinstance(lease, bool) or not isinstance(lease, (int, float)) or not 0 < lease <= 86_400:
            raise ValueError(f"lease must be a number of seconds > 0 and <= 86400, got {lease!r}")
        self.lease = float(lease)
        if clock is not None and not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, got {clock!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 60:
            raise ValueError(f"timeout must be a number of seconds > 0 and <= 60, got {timeout!r}")
        self.key_prefix = check_prefix(key_prefix)
        self.clock = clock
        self.timeout = float(timeout)
        self.failover = Failover(on_error, CircuitBreaker() if breaker is None else breaker, clock)
        self.connection = Connection(client, timeout=self.timeout)

    @property
    def on_error(self) -> OnError:
        return self.failover.on_error

    @property
    def breaker(self) -> CircuitBreaker:
        return self.failover.breaker

    def bind(self, policy: Policy) -> RedisBackend:
        if self.connection.cluster and len(policy.all_rules) > len(policy.rules):
            raise TypeError(
                "token and concurrency limits are not supported on a Redis Cluster yet: use a standalone "
                "Redis (or MemoryStorage) for limiters with tokens, input_tokens, output_tokens or "
                "max_concurrent"
            )
        return RedisBackend(
            policy,
            self.connection,
            self.failover,
            key_prefix=self.key_prefix,
            clock=self.clock,
            lease=self.lease,
        )

    def close(self) -> None:
        """Close this storage's sync connections (a client passed in is the caller's, and untouched)."""
        self.connection.close()

    async def aclose(self) -> None:
        """Close this storage's connections for the running event loop."""
        await self.connection.aclose()

    def __repr__(self) -> str:
        return f"RedisStorage(key_prefix={self.key_prefix!r}, on_error={self.on_error!r})"


def _verdicts(reply: Sequence[Any]) -> list[Verdict]:
    """A decision's reply (allowed, remaining, retry_after, reset_after per rule; a reservation's then ends
    with the time of the charge) as verdicts."""
    return [
        (reply[i] == 1, int(reply[i + 1]), float(reply[i + 2]), float(reply[i + 3]))
        for i in range(0, len(reply) - 3, 4)
    ]


class RedisBackend:
    """Decides one policy's requests in Redis; sync or async according to the storage's client."""

    def __init__(
        self,
        policy: Policy,
        connection: Connection,
        failover: Failover,
        *,
        key_prefix: str,
        clock: Callable[[], float] | None,
        lease: float = DEFAULT_LEASE,
    ) -> None:
        self._policy = policy
        self._connection = connection
        self._failover = failover
        self._fallback = failover.bind(policy)
        self._clock = clock
        self._script = script_for(policy.algorithm)
        self._key = rule_key_maker(key_prefix, policy)
        self._pad = "0" if clock is None else str(CLOCK_TTL_PAD_MS)
        self._lease = repr(float(lease))
        # The algorithm's own limit (at least 1: a limit of 0 denies before any script runs) and window (0
        # for a concurrency limit: the script keeps leases for those).
        self._rule_args = [
            (str(rule.algorithm.limit), "0" if rule.unit == "concurrent" else repr(rule.algorithm.window))
            for rule in policy.all_rules
        ]
        self._all = list(range(len(policy.rules)))
        self._every = list(range(len(policy.all_rules)))
        self._spread = connection.cluster and len(policy.rules) > 1  # keys on several slots, maybe
        self._decide_args: dict[int, list[Arg]] = {}  # by cost, when Redis keeps the time

    def _args(self, mode: str, rules: Sequence[int], amount: int, at: Arg = "") -> list[Arg]:
        now = "" if self._clock is None else repr(float(self._clock()))
        args: list[Arg] = [mode, now, self._pad, at, self._lease]
        text = str(amount)
        for index in rules:
            args += (*self._rule_args[index], text)
        return args

    def _decision_args(self, cost: int) -> list[Arg]:
        """The arguments of a decision on every rule: the same for every request of one cost."""
        if self._clock is not None:
            return self._args("decide", self._all, cost)
        args = self._decide_args.get(cost)
        if args is None:
            args = self._args("decide", self._all, cost)
            if len(self._decide_args) < _CACHED_COSTS:
                self._decide_args[cost] = args
        return args

    def _keys(self, user: str, model: str) -> list[bytes]:
        key = self._key
        return [key(rule, user, model) for rule in self._policy.rules]

    def _calls(self, keys: Sequence[bytes], groups: Sequence[Sequence[int]], cost: int) -> list[Call]:
        return [
            Call(self._script, [keys[i] for i in group], self._args("reserve", group, cost))
            for group in groups
        ]

    def _settle(
        self, keys: Sequence[bytes], groups: Sequence[Sequence[int]], replies: Sequence[Any], cost: int
    ) -> tuple[list[Verdict], list[Call]]:
        """The verdicts of a decision spread over slots, and the refunds it needs: if a slot denied, every
        slot that allowed (and so charged) gets its charge back."""
        verdicts: list[Verdict] = [(True, 0, 0.0, 0.0)] * len(keys)
        charged: list[tuple[Sequence[int], Arg]] = []
        for group, reply in zip(groups, replies, strict=True):
            group_verdicts = _verdicts(reply)
            for index, verdict in zip(group, group_verdicts, strict=True):
                verdicts[index] = verdict
            if all(verdict[0] for verdict in group_verdicts):
                charged.append((group, reply[-1]))
        if not cost or len(charged) == len(groups):
            return verdicts, []
        refunds = [
            Call(self._script, [keys[i] for i in group], self._args("refund", group, cost, at))
            for group, at in charged
        ]
        return verdicts, refunds

    def _groups(self, keys: Sequence[bytes]) -> list[list[int]]:
        return slot_groups(keys) if self._spread else [self._all]

    # -- failures ----------------------------------------------------------------------------------------

    def _unavailable(self) -> NoReturn:
        raise self._failover.unavailable()

    def _guarded(self, send: Callable[[], T], fallback: Callable[[], T]) -> T:
        """``send()``, or ``fallback()`` when the breaker is open or Redis fails."""
        failover = self._failover
        if not failover.attempt():
            return fallback()
        try:
            result = send()
        except REDIS_ERRORS as error:
            failover.failed(error)
            return fallback()
        failover.succeeded()
        return result

    async def _aguarded(self, send: Callable[[], Awaitable[T]], fallback: Callable[[], T]) -> T:
        """``_guarded`` for event loops."""
        failover = self._failover
        if not failover.attempt():
            return fallback()
        try:
            result = await send()
        except REDIS_ERRORS as error:
            failover.failed(error)
            return fallback()
        failover.succeeded()
        return result

    # -- decisions -----------------------------------------------------------------------------------

    def _decide(self, user: str, model: str, cost: int) -> Decision:
        keys = self._keys(user, model)
        groups = self._groups(keys)
        connection = self._connection
        if len(groups) == 1:
            reply = connection.evaluate(Call(self._script, keys, self._decision_args(cost)))
            return self._policy.decide(_verdicts(reply), cost)
        verdicts, refunds = self._settle(
            keys, groups, connection.evaluate_all(self._calls(keys, groups, cost)), cost
        )
        if refunds:
            connection.evaluate_all(refunds)
        return self._policy.decide(verdicts, cost)

    async def _adecide(self, user: str, model: str, cost: int) -> Decision:
        keys = self._keys(user, model)
        groups = self._groups(keys)
        connection = self._connection
        if len(groups) == 1:
            reply = await connection.aevaluate(Call(self._script, keys, self._decision_args(cost)))
            return self._policy.decide(_verdicts(reply), cost)
        replies = await connection.aevaluate_all(self._calls(keys, groups, cost))
        verdicts, refunds = self._settle(keys, groups, replies, cost)
        if refunds:
            await connection.aevaluate_all(refunds)
        return self._policy.decide(verdicts, cost)

    def decide(self, user: str, model: str, cost: int) -> Decision:
        """Evaluate every rule (in one script per slot); all or nothing is charged."""
        self._connection.check_sync()
        if cost > self._policy.min_limit:
            return self._policy.oversized(cost)
        return self._guarded(
            lambda: self._decide(user, model, cost), lambda: self._fallback.decide(user, model, cost)
        )

    async def adecide(self, user: str, model: str, cost: int) -> Decision:
        """``decide`` for event loops, on the asyncio connections."""
        self._connection.check_async()
        if cost > self._policy.min_limit:
            return self._policy.oversized(cost)
        return await self._aguarded(
            lambda: self._adecide(user, model, cost), lambda: self._fallback.decide(user, model, cost)
        )

    def _used_call(self, user: str, model: str, rule: Rule) -> Call:
        return Call(self._script, [self._key(rule, user, model)], self._args("used", [rule.index], 0))

    def used(self, user: str, model: str, rule: Rule) -> int:
        """Units that ``rule`` counts for this user and model now."""
        self._connection.check_sync()
        call = self._used_call(user, model, rule)
        return int(self._guarded(lambda: self._connection.evaluate(call), self._unavailable))

    async def aused(self, user: str, model: str, rule: Rule) -> int:
        self._connection.check_async()
        call = self._used_call(user, model, rule)
        return int(await self._aguarded(lambda: self._connection.aevaluate(call), self._unavailable))

    def reset(self, user: str, model: str, rules: tuple[Rule, ...]) -> None:
        """Delete the keys that ``rules`` hold for this user and model (one command per slot)."""
        self._connection.check_sync()
        if rules:
            keys = [self._key(rule, user, model) for rule in rules]
            self._guarded(lambda: self._connection.delete(keys), self._unavailable)

    async def areset(self, user: str, model: str, rules: tuple[Rule, ...]) -> None:
        self._connection.check_async()
        if rules:
            keys = [self._key(rule, user, model) for rule in rules]
            await self._aguarded(lambda: self._connection.adelete(keys), self._unavailable)

    # -- reservations (tokens and concurrency; a standalone Redis) ----------------------------------------

    def _reserve_call(self, user: str, model: str, costs: Sequence[int]) -> Call:
        key = self._key
        keys = [key(rule, user, model) for rule in self._policy.all_rules]
        args = self._args("reserve", [], 0)
        for index, cost in zip(self._every, costs, strict=True):
            args += (*self._rule_args[index], str(cost))
        return Call(self._script, keys, args)

    def _reserved(self, reply: Sequence[Any]) -> Reserved:
        count = len(self._every)
        verdicts = _verdicts(reply[: 4 * count + 1])
        used = [int(units) for units in reply[4 * count + 1 :]] if len(reply) > 4 * count + 1 else None
        return verdicts, float(reply[4 * count]), used

    def reserve(self, user: str, model: str, costs: Sequence[int]) -> Reserved:
        """Evaluate every rule (requests, tokens, concurrency) with its own cost in one script, all or
        nothing; the verdicts, the Redis time of the charge and, on denial, the units each rule counts.

        When Redis cannot serve, ``on_error`` answers (see ``Fallback.reserve``).
        """
        self._connection.check_sync()
        call = self._reserve_call(user, model, costs)
        return self._guarded(
            lambda: self._reserved(self._connection.evaluate(call)),
            lambda: self._fallback.reserve(user, model, costs),
        )

    async def areserve(self, user: str, model: str, costs: Sequence[int]) -> Reserved:
        """``reserve`` for event loops."""
        self._connection.check_async()
        call = self._reserve_call(user, model, costs)

        async def send() -> Reserved:
            return self._reserved(await self._connection.aevaluate(call))

        return await self._aguarded(send, lambda: self._fallback.reserve(user, model, costs))

    def _adjust_call(self, user: str, model: str, at: float, deltas: Sequence[int]) -> Call | None:
        rules = [rule for rule, delta in zip(self._policy.all_rules, deltas, strict=True) if delta]
        if not rules:
            return None
        key = self._key
        args = self._args("adjust", [], 0, repr(float(at)))
        for rule in rules:
            args += (*self._rule_args[rule.index], str(deltas[rule.index]))
        return Call(self._script, [key(rule, user, model) for rule in rules], args)

    def _adjust_failed(self) -> None:
        """A settlement Redis could not take: ``deny`` raises; otherwise it is dropped (the tokens stay
        charged, the slot frees up when its lease expires)."""
        if self._failover.on_error == "deny":
            self._unavailable()

    def adjust(self, user: str, model: str, at: float, deltas: Sequence[int]) -> None:
        """Settle the charge made at ``at``: each rule moves by its delta (-1 gives a lease back)."""
        self._connection.check_sync()
        if math.copysign(1.0, at) < 0:  # a negative time: made by the fallback, not in Redis
            self._fallback.adjust(user, model, at, deltas)
            return
        call = self._adjust_call(user, model, at, deltas)
        if call is not None:
            self._guarded(lambda: self._connection.evaluate(call), self._adjust_failed)

    async def aadjust(self, user: str, model: str, at: float, deltas: Sequence[int]) -> None:
        """``adjust`` for event loops."""
        self._connection.check_async()
        if math.copysign(1.0, at) < 0:
            self._fallback.adjust(user, model, at, deltas)
            return
        call = self._adjust_call(user, model, at, deltas)
        if call is not None:
            await self._aguarded(lambda: self._connection.aevaluate(call), self._adjust_failed)

    def __len__(self) -> int:
        raise TypeError(
            "len() is not available for a limiter on Redis: its keys live in Redis, shared with other "
            "processes, and expire there; count them with SCAN MATCH '<key_prefix>:*' if needed"
        )
