"""Redis storage: limiter state shared by every process and machine that uses one Redis, exact and atomic.

Every decision is one round trip: a Lua script (one per algorithm, see ``scripts``) evaluates every rule of
the policy on its key, writes only if all allow, and returns one verdict per rule; ``Policy.decide`` then
picks the binding one exactly as for the in-memory backend. Time comes from Redis (``TIME`` in the script),
so application servers whose clocks disagree still agree on every limit. Each key gets a TTL of at most one
window (two for the sliding window counter) and so leaves Redis once its user goes idle.

On a Redis Cluster the keys of one user share a slot, but shared tiers (per_model, global) live on slots of
their own. A decision then runs one script per slot, each checking and charging its own rules (a
reservation); if one slot denies while others allowed, the others' charges are refunded (the script's
``refund`` mode, at the time of each rule's charge, which each reply ends with). A denied request so charges
nothing, as on one Redis; meanwhile a reservation may make a concurrent request on the same key see a
fuller window, so a cluster can deny slightly more than one Redis would, never admit more. Token and
concurrency reservations work the same way, and remember the time of each rule's charge for their
settlement.

When Redis is slow or gone, ``failover`` answers (``on_error``): no Redis exception reaches the caller.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, NamedTuple, NoReturn, TypeVar

from ...algorithms import Verdict
from ...decision import Decision
from ...hooks import checked_clock
from ...policy import Policy, Rule
from ..base import Reserved
from .breaker import CircuitBreaker
from .clients import RedisClient
from .connection import Arg, Call, Connection
from .failover import REDIS_ERRORS, UNSENT, Failover, OnError
from .keyspace import check_prefix, rule_key_maker, slot_groups
from .scripts import script_for

__all__ = [
    "CLOCK_TTL_PAD_MS",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_LEASE",
    "DEFAULT_TIMEOUT",
    "Charge",
    "RedisBackend",
    "RedisStorage",
]

T = TypeVar("T")

DEFAULT_TIMEOUT = 0.1
"""Seconds a limiter call may wait for Redis (all its round trips): a stalled Redis costs a request at
most this before ``on_error`` answers (and the circuit breaker then answers at once)."""

DEFAULT_CONNECT_TIMEOUT = 1.0
"""Seconds a new connection may take to be set up (connect, TLS, AUTH or HELLO, CLIENT SETINFO, SELECT: a
round trip each) by default, or ``timeout`` if longer. The setup runs apart from the calls, which wait for
it until their own deadline only: one that outlasts its call serves the next."""

_CACHED_COSTS = 64  # costs whose decision arguments are kept ready

DEFAULT_LEASE = 60.0
"""Seconds a concurrency slot is held unless renewed: a worker that dies without settling its reservation
frees its slot after this long at most (the middlewares renew the leases of responses still running)."""

CLOCK_TTL_PAD_MS = 60_000
"""With an injected ``clock``, Redis still expires keys on its own clock: every TTL is lengthened by this
much, so that state cannot vanish while the injected time stands still."""


logger = logging.getLogger("ratelimit_middleware")


def _refund_failed(error: BaseException) -> None:
    logger.warning(
        "a denied request's charge on another cluster slot could not be given back (%s: %s); it stays "
        "counted there until its window passes",
        type(error).__name__,
        error,
    )


def _being_cancelled() -> bool:
    """Whether the running task is being cancelled (Python 3.11 and later say so; 3.10 does not)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is not None and bool(cancelling())


