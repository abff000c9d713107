"""RateLimiter semantics that every algorithm shares: allow/deny, isolation, cost, counts, reset, async."""

from __future__ import annotations

import asyncio
import math
from fractions import Fraction

import pytest

from ratelimit_middleware import Decision, MultiTierRateLimiter, RateLimitConfig, RateLimiter
from ratelimit_middleware.backends.base import Storage

from .conftest import FakeClock, held_keys


def make(algorithm: str, storage: Storage, limit: int = 3, window: float = 60) -> RateLimiter:
    return RateLimiter(limit, window, algorithm=algorithm, storage=storage)


def test_readme_quick_start_works_as_written() -> None:
    limiter = RateLimiter(max_requests=100, window_seconds=3600)
    assert limiter.allow("alice", "gpt-4")
    count = limiter.get_request_count("alice", "gpt-4")
    assert count == 1


def test_defaults_are_100_per_hour_sliding_log() -> None:
    limiter = RateLimiter()
    decision = limiter.check("alice", "gpt-4")
    assert (decision.limit, decision.window_seconds, decision.remaining) == (100, 3600.0, 99)
    assert limiter.policy.algorithm == "sliding_log"


def test_allows_up_to_the_limit_then_denies(algorithm: str, clock: FakeClock, storage: Storage) -> None:
    limiter = make(algorithm, storage)
    assert [limiter.allow("u", "m") for _ in range(5)] == [True, True, True, False, False]


def test_users_and_models_are_isolated(algorithm: str, clock: FakeClock, storage: Storage) -> None:
    limiter = make(algorithm, storage, limit=1)
    assert limiter.allow("alice", "gpt-4")
    assert not limiter.allow("alice", "gpt-4")
    assert limiter.allow("bob", "gpt-4")
    assert limiter.allow("alice", "llama")


def test_keys_cannot_collide(algorithm: str, clock: FakeClock, storage: Storage) -> None:
    limiter = make(algorithm, storage, limit=1)
    assert limiter.allow("a:b", "c")
    assert limiter.allow("a", "b:c")
    assert limiter.allow("a\x00b", "c")
    assert limiter.allow("", "a:b:c")
    assert limiter.allow("a:b:c", "")
    assert held_keys(limiter) == 5


def test_decision_fields_when_allowed(algorithm: str, clock: FakeClock, storage: Storage) -> None:
    decision = make(algorithm, storage, limit=3).check("u", "m")
    assert isinstance(decision, Decision)
    assert decision.allowed and bool(decision)
    assert (decision.limit, decision.remaining, decision.retry_after) == (3, 2, 0.0)
    assert decision.reset_after > 0
    assert (decision.tier, decision.window_seconds, decision.cost) == ("per_user_model", 60.0, 1)
    assert decision.reason is None


def test_decision_fields_when_denied(algorithm: str, clock: FakeClock, storage: Storage) -> None:
    limiter = make(algorithm, storage, limit=1)
    limiter.allow("u", "m")
    decision = limiter.check("u", "m")
    assert not decision and not decision.allowed
    assert decision.remaining == 0
    assert 0 < decision.retry_after <= 2 * 60
    assert decision.reset_after > 0
    assert decision.reason is not None
    assert "per_user_model limit of 1 requests per 1 minute" in decision.reason


def test_an_empty_limiter_is_truthy(storage: Storage) -> None:
    limiter = RateLimiter(storage=storage)
    assert bool(limiter) and (limiter or None) is limiter


def test_decision_is_immutable(clock: FakeClock, storage: Storage) -> None:
    decision = RateLimiter(storage=storage).check("u", "m")
    with pytest.raises(AttributeError):
        decision.allowed = False  # type: ignore[misc]


def test_waiting_retry_after_is_enough(algorithm: str, clock: FakeClock, storage: Storage) -> None:
    limiter = make(algorithm, storage, limit=4, window=16)
    for step in range(40):  # a bursty pattern: whenever denied, wait exactly retry_after
        decision = limiter.check("u", "m")
        if not decision.allowed:
            assert decision.retry_after > 0
            clock.advance(decision.retry_after)
            assert limiter.allow("u", "m"), f"denied right after waiting retry_after at step {step}"
        clock.advance(0.5)


def test_retry_after_is_not_much_too_long(algorithm: str, clock: FakeClock, storage: Storage) -> None:
    """Just before retry_after has passed, the request is still denied: the wait is tight."""
    limiter = make(algorithm, storage, limit=4, window=16)
    while limiter.allow("u", "m"):
        clock.advance(1)
    decision = limiter.check("u", "m")
    clock.advance(decision.retry_after - 0.01)
    assert not limiter.allow("u", "m")


