"""The fast path of ``check`` and ``allow`` gives the answers of the general path, decision by decision.

For one rule, the in-memory backend runs ``Algorithm.admit`` (evaluate and commit in one pass) in a closure
built at bind time; ``check`` then reads the figures of its ``Decision`` from the state left
(``Algorithm.figures``), and ``allow`` never builds one.
These tests drive that path and the general one (``Algorithm.evaluate`` then ``commit``, the backend's
``_decide`` for any rules) with the same traffic and compare everything that can be observed afterwards: the
answers, the states, remaining, retry_after and reset_after, the counts and the keys held.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit_middleware import ALGORITHMS, MultiTierRateLimiter, RateLimiter
from ratelimit_middleware.algorithms import Algorithm

from .conftest import FakeClock

# Times on a grid of 1/8 s hit window boundaries exactly; arbitrary floats hit everything in between.
grid_steps = st.integers(min_value=0, max_value=40).map(lambda n: n / 8)
float_steps = st.floats(min_value=0.0, max_value=6.0, allow_nan=False)
steps = st.one_of(grid_steps, float_steps)
limits = st.integers(min_value=1, max_value=12)
windows = st.sampled_from([1.0, 2.0, 5.0, 10.0, 0.3])

# (time step, cost, refund or overage settled on the last admitted charge, 0 for none). About half the costs
# are 1 and half the steps settle nothing: states of plain request counting (the sliding log keeps those in
# its compact layouts) last for a while, besides states of any costs.
algorithm_traffic = st.lists(
    st.tuples(
        steps,
        st.one_of(st.just(1), st.integers(1, 12)),
        st.one_of(st.just(0), st.integers(-3, 2)),
    ),
    min_size=1,
    max_size=80,
)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
@settings(max_examples=300, deadline=None)
@given(limit=limits, window=windows, start=st.floats(0.0, 10_000.0), traffic=algorithm_traffic)
def test_admit_is_evaluate_then_commit(
    name: str, limit: int, window: float, start: float, traffic: list[tuple[float, int, int]]
) -> None:
    """``admit`` allows exactly when ``evaluate`` does and leaves exactly the state ``commit`` would, whose
    ``figures`` are those of ``evaluate``'s verdict; a denial leaves the state as it was."""
    algorithm: Algorithm[Any] = ALGORITHMS[name](limit, window)
    state: Any = None
    now = start
    charged_at, charged = None, 0
    for step, cost, settle in traffic:
        now += step
        cost = min(cost, limit)
        before = copy.copy(state)
        admitted = algorithm.admit(copy.copy(state), now, cost)
        verdict = algorithm.evaluate(state, now, cost)
        assert (admitted is not None) == verdict[0]
        if admitted is None:
            assert state == before
        else:
            assert admitted == algorithm.commit(copy.copy(state), now, cost)
            assert (True, *algorithm.figures(copy.copy(admitted), now, cost)) == (*verdict[:2], verdict[3])
            state, charged_at, charged = admitted, now, cost
        if settle and charged_at is not None:  # reservations settle charges: admit must read those states
            state = algorithm.adjust(state, now, charged_at, charged, settle)


# (time step, user, cost): costs include 0 and above the limit, which take the general path.
limiter_traffic = st.lists(
    st.tuples(steps, st.sampled_from(["a", "b", "c", "d"]), st.integers(0, 14)), min_size=1, max_size=60
)


def assert_same_state(users: list[str], one: Any, *others: Any) -> None:
    """The limiters hold the same keys and answer a probe (cost 0: it charges nothing) identically."""
    for other in others:
        assert len(one) == len(other)
    for user in users:
        probe = one.check(user, "m", 0)
        count = one.get_request_count(user, "m")
        for other in others:
            assert other.check(user, "m", 0) == probe
            assert other.get_request_count(user, "m") == count


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
@settings(max_examples=150, deadline=None)
@given(limit=limits, window=windows, max_keys=st.integers(1, 5), traffic=limiter_traffic)
def test_allow_and_check_match_the_general_decide(
    name: str, limit: int, window: float, max_keys: int, traffic: list[tuple[float, str, int]]
) -> None:
    """Single rule: ``allow`` and ``check`` (the fast path) agree on every call with the backend's general
    ``_decide`` (every rule evaluated, then committed), ``check`` on every figure, and all three leave the
    same state, including which keys ``max_keys`` evicted."""
    clock = FakeClock()
    allowing, checking, general = (
        RateLimiter(limit, window, algorithm=name, clock=clock, max_keys=max_keys) for _ in range(3)
    )
    for step, user, cost in traffic:
        clock.advance(step)
        decision = general._backend._decide(user, "m", cost)  # type: ignore[attr-defined]
        assert checking.check(user, "m", cost) == decision
        assert allowing.allow(user, "m", cost) == decision.allowed
        assert_same_state(["a", "b", "c", "d"], allowing, checking, general)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