def _seconds(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 60:
        raise ValueError(f"{name} must be a number of seconds > 0 and <= 60, got {value!r}")
    return float(value)


class RedisStorage:
    """State in Redis, shared by every limiter (in any process) with the same Redis, prefix and limits.

    ``client`` is a ``redis.Redis`` or ``redis.cluster.RedisCluster`` (for the sync methods), their
    ``redis.asyncio`` twins (for the async ones), or a URL (both): ``redis://``, ``rediss://`` (TLS) or
    ``unix://`` for one Redis, ``redis+cluster://`` or ``rediss+cluster://`` for a Redis Cluster (any of its
    nodes). The limiter never sends through the client it is given: it makes connections of its own to the
    same server with the same credentials, so that ``timeout`` (seconds, default 0.1) bounds every call
    however the client is configured, and nothing is retried. A new connection is set up apart from the
    calls, within ``connect_timeout`` seconds (default: the larger of 1 s and ``timeout``); the calls wait
    for it until their own timeout only, and one that outlasts its call serves the next, so that a Redis
    whose connection setup (several round trips) takes longer than a call may wait is still used.
    ``key_prefix`` starts every key.

    ``on_error`` says what decisions do when Redis fails or is slower than ``timeout``: ``"allow"`` (the
    default; fail open), ``"deny"`` (fail closed: ``RateLimiterUnavailable``, a 503 in HTTP) or ``"local"``
    (an in-memory limiter with the same limits, per process, until Redis answers again). ``breaker`` stops
    calling a Redis that keeps failing (default ``CircuitBreaker()``: open after 3 failures in a row, one
    probe a second).

    ``clock`` is a testing hook: a zero-argument callable returning seconds that replaces Redis' ``TIME`` (so
    tests can move time without sleeping; TTLs then get ``CLOCK_TTL_PAD_MS`` extra); leave it unset in
    production, where Redis' clock is the one clock every process agrees on. Constructing a storage never
    contacts Redis. Needs Redis 5 or later (Valkey too); tested on Redis 7.

    A concurrency slot (``reserve``) is a lease of ``lease`` seconds (default 60): a worker that dies holding
    one frees it when it expires; ``Reservation.renew`` extends it for responses that run longer (the
    middlewares renew every third of the lease).
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
        connect_timeout: float | None = None,
    ) -> None:
        if isinstance(lease, bool) or not isinstance(lease, (int, float)) or not 0 < lease <= 86_400:
            raise ValueError(f"lease must be a number of seconds > 0 and <= 86400, got {lease!r}")
        self.lease = float(lease)
        if clock is not None:
            clock = checked_clock(clock)
        self.timeout = _seconds("timeout", timeout)
        self.connect_timeout = (
            max(DEFAULT_CONNECT_TIMEOUT, self.timeout)
            if connect_timeout is None
            else _seconds("connect_timeout", connect_timeout)
        )
        self.key_prefix = check_prefix(key_prefix)
        self.clock = clock
        self.connection = Connection(client, timeout=self.timeout, setup=self.connect_timeout)
        self.failover = Failover(
            on_error,
            CircuitBreaker() if breaker is None else breaker,
            clock,
            cluster=self.connection.cluster,
            key_prefix=self.key_prefix,
        )

    @property
    def on_error(self) -> OnError:
        return self.failover.on_error

    @property
    def breaker(self) -> CircuitBreaker:
        return self.failover.breaker

    def bind(self, policy: Policy) -> RedisBackend:
        return RedisBackend(
            policy,
            self.connection,
            self.failover,
            key_prefix=self.key_prefix,
            clock=self.clock,
            lease=self.lease,
        )

    def close(self) -> None:
        """Close this storage's sync connections (a client passed in is the caller's, and untouched), once the
        work they do apart from the calls has ended (giving back the slots of a reservation that failed on
        a cluster; within the timeout)."""
        self.connection.close()

    async def aclose(self) -> None:
        """Close this storage's connections for the running event loop, once the work they do apart from the
        calls has ended (cancelling a reservation made for a cancelled caller, giving back the slots of one
        that failed on a cluster; within the timeout)."""
        await self.connection.aclose()

    def __repr__(self) -> str:
        return f"RedisStorage(key_prefix={self.key_prefix!r}, on_error={self.on_error!r})"


class Charge(NamedTuple):
    """The receipt of a reservation made in Redis."""

    parts: tuple[tuple[int, ...], ...]
    """Indexes of the rules charged together (one slot of a cluster; all of them on one Redis)."""
    times: tuple[Arg, ...]
    """The Redis time of each rule's charge (one per rule of the policy), where its settlement finds it."""
    lease_id: str
    """Names the reservation's concurrency leases (``""`` when it took none)."""
    costs: tuple[int, ...]
    """What the reservation charged each rule (GCRA settles an overage behind it)."""


