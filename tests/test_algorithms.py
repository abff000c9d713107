"""Exact behaviour of each algorithm at its boundaries, with an injected clock."""

from __future__ import annotations

import pytest

from ratelimit_middleware import RateLimiter
from ratelimit_middleware.algorithms.gcra import GCRA
from ratelimit_middleware.backends.base import Storage

from .conftest import FakeClock


def test_sliding_log_example_from_the_spec(clock: FakeClock, storage: Storage) -> None:
    """2 per 10 s, requests at t=0 and t=1: denied at t=5 with retry_after 5, allowed at t=10."""
    clock.now = 0.0
    limiter = RateLimiter(2, 10, storage=storage)
    assert limiter.allow("u", "m")
    clock.now = 1.0
    assert limiter.allow("u", "m")
    clock.now = 5.0
    decision = limiter.check("u", "m")
    assert not decision.allowed
    assert decision.retry_after == 5.0
    assert decision.reset_after == 6.0
    clock.now = 10.0
    assert limiter.allow("u", "m")


def test_sliding_log_window_is_half_open(clock: FakeClock, storage: Storage) -> None:
    """A request at t counts in [t, t + window): still counted just before, gone exactly at the end."""
    clock.now = 0.0
    limiter = RateLimiter(1, 10, storage=storage)
    limiter.allow("u", "m")
    clock.now = 9.999
    assert not limiter.allow("u", "m")
    clock.now = 10.0
    assert limiter.allow("u", "m")


def test_sliding_log_retry_after_accounts_for_cost(clock: FakeClock, storage: Storage) -> None:
    clock.now = 0.0
    limiter = RateLimiter(10, 10, storage=storage)
    for t, cost in [(0, 3), (1, 3), (2, 4)]:
        clock.now = float(t)
        assert limiter.allow("u", "m", cost=cost)
    clock.now = 3.0
    # 6 units must leave before 6 more fit: the entries of t=0 and t=1, so the wait ends at t=11.
    assert limiter.check("u", "m", cost=6).retry_after == 8.0
    assert limiter.check("u", "m", cost=3).retry_after == 7.0


def test_fixed_window_resets_at_aligned_boundaries(clock: FakeClock, storage: Storage) -> None:
    clock.now = 0.0
    limiter = RateLimiter(2, 10, algorithm="fixed_window", storage=storage)
    clock.now = 9.0
    assert limiter.allow("u", "m") and limiter.allow("u", "m")
    decision = limiter.check("u", "m")
    assert not decision.allowed and decision.retry_after == 1.0
    clock.now = 10.0
    assert limiter.allow("u", "m") and limiter.allow("u", "m")  # the boundary burst fixed windows allow
    assert not limiter.allow("u", "m")


def test_gcra_bursts_the_limit_then_replenishes_evenly(clock: FakeClock, storage: Storage) -> None:
    clock.now = 0.0
    limiter = RateLimiter(4, 8, algorithm="gcra", storage=storage)
    assert all(limiter.allow("u", "m") for _ in range(4))
    decision = limiter.check("u", "m")
    assert not decision.allowed and decision.retry_after == 2.0  # one unit every 8 / 4 seconds
    clock.now = 2.0
    assert limiter.allow("u", "m")
    assert not limiter.allow("u", "m")
    clock.now = 8.0
    assert limiter.check("u", "m").remaining == 2  # 3 replenished, 1 taken


def test_gcra_remaining_and_reset_after(clock: FakeClock, storage: Storage) -> None:
    clock.now = 0.0
    limiter = RateLimiter(10, 10, algorithm="gcra", storage=storage)
    decision = limiter.check("u", "m", cost=4)
    assert decision.remaining == 6
    assert decision.reset_after == 4.0  # fully replenished 4 units * 1 s later


def test_gcra_limit_that_does_not_divide_the_window(clock: FakeClock, storage: Storage) -> None:
    clock.now = 0.0
    limiter = RateLimiter(3, 10, algorithm="gcra", storage=storage)
    assert [limiter.allow("u", "m") for _ in range(4)] == [True, True, True, False]


def test_sliding_window_weights_the_previous_window(clock: FakeClock, storage: Storage) -> None:
    clock.now = 0.0
    limiter = RateLimiter(10, 10, algorithm="sliding_window", storage=storage)
    clock.now = 5.0
    assert limiter.allow("u", "m", cost=10)
    clock.now = 12.5  # 25% into the next window: 10 * 0.75 = 7.5 still counted
    assert limiter.get_request_count("u", "m") == 8  # rounded up
    assert limiter.allow("u", "m", cost=2)
    decision = limiter.check("u", "m", cost=1)
    assert not decision.allowed
    # 10 * (1 - f) + 2 + 1 <= 10 from f = 0.3, at t = 13
    assert decision.retry_after == pytest.approx(0.5)


def test_sliding_window_denial_in_the_current_window_waits_for_the_next(
    clock: FakeClock, storage: Storage
) -> None:
    clock.now = 0.0
    limiter = RateLimiter(4, 10, algorithm="sliding_window", storage=storage)
    clock.now = 2.0
    for _ in range(4):
        assert limiter.allow("u", "m")
    decision = limiter.check("u", "m")
    # Next window starts at 10 with previous = 4; 4 * (1 - f) <= 3 from f = 0.25: t = 12.5
    assert decision.retry_after == pytest.approx(10.5)
    assert decision.reset_after == pytest.approx(18.0)