@settings(max_examples=60, deadline=None)
@given(limit=limits, window=windows, traffic=limiter_traffic)
def test_aallow_matches_check(
    name: str, limit: int, window: float, traffic: list[tuple[float, str, int]]
) -> None:
    """The async twin runs the same fast path."""
    clock = FakeClock()
    fast = RateLimiter(limit, window, algorithm=name, clock=clock)
    general = RateLimiter(limit, window, algorithm=name, clock=clock)

    async def drive() -> None:
        for step, user, cost in traffic:
            clock.advance(step)
            assert await fast.aallow(user, "m", cost) == general.check(user, "m", cost).allowed
            assert_same_state(["a", "b", "c", "d"], fast, general)

    asyncio.run(drive())


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
@settings(max_examples=60, deadline=None)
@given(limit=limits, traffic=limiter_traffic)
def test_multi_tier_allow_matches_check(name: str, limit: int, traffic: list[tuple[float, str, int]]) -> None:
    """Several rules (two tiers, one of them with two windows) take the general path: still the same."""
    clock = FakeClock()

    def make() -> MultiTierRateLimiter:
        return MultiTierRateLimiter(
            per_user_model=f"{limit}/2 seconds;{limit * 2}/10 seconds",
            per_model=f"{limit + 3}/5 seconds",
            algorithm=name,
            clock=clock,
        )

    fast, general = make(), make()
    for step, user, cost in traffic:
        clock.advance(step)
        decision = general.check(user, "m", cost)
        assert fast.allow(user, "m", cost) == (decision.allowed, decision.reason)
        assert_same_state(["a", "b", "c", "d"], fast, general)


@pytest.mark.parametrize("tier", ["per_user_model", "per_model", "per_user", "global_limit"])
def test_every_single_tier_keys_its_own_identity(tier: str, algorithm: str, clock: FakeClock) -> None:
    """The fast path builds per_user_model keys inline and the others through the tier: all stay apart
    exactly as the tier says."""
    limiter = MultiTierRateLimiter(**{tier: "2/minute"}, algorithm=algorithm, clock=clock)
    shares = {
        "per_user_model": [("a", "m"), ("a", "m")],
        "per_model": [("a", "m"), ("b", "m")],
        "per_user": [("a", "m"), ("a", "n")],
        "global_limit": [("a", "m"), ("b", "n")],
    }[tier]
    for user, model in shares:
        assert limiter.allow(user, model) == (True, None)
    allowed, reason = limiter.allow(*shares[0])
    assert not allowed and reason is not None
    assert RateLimiter(1, 60, algorithm=algorithm, clock=clock).allow("a:b", "c")
    separate = RateLimiter(1, 60, algorithm=algorithm, clock=clock)
    assert separate.allow("a:b", "c") and separate.allow("a", "b:c")
    assert not separate.allow("a", "b:c")


def test_allow_validates_like_check(algorithm: str) -> None:
    limiter = RateLimiter(5, 60, algorithm=algorithm)
    with pytest.raises(TypeError, match="user"):
        limiter.allow(1, "m")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="-1"):
        limiter.allow("u", "m", -1)
    with pytest.raises(TypeError, match="cost"):
        asyncio.run(limiter.aallow("u", "m", True))
    assert not limiter.allow("u", "m", 6)  # above the limit: denied, never counted
    assert limiter.get_request_count("u", "m") == 0


@settings(max_examples=300, deadline=None)
@given(
    limit=limits,
    window=st.sampled_from([0.3, 0.7, 1.0, 3.3, 10.0]),
    start=st.floats(0.0, 10_000.0),
    traffic=limiter_traffic,
)
def test_sliding_window_allows_once_retry_after_has_passed(
    limit: int, window: float, start: float, traffic: list[tuple[float, str, int]]
) -> None:
    """What ``check`` denies, ``allow`` admits once ``retry_after`` has passed: the fast path keeps the slack
    for the rounding between the two ways the sliding window computes that moment (from the window of the
    denial and from the next one), which differ in the last bits for times that are not round in binary."""
    clock = FakeClock(start)
    limiter = RateLimiter(limit, window, algorithm="sliding_window", clock=clock)
    for step, user, cost in traffic:
        clock.advance(step)
        decision = limiter.check(user, "m", cost)
        if not decision.allowed and 0 < cost <= limit:
            clock.advance(decision.retry_after)
            assert limiter.allow(user, "m", cost)