def _verdicts(reply: Sequence[Any]) -> list[Verdict]:
    """A decision's reply (allowed, remaining, retry_after, reset_after per rule; a reservation's then ends
    with the time of the charge) as verdicts."""
    return [
        (reply[i] == 1, int(reply[i + 1]), float(reply[i + 2]), float(reply[i + 3]))
        for i in range(0, len(reply) - 3, 4)
    ]


def _times(charged_at: Any, count: int) -> list[Arg]:
    """The time each of a script's ``count`` rules was charged at, from its reply: one time for all, or a
    list of one per rule when they differ (a key whose time was ahead of Redis' clock, which stepped
    back)."""
    return list(charged_at) if isinstance(charged_at, list) else [charged_at] * count


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
        self.lease = float(lease)
        self._lease = repr(self.lease)
        # The algorithm's own limit (at least 1: a limit of 0 denies before any script runs) and window (0
        # for a concurrency limit: the script keeps leases for those).
        self._rule_args = [
            (str(rule.algorithm.limit), "0" if rule.unit == "concurrent" else repr(rule.algorithm.window))
            for rule in policy.all_rules
        ]
        self._all = list(range(len(policy.rules)))
        self._every = list(range(len(policy.all_rules)))
        self._leased = tuple(rule.index for rule in policy.all_rules if rule.unit == "concurrent")
        self._cluster = connection.cluster  # keys on several slots, maybe
        self._decide_args: dict[int, list[Arg]] = {}  # by cost, when Redis keeps the time

    def _args(
        self,
        mode: str,
        rules: Sequence[int],
        amounts: Sequence[int],
        lease_id: str = "",
        times: Sequence[Arg] = (),
        charges: Sequence[int] = (),
    ) -> list[Arg]:
        """A script's ARGV (see driver.lua) for ``rules`` moved by ``amounts`` (one per rule); 'refund' and
        'adjust' also take the time of each rule's charge (``times``), and 'adjust' the units it made
        (``charges``)."""
        now = "" if self._clock is None else repr(float(self._clock()))
        args: list[Arg] = [mode, now, self._pad, self._lease, lease_id]
        tails: Iterable[tuple[Arg, ...]] = [()] * len(rules)  # what a rule takes after its amount
        if charges:
            tails = zip(times, map(str, charges), strict=True)
        elif times:
            tails = zip(times)
        for index, amount, tail in zip(rules, amounts, tails, strict=True):
            args += (*self._rule_args[index], str(amount), *tail)
        return args

    def _decision_args(self, cost: int) -> list[Arg]:
        """The arguments of a decision on every rule: the same for every request of one cost."""
        if self._clock is not None:
            return self._args("decide", self._all, [cost] * len(self._all))
        args = self._decide_args.get(cost)
        if args is None:
            args = self._args("decide", self._all, [cost] * len(self._all))
            if len(self._decide_args) < _CACHED_COSTS:
                self._decide_args[cost] = args
        return args

    def _keys(self, user: str, model: str, rules: Sequence[Rule]) -> list[bytes]:
        key = self._key
        return [key(rule, user, model) for rule in rules]

    def _groups(self, keys: Sequence[bytes], rules: list[int]) -> list[list[int]]:
        """The rules (indexes into ``keys``) charged by one script each: one per slot on a cluster."""
        return [[rules[i] for i in group] for group in slot_groups(keys)] if self._cluster else [rules]

    def _calls(
        self, keys: Sequence[bytes], groups: Sequence[Sequence[int]], costs: Sequence[int], lease_id: str = ""
    ) -> list[Call]:
        """A reservation per group of rules (``costs`` holds one per rule)."""
        return [
            Call(
                self._script,
                [keys[i] for i in group],
                self._args("reserve", group, [costs[i] for i in group], lease_id),
                () if release is None else (release.by_sha(),),
            )
            for group, release in zip(groups, self._releases(keys, groups, costs, lease_id), strict=True)
        ]

    def _releases(
        self, keys: Sequence[bytes], groups: Sequence[Sequence[int]], costs: Sequence[int], lease_id: str
    ) -> list[Call | None]:
        """Per group, what gives back the leases a reservation of it takes (``None``: it takes none): its
        undo, written after it if its reply never comes (Redis may still run it: see ``transport``).
        Harmless if it did not run: the lease id is this reservation's alone (see concurrency.lua), so that
        no other lease is ever given back (a lease's time is not needed). Its token charge cannot be told
        apart without the reply's time of the charge: it stays counted until its window passes."""
        releases: list[Call | None] = []
        for group in groups:
            leased = [i for i in group if costs[i] and i in self._leased] if lease_id else []
            if leased:
                charged = [costs[i] for i in leased]
                amounts = [-amount for amount in charged]
                args = self._args("adjust", leased, amounts, lease_id, [""] * len(leased), charged)
                releases.append(Call(self._script, [keys[i] for i in leased], args))
            else:
                releases.append(None)
        return releases

    def _failed_apart(
        self, keys: Sequence[bytes], groups: Sequence[Sequence[int]], costs: Sequence[int], lease_id: str
    ) -> list[Call]:
        """What gives back the leases of a reservation over several cluster slots that failed as a whole (a
        slot that did not answer, or answered an error), to send apart: a slot that answered made its part,
        and its undo went nowhere (one still unanswered is given back by its undo too, after it)."""
        return [release for release in self._releases(keys, groups, costs, lease_id) if release is not None]

    def _gather(
        self,
        keys: Sequence[bytes],
        groups: Sequence[Sequence[int]],
        replies: Sequence[Any],
        costs: Sequence[int],
        lease_id: str = "",
    ) -> tuple[Reserved, list[Call]]:
        """The verdicts of reservations made per group, and the refunds they need: if a group denied, every
        group that allowed (and so charged) gets its charge back, all or nothing as on one Redis.

        On denial, the units each rule counted: as the denying groups reported them, and for the others
        as their verdicts imply (their limit, less what remains after this request's cost).
        """
        size = len(keys)
        verdicts: list[Verdict] = [(True, 0, 0.0, 0.0)] * size
        used: list[int] = [0] * size
        parts: list[tuple[int, ...]] = []
        times: list[Arg] = [""] * size
        rules = self._policy.all_rules
        for group, reply in zip(groups, replies, strict=True):
            count = len(group)
            denied = len(reply) > 4 * count + 1  # then it reported what each of its rules counts
            for n, (index, verdict) in enumerate(zip(group, _verdicts(reply[: 4 * count]), strict=True)):
                verdicts[index] = verdict
                if denied:
                    used[index] = int(reply[4 * count + 1 + n])
                else:
                    used[index] = max(rules[index].limit - verdict[1] - costs[index], 0)
            if not denied:  # so charged: the reply ends with the time of the charge
                parts.append(tuple(group))
                for index, at in zip(group, _times(reply[4 * count], count), strict=True):
                    times[index] = at
        if len(parts) == len(groups):
            return Reserved(verdicts, Charge(tuple(parts), tuple(times), lease_id, tuple(costs))), []
        refunds = [
            Call(
                self._script,
                [keys[i] for i in group],
                self._args("refund", group, [costs[i] for i in group], lease_id, [times[i] for i in group]),
            )
            for group in parts
        ]
        return Reserved(verdicts, None, used), refunds

    # -- failures ----------------------------------------------------------------------------------------

    def _unavailable(self) -> NoReturn:
        raise self._failover.unavailable()

    def _guarded(
        self,
        send: Callable[[], T],
        fallback: Callable[[], T],
        lost: Callable[[BaseException], None] | None = None,
    ) -> T:
        """``send()``, or ``fallback()`` when the breaker is open or Redis fails or never ran the call (which
        ``failover.failed`` tells apart: only a failure counts toward the breaker); ``lost(error)`` logs a
        failure of a call whose effect outlasts it (a reservation's, a settlement's), unless it never ran."""
        failover = self._failover
        if not failover.attempt():
            return fallback()
        try:
            result = send()
        except REDIS_ERRORS as error:
            failover.failed(error)
            if lost is not None and not isinstance(error, UNSENT):
                lost(error)
            return fallback()
        failover.succeeded()
        return result

    async def _aguarded(
        self,
        send: Callable[[], Awaitable[T]],
        fallback: Callable[[], T],
        lost: Callable[[BaseException], None] | None = None,
    ) -> T:
        """``_guarded`` for event loops."""
        failover = self._failover
        if not failover.attempt():
            return fallback()
        try:
            result = await send()
        except REDIS_ERRORS as error:
            failover.failed(error)
            if lost is not None and not isinstance(error, UNSENT):
                lost(error)
            return fallback()
        failover.succeeded()
        return result

    def _reservation_lost(self, error: BaseException) -> None:
        self._failover.warn(
            "reservation lost",
            "a reservation got no answer from Redis (%s: %s) and was answered with on_error=%r; if Redis "
            "makes it late, its concurrency slots are given back, and its tokens stay counted until their "
            "window passes (logged at most once a minute)",
            type(error).__name__,
            error,
            self._failover.on_error,
        )

    def _settlement_lost(self, error: BaseException) -> None:
        self._failover.warn(
            "settlement lost",
            "a settlement got no answer from Redis (%s: %s); if Redis never makes it, the reservation's "
            "tokens stay as estimated until their window passes and its concurrency slots are held until "
            "their lease expires (%g s) (logged at most once a minute)",
            type(error).__name__,
            error,
            self.lease,
        )

    def _release(self, releases: Sequence[Call]) -> None:
        """Send ``releases`` (see ``_failed_apart``), each on a thread of its own: the node that did not
        answer the reservation may not answer its release either, and must not use up the others' time (the
        sync calls of a cluster go one after the other). One that fails is logged, and leaves its leases to
        expire."""
        for release in releases:
            self._connection.orphans.apart(functools.partial(self._release_one, release))

    def _release_one(self, release: Call) -> None:
        try:
            self._connection.evaluate(release)
        except REDIS_ERRORS as error:
            self._release_failed(error)

    async def _arelease(self, releases: Sequence[Call]) -> None:
        """``_release`` for event loops (the releases sent at once, within one timeout). Cancelled, its event
        loop ending (``asyncio.run`` cancels the tasks left when its coroutine returns) before it could end,
        it is made at once through the sync connections, when the storage has them (see ``_settles_now``)."""
        try:
            await self._connection.aevaluate_all(releases)
        except REDIS_ERRORS as error:
            self._release_failed(error)
        except asyncio.CancelledError:
            if self._settles_now():
                self._release(releases)
                self._connection.orphans.join(self._connection.timeout)  # made before the process may end
            raise

    def _release_failed(self, error: BaseException) -> None:
        self._failover.warn(
            "release lost",
            "the concurrency slots of a reservation answered with on_error could not be given back (%s: "
            "%s); they are held until their lease expires (%g s) unless Redis gives them back by itself (it "
            "does for a reservation it makes late) (logged at most once a minute)",
            type(error).__name__,
            error,
            self.lease,
        )

    @staticmethod
    def _refund(send: Callable[[], object]) -> None:
        """Give back what the slots that allowed a denied request charged (a cluster), within what is left of
        the call's deadline; a refund that fails leaves that charge (the request counts where it was
        allowed) and never turns the denial into an admission."""
        try:
            send()
        except REDIS_ERRORS as error:
            _refund_failed(error)

    @staticmethod
    async def _arefund(send: Callable[[], Awaitable[object]]) -> None:
        """``_refund`` for event loops."""
        try:
            await send()
        except REDIS_ERRORS as error:
            _refund_failed(error)

    # -- decisions -----------------------------------------------------------------------------------

    def _decide(self, user: str, model: str, cost: int) -> Decision:
        keys = self._keys(user, model, self._policy.rules)
        groups = self._groups(keys, self._all)
        connection = self._connection
        if len(groups) == 1:
            reply = connection.evaluate(Call(self._script, keys, self._decision_args(cost)))
            return self._policy.decide(_verdicts(reply), cost)
        costs = [cost] * len(keys)
        deadline = time.monotonic() + connection.timeout
        replies = connection.evaluate_all(self._calls(keys, groups, costs), deadline)
        reserved, refunds = self._gather(keys, groups, replies, costs)
        if refunds and cost:
            self._refund(lambda: connection.evaluate_all(refunds, deadline))
        return self._policy.decide(reserved.verdicts, cost)

    async def _adecide(self, user: str, model: str, cost: int) -> Decision:
        keys = self._keys(user, model, self._policy.rules)
        groups = self._groups(keys, self._all)
        connection = self._connection
        if len(groups) == 1:
            reply = await connection.aevaluate(Call(self._script, keys, self._decision_args(cost)))
            return self._policy.decide(_verdicts(reply), cost)
        costs = [cost] * len(keys)
        deadline = time.monotonic() + connection.timeout
        replies = await connection.aevaluate_all(self._calls(keys, groups, costs), deadline)
        reserved, refunds = self._gather(keys, groups, replies, costs)
        if refunds and cost:
            await self._arefund(lambda: connection.aevaluate_all(refunds, deadline))
        return self._policy.decide(reserved.verdicts, cost)

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
        return Call(self._script, [self._key(rule, user, model)], self._args("used", [rule.index], [0]))

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

    # -- reservations (tokens and concurrency) -------------------------------------------------------

    def _reserve(self, user: str, model: str) -> tuple[list[bytes], list[list[int]], str]:
        """A reservation's keys, its groups of rules (one per slot) and the id of its leases."""
        keys = self._keys(user, model, self._policy.all_rules)
        lease_id = secrets.token_hex(8) if self._leased else ""  # unique: names this reservation's leases
        return keys, self._groups(keys, self._every), lease_id

    def _reserved(self, reply: Sequence[Any], lease_id: str, costs: Sequence[int]) -> Reserved:
        """The reply of one script over every rule (one Redis): allowed, it ends with the time of the charge;
        denied, also with the units each rule counts."""
        count = len(self._every)
        verdicts = _verdicts(reply[: 4 * count])
        if len(reply) == 4 * count + 1:
            times = tuple(_times(reply[-1], count))
            return Reserved(verdicts, Charge((tuple(self._every),), times, lease_id, tuple(costs)))
        return Reserved(verdicts, None, [int(units) for units in reply[4 * count + 1 :]])

    def reserve(self, user: str, model: str, costs: Sequence[int]) -> Reserved:
        """Evaluate every rule (requests, tokens, concurrency) with its own cost in one script (one per slot
        on a cluster), all or nothing; the verdicts, a ``Charge`` for the settlement and, on denial, the
        units each rule counts.

        When Redis cannot serve, ``on_error`` answers (see ``Fallback.reserve``).
        """
        self._connection.check_sync()
        keys, groups, lease_id = self._reserve(user, model)
        connection = self._connection

        def send() -> Reserved:
            calls = self._calls(keys, groups, costs, lease_id)
            if len(groups) == 1:
                return self._reserved(connection.evaluate(calls[0]), lease_id, costs)
            deadline = time.monotonic() + connection.timeout
            try:
                replies = connection.evaluate_all(calls, deadline)
            except REDIS_ERRORS:
                releases = self._failed_apart(keys, groups, costs, lease_id)
                if releases:  # on threads: the caller waited its timeout already
                    self._release(releases)
                raise
            reserved, refunds = self._gather(keys, groups, replies, costs, lease_id)
            if refunds:
                self._refund(lambda: connection.evaluate_all(refunds, deadline))
            return reserved

        return self._guarded(send, lambda: self._fallback.reserve(user, model, costs), self._reservation_lost)

    async def areserve(self, user: str, model: str, costs: Sequence[int]) -> Reserved:
        """``reserve`` for event loops.

        A caller cancelled once its reservation was sent (an outer timeout, a server cancelling the task of a
        request whose client left) gets its ``CancelledError`` at once; Redis makes the reservation all the
        same, and it is cancelled when its reply comes (``_abandoned``) instead of held until its lease
        expires. Over several cluster slots, the reservation and its refunds run in a task of their own. A
        reservation answered by ``on_error`` after its timeout gives its leases back if Redis makes it late
        (``_undo``), as in ``reserve``.
        """
        self._connection.check_async()
        keys, groups, lease_id = self._reserve(user, model)
        connection = self._connection

        abandoned = functools.partial(self._abandoned, user, model, costs)

        async def spread(calls: list[Call]) -> Reserved:
            deadline = time.monotonic() + connection.timeout
            try:
                replies = await connection.aevaluate_all(calls, deadline)
            except REDIS_ERRORS:
                releases = self._failed_apart(keys, groups, costs, lease_id)
                if releases:
                    connection.orphans.detached(
                        self._arelease(releases), "giving back the leases of a failed reservation"
                    )
                raise
            reserved, refunds = self._gather(keys, groups, replies, costs, lease_id)
            if refunds:
                await self._arefund(lambda: connection.aevaluate_all(refunds, deadline))
            return reserved

        async def send() -> Reserved:
            calls = self._calls(keys, groups, costs, lease_id)
            if len(groups) == 1:
                reply = await connection.aevaluate(
                    calls[0], lambda reply: abandoned(self._reserved(reply, lease_id, costs))
                )
                return self._reserved(reply, lease_id, costs)
            return await connection.orphans.kept(spread(calls), abandoned)

        return await self._aguarded(
            send, lambda: self._fallback.reserve(user, model, costs), self._reservation_lost
        )

    def _abandoned(self, user: str, model: str, costs: Sequence[int], reserved: Reserved) -> None:
        """Cancel a reservation that Redis made for a caller cancelled meanwhile, as ``Reservation.cancel``
        would: its tokens refunded, its slots given back, its request counted (a denial charged nothing)."""
        if isinstance(reserved.receipt, Charge):
            deltas = self._policy.cancellation(costs)
            self._connection.orphans.detached(
                self.aadjust(user, model, reserved.receipt, deltas),
                "cancelling the reservation of a cancelled request",
            )

    def _adjust_calls(self, user: str, model: str, charge: Charge, deltas: Sequence[int]) -> list[Call]:
        """One script per part of the charge whose rules move (each at the time of its charge)."""
        calls = []
        for part in charge.parts:
            rules = [index for index in part if deltas[index]]
            if rules:
                keys = self._keys(user, model, [self._policy.all_rules[i] for i in rules])
                amounts, charges = [deltas[i] for i in rules], [charge.costs[i] for i in rules]
                times = [charge.times[i] for i in rules]
                args = self._args("adjust", rules, amounts, charge.lease_id, times, charges)
                calls.append(Call(self._script, keys, args))
        return calls

    def _adjust_failed(self) -> None:
        """A settlement Redis could not take: ``deny`` raises; otherwise it is dropped (the tokens stay
        charged, the slot frees up when its lease expires)."""
        if self._failover.on_error == "deny":
            self._unavailable()

    def adjust(self, user: str, model: str, receipt: object, deltas: Sequence[int]) -> None:
        """Settle a charge: each rule moves by its delta (a concurrency rule's -1 gives its lease back)."""
        self._connection.check_sync()
        if not isinstance(receipt, Charge):  # made by the failure policy, not in Redis
            self._fallback.adjust(user, model, receipt, deltas)
            return
        calls = self._adjust_calls(user, model, receipt, deltas)
        if calls:
            self._guarded(
                lambda: self._connection.evaluate_all(calls), self._adjust_failed, self._settlement_lost
            )

    async def aadjust(self, user: str, model: str, receipt: object, deltas: Sequence[int]) -> None:
        """``adjust`` for event loops."""
        self._connection.check_async()
        if not isinstance(receipt, Charge):
            self._fallback.adjust(user, model, receipt, deltas)
            return
        calls = self._adjust_calls(user, model, receipt, deltas)
        if not calls:
            return
        connection = self._connection
        if _being_cancelled() and self._settles_now():
            self._guarded(lambda: connection.evaluate_all(calls), self._adjust_failed, self._settlement_lost)
            return
        try:
            await self._aguarded(
                lambda: connection.aevaluate_all(calls), self._adjust_failed, self._settlement_lost
            )
        except asyncio.CancelledError:
            # Cancelled midway, the settlement may not have been sent: its leases are given back (twice is
            # harmless, the lease id being this reservation's alone); its tokens, which must not be settled
            # twice, stay as estimated until their window passes.
            if self._settles_now():
                leased = self._leased
                releases = self._adjust_calls(
                    user, model, receipt, [delta if i in leased else 0 for i, delta in enumerate(deltas)]
                )
                self._guarded(lambda: connection.evaluate_all(releases), lambda: None, self._settlement_lost)
            raise

    def _settles_now(self) -> bool:
        """Whether a settlement of a task being cancelled can go through the sync connections, at once, within
        the timeout: the storage has them when it was given a URL or a sync client. A server that cancels
        its requests may end its process within a few turns of its event loop, before an async round trip
        ends (uvicorn's ``--timeout-graceful-shutdown`` cancels them, then raises its SIGTERM again), and
        the slot would be held until its lease expires: that is logged when the storage has no sync
        connections (once a minute)."""
        if self._connection.endpoint.serves_sync:
            return True
        self._failover.warn(
            "settlement cancelled",
            "a reservation was settled by a task being cancelled, through the asyncio connections (this "
            "storage was given an asyncio client): if its event loop stops first (a server ending its "
            "process after cancelling its requests), its concurrency slots are held until their lease "
            "expires (%g s); give the storage a URL to have such settlements made at once (logged at most "
            "once a minute)",
            self.lease,
        )
        return False

    def _renew_calls(self, user: str, model: str, charge: Charge) -> list[Call]:
        """One script per slot holding leases of the charge (one call on one Redis)."""
        leased = [self._policy.all_rules[i] for i in self._leased]
        keys = self._keys(user, model, leased)
        groups = self._groups(keys, list(range(len(leased))))
        return [
            Call(
                self._script,
                [keys[i] for i in group],
                self._args("renew", [leased[i].index for i in group], [1] * len(group), charge.lease_id),
            )
            for group in groups
        ]

    def _held(self, replies: Sequence[Any]) -> bool:
        return sum(int(reply) for reply in replies) == len(self._leased)

    def renew(self, user: str, model: str, receipt: object) -> bool | None:
        """Extend a charge's leases to ``lease`` seconds from now; True if it still held every one, None when
        Redis could not be reached (the failure policy logs the outage once)."""
        self._connection.check_sync()
        if not isinstance(receipt, Charge) or not self._leased:
            return True  # in memory (the failure policy's) or unchecked: nothing expires
        calls = self._renew_calls(user, model, receipt)
        return self._guarded(lambda: self._held(self._connection.evaluate_all(calls)), lambda: None)

    async def arenew(self, user: str, model: str, receipt: object) -> bool | None:
        """``renew`` for event loops."""
        self._connection.check_async()
        if not isinstance(receipt, Charge) or not self._leased:
            return True
        calls = self._renew_calls(user, model, receipt)

        async def send() -> bool | None:
            return self._held(await self._connection.aevaluate_all(calls))

        return await self._aguarded(send, lambda: None)

    def __len__(self) -> int:
        raise TypeError(
            "len() is not available for a limiter on Redis: its keys live in Redis, shared with other "
            "processes, and expire there; count them with SCAN MATCH '<key_prefix>:*' if needed"
        )
