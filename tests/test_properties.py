"""Property-based tests: each algorithm keeps its documented bound under any traffic.

Traffic is a sequence of (time step, cost) pairs on one key; the admitted requests are then checked against
the bound. Times are multiples of 1/8 s so that the arithmetic is exact in floats. Each property runs on every
storage of the contract, with a sixth of the examples on Redis (a round trip per check).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit_middleware import RateLimiter
from ratelimit_middleware.algorithms.gcra import GCRA

from .conftest import FakeClock, StorageFactory, examples_on

Examples = Callable[[int], settings]

traffic = st.lists(
    st.tuples(st.integers(min_value=0, max_value=40).map(lambda n: n / 8), st.integers(0, 6)),
    min_size=1,
    max_size=120,
)
limits = st.integers(min_value=1, max_value=12)
windows = st.sampled_from([1.0, 2.0, 5.0, 10.0])


def run(
    storage_for: StorageFactory, algorithm: str, limit: int, window: float, steps: list[tuple[float, int]]
):  # type: ignore[no-untyped-def]
    clock = FakeClock(0.0)
    limiter = RateLimiter(limit, window, algorithm=algorithm, storage=storage_for(clock))
    admitted: list[tuple[float, int]] = []
    results = []
    for step, cost in steps:
        clock.advance(step)
        decision = limiter.check("u", "m", cost)
        results.append((clock.now, cost, decision))
        if decision.allowed and cost:
            admitted.append((clock.now, cost))
    return admitted, results


@pytest.fixture
def examples(storage_name: str) -> Examples:
    """Hypothesis settings for ``n`` examples in memory, a sixth as many on network storages."""

    return lambda n: examples_on(storage_name, n)


def units_in(admitted: list[tuple[float, int]], start: float, end: float) -> int:
    """Units admitted in [start, end)."""
    return sum(cost for t, cost in admitted if start <= t < end)


def test_sliding_log_never_exceeds_the_limit_in_any_window(
    storage_for: StorageFactory, examples: Examples
) -> None:
    @examples(300)
    @given(limit=limits, window=windows, steps=traffic)
    def check(limit: int, window: float, steps: list[tuple[float, int]]) -> None:
        admitted, _ = run(storage_for, "sliding_log", limit, window, steps)
        for t, _ in admitted:
            assert units_in(admitted, t, t + window) <= limit

    check()


def test_sliding_log_matches_a_reference_log(storage_for: StorageFactory, examples: Examples) -> None:
    """Exact: denied only when the request does not fit, and retry_after is exactly right."""

    @examples(300)
    @given(limit=limits, window=windows, steps=traffic)
    def check(limit: int, window: float, steps: list[tuple[float, int]]) -> None:
        _, results = run(storage_for, "sliding_log", limit, window, steps)
        log: list[tuple[float, int]] = []
        for now, cost, decision in results:
            live = [(t, c) for t, c in log if t > now - window]
            used = sum(c for _, c in live)
            fits = used + cost <= limit
            assert decision.allowed == fits, (now, cost, live)
            if fits:
                assert decision.remaining == limit - used - cost
                if cost:
                    log.append((now, cost))
            elif cost <= limit:
                # the earliest moment at which enough of the oldest entries have left
                freed, wait = 0, 0.0
                for t, c in live:
                    freed += c
                    wait = t + window - now
                    if used - freed + cost <= limit:
                        break
                assert decision.retry_after == wait

    check()


def test_fixed_window_never_exceeds_the_limit_per_aligned_window(
    storage_for: StorageFactory, examples: Examples
) -> None:
    @examples(300)
    @given(limit=limits, window=windows, steps=traffic)
    def check(limit: int, window: float, steps: list[tuple[float, int]]) -> None:
        admitted, results = run(storage_for, "fixed_window", limit, window, steps)
        for t, _ in admitted:
            start = (t // window) * window
            assert units_in(admitted, start, start + window) <= limit
        for now, cost, decision in results:  # and denies only what does not fit
            if not decision.allowed:
                start = (now // window) * window
                already = units_in([a for a in admitted if a[0] <= now], start, now + 1e-9)
                assert already + cost > limit

    check()


def test_gcra_never_exceeds_burst_plus_replenishment(storage_for: StorageFactory, examples: Examples) -> None:
    @examples(300)
    @given(limit=limits, window=windows, steps=traffic)
    def check(limit: int, window: float, steps: list[tuple[float, int]]) -> None:
        admitted, _ = run(storage_for, "gcra", limit, window, steps)
        interval = window / limit
        for i, (start, _) in enumerate(admitted):
            total = 0
            for end, cost in admitted[i:]:
                total += cost
                assert total <= limit + (end - start) / interval + 1e-6

    check()


def test_sliding_window_keeps_its_documented_approximation(
    storage_for: StorageFactory, examples: Examples
) -> None:
    @examples(300)
    @given(limit=limits, window=windows, steps=traffic)
    def check(limit: int, window: float, steps: list[tuple[float, int]]) -> None:
        admitted, _ = run(storage_for, "sliding_window", limit, window, steps)
        for t, _ in admitted:
            start = (t // window) * window
            assert units_in(admitted, start, start + window) <= limit
            assert units_in(admitted, t, t + window) <= 2 * limit

    check()


def test_retry_after_is_always_enough(storage_for: StorageFactory, examples: Examples) -> None:
    """After any traffic, a denied request waiting exactly retry_after is then allowed."""

    @examples(200)
    @given(
        algorithm=st.sampled_from(["sliding_log", "sliding_window", "gcra", "fixed_window"]),
        limit=limits,
        window=windows,
        steps=traffic,
    )
    def check(algorithm: str, limit: int, window: float, steps: list[tuple[float, int]]) -> None:
        clock = FakeClock(0.0)
        limiter = RateLimiter(limit, window, algorithm=algorithm, storage=storage_for(clock))
        for step, cost in steps:
            clock.advance(step)
            limiter.check("u", "m", cost)
        for cost in range(1, limit + 1):
            decision = limiter.check("u", "m", cost)
            if not decision.allowed:
                clock.advance(decision.retry_after)
                assert limiter.check("u", "m", cost).allowed
                return

    check()


@pytest.mark.parametrize("algorithm", ["sliding_log", "sliding_window", "gcra", "fixed_window"])
def test_retry_after_is_enough_at_any_clock(
    algorithm: str, storage_for: StorageFactory, examples: Examples
) -> None:
    """The same with decimal windows and clocks from zero to Unix times, where the wait, the client's sum
    and the retry's own float expressions each round: a denial waited out is never denied again."""

    @examples(150)
    @given(
        limit=limits,
        window=st.sampled_from([0.1, 0.3, 0.7, 2.5, 3600.0]),
        start=st.sampled_from([0.0, 1.3e5, 2.1e6, 4529271.7, 1.75e9]),
        offset=st.floats(0.0, 1000.0),
        steps=st.lists(st.tuples(st.floats(0.0, 0.4), st.integers(1, 12)), min_size=1, max_size=30),
    )
    def check(limit: int, window: float, start: float, offset: float, steps: list[tuple[float, int]]) -> None:
        clock = FakeClock(start + offset)
        limiter = RateLimiter(limit, window, algorithm=algorithm, storage=storage_for(clock))
        for fraction, cost in steps:
            clock.advance(fraction * window)
            cost = min(cost, limit)
            decision = limiter.check("u", "m", cost)
            if not decision.allowed:
                assert decision.retry_after > 0
                clock.advance(decision.retry_after)
                assert limiter.check("u", "m", cost).allowed, (clock.now, decision.retry_after)

    check()


def test_gcra_remaining_is_what_one_more_request_gets() -> None:
    """``remaining`` is the largest cost a further request admits right after, by admission's own float
    expression: no longer one off either way at large clock values (the scripts give the same figures:
    test_redis.py)."""

    @settings(max_examples=400, deadline=None)
    @given(
        limit=st.integers(1, 15),
        window=st.sampled_from([0.1, 0.7, 1.0, 10.0]),
        start=st.sampled_from([0.0, 5e4, 2e6, 1.75e9]),
        steps=st.lists(st.tuples(st.floats(0.0, 0.25), st.integers(1, 15)), min_size=1, max_size=12),
    )
    def check(limit: int, window: float, start: float, steps: list[tuple[float, int]]) -> None:
        algorithm = GCRA(limit, window)
        now, state = start, None
        for fraction, cost in steps:
            now += fraction * window
            allowed, remaining, _, _ = algorithm.evaluate(state, now, min(cost, limit))
            if allowed:
                state = algorithm.commit(state, now, min(cost, limit))
                assert remaining == 0 or algorithm.evaluate(state, now, remaining)[0]
                assert remaining == limit or not algorithm.evaluate(state, now, remaining + 1)[0]

    check()
