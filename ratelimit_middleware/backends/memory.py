"""In-memory storage: one process, zero set-up, exact and thread-safe.

Each rule (one window of one tier) has its own ``OrderedDict`` of key -> algorithm state, kept in least
recently used order, shared by the limiters of one storage that state the rule alike (as on one Redis). A
decision evaluates every rule under the storage's lock and commits only if all allow, so denied requests
charge nothing and concurrent threads can never over-admit.

The clock is read under the lock and never goes back: a thread that read the time and then waited for the
lock could otherwise commit an older time over a newer state (a window's count wiped, a log out of order).

Memory stays bounded without a background thread: every ``_SWEEP_EVERY`` decisions on the storage (from a few
stores, in turn), and whenever a new key is stored (from its store), idle (fully recovered) states are
dropped from the least recently used end of the stores; and
``max_keys`` caps the total, evicting idle keys first, then the least recently used key of the largest store.
"""

from __future__ import annotations

import collections
import math
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal, cast, overload

from ..algorithms import Verdict
from ..decision import Decision
from ..hooks import checked_clock
from ..policy import CounterName, Policy, Rule, counter_names
from .base import Reserved

__all__ = ["DEFAULT_MAX_KEYS", "MemoryBackend", "MemoryStorage"]

_new_tuple = tuple.__new__

DEFAULT_MAX_KEYS = 1_000_000
"""About 200 MB of states at most for the O(1) algorithms (see DESIGN.md for bytes per key)."""

_SWEEP_EVERY = 64  # decisions between two sweeps: up to one idle key dropped per decision
_SWEEP_BATCH = 64  # idle keys dropped at most per store and sweep
_STORES_PER_SWEEP = 8  # stores swept per sweep, in turn


class _Store:
    """The states of one counter name (a rule stated alike by the limiters bound to a storage), the rule that
    says when they are idle, and how many of those limiters are alive."""

    __slots__ = ("rule", "states", "users")

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.states: OrderedDict[Hashable, Any] = OrderedDict()
        self.users = 0


class MemoryStorage:
    """State in this process: the default storage.

    ``clock`` is a zero-argument callable returning seconds (default ``time.monotonic``; inject one in tests
    instead of sleeping). ``max_keys`` caps the keys held by each limiter bound to this storage.

    Limiters bound to one storage count a rule they state alike (``policy.counter_names``) in one counter,
    as they do on one Redis: they share its store, and one lock.
    """

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, max_keys: int = DEFAULT_MAX_KEYS
    ) -> None:
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise ValueError(f"max_keys must be an int >= 1, got {max_keys!r}")
        self.clock = checked_clock(clock)
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._last = -math.inf  # the latest time used, under the lock (see `MemoryBackend._now`)
        self._stores: dict[CounterName, _Store] = {}
        self._released: collections.deque[tuple[CounterName, ...]] = collections.deque()
        self._turns: collections.deque[CounterName] = collections.deque()  # every store, in sweeping order
        self._until_sweep = _SWEEP_EVERY  # decisions on this storage until the next sweep

    def bind(self, policy: Policy) -> MemoryBackend:
        rules = len(policy.all_rules)
        if self.max_keys < (rules + 1 if rules > 1 else 1):  # a request stores a key per rule, evicting none
            raise ValueError(
                f"max_keys={self.max_keys} cannot hold one user's keys for {rules} rules: it must be larger"
            )
        names = counter_names(policy)
        with self._lock:
            self._take_releases()
            stores = []
            for name, rule in zip(names, policy.all_rules, strict=True):
                store = self._stores.get(name)
                if store is None:
                    store = self._stores[name] = _Store(rule)
                    self._turns.append(name)
                store.users += 1
                stores.append(store.states)
        backend = MemoryBackend(policy, self, stores)
        # Not under the lock: the collector may run this while the lock is held. `_take_releases` counts it.
        weakref.finalize(backend, self._released.append, names)
        return backend

    def _take_releases(self) -> None:
        """Count the limiters collected since (under the lock)."""
        while self._released:
            for name in self._released.popleft():
                self._stores[name].users -= 1

    def _sweep(self, now: float) -> None:
        """Every ``_SWEEP_EVERY`` decisions on the storage (under the lock): drop idle states from the next
        few stores in turn, every store it holds being reached (limiters that alternate, or are made per
        request, never starve one). A store no limiter uses any more keeps its states while they count (a
        limiter bound later finds them, as on Redis) and goes once empty."""
        self._until_sweep = _SWEEP_EVERY
        self._take_releases()
        for _ in range(min(len(self._turns), _STORES_PER_SWEEP)):
            name = self._turns.popleft()
            store = self._stores[name]
            MemoryBackend._sweep_store(store.rule, store.states, now, _SWEEP_BATCH)
            if store.states or store.users:
                self._turns.append(name)
            else:
                del self._stores[name]


