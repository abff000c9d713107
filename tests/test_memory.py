"""Memory stays bounded: idle keys are swept inside calls, max_keys caps the store, LRU keys go first."""

from __future__ import annotations

import tracemalloc

import pytest

from ratelimit_middleware import MultiTierRateLimiter, RateLimiter
from ratelimit_middleware.backends.memory import DEFAULT_MAX_KEYS

from .conftest import FakeClock


def test_idle_keys_are_swept_without_a_thread(algorithm: str, clock: FakeClock) -> None:
    limiter = RateLimiter(5, 10, algorithm=algorithm, clock=clock)
    for i in range(1000):
        limiter.allow(f"user-{i}", "m")
    assert len(limiter) == 1000
    clock.advance(30)  # every key is idle now, for every algorithm
    for _ in range(1000 + 64):  # one active user keeps calling; each call sweeps one idle key on average
        limiter.allow("active", "m")
        clock.advance(0.001)
    assert len(limiter) == 1


def test_new_keys_reclaim_idle_ones(algorithm: str, clock: FakeClock) -> None:
    limiter = RateLimiter(5, 10, algorithm=algorithm, clock=clock)
    for round_ in range(10):  # a churn of one-off users, each round after the last went idle
        for i in range(200):
            limiter.allow(f"user-{round_}-{i}", "m")
        clock.advance(30)
    assert len(limiter) <= 400


def test_live_keys_are_never_swept(algorithm: str, clock: FakeClock) -> None:
    limiter = RateLimiter(1, 100, algorithm=algorithm, clock=clock)
    for i in range(300):
        limiter.allow(f"user-{i}", "m")
    for _ in range(600):
        limiter.allow("other", "m")
    clock.advance(1)
    assert not any(limiter.allow(f"user-{i}", "m") for i in range(300))


def test_max_keys_caps_the_store(algorithm: str, clock: FakeClock) -> None:
    limiter = RateLimiter(5, 3600, algorithm=algorithm, clock=clock, max_keys=100)
    for i in range(1000):
        limiter.allow(f"user-{i}", "m")
        assert len(limiter) <= 100
    assert len(limiter) == 100


def test_max_keys_evicts_least_recently_used(clock: FakeClock) -> None:
    limiter = RateLimiter(1, 3600, clock=clock, max_keys=3)
    for user in ["a", "b", "c"]:
        limiter.allow(user, "m")
    assert not limiter.allow("a", "m")  # a is now the most recently used (denials count as use)
    limiter.allow("d", "m")  # evicts b, the least recently used
    assert not limiter.allow("a", "m")
    assert not limiter.allow("c", "m")
    assert limiter.allow("b", "m")  # b was forgotten: it starts afresh


def test_max_keys_evicts_idle_keys_before_live_ones(clock: FakeClock) -> None:
    limiter = RateLimiter(1, 10, clock=clock, max_keys=3)
    limiter.allow("old", "m")
    clock.advance(20)  # "old" is idle now
    limiter.allow("a", "m")
    limiter.allow("b", "m")
    limiter.allow("c", "m")  # over the cap: "old" goes, not a live key
    assert len(limiter) == 3
    assert not any(limiter.allow(user, "m") for user in "abc")


def test_max_keys_counts_every_tier(clock: FakeClock) -> None:
    limiter = MultiTierRateLimiter(per_user_model="5/hour", per_model="1000/hour", clock=clock, max_keys=50)
    for i in range(500):
        limiter.allow(f"user-{i}", "gpt-4")
    assert len(limiter) <= 50
    assert limiter.get_request_count("x", "gpt-4", tier="per_model") == 500  # the shared key survives


def test_max_keys_never_evicts_the_slots_of_requests_in_flight(clock: FakeClock) -> None:
    """An evicted slot count would let its user take ``max_concurrent`` more, and the old request's release
    would then undercount the new one: counts of requests in flight are kept, bounded by those requests."""
    limiter = RateLimiter(max_concurrent=1, clock=clock, max_keys=5)
    held = [limiter.reserve(f"user-{index}", "m") for index in range(8)]  # more in flight than max_keys
    assert all(reservation.allowed for reservation in held)
    assert not any(limiter.reserve(f"user-{index}", "m").allowed for index in range(8))  # all still taken
    held[0].cancel()
    assert limiter.get_request_count("user-0", "m", unit="concurrent") == 0
    assert limiter.reserve("user-0", "m").allowed


def test_default_max_keys_is_large() -> None:
    assert DEFAULT_MAX_KEYS >= 1_000_000