def test_denied_requests_consume_nothing(algorithm: str, clock: FakeClock, storage: Storage) -> None:
    limiter = make(algorithm, storage, limit=2, window=10)
    limiter.allow("u", "m")
    limiter.allow("u", "m")
    first = limiter.check("u", "m")
    for _ in range(100):
        assert not limiter.allow("u", "m")
    assert limiter.check("u", "m").retry_after == first.retry_after
    assert limiter.get_request_count("u", "m") == 2


def test_everything_recovers_after_a_long_idle(algorithm: str, clock: FakeClock, storage: Storage) -> None:
    limiter = make(algorithm, storage, limit=2, window=10)
    while limiter.allow("u", "m"):
        pass
    clock.advance(20)
    assert limiter.get_request_count("u", "m") == 0
    assert limiter.check("u", "m").remaining == 1


def test_cost_counts_as_several_units(algorithm: str, clock: FakeClock, storage: Storage) -> None:
    limiter = make(algorithm, storage, limit=10)
    assert limiter.check("u", "m", cost=7).remaining == 3
    assert not limiter.allow("u", "m", cost=4)
    assert limiter.allow("u", "m", cost=3)
    assert limiter.get_request_count("u", "m") == 10


def test_cost_above_the_limit_can_never_pass(algorithm: str, clock: FakeClock, storage: Storage) -> None:
    limiter = make(algorithm, storage, limit=10)
    decision = limiter.check("u", "m", cost=11)
    assert not decision.allowed
    assert math.isinf(decision.retry_after)
    assert decision.reason is not None and "can never be allowed" in decision.reason
    assert "11" in decision.reason
    assert limiter.get_request_count("u", "m") == 0
    assert held_keys(limiter) == 0


def test_cost_zero_is_allowed_and_stores_nothing(algorithm: str, clock: FakeClock, storage: Storage) -> None:
    limiter = make(algorithm, storage, limit=1)
    assert limiter.allow("u", "m", cost=0)
    assert held_keys(limiter) == 0
    limiter.allow("u", "m")
    assert limiter.allow("u", "m", cost=0)
    assert not limiter.allow("u", "m")


def test_large_costs_take_one_entry(algorithm: str, clock: FakeClock, storage: Storage) -> None:
    limiter = make(algorithm, storage, limit=1_000_000)
    assert limiter.allow("u", "m", cost=50_000)
    assert limiter.get_request_count("u", "m") == 50_000
    assert held_keys(limiter) == 1


def test_max_requests_zero_denies_everything(algorithm: str, clock: FakeClock, storage: Storage) -> None:
    limiter = make(algorithm, storage, limit=0)
    decision = limiter.check("u", "m")
    assert not decision.allowed
    assert decision.limit == 0
    assert math.isinf(decision.retry_after)


def test_get_request_count_follows_usage(algorithm: str, clock: FakeClock, storage: Storage) -> None:
    limiter = make(algorithm, storage, limit=5)
    assert limiter.get_request_count("u", "m") == 0
    for expected in range(1, 4):
        limiter.allow("u", "m")
        assert limiter.get_request_count("u", "m") == expected
    assert limiter.get_request_count("other", "m") == 0


def test_reset_forgets_one_key(algorithm: str, clock: FakeClock, storage: Storage) -> None:
    limiter = make(algorithm, storage, limit=1)
    limiter.allow("u", "m")
    limiter.allow("v", "m")
    limiter.reset("u", "m")
    assert limiter.allow("u", "m")
    assert not limiter.allow("v", "m")
    limiter.reset("nobody", "m")  # forgetting an unknown key is fine


def test_multi_window_limits_are_checked_together(algorithm: str, clock: FakeClock, storage: Storage) -> None:
    limiter = RateLimiter(limit="2/second;3/minute", algorithm=algorithm, storage=storage)
    assert limiter.allow("u", "m") and limiter.allow("u", "m")
    decision = limiter.check("u", "m")
    assert not decision.allowed and decision.window_seconds == 1.0
    clock.advance(3)
    assert limiter.allow("u", "m")
    decision = limiter.check("u", "m")
    assert not decision.allowed and decision.window_seconds == 60.0
    assert decision.limit == 3


def test_counts_address_each_window(algorithm: str, clock: FakeClock, storage: Storage) -> None:
    limiter = RateLimiter(limit="3/2 seconds;100/day", algorithm=algorithm, storage=storage)
    for _ in range(3):
        limiter.check("u", "m")
    clock.advance(5)  # two short windows: every algorithm has forgotten them
    assert limiter.get_request_count("u", "m") == 0  # the first window, as before
    assert limiter.get_request_count("u", "m", window=2) == 0
    assert limiter.get_request_count("u", "m", "per_user_model", window=86400) == 3
    assert asyncio.run(limiter.aget_request_count("u", "m", window=86400.0)) == 3
    with pytest.raises(ValueError, match=r"window=60: per_user_model has no requests window .*: 2, 86400"):
        limiter.get_request_count("u", "m", window=60)