@pytest.mark.parametrize("algorithm", ["sliding_log", "fixed_window", "gcra", "sliding_window"])
def test_clock_default_is_monotonic(algorithm: str) -> None:
    limiter = RateLimiter(1, 3600, algorithm=algorithm)
    assert limiter.allow("u", "m")
    assert not limiter.allow("u", "m")
    assert 0 < limiter.check("u", "m").retry_after <= 7200


# -- waiting retry_after is always enough, at any clock and window ---------------------------------------


def test_sliding_log_retry_after_is_enough_at_a_large_clock(clock: FakeClock, storage: Storage) -> None:
    """The wait was `t + window - now` while the window tests `t > now - window`: at this clock the retry
    fell one ulp short and was denied again, with a retry_after of 0.0."""
    limiter = RateLimiter(1, 3600, storage=storage)
    clock.now = 130171.52032118298  # time.monotonic() after about 36 hours of uptime
    assert limiter.allow("u", "m")
    clock.now = 130654.23868315606
    denied = limiter.check("u", "m")
    assert not denied.allowed
    clock.advance(denied.retry_after)
    assert limiter.check("u", "m").allowed


def test_fixed_window_retry_after_reaches_the_next_decimal_window(clock: FakeClock, storage: Storage) -> None:
    """`(k + 1) * 0.1` rounds below the boundary `now // 0.1` sees: the retry landed in the old window."""
    limiter = RateLimiter(1, 0.1, algorithm="fixed_window", storage=storage)
    clock.now = 26119.4055
    assert limiter.allow("u", "m")
    clock.advance(0.01)
    denied = limiter.check("u", "m")
    assert not denied.allowed and denied.retry_after > 0
    clock.advance(denied.retry_after)
    assert limiter.check("u", "m").allowed


def test_gcra_admits_the_whole_limit_at_a_unix_clock(clock: FakeClock, storage: Storage) -> None:
    """Each charge rounds `tat` to the floats near the clock (0.24 us apart at Unix times), far coarser than a
    slack relative to the window: a request of the whole limit on an empty bucket was denied, for good."""
    limiter = RateLimiter(12, 0.7, algorithm="gcra", storage=storage)
    clock.now = 1750665899.682213
    assert limiter.check("u", "m", 12).allowed
    clock.now = 1750000000.25
    assert [limiter.allow("v", "m") for _ in range(13)] == [True] * 12 + [False]


def test_gcra_overage_saturates_at_an_empty_bucket(clock: FakeClock, storage: Storage) -> None:
    """An overage settled after the fact fills the bucket at most (as the window counters saturate at the
    limit): the key is full again one window later, not a hundred."""
    limiter = RateLimiter(tokens="1000/minute", algorithm="gcra", storage=storage)
    clock.now = 6000.0
    limiter.reserve("u", "m", input_tokens=10).settle(10, 100_000)
    assert limiter.get_request_count("u", "m", unit="tokens") == 1000
    clock.advance(60)
    assert limiter.get_request_count("u", "m", unit="tokens") == 0
    assert limiter.reserve("u", "m", input_tokens=1000).allowed


def test_gcra_refund_gives_back_only_what_has_not_drained(clock: FakeClock, storage: Storage) -> None:
    """10 tokens per 10 s: 10 reserved at t=0, 5 used at t=5, then the first settled to 0. By t=5 half of the
    first charge has drained; the refund gives back the other half, not 10 off the end of the bucket (which
    by then holds the second charge: it would be erased). As if 0 then 5 had been charged: 5 in the bucket."""
    limiter = RateLimiter(tokens="10/10 seconds", algorithm="gcra", storage=storage)
    clock.now = 1000.0
    first = limiter.reserve("u", "m", input_tokens=10)
    clock.advance(5)
    second = limiter.reserve("u", "m", input_tokens=5)
    assert first.allowed and second.allowed
    second.settle(5, 0)
    first.settle(0, 0)
    assert limiter.get_request_count("u", "m", unit="tokens") == 5
    assert not limiter.reserve("u", "m", input_tokens=10).allowed
    assert limiter.reserve("u", "m", input_tokens=5).allowed


def test_gcra_rounding_allowance_stays_below_an_interval(clock: FakeClock, storage: Storage) -> None:
    """The slack for the rounding of sums at the clock's magnitude (``now * 2**-52`` per sum) is 0.4 ms at
    Unix times: four intervals of 1,000 requests per 0.1 s, which admitted 1,004 at once. At most half an
    interval, the whole limit still fits in one request and one more unit does not."""
    limiter = RateLimiter(1000, 0.1, algorithm="gcra", storage=storage)
    clock.now = 1_767_000_000.0
    assert limiter.check("u", "m", 1000).allowed
    assert not limiter.check("u", "m").allowed
    assert limiter.get_request_count("u", "m") == 1000


def test_gcra_a_burst_at_a_tiny_interval_is_off_by_a_unit_at_most() -> None:
    """Unit requests at one instant: each sum rounds at the clock's magnitude, which no slack can undo at an
    interval of 0.1 ms, but the allowance no longer adds whole intervals of its own (1,004 of 1,000)."""
    now = 1_767_000_000.0
    for limit, window in [(100, 1.0), (1000, 1.0), (1000, 0.1), (500, 0.05)]:
        gcra = GCRA(limit, window)
        state: float | None = None
        admitted = 0
        while admitted <= limit + 10:
            state = gcra.admit(state, now, 1)
            if state is None:
                break
            admitted += 1
        assert limit <= admitted <= limit + 1
