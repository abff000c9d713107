"""MultiTierRateLimiter: tiers checked together, all or nothing, naming the tier that denied."""

from __future__ import annotations

import pytest

from ratelimit_middleware import MultiTierRateLimiter, RateLimitConfig
from ratelimit_middleware.backends.base import Storage

from .conftest import FakeClock


def test_readme_multitier_example_works_as_written() -> None:
    limiter = MultiTierRateLimiter(
        per_user_model=RateLimitConfig(100, 3600),
        per_model=RateLimitConfig(10000, 3600),
    )
    allowed, reason = limiter.allow("alice", "gpt-4")
    assert allowed is True and reason is None


def test_allow_is_true_only_when_allowed_and_still_unpacks(clock: FakeClock) -> None:
    """A plain tuple of two is always true: ``if limiter.allow(...)`` let every request through."""
    limiter = MultiTierRateLimiter(per_user_model="1/minute", clock=clock)
    assert limiter.allow("alice", "gpt-4")
    denied = limiter.allow("alice", "gpt-4")
    assert not denied
    allowed, reason = denied
    assert allowed is False and reason is not None and "per_user_model" in reason
    assert denied.reason == reason


def test_per_model_tier_is_shared_by_all_users(algorithm: str, clock: FakeClock, storage: Storage) -> None:
    limiter = MultiTierRateLimiter(
        per_user_model="10/minute", per_model="3/minute", algorithm=algorithm, storage=storage
    )
    assert limiter.allow("alice", "gpt-4")[0]
    assert limiter.allow("bob", "gpt-4")[0]
    assert limiter.allow("carol", "gpt-4")[0]
    allowed, reason = limiter.allow("dave", "gpt-4")
    assert not allowed
    assert reason is not None and "per_model" in reason and "3 requests per 1 minute" in reason
    assert "per_user_model" not in reason
    assert limiter.allow("dave", "llama")[0]


def test_denial_by_one_tier_charges_no_other(algorithm: str, clock: FakeClock, storage: Storage) -> None:
    limiter = MultiTierRateLimiter(
        per_user_model="2/minute", per_model="1/minute", algorithm=algorithm, storage=storage
    )
    assert limiter.allow("alice", "gpt-4")[0]
    assert not limiter.allow("alice", "gpt-4")[0]  # per_model denies
    assert limiter.get_request_count("alice", "gpt-4") == 1  # per_user_model was not charged
    assert limiter.get_request_count("alice", "gpt-4", tier="per_model") == 1


def test_denial_by_a_later_window_charges_earlier_tiers_nothing(clock: FakeClock, storage: Storage) -> None:
    limiter = MultiTierRateLimiter(per_user_model="5/minute", global_limit="1/second;2/hour", storage=storage)
    limiter.allow("a", "m")
    clock.advance(2)
    limiter.allow("b", "m")
    clock.advance(2)
    allowed, reason = limiter.allow("c", "m")
    assert not allowed and reason is not None and "global" in reason and "2 requests per 1 hour" in reason
    assert limiter.get_request_count("c", "m") == 0


def test_per_user_tier_spans_models(clock: FakeClock, storage: Storage) -> None:
    limiter = MultiTierRateLimiter(per_user="2/minute", storage=storage)
    assert limiter.allow("alice", "gpt-4")[0]
    assert limiter.allow("alice", "llama")[0]
    allowed, reason = limiter.allow("alice", "mistral")
    assert not allowed and reason is not None and "per_user " in reason
    assert limiter.allow("bob", "gpt-4")[0]


def test_global_tier_limits_all_traffic(clock: FakeClock, storage: Storage) -> None:
    limiter = MultiTierRateLimiter(global_limit=RateLimitConfig(2, 60), storage=storage)
    assert limiter.allow("a", "x")[0]
    assert limiter.allow("b", "y")[0]
    assert not limiter.allow("c", "z")[0]


def test_check_returns_the_binding_tier(clock: FakeClock, storage: Storage) -> None:
    limiter = MultiTierRateLimiter(per_user_model="10/minute", per_model="3/minute", storage=storage)
    decision = limiter.check("alice", "gpt-4")
    assert decision.allowed and decision.tier == "per_model" and decision.remaining == 2
    limiter.check("bob", "gpt-4")
    limiter.check("carol", "gpt-4")
    decision = limiter.check("alice", "gpt-4")
    assert not decision.allowed and decision.tier == "per_model" and decision.limit == 3


def test_binding_denial_is_the_longest_wait(clock: FakeClock, storage: Storage) -> None:
    limiter = MultiTierRateLimiter(per_user_model="1/second", per_model="1/hour", storage=storage)
    limiter.allow("a", "m")
    decision = limiter.check("a", "m")
    assert decision.tier == "per_model"
    assert decision.retry_after == pytest.approx(3600)


def test_ties_name_the_most_specific_tier(clock: FakeClock, storage: Storage) -> None:
    limiter = MultiTierRateLimiter(per_user_model="1/minute", per_model="1/minute", storage=storage)
    limiter.allow("a", "m")
    assert limiter.check("a", "m").tier == "per_user_model"


def test_reset_defaults_to_user_tiers_and_can_name_shared_ones(clock: FakeClock, storage: Storage) -> None:
    limiter = MultiTierRateLimiter(per_user_model="1/minute", per_model="2/minute", storage=storage)
    limiter.allow("a", "m")
    limiter.allow("b", "m")
    limiter.reset("a", "m")
    assert not limiter.allow("a", "m")[0]  # per_model still holds 2
    limiter.reset("a", "m", tier="per_model")
    assert limiter.allow("a", "m")[0]
    with pytest.raises(ValueError, match="per_user"):
        limiter.reset("a", "m", tier="per_user")  # not configured here
    with pytest.raises(ValueError, match="unknown tier"):
        limiter.get_request_count("a", "m", tier="bogus")


def test_needs_at_least_one_tier() -> None:
    with pytest.raises(ValueError, match="at least one tier"):
        MultiTierRateLimiter()


def test_async_multitier(clock: FakeClock, storage: Storage) -> None:
    import asyncio

    limiter = MultiTierRateLimiter(per_user_model="1/minute", storage=storage)

    async def scenario() -> tuple[tuple[bool, str | None], tuple[bool, str | None]]:
        return await limiter.aallow("a", "m"), await limiter.aallow("a", "m")

    first, second = asyncio.run(scenario())
    assert first == (True, None)
    assert not second[0] and second[1] is not None and "per_user_model" in second[1]
