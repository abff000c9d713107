"""Limits, costs and token counts up to ``MAX_AMOUNT`` (2**53): exact, and alike on every storage.

Redis counts in doubles, exact for integers up to 2**53 only, and memory's sliding log keeps its cumulative
costs in float64: a sum such as ``used + cost`` of a full window rounds back to 2**53 and passes the limit.
Traffic here runs at limits and costs at that edge, on each storage of the contract beside a
``MemoryStorage`` on the same clock (every decision and count must match), and against an exact reference
(integers) of the window counters and of the sliding log. GCRA counts time in floats: it takes limits up
to ``GCRA_MAX_LIMIT``, at most ``GCRA_MAX_RATE`` per second, and refuses finer ones.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ratelimit_middleware import Limits, MemoryStorage, MultiTierRateLimiter, RateLimiter
from ratelimit_middleware.algorithms.gcra import GCRA_MAX_LIMIT, GCRA_MAX_RATE
from ratelimit_middleware.backends.base import Storage
from ratelimit_middleware.config import MAX_AMOUNT
from ratelimit_middleware.decision import Decision
from ratelimit_middleware.reservation import Reservation

from .conftest import FakeClock, StorageFactory, examples_on

WINDOW = 3600.0
START = 1_779_998_400.0  # an hour boundary at a Unix time, as Redis' clock reads
EDGES = (0, 1, 2, 3, 2**52 - 1, 2**52, 2**52 + 1, MAX_AMOUNT - 3, MAX_AMOUNT - 2, MAX_AMOUNT - 1, MAX_AMOUNT)
amounts = st.one_of(st.sampled_from(EDGES), st.integers(0, MAX_AMOUNT))
Step = tuple[int, bool, int, "int | None", int]
traffic = st.lists(
    st.tuples(
        st.integers(0, 10),  # eighths of the window to move the clock by
        st.booleans(),  # a reservation of tokens (else a check of requests)
        amounts,  # its cost or estimate
        st.one_of(st.none(), amounts),  # the tokens used (None: cancelled)
        st.integers(0, 2),  # steps until it settles
    ),
    min_size=1,
    max_size=14,
)


class Exact:
    """The units charged at each time, in integers, and what the algorithm counts of them.

    The sliding log counts the units charged in ``(now - window, now]``; an overage lands on its charge, up
    to ``MAX_AMOUNT`` units in the window. The fixed window counts the current aligned window, saturating at
    the limit. The sliding window counter approximates: it is held to its documented bounds instead.
    """

    def __init__(self, algorithm: str, limit: int) -> None:
        self.algorithm = algorithm
        self.limit = limit
        self.charges: list[list[float]] = []  # [time, units]

    def aligned(self, now: float) -> int:
        """Units charged in the aligned window of ``now``."""
        return sum(int(units) for t, units in self.charges if t // WINDOW == now // WINDOW)

    def sliding(self, now: float) -> int:
        """Units charged in ``(now - window, now]``."""
        return sum(int(units) for t, units in self.charges if t > now - WINDOW)

    def used(self, now: float) -> int:
        return self.aligned(now) if self.algorithm == "fixed_window" else self.sliding(now)

    def fits(self, now: float, cost: int) -> bool:
        return self.used(now) + cost <= self.limit

    def charge(self, now: float, cost: int) -> list[float]:
        entry = [now, float(cost)]
        self.charges.append(entry)
        return entry

    def settle(self, entry: list[float], now: float, delta: int) -> None:
        if self.algorithm == "fixed_window":
            if entry[0] // WINDOW == now // WINDOW:
                used = self.used(now)
                entry[1] += min(max(used + delta, 0), self.limit) - used
        elif entry[0] > now - WINDOW:
            entry[1] += min(delta, MAX_AMOUNT - self.used(now))


def limiter_on(storage: Storage, algorithm: str, limit: int) -> MultiTierRateLimiter:
    limits = Limits(requests=f"{limit}/hour", tokens=f"{limit}/hour")
    return MultiTierRateLimiter(per_user_model=limits, algorithm=algorithm, storage=storage)


def within_limit(*decisions: Decision) -> None:
    for decision in decisions:
        assert 0 <= decision.remaining <= decision.limit, decision


@pytest.mark.parametrize("algorithm", ["sliding_log", "fixed_window", "sliding_window"])
def test_a_full_window_of_2_53_admits_nothing_more(
    algorithm: str, clock: FakeClock, storage: Storage
) -> None:
    """In doubles 2**53 + 1 is 2**53: ``used + cost <= limit`` held for every further unit (in Redis' scripts,
    and in memory's sliding log, which then reported -1 remaining)."""
    limiter = RateLimiter(limit=f"{MAX_AMOUNT}/hour", algorithm=algorithm, storage=storage)
    clock.now = START
    decisions = [limiter.check("u", "m", cost) for cost in (MAX_AMOUNT, 1, 1, 1)]
    assert [(d.allowed, d.remaining) for d in decisions] == [(True, 0)] + [(False, 0)] * 3
    assert limiter.get_request_count("u", "m") == MAX_AMOUNT


def test_sliding_window_keeps_a_full_window_full_to_its_end(clock: FakeClock, storage: Storage) -> None:
    """When a request fits only in the next window, it fits at ``start + window * (2 - (limit - cost) /
    current)``: at 2**53 that rounds to the window's end, and the slack of 1e-9 of the window (3.6 us an hour)
    admitted it in the last microseconds of a full window."""
    limiter = RateLimiter(limit=f"{MAX_AMOUNT}/hour", algorithm="sliding_window", storage=storage)
    clock.now = START
    assert limiter.check("u", "m", MAX_AMOUNT).allowed
    clock.now = START + WINDOW - 2**-20
    assert not limiter.check("u", "m").allowed
    assert limiter.get_request_count("u", "m") == MAX_AMOUNT


def test_sliding_window_counts_a_large_previous_window_exactly(clock: FakeClock, storage: Storage) -> None:
    """Half of a previous window of 2**53 - 2 units is 2**52 - 1 (exact in floats); the count rounded it
    up as ``int(share + 1 - 1e-9)``, where 2**52 - 1e-9 is 2**52."""
    limiter = RateLimiter(limit=f"{MAX_AMOUNT}/hour", algorithm="sliding_window", storage=storage)
    clock.now = START
    assert limiter.check("u", "m", MAX_AMOUNT - 2).allowed
    clock.now = START + 1.5 * WINDOW
    assert limiter.get_request_count("u", "m") == 2**52 - 1


def test_sliding_window_remaining_rounds_as_memory_does(clock: FakeClock, storage: Storage) -> None:
    """The estimate adds the current window's units and the request's cost as one integer, then to the
    previous window's share: the script added them one by one, two roundings near 2**52, one unit apart."""
    limiter = limiter_on(storage, "sliding_window", MAX_AMOUNT)
    twin = limiter_on(MemoryStorage(clock=clock), "sliding_window", MAX_AMOUNT)
    clock.now = START
    assert all(one.check("u", "m").allowed for one in (limiter, twin))
    clock.now = START + WINDOW
    assert all(one.check("u", "m", 2**52 - 1).allowed for one in (limiter, twin))
    clock.now = START + WINDOW + 3 * WINDOW / 8
    # 0.625 of the previous unit and 2**52 units in this window: 2**52 + 0.625, rounded to 2**52 + 1.
    remaining = [one.check("u", "m").remaining for one in (limiter, twin)]
    assert remaining == [2**52 - 1, 2**52 - 1]


def test_sliding_log_counts_an_overage_up_to_2_53(clock: FakeClock, storage: Storage) -> None:
    """The sliding log counts an overage settled after the fact exactly, beyond the limit, but no further
    than 2**53 units in the window: past it, its float64 sums (Redis' doubles) would skip units."""
    limiter = RateLimiter(tokens=f"{MAX_AMOUNT}/hour", storage=storage)
    clock.now = START
    assert limiter.reserve("u", "m", input_tokens=2**52).allowed
    clock.advance(1)
    limiter.reserve("u", "m", input_tokens=1).settle(MAX_AMOUNT - 1, 1)  # 2**53 - 1 more than reserved
    assert limiter.get_request_count("u", "m", unit="tokens") == MAX_AMOUNT
    clock.advance(WINDOW - 1)  # the first charge has left the window; the settled one counts in full
    assert limiter.get_request_count("u", "m", unit="tokens") == 2**52
    assert not limiter.reserve("u", "m", input_tokens=2**52 + 1).allowed
    assert limiter.reserve("u", "m", input_tokens=2**52).allowed


@pytest.mark.parametrize("algorithm", ["sliding_log", "fixed_window", "sliding_window"])
def test_amounts_up_to_2_53_are_exact_and_alike_on_every_storage(
    algorithm: str, storage_name: str, storage_for: StorageFactory
) -> None:
    """Checks of requests and reservations of tokens (settled later, out of order, or cancelled) at limits
    and costs near 2**53: each decision and count as memory gives it and as exact integers say."""
    exact = algorithm != "sliding_window"

    @examples_on(storage_name, 150)
    @given(limit=st.sampled_from([MAX_AMOUNT, MAX_AMOUNT - 1, 2**52 + 1]), steps=traffic)
    def check(limit: int, steps: list[Step]) -> None:
        clock = FakeClock(START)
        limiter = limiter_on(storage_for(clock), algorithm, limit)
        twin = limiter_on(MemoryStorage(clock=clock), algorithm, limit)
        requests, tokens = Exact(algorithm, limit), Exact(algorithm, limit)
        pending: list[tuple[int, tuple[Reservation, Reservation], list[float], int, int | None]] = []
        for index, (eighths, reserve, amount, actual, delay) in enumerate(steps):
            clock.advance(eighths * WINDOW / 8)
            now = clock.now
            if reserve:
                held, theirs = (one.reserve("u", "m", input_tokens=amount) for one in (limiter, twin))
                assert held.decisions == theirs.decisions
                within_limit(*held.decisions.values())
                assert not exact or held.allowed == (requests.fits(now, 1) and tokens.fits(now, amount))
                if held.allowed:
                    requests.charge(now, 1)
                    entry = tokens.charge(now, amount)
                    pending.append((index + delay, (held, theirs), entry, amount, actual))
                    assert not exact or held.decisions["tokens"].remaining == limit - tokens.used(now)
            else:
                decision = limiter.check("u", "m", amount)
                assert decision == twin.check("u", "m", amount)
                within_limit(decision)
                assert not exact or decision.allowed == requests.fits(now, amount)
                if decision.allowed:
                    requests.charge(now, amount)
                    assert not exact or decision.remaining == limit - requests.used(now)
            for due in [p for p in pending if p[0] <= index]:
                pending.remove(due)
                _, reservations, entry, estimate, used = due
                tokens.settle(entry, now, (used or 0) - estimate)
                for reservation in reservations:
                    if used is None:
                        reservation.cancel()
                    else:
                        reservation.settle(used, 0)
            counts = [count for _, count in limiter.counts("u", "m")]
            assert counts == [count for _, count in twin.counts("u", "m")]
            if exact:
                assert counts == [requests.used(now), tokens.used(now)]
            else:  # at most the limit per aligned window, twice that in any window, and counts within it
                assert requests.aligned(now) <= limit and requests.sliding(now) <= 2 * limit
                assert all(0 <= count <= limit for count in counts)

    check()


@pytest.mark.parametrize("limit", [f"{MAX_AMOUNT}/hour", f"{GCRA_MAX_LIMIT + 1}/day", "1000001/second"])
def test_gcra_rejects_a_limit_finer_than_its_float_time(limit: str) -> None:
    """GCRA keeps time in floats (0.24 us apart at Unix times) and a slack of 1e-9 of the window: 2**53 units
    per hour are 0.4 ps each, so that every request of one unit was admitted, free. It refuses such limits
    by name (with requests and tokens alike) rather than count them wrong."""
    amount = limit.split("/")[0]
    with pytest.raises(ValueError, match=rf"gcra .*{amount} per .*: at most {GCRA_MAX_LIMIT:,} per window"):
        RateLimiter(limit=limit, algorithm="gcra")
    with pytest.raises(ValueError, match=amount):
        RateLimiter(tokens=limit, algorithm="gcra")
    assert RateLimiter(limit=limit, algorithm="sliding_log").check("u", "m").allowed


@pytest.mark.parametrize(("limit", "window"), [(GCRA_MAX_LIMIT, 1000.0), (GCRA_MAX_RATE, 1.0)])
def test_gcra_at_its_largest_limits_is_alike_on_every_storage(
    limit: int, window: float, storage_name: str, storage_for: StorageFactory
) -> None:
    """At its largest limit, and at its finest interval: the same decisions and counts as memory, within
    the limit, and a token bucket's bound (a unit of slack) on what it admits."""
    interval = window / limit
    costs = st.one_of(st.sampled_from([0, 1, 2, limit // 2, limit - 1, limit]), st.integers(0, limit))

    @examples_on(storage_name, 100)
    @given(steps=st.lists(st.tuples(st.integers(0, 10), costs), min_size=1, max_size=14))
    def check(steps: list[tuple[int, int]]) -> None:
        clock = FakeClock(START)
        limiter = RateLimiter(limit, window, algorithm="gcra", storage=storage_for(clock))
        twin = RateLimiter(limit, window, algorithm="gcra", storage=MemoryStorage(clock=clock))
        admitted: list[tuple[float, int]] = []
        for eighths, cost in steps:
            clock.advance(eighths * window / 8)
            decision = limiter.check("u", "m", cost)
            assert decision == twin.check("u", "m", cost)
            within_limit(decision)
            count = limiter.get_request_count("u", "m")
            assert count == twin.get_request_count("u", "m") and 0 <= count <= limit
            if decision.allowed:
                admitted.append((clock.now, cost))
        for i, (start, _) in enumerate(admitted):
            total = 0
            for end, cost in admitted[i:]:
                total += cost
                assert total <= limit + (end - start) / interval + 1

    check()