def test_multi_window_denial_charges_no_window(clock: FakeClock, storage: Storage) -> None:
    limiter = RateLimiter(limit="5/second;2/minute", storage=storage)
    limiter.allow("u", "m", cost=2)
    assert not limiter.allow("u", "m")  # denied by the minute window
    clock.advance(61)
    assert limiter.allow("u", "m", cost=2)  # nothing was charged to the second window meanwhile


def test_limit_keyword_takes_config_or_string(clock: FakeClock, storage: Storage) -> None:
    assert RateLimiter(limit=RateLimitConfig(1, 5), storage=storage).check("u", "m").limit == 1
    assert RateLimiter(limit="7/hour", storage=storage).check("u", "m").limit == 7
    with pytest.raises(TypeError, match="not both"):
        RateLimiter(10, limit="7/hour")


def test_async_twins_share_state(algorithm: str, clock: FakeClock, storage: Storage) -> None:
    limiter = make(algorithm, storage, limit=2)

    async def scenario() -> None:
        assert await limiter.aallow("u", "m")
        assert limiter.allow("u", "m")
        assert not await limiter.aallow("u", "m")
        assert await limiter.aget_request_count("u", "m") == 2
        decision = await limiter.acheck("u", "m")
        assert not decision.allowed
        await limiter.areset("u", "m")
        assert await limiter.aallow("u", "m")

    asyncio.run(scenario())


def test_async_gather_admits_exactly_the_limit(algorithm: str, clock: FakeClock, storage: Storage) -> None:
    limiter = make(algorithm, storage, limit=25)

    async def scenario() -> list[bool]:
        return await asyncio.gather(*(limiter.aallow("u", "m") for _ in range(100)))

    assert sum(asyncio.run(scenario())) == 25


def test_counts_read_every_rule_even_two_windows_of_one_length(clock: FakeClock, storage: Storage) -> None:
    limiter = MultiTierRateLimiter(per_user_model="3/minute;1000/minute", per_model="5/hour", storage=storage)
    for _ in range(5):
        limiter.allow("u", "m")
    counted = [(rule.limit, rule.seconds, used) for rule, used in limiter.counts("u", "m")]
    assert counted == [(3, 60.0, 3), (1000, 60.0, 3), (5, 3600.0, 3)]


def test_a_clock_reading_any_real_number_is_taken_as_seconds(algorithm: str) -> None:
    """A clock of Fractions (or numpy numbers) reads real numbers: taken as float seconds, not refused."""
    now = [Fraction(1, 3)]
    limiter = RateLimiter(1, 60, algorithm=algorithm, clock=lambda: now[0])
    assert [limiter.allow("u", "m") for _ in range(2)] == [True, False]
    now[0] += 3600
    assert limiter.allow("u", "m")


@pytest.mark.parametrize("reading", [math.inf, math.nan, -math.inf, "soon", None])
def test_a_clock_reading_no_finite_time_is_an_error_and_the_limit_holds_after_it(
    algorithm: str, clock: FakeClock, storage: Storage, reading: object
) -> None:
    """One infinite reading pinned the in-memory time (it never goes back) at infinity, and NaN compares false
    with every time: either admitted without limit."""
    limiter = make(algorithm, storage, limit=2)
    assert [limiter.allow("u", "m") for _ in range(2)] == [True, True]
    good, clock.now = clock.now, reading  # type: ignore[assignment]
    with pytest.raises(ValueError, match=r"read .*: a clock must return a finite number of seconds"):
        limiter.check("u", "m")
    clock.now = good + 1
    assert [limiter.allow("u", "m"), limiter.allow("fresh", "m"), limiter.allow("fresh", "m")] == [
        False,
        True,
        True,
    ]
    assert not limiter.allow("fresh", "m")


def test_a_clock_must_be_a_plain_function_of_no_arguments() -> None:
    from ratelimit_middleware import MemoryStorage
    from ratelimit_middleware.backends.redis import CircuitBreaker, RedisStorage

    async def later() -> float:
        return 0.0

    for make_one in (
        lambda clock: MemoryStorage(clock=clock),
        lambda clock: RedisStorage("redis://127.0.0.1:1", clock=clock),
        lambda clock: CircuitBreaker(clock=clock),
        lambda clock: RateLimiter(limit="1/minute", clock=clock),
    ):
        with pytest.raises(TypeError, match="clock must be a plain function, not async"):
            make_one(later)
        with pytest.raises(TypeError, match=r"clock is called as clock\(\), which .* cannot take"):
            make_one(lambda now: now)
        with pytest.raises(TypeError, match="clock must be callable, got 5"):
            make_one(5)