class MemoryBackend:
    """Holds the states of one policy's keys in this process (in its storage's stores, by counter name)."""

    lease: float | None = None  # slots never expire: they live and die with the process

    def __init__(
        self, policy: Policy, storage: MemoryStorage, stores: list[OrderedDict[Hashable, Any]]
    ) -> None:
        self._policy = policy
        self._storage = storage
        self._clock = storage.clock
        self._max_keys = storage.max_keys
        self._lock = storage._lock
        self._stores = stores
        # One rule, the common case: closures over it, built once (see `_single`).
        single = len(policy.rules) == 1
        self.decide: Callable[[str, str, int], Decision] = (
            self._single(decides=True) if single else self._decide
        )
        """Evaluate every rule at the current time; commit all or nothing."""
        self.allows: Callable[[str, str, int], bool] = (
            self._single(decides=False) if single else self._decided
        )
        """``decide(...).allowed``, without a single rule's ``Decision``: all that ``allow`` needs."""

    # -- decisions ---------------------------------------------------------------------------------

    def _decide(self, user: str, model: str, cost: int) -> Decision:
        """``decide`` for any rules and any cost."""
        policy = self._policy
        if cost > policy.min_limit:
            return policy.oversized(cost)
        # acquire/release, not `with`: the context manager protocol costs twice as much per call.
        self._lock.acquire()
        try:
            now = self._now()
            self._tick(now)
            verdicts = self._evaluate(policy.rules, user, model, [cost] * len(policy.rules), now)
        finally:
            self._lock.release()
        return policy.decide(verdicts, cost)

    def _decided(self, user: str, model: str, cost: int) -> bool:
        return self.decide(user, model, cost).allowed

    @overload
    def _single(self, *, decides: Literal[True]) -> Callable[[str, str, int], Decision]: ...

    @overload
    def _single(self, *, decides: Literal[False]) -> Callable[[str, str, int], bool]: ...

    def _single(self, *, decides: bool) -> Callable[[str, str, int], Decision | bool]:
        """``decide`` (``decides``) or ``allows`` for a single rule: a closure over everything it reads,
        since it runs once per request.

        For ``1 <= cost <= limit`` (nearly every call), ``Algorithm.admit`` evaluates and commits in one pass;
        ``decide`` then takes the figures of its ``Decision`` from the state left (``Algorithm.figures``), or
        a denial's from ``evaluate`` (``admit`` left the state as it was). ``allows`` needs neither. Anything
        else goes through ``_decide``.
        """
        rule = self._policy.rules[0]
        algorithm, store, limit = rule.algorithm, self._stores[0], rule.limit
        admit, figures, evaluate = algorithm.admit, algorithm.figures, algorithm.evaluate
        tier, seconds, unit = rule.tier, rule.seconds, rule.unit
        get, move_to_end, clock = store.get, store.move_to_end, self._clock
        acquire, release = self._lock.acquire, self._lock.release
        identity = rule.identity
        pair = tier == "per_user_model"  # its key, built inline: (user, model)
        decide, backend, storage = self._decide, self, self._storage

        def single(user: str, model: str, cost: int) -> Decision | bool:
            if not 0 < cost <= limit:
                return decide(user, model, cost) if decides else decide(user, model, cost).allowed
            key = (user, model) if pair else identity(user, model)
            acquire()
            try:
                now = clock()  # `_now` inline
                if now < storage._last:
                    now = storage._last
                else:
                    storage._last = now
                storage._until_sweep -= 1  # `_tick` inline: the same count as `_decide`, without a call
                if storage._until_sweep <= 0:
                    storage._sweep(now)
                state = get(key)
                if state is not None:
                    move_to_end(key)
                admitted = admit(state, now, cost)
                if admitted is None:
                    if not decides:
                        return False
                    verdict = evaluate(state, now, cost)  # the denial's figures
                else:
                    if state is None:
                        backend._make_room(rule, store, now)
                    store[key] = admitted
                    if not decides:
                        return True
                    remaining, reset_after = figures(admitted, now, cost)
                    # `Rule.decision` inline; tuple.__new__ skips the generated keyword __new__.
                    return _new_tuple(
                        Decision, (True, limit, remaining, 0.0, reset_after, tier, seconds, cost, unit, None)
                    )
            finally:
                release()
            return rule.decision(verdict, cost)

        return single

    def _evaluate(
        self, rules: Sequence[Rule], user: str, model: str, costs: Sequence[int], now: float
    ) -> list[Verdict]:
        """Evaluate ``rules`` (under the lock) and commit them all if all allow; the verdicts."""
        stores = [self._stores[rule.index] for rule in rules]
        keys = [rule.identity(user, model) for rule in rules]
        states = [self._touch(store, key) for store, key in zip(stores, keys, strict=True)]
        verdicts: list[Verdict] = [
            rule.algorithm.evaluate(state, now, cost)
            for rule, state, cost in zip(rules, states, costs, strict=True)
        ]
        if all(verdict[0] for verdict in verdicts):
            for rule, store, key, state, cost in zip(rules, stores, keys, states, costs, strict=True):
                if cost:
                    if state is None:
                        self._make_room(rule, store, now)
                    store[key] = rule.algorithm.commit(state, now, cost)
        return verdicts

    async def adecide(self, user: str, model: str, cost: int) -> Decision:
        """``decide`` for event loops: it never waits on I/O, so it simply runs inline."""
        return self.decide(user, model, cost)

    async def aallows(self, user: str, model: str, cost: int) -> bool:
        """``allows`` for event loops, inline like ``adecide``."""
        return self.allows(user, model, cost)

    def used(self, user: str, model: str, rule: Rule) -> int:
        """Units that ``rule`` counts for this user and model now."""
        with self._lock:
            state = self._stores[rule.index].get(rule.identity(user, model))
            return rule.algorithm.used(state, self._now())

    async def aused(self, user: str, model: str, rule: Rule) -> int:
        return self.used(user, model, rule)

    def reserve(self, user: str, model: str, costs: Sequence[int]) -> Reserved:
        """Evaluate every rule of the policy with its own cost, all or nothing.

        The receipt is the time of the charge and each rule's cost (``adjust`` settles the charges made then);
        on denial the reply also holds the units each rule already counts (for messages).
        """
        rules = self._policy.all_rules
        with self._lock:
            now = self._now()
            self._tick(now)
            verdicts = self._evaluate(rules, user, model, costs, now)
            if all(verdict[0] for verdict in verdicts):
                return Reserved(verdicts, (now, tuple(costs)))
            used = [
                rule.algorithm.used(self._stores[rule.index].get(rule.identity(user, model)), now)
                for rule in rules
            ]
            return Reserved(verdicts, now, used)

    async def areserve(self, user: str, model: str, costs: Sequence[int]) -> Reserved:
        return self.reserve(user, model, costs)

    def adjust(self, user: str, model: str, receipt: object, deltas: Sequence[int]) -> None:
        """Change the charges of ``receipt`` (their time and costs) by ``deltas`` (one per rule of the policy;
        0 leaves a rule)."""
        at, costs = cast(tuple[float, tuple[int, ...]], receipt)
        with self._lock:
            now = self._now()
            for rule, charged, delta in zip(self._policy.all_rules, costs, deltas, strict=True):
                if delta:
                    store = self._stores[rule.index]
                    key = rule.identity(user, model)
                    state = rule.algorithm.adjust(store.get(key), now, at, charged, delta)
                    if state is None:
                        store.pop(key, None)
                    else:
                        store[key] = state

    async def aadjust(self, user: str, model: str, receipt: object, deltas: Sequence[int]) -> None:
        self.adjust(user, model, receipt, deltas)

    def renew(self, user: str, model: str, receipt: object) -> bool:
        """Nothing to do: slots in memory are held until given back (they die with the process)."""
        return True

    async def arenew(self, user: str, model: str, receipt: object) -> bool:
        return True

    def reset(self, user: str, model: str, rules: tuple[Rule, ...]) -> None:
        """Forget the keys that ``rules`` hold for this user and model."""
        with self._lock:
            for rule in rules:
                self._stores[rule.index].pop(rule.identity(user, model), None)

    async def areset(self, user: str, model: str, rules: tuple[Rule, ...]) -> None:
        self.reset(user, model, rules)

    def __len__(self) -> int:
        return sum(len(store) for store in self._stores)

    # -- storage -------------------------------------------------------------------------------------

    def _now(self) -> float:
        """The clock, read under the lock, never behind a time already used."""
        now, storage = self._clock(), self._storage
        if now < storage._last:
            return storage._last
        storage._last = now
        return now

    @staticmethod
    def _touch(store: OrderedDict[Hashable, Any], key: Hashable) -> Any:
        state = store.get(key)
        if state is not None:
            store.move_to_end(key)
        return state

    def _make_room(self, rule: Rule, store: OrderedDict[Hashable, Any], now: float) -> None:
        """Before a new key is stored: drop a couple of idle keys, and respect ``max_keys``."""
        self._sweep_store(rule, store, now, 2)
        if len(self) >= self._max_keys:
            self._evict(now)

    def _tick(self, now: float) -> None:
        """Count a decision on the storage; every ``_SWEEP_EVERY`` of them, sweep idle keys (this limiter's,
        and those of stores no limiter uses: limiters made per request never reach a count of their own)."""
        storage = self._storage
        storage._until_sweep -= 1
        if storage._until_sweep <= 0:
            storage._sweep(now)

    def _sweep_own(self, now: float) -> None:
        """Drop idle states from this limiter's stores (before evicting live ones at ``max_keys``)."""
        for rule, store in zip(self._policy.all_rules, self._stores, strict=True):
            self._sweep_store(rule, store, now, _SWEEP_BATCH)

    @staticmethod
    def _sweep_store(rule: Rule, store: OrderedDict[Hashable, Any], now: float, limit: int) -> None:
        """Drop up to ``limit`` idle states from the least recently used end, stopping at a live one.

        Within one store every key has the same window, so idle keys gather at that end: a key unused for a
        whole window (two for the sliding window counter) is always idle.
        """
        idle = rule.algorithm.idle
        for _ in range(limit):
            if not store:
                return
            key, state = next(iter(store.items()))
            if not idle(state, now):
                return
            del store[key]

    def _evict(self, now: float) -> None:
        """Bring the total below ``max_keys``: idle keys first, then the LRU key of the largest store.

        Slot counts of requests in flight are never evicted (their release would undercount the fresh
        count, and the user could take the slots again): they are bounded by the requests running, and
        only the other stores give way, down to none.
        """
        self._sweep_own(now)
        windowed = [
            store
            for rule, store in zip(self._policy.all_rules, self._stores, strict=True)
            if rule.unit != "concurrent"
        ]
        while len(self) >= self._max_keys:
            largest = max(windowed, key=len, default=None)
            if not largest:
                return
            largest.popitem(last=False)