@pytest.mark.parametrize(
    ("algorithm", "budget"),
    [("gcra", 200), ("fixed_window", 200), ("sliding_window", 200), ("sliding_log", 200 + 16)],
)
def test_bytes_per_key_within_budget(algorithm: str, budget: int, clock: FakeClock) -> None:
    """Every structure the limiter allocates per key, measured with tracemalloc (user ids excluded)."""
    users = [f"user-{i}" for i in range(20_000)]
    limiter = RateLimiter(100, 3600, algorithm=algorithm, clock=clock)
    limiter.allow("warm-up", "m")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for user in users:
            limiter.allow(user, "m")
        per_key = (tracemalloc.get_traced_memory()[0] - before) / len(users)
    finally:
        tracemalloc.stop()
    assert per_key <= budget, f"{algorithm}: {per_key:.0f} bytes per key"


@pytest.mark.parametrize(
    ("cost", "entry"),
    [(1, 8), (3, 16)],  # costs of 1: times only; other costs: (time, cumulative cost)
)
def test_sliding_log_bytes_per_request(cost: int, entry: int, clock: FakeClock) -> None:
    limiter = RateLimiter(1_000_000, 3600, clock=clock)
    limiter.allow("u", "m", cost=cost)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(10_000):
            clock.advance(0.001)
            limiter.allow("u", "m", cost=cost)
        per_request = (tracemalloc.get_traced_memory()[0] - before) / 10_000
    finally:
        tracemalloc.stop()
    assert per_request <= entry * 1.15, f"{per_request:.1f} bytes per request"  # growth slack


@pytest.mark.parametrize("cost", [1, 2])  # the log of times, and the log of pairs
def test_sliding_log_compacts_expired_entries(cost: int, clock: FakeClock) -> None:
    clock.now = 0.0
    limiter = RateLimiter(1000, 1, clock=clock)
    for _ in range(5000):
        assert limiter.allow("u", "m", cost=cost)
        clock.advance(0.01)
    log = limiter._backend._stores[0][("u", "m")]
    entries = len(log) // 16 if isinstance(log, bytearray) else len(log)
    assert entries <= 100 + 64  # 100 live entries plus at most one batch of expired ones


@pytest.mark.parametrize("method", ["allow", "check", "reserve"])
def test_a_time_older_than_one_used_never_rewrites_a_state(
    algorithm: str, clock: FakeClock, method: str
) -> None:
    """A thread that read the clock before waiting for the lock, or a clock that steps back, decides at the
    latest time already used: its older time must not turn a full window into a fresh one."""
    limiter = RateLimiter(3, 10, algorithm=algorithm, clock=clock)

    def admitted() -> bool:
        if method == "reserve":
            return limiter.reserve("u", "m").allowed
        return bool(getattr(limiter, method)("u", "m"))

    clock.now = 10.0  # the start of a fixed window
    assert [admitted() for _ in range(3)] == [True, True, True]
    clock.now = 9.9  # the window before, for a fixed window
    assert not admitted()
    clock.now = 10.0
    assert not admitted()
    assert limiter.get_request_count("u", "m") == 3


def test_limiters_on_one_storage_share_the_rules_they_state_alike(clock: FakeClock) -> None:
    """As on one Redis: a rule's counter is named by the rule, so limiters bound to one storage share it."""
    from ratelimit_middleware import MemoryStorage

    storage = MemoryStorage(clock=clock)
    first = MultiTierRateLimiter(per_user="3/minute", per_model="100/minute", storage=storage)
    second = MultiTierRateLimiter(per_user="3/minute", per_model="50/minute", storage=storage)
    assert first.allow("u", "a")[0] and first.allow("u", "a")[0]
    assert second.allow("u", "b")[0] and not second.allow("u", "b")[0]  # the user's third, then none
    assert second.get_request_count("u", "b", tier="per_model") == 1  # another limit: its own counter
    assert RateLimiter(limit="3/minute", clock=clock).allow("u", "m")  # its own storage: shares nothing


def test_a_gcra_overage_does_not_hold_back_the_sweep(clock: FakeClock) -> None:
    """A key settled with a huge overage sat many windows ahead at the least recently used end, where the
    sweep stops at the first live key: every idle key behind it stayed. Saturated at one window, it goes."""
    limiter = RateLimiter(tokens="1000/minute", algorithm="gcra", clock=clock)
    limiter.reserve("heavy", "m", input_tokens=10).settle(10, 100_000)
    for minute in range(5):
        for i in range(300):
            limiter.reserve(f"user-{minute}-{i}", "m", input_tokens=1).settle(1, 0)
        clock.advance(60)
    assert len(limiter) <= 600


def test_a_storage_keeps_counts_for_limiters_made_later_and_drops_idle_orphans(clock: FakeClock) -> None:
    """Limiters made per request on one storage count on (as on Redis); the stores of rules no limiter
    states any more go once their states are idle."""
    import gc

    from ratelimit_middleware import MemoryStorage

    storage = MemoryStorage(clock=clock)
    made = [RateLimiter(limit="3/minute", storage=storage).allow("alice", "m") for _ in range(5)]
    gc.collect()
    assert made == [True, True, True, False, False]  # each limiter gone after its request, the count stays
    kept = RateLimiter(limit="5/minute", storage=storage)
    for limit in range(10, 60):
        RateLimiter(limit=f"{limit}/minute", storage=storage).allow("u", "m")
    gc.collect()
    clock.advance(120)  # every state is idle
    for _ in range(64 * 8):  # the storage's sweeps (every 64 decisions) reach 8 orphans each
        kept.allow("u", "m")
    assert {name[3] for name in storage._stores} == {5}  # only the live limiter's rule is left


def test_max_keys_must_hold_one_request_s_keys(clock: FakeClock) -> None:
    from ratelimit_middleware import MemoryStorage

    with pytest.raises(ValueError, match="max_keys=2 cannot hold one user's keys for 3 rules"):
        MultiTierRateLimiter(
            per_user_model="2/minute;10/hour", per_model="5/minute", storage=MemoryStorage(max_keys=2)
        )


def test_max_keys_of_one_serves_a_single_rule_and_no_decision_evicts_its_own_charge(clock: FakeClock) -> None:
    from ratelimit_middleware import MemoryStorage

    single = RateLimiter(limit="1/minute", storage=MemoryStorage(clock=clock, max_keys=1))
    assert single.allow("a", "m") and single.allow("b", "m") and single.allow("a", "m")  # a was evicted
    with pytest.raises(ValueError, match="max_keys=2 cannot hold one user's keys for 2 rules"):
        RateLimiter(limit="1/minute;100/hour", storage=MemoryStorage(clock=clock, max_keys=2))
    two = RateLimiter(limit="1/minute;100/hour", storage=MemoryStorage(clock=clock, max_keys=3))
    assert [two.allow(user, "m") for user in ("a", "b", "b", "a", "a")] == [True, True, False, True, False]


def test_limiters_made_per_request_still_sweep_their_storage(clock: FakeClock) -> None:
    """No limiter of its own reaches 64 decisions: the storage counts them, so its idle states still go."""
    import gc

    from ratelimit_middleware import MemoryStorage

    storage = MemoryStorage(clock=clock)
    for customer in range(200):
        RateLimiter(limit=f"{10 + customer % 20}/minute", storage=storage).allow(f"u{customer}", "m")
    gc.collect()
    clock.advance(120)
    for customer in range(64 * 8):
        RateLimiter(limit="5/minute", storage=storage).allow(f"late{customer}", "m")
        clock.advance(0.5)
    gc.collect()
    assert sum(len(store.states) for store in storage._stores.values()) < 200  # the early keys went


def test_limiters_that_alternate_on_one_storage_are_all_swept(clock: FakeClock) -> None:
    """Sweeps go round every store of the storage: the limiter whose turn never comes up is swept too."""
    from ratelimit_middleware import MemoryStorage

    storage = MemoryStorage(clock=clock)
    app_wide = RateLimiter(limit="5/minute", storage=storage)
    route = RateLimiter(limit="7/minute", storage=storage)
    for user in range(5000):
        app_wide.allow(f"u{user}", "m")
    clock.advance(120)
    for turn in range(3200):
        (app_wide if turn % 2 else route).allow("active", "m")
    assert len(app_wide) < 2000  # idle keys went (all 5,000 stayed when only the other limiter swept)


def test_a_sweep_never_drops_a_log_entry_the_window_still_counts(clock: FakeClock) -> None:
    """At 1/3 and then 1/3 + 1 (rounded), the entry is live (`1/3 > now - 1`), yet `1/3 + 1 <= now` held:
    idle by a rounding, another user's first request swept it and the user was admitted past the limit."""
    clock.now = 1 / 3
    limiter = RateLimiter(limit="1/second", algorithm="sliding_log", clock=clock)
    assert limiter.allow("a", "m")
    clock.now = 1 / 3 + 1.0
    assert limiter.allow("b", "m")  # a new key: idle keys of the store are swept first
    assert not limiter.allow("a", "m")
    assert limiter.get_request_count("a", "m") == 1
