"""Token budgets and concurrency limits: reserve, then settle, on every storage that supports them."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit_middleware import Limits, MemoryStorage, MultiTierRateLimiter, RateLimiter
from ratelimit_middleware.backends.base import Storage
from ratelimit_middleware.reservation import Reservation

from .conftest import FakeClock, StorageFactory, examples_on, held_keys, stored_entries


def tokens_limiter(
    storage: Storage, algorithm: str = "sliding_log", **limits: object
) -> MultiTierRateLimiter:
    return MultiTierRateLimiter(per_user_model=Limits(**limits), algorithm=algorithm, storage=storage)  # type: ignore[arg-type]


def test_reserve_charges_request_tokens_and_slot_together(storage: Storage) -> None:
    limiter = tokens_limiter(storage, requests="10/minute", tokens="1000/minute", max_concurrent=2)
    reservation = limiter.reserve("u", "m", input_tokens=300, output_tokens=100)
    assert reservation.allowed
    assert reservation.decisions["tokens"].remaining == 600
    assert reservation.decisions["requests"].remaining == 9
    assert reservation.decisions["concurrent"].remaining == 1
    assert limiter.get_request_count("u", "m", unit="tokens") == 400
    assert limiter.get_request_count("u", "m", unit="concurrent") == 1


def test_settle_refunds_what_was_not_used(algorithm: str, storage: Storage) -> None:
    limiter = tokens_limiter(storage, algorithm, tokens="1000/minute")
    reservation = limiter.reserve("u", "m", input_tokens=200, output_tokens=600)
    reservation.settle(input_tokens=200, output_tokens=50)
    assert limiter.get_request_count("u", "m", unit="tokens") == 250
    assert limiter.reserve("u", "m", input_tokens=700).allowed  # the refund made room


def test_settle_charges_an_overage(algorithm: str, storage: Storage) -> None:
    limiter = tokens_limiter(storage, algorithm, tokens="1000/minute")
    limiter.reserve("u", "m", input_tokens=100, output_tokens=100).settle(100, 500)
    assert limiter.get_request_count("u", "m", unit="tokens") == 600
    assert not limiter.reserve("u", "m", input_tokens=450).allowed


def test_reservations_at_the_same_instant_settle_independently(algorithm: str, storage: Storage) -> None:
    limiter = tokens_limiter(storage, algorithm, tokens="1000/minute")
    first = limiter.reserve("u", "m", input_tokens=100)
    second = limiter.reserve("u", "m", input_tokens=300)  # the injected clock has not moved
    second.settle(0, 0)
    first.settle(150, 0)
    assert limiter.get_request_count("u", "m", unit="tokens") == 150


def test_a_gcra_overage_lands_behind_its_charge_once_that_drained_and_went(
    storage: Storage, clock: FakeClock
) -> None:
    """8 tokens at 1000 drain by 1008; at 1009 another user's first reservation sweeps the drained key (in
    memory; on Redis the key expires at its drain time). An overage of 10 then lands behind the 8, as if the
    18 used had been charged at 1000 (9 still count at 1009), not on an empty bucket (1 counted, 9 more
    admitted: 27 tokens in 9 s, where the bucket's bound is 10 + 9)."""
    limiter = tokens_limiter(storage, "gcra", tokens="10/10 seconds")  # a token per second
    reservation = limiter.reserve("a", "m", input_tokens=8)
    clock.now = 1009.0
    assert limiter.reserve("b", "m", input_tokens=1).allowed
    reservation.settle(8, 10)
    assert limiter.get_request_count("a", "m", unit="tokens") == 9
    assert not limiter.reserve("a", "m", input_tokens=2).allowed


def test_a_gcra_overage_lands_behind_its_charge_after_a_refund_emptied_the_key(
    storage: Storage, clock: FakeClock
) -> None:
    """On a cluster, a reservation denied by another slot is refunded where it charged: on a drained bucket
    the refund deletes the key. An earlier reservation's overage still lands behind its own charge."""
    limiter = MultiTierRateLimiter(
        per_user_model="1/second",
        per_model=Limits(input_tokens="150/5 seconds"),  # 30 tokens per second
        algorithm="gcra",
        storage=storage,
    )
    first = limiter.reserve("b", "x", input_tokens=3)  # x's bucket drains at 1000.1
    clock.now = 1002.5
    assert limiter.check("a", "x").allowed
    assert not limiter.reserve("a", "x", input_tokens=13).allowed  # a's request limit denies
    first.settle(99, 0)  # 99 used at 1000: 24 still count at 1002.5
    assert limiter.get_request_count("b", "x", tier="per_model", unit="input_tokens") == 24


@pytest.mark.parametrize("algorithm", ["fixed_window", "sliding_window"])
def test_a_settlement_lands_while_the_clock_is_behind_its_charges_window(
    algorithm: str, storage: Storage, clock: FakeClock
) -> None:
    """Redis' clock may step back across a window boundary between a reservation and its settlement: the
    key's window stays current (as memory, whose clock never goes back, sees it), and the overage lands
    there (saturating the window counter), not dropped while the key went on counting the estimate."""
    clock.now = 1080.5  # window [1080, 1140)
    limiter = tokens_limiter(storage, algorithm, tokens="100/minute")
    reservation = limiter.reserve("u", "m", input_tokens=10)
    clock.now = 1079.5
    reservation.settle(10, 100)  # 110 used: the window is full
    clock.now = 1081.0
    assert limiter.get_request_count("u", "m", unit="tokens") == 100
    assert not limiter.reserve("u", "m", input_tokens=80).allowed


def test_a_gcra_overage_settled_while_the_clock_is_behind_its_charge_saturates_from_the_charge(
    storage: Storage, clock: FakeClock
) -> None:
    """An overage saturates one window ahead: of the charge's time at least, as memory (whose clock never
    goes back) counts it, not of a Redis clock that stepped back since, from where a bucket 5 s ahead was
    already full and the whole overage was dropped."""
    limiter = tokens_limiter(storage, "gcra", tokens="100/10 seconds")  # 10 tokens per second
    reservation = limiter.reserve("u", "m", input_tokens=50)  # the bucket is full again at 1005
    clock.now = 995.0
    reservation.settle(50, 60)  # 110 used: the bucket is empty, full again at 1010
    clock.now = 1000.0
    assert limiter.get_request_count("u", "m", unit="tokens") == 100
    assert not limiter.reserve("u", "m", input_tokens=45).allowed


def test_a_gcra_overage_settled_once_its_bucket_drained_lands_as_on_a_bucket_gone(
    storage: Storage, clock: FakeClock
) -> None:
    """A drained bucket (its arrival time passed) is the same as none, whether its key is still there or gone
    (memory sweeps it now and then, Redis expires it at that time): an overage settled then is charged behind
    the charge itself, from the reservation's time, not behind the arrival time the drained key still holds,
    which counted the charges ahead of it again (70 instead of 40) while the key was kept."""
    limiter = tokens_limiter(storage, "gcra", tokens="100/10 seconds")  # 10 tokens per second
    limiter.reserve("u", "m", input_tokens=30).settle(30, 0)  # full again at 1003
    reservation = limiter.reserve("u", "m", input_tokens=10)  # its charge ends at 1001 at the earliest
    clock.now = 1005.0  # drained at 1004
    reservation.settle(10, 80)  # 80 more from 1001: full again at 1009
    assert limiter.get_request_count("u", "m", unit="tokens") == 40
    assert limiter.reserve("u", "m", input_tokens=60).allowed


def test_a_sliding_log_reservation_made_while_the_clock_is_behind_settles_where_it_was_logged(
    storage: Storage, clock: FakeClock
) -> None:
    """After Redis' clock stepped back, a reservation is logged at the key's newest entry (a log never runs
    backwards), as memory, whose clock never goes back, logs it: its settlement lands there, an overage
    counting as long as the charge, a cancellation giving the tokens back."""
    limiter = tokens_limiter(storage, tokens="100/10 seconds")
    limiter.reserve("u", "m", input_tokens=1).settle(1, 0)  # the newest entry: 1000
    clock.now = 995.0
    limiter.reserve("u", "m", input_tokens=10).settle(10, 80)  # 90 used, logged at 1000
    limiter.reserve("u", "m", input_tokens=5).cancel()
    clock.now = 1006.0
    assert limiter.get_request_count("u", "m", unit="tokens") == 91
    assert not limiter.reserve("u", "m", input_tokens=80).allowed


@pytest.mark.parametrize("algorithm", ["fixed_window", "sliding_window"])
@pytest.mark.parametrize(
    ("window", "times"),
    [
        ("minute", (1080.5, 1079.5, 1081.0)),  # window [1080, 1140)
        ("1.1 seconds", (997.75, 997.6, 997.8)),  # window 907: 907 * 1.1 rounds to 997.7, in window 906
    ],
)
def test_a_reservation_made_while_the_clock_is_behind_its_keys_window_settles_there(
    algorithm: str, window: str, times: tuple[float, float, float], storage: Storage, clock: FakeClock
) -> None:
    """After Redis' clock stepped back across a window boundary, a reservation is counted in the key's
    later window (it stays current), as memory, whose clock never goes back, counts it: its receipt names
    that window, so that its settlement lands there (not dropped for naming an earlier window, nor landing
    in the counter's previous window), an overage counting, a cancellation giving the tokens back."""
    ahead, behind, later = times
    clock.now = ahead
    limiter = tokens_limiter(storage, algorithm, tokens=f"100/{window}")
    limiter.reserve("u", "m", input_tokens=1).settle(1, 0)
    clock.now = behind
    limiter.reserve("u", "m", input_tokens=10).settle(10, 80)  # 90 used, counted in the key's window
    limiter.reserve("u", "m", input_tokens=5).cancel()
    clock.now = later
    assert limiter.get_request_count("u", "m", unit="tokens") == 91
    assert not limiter.reserve("u", "m", input_tokens=10).allowed


@pytest.mark.parametrize("algorithm", ["fixed_window", "sliding_window", "sliding_log"])
def test_a_reservation_of_no_tokens_made_while_the_clock_is_behind_settles_where_the_key_counts(
    algorithm: str, storage: Storage, clock: FakeClock
) -> None:
    """A reservation that charges a rule nothing (an estimate of 0 tokens) still names, for that rule, the
    time a charge would count at: after Redis' clock stepped back, the key's later window or newest log
    entry, as memory, whose clock never goes back, counts it. Its overage lands there, counting as long as
    the key's other units: not dropped (a fixed window: Redis' earlier window is not the key's), put in the
    counter's previous window (weighing less, and gone a window early), or logged a second early (expiring
    a second early)."""
    clock.now = 1080.5  # window [1080, 1140)
    limiter = tokens_limiter(storage, algorithm, tokens="100/minute")
    limiter.reserve("u", "m", input_tokens=1).settle(1, 0)
    clock.now = 1079.5  # window [1020, 1080)
    limiter.reserve("u", "m", input_tokens=0).settle(0, 50)
    clock.now = 1139.9  # the key's window, and its log's entries, still count
    assert limiter.get_request_count("u", "m", unit="tokens") == 51
    assert not limiter.reserve("u", "m", input_tokens=50).allowed


def test_a_reservation_settles_each_key_where_it_was_charged_after_the_clock_stepped_back(
    algorithm: str, storage: Storage, clock: FakeClock
) -> None:
    """After Redis' clock stepped back across a window boundary, one reservation charges keys used before
    (the user's, by another model; the model's, by another user) in their later window, and the user's
    fresh key of this model at Redis' time, in the earlier one: each settles where it was charged, a
    cancellation taking back exactly the 5 reserved and an overage of 80 adding exactly 80 on every key,
    not dropped or misplaced on the key charged at the earlier time for following the others' (on a
    cluster the user's two keys share a slot). A reservation the model's limit denies charges nothing: a
    cluster gives back what the user's slot charged, on each key where it charged. Memory, whose clock
    never goes back, charges them all at the later time: the same counts."""
    limiter = MultiTierRateLimiter(
        per_user=Limits(tokens="200/hour"),
        per_model=Limits(tokens="100/hour"),
        per_user_model=Limits(tokens="200/hour"),
        algorithm=algorithm,
        storage=storage,
    )
    clock.now = 3600.5  # window [3600, 7200)
    limiter.reserve("u", "a", input_tokens=1).settle(1, 0)
    limiter.reserve("v", "b", input_tokens=1).settle(1, 0)
    clock.now = 3599.5  # window [0, 3600)

    def counts() -> list[int]:
        return [
            limiter.get_request_count("u", "b", tier=tier, unit="tokens")
            for tier in ("per_user", "per_model", "per_user_model")
        ]

    before = counts()
    limiter.reserve("u", "b", input_tokens=5).cancel()
    limiter.reserve("u", "b", input_tokens=10).settle(10, 80)
    limiter.reserve("u", "b", input_tokens=0).settle(0, 5)  # charging nothing, each key still has a time
    after = counts()
    assert [now - then for now, then in zip(after, before, strict=True)] == [95, 95, 95]
    assert not limiter.reserve("u", "b", input_tokens=10).allowed  # the model's 100 tokens are used
    assert counts() == after


def test_reservations_settled_at_zero_or_cancelled_leave_no_log_entries(
    storage: Storage, clock: FakeClock
) -> None:
    """A sliding log keeps only what it counts: reservations cancelled (a client that disconnects, an
    upstream error) or settled at 0 leave no entry, however many the window sees, instead of one each for
    the whole window (a key growing with the reservations made, not with the limit). The count, the
    figures and the next decisions are those of the entries that count; the key goes with its last."""
    limiter = RateLimiter(input_tokens="100/hour", storage=storage)
    kept = limiter.reserve("u", "m", input_tokens=10)
    for i in range(40):
        clock.advance(1)
        reservation = limiter.reserve("u", "m", input_tokens=10)
        assert reservation.allowed
        reservation.settle(0, 0) if i % 2 else reservation.cancel()
    assert stored_entries(limiter) == 1
    assert limiter.get_request_count("u", "m", unit="input_tokens") == 10
    figures = limiter.reserve("u", "m", input_tokens=0).decision  # charges nothing
    assert (figures.remaining, figures.reset_after) == (90, 3600 - 40)  # reset by the entry that counts
    denied = limiter.reserve("u", "m", input_tokens=91).decision
    assert not denied.allowed and denied.retry_after == 3600 - 40
    kept.cancel()
    assert stored_entries(limiter) == 0 and held_keys(limiter) == 0


def test_entries_emptied_at_one_instant_go_and_a_later_overage_logs_there(
    storage: Storage, clock: FakeClock
) -> None:
    """Reservations made at one instant settle as one: cancelling both empties their entries, which go, a
    later entry counting on from what is left; a third made then and settled with usage logs a new entry
    at that instant, before the later one, which counts on from it."""
    limiter = RateLimiter(input_tokens="100/hour", storage=storage)
    first, second = (limiter.reserve("u", "m", input_tokens=40) for _ in range(2))
    third = limiter.reserve("u", "m", input_tokens=0)
    clock.advance(1)
    assert limiter.reserve("u", "m", input_tokens=15).allowed
    first.cancel()
    assert stored_entries(limiter) == 2  # the 40 left at 1000 and the 15 at 1001
    second.cancel()
    assert stored_entries(limiter) == 1
    assert limiter.get_request_count("u", "m", unit="input_tokens") == 15
    third.settle(30, 0)
    assert stored_entries(limiter) == 2
    assert limiter.get_request_count("u", "m", unit="input_tokens") == 45
    denied = limiter.reserve("u", "m", input_tokens=56).decision
    assert not denied.allowed and denied.retry_after == 3600 - 1  # until the 30 at 1000 leave
    clock.advance(3600 - 1)
    assert limiter.get_request_count("u", "m", unit="input_tokens") == 15
    assert limiter.reserve("u", "m", input_tokens=85).allowed


def test_refund_never_exceeds_the_reservation(algorithm: str, storage: Storage) -> None:
    limiter = tokens_limiter(storage, algorithm, tokens="1000/minute")
    limiter.reserve("u", "m", input_tokens=300).settle(300, 0)
    limiter.reserve("u", "m", input_tokens=100).settle(0, 0)  # refunds its own 100, nothing of the 300
    assert limiter.get_request_count("u", "m", unit="tokens") == 300


def test_cancel_refunds_every_reserved_token_but_counts_the_request(storage: Storage) -> None:
    limiter = tokens_limiter(storage, requests="5/minute", tokens="1000/minute", max_concurrent=1)
    reservation = limiter.reserve("u", "m", input_tokens=900)
    reservation.cancel()
    assert limiter.get_request_count("u", "m", unit="tokens") == 0
    assert limiter.get_request_count("u", "m", unit="concurrent") == 0
    assert limiter.get_request_count("u", "m") == 1
    reservation.cancel()  # settling twice changes nothing
    reservation.settle(500, 500)
    assert limiter.get_request_count("u", "m", unit="tokens") == 0


def test_settlement_lands_in_the_window_of_the_reservation(
    algorithm: str, storage: Storage, clock: FakeClock
) -> None:
    limiter = tokens_limiter(storage, algorithm, tokens="1000/minute")
    clock.now = 6000.0  # a window boundary for the aligned algorithms
    reservation = limiter.reserve("u", "m", input_tokens=800)
    clock.advance(150)  # every window of the reservation is over
    reservation.settle(800, 500)  # an overage that would have landed in a window that has passed
    assert limiter.get_request_count("u", "m", unit="tokens") == 0
    assert limiter.reserve("u", "m", input_tokens=1000).allowed


def test_token_denial_names_tokens_and_charges_nothing(storage: Storage) -> None:
    limiter = tokens_limiter(storage, requests="10/minute", tokens="1000/minute")
    limiter.reserve("u", "m", input_tokens=900).settle(900, 0)
    denied = limiter.reserve("u", "m", input_tokens=200)
    assert not denied.allowed
    assert denied.decision.unit == "tokens"
    assert denied.decision.reason is not None and "tokens" in denied.decision.reason
    assert limiter.get_request_count("u", "m") == 1  # the denied request was not counted
    denied.settle(0, 0)  # nothing to settle on a denial
    assert limiter.get_request_count("u", "m", unit="tokens") == 900


def test_token_cost_above_the_limit_can_never_pass(storage: Storage) -> None:
    limiter = tokens_limiter(storage, tokens="1000/minute")
    denied = limiter.reserve("u", "m", input_tokens=800, output_tokens=400)
    assert not denied.allowed and math.isinf(denied.decision.retry_after)
    assert denied.decision.cost == 1200 and denied.decision.unit == "tokens"


def test_input_and_output_limits_count_their_side_only(storage: Storage) -> None:
    limiter = tokens_limiter(storage, input_tokens="500/minute", output_tokens="100/minute")
    assert limiter.reserve("u", "m", input_tokens=400, output_tokens=50).allowed
    denied = limiter.reserve("u", "m", input_tokens=50, output_tokens=60)
    assert not denied.allowed and denied.decision.unit == "output_tokens"
    assert limiter.reserve("u", "m", input_tokens=100, output_tokens=50).allowed


def test_concurrency_slots_are_taken_and_released(storage: Storage) -> None:
    limiter = tokens_limiter(storage, max_concurrent=2)
    first, second = limiter.reserve("u", "m"), limiter.reserve("u", "m")
    third = limiter.reserve("u", "m")
    assert first.allowed and second.allowed and not third.allowed
    assert third.decision.unit == "concurrent" and third.decision.retry_after > 0
    first.settle(0, 0)
    assert limiter.reserve("u", "m").allowed
    assert limiter.reserve("v", "m").allowed  # another user has slots of their own


def test_limiters_with_another_max_concurrent_count_the_same_slots(storage: Storage) -> None:
    """A rollout of a new ``max_concurrent``: old and new processes (limiters on one storage) counted their
    slots apart, the limit being part of the counter's name, so a user held old plus new slots. The slots
    held are the same whatever the limit; each limiter compares their count with its own."""
    old = tokens_limiter(storage, requests="100/minute", max_concurrent=2)
    new = tokens_limiter(storage, requests="100/minute", max_concurrent=3)
    held = [old.reserve("u", "m"), old.reserve("u", "m")]
    assert all(reservation.allowed for reservation in held)
    assert new.get_request_count("u", "m", unit="concurrent") == 2
    third = new.reserve("u", "m")
    assert third.allowed and third.decision.remaining == 0
    assert not new.reserve("u", "m").allowed and not old.reserve("u", "m").allowed
    held[0].settle(0, 0)
    assert not old.reserve("u", "m").allowed  # 2 still held: the old limit's
    assert new.reserve("u", "m").allowed
    assert old.get_request_count("u", "m", unit="concurrent") == 3
    assert old.get_request_count("u", "m") == new.get_request_count("u", "m") == 4  # one request counter


def test_context_manager_releases_on_success_and_cancels_on_error(storage: Storage) -> None:
    limiter = tokens_limiter(storage, tokens="1000/minute", max_concurrent=1)
    with limiter.reserve("u", "m", input_tokens=300) as reservation:
        assert limiter.get_request_count("u", "m", unit="concurrent") == 1
    assert reservation.settled and limiter.get_request_count("u", "m", unit="tokens") == 300
    with pytest.raises(RuntimeError), limiter.reserve("u", "m", input_tokens=300):
        raise RuntimeError("upstream failed")
    assert limiter.get_request_count("u", "m", unit="tokens") == 300  # the failed call was refunded
    assert limiter.get_request_count("u", "m", unit="concurrent") == 0


def test_no_slot_leaks_after_many_mixed_requests(storage: Storage, clock: FakeClock) -> None:
    limiter = tokens_limiter(storage, max_concurrent=3, tokens="1000000000/minute")
    for index in range(10_000):
        clock.advance(0.001)
        reservation = limiter.reserve("u", "m", input_tokens=10, output_tokens=10)
        assert reservation.allowed
        if index % 3 == 0:
            reservation.cancel()
        elif index % 3 == 1:
            reservation.settle(5, 20)
        else:
            with reservation:
                pass
    assert limiter.get_request_count("u", "m", unit="concurrent") == 0


def test_renewal_keeps_a_slot_for_as_long_as_the_response_runs(storage: Storage, clock: FakeClock) -> None:
    limiter = tokens_limiter(storage, tokens="1000/minute", max_concurrent=1)
    held = limiter.reserve("u", "m", input_tokens=10)
    assert held.lease == (None if isinstance(storage, MemoryStorage) else 60.0)  # memory: slots never expire
    for _ in range(5):
        clock.advance(30)
        assert held.renew()
    assert not limiter.reserve("u", "m").allowed  # 150 s later, the slot is still held
    held.settle(10, 0)
    assert not held.renew()
    assert limiter.reserve("u", "m").allowed
    assert tokens_limiter(storage, tokens="1000/minute").reserve("v", "m").lease is None  # no slot, no lease

    async def scenario() -> None:
        reservation = await limiter.areserve("w", "m")
        clock.advance(30)
        assert await reservation.arenew()
        await reservation.acancel()
        assert not await reservation.arenew()

    asyncio.run(scenario())


def test_tiers_share_token_budgets(storage: Storage) -> None:
    limiter = MultiTierRateLimiter(
        per_user_model=Limits(tokens="1000/minute"),
        per_model=Limits(tokens="1500/minute", max_concurrent=10),
        storage=storage,
    )
    limiter.reserve("a", "m", input_tokens=900).settle(900, 0)
    denied = limiter.reserve("b", "m", input_tokens=700)
    assert not denied.allowed and denied.decision.tier == "per_model"
    assert limiter.get_request_count("b", "m", unit="tokens") == 0  # nothing charged to b's own tier


def test_rate_limiter_keywords(storage: Storage) -> None:
    limiter = RateLimiter(tokens="100/minute", max_concurrent=1, storage=storage)
    assert limiter.uses_reservations
    with pytest.raises(TypeError, match="no request limit"):
        limiter.check("u", "m")
    assert limiter.reserve("u", "m", input_tokens=50).allowed
    both = RateLimiter(10, 60, tokens="100/minute", storage=storage)
    assert both.check("u", "m").allowed and both.reserve("u", "m", input_tokens=10).allowed


def test_async_reservations(storage: Storage) -> None:
    limiter = tokens_limiter(storage, tokens="1000/minute", max_concurrent=5)

    async def scenario() -> None:
        reservations = await asyncio.gather(*(limiter.areserve("u", "m", input_tokens=100) for _ in range(8)))
        assert sum(r.allowed for r in reservations) == 5
        for reservation in reservations:
            await reservation.asettle(50, 0)
        assert await limiter.aget_request_count("u", "m", unit="tokens") == 250
        async with await limiter.areserve("u", "m", input_tokens=10):
            pass
        failing = await limiter.areserve("u", "m", input_tokens=10)
        await failing.acancel()
        assert await limiter.aget_request_count("u", "m", unit="concurrent") == 0

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"input_tokens": -1}, ValueError),
        ({"output_tokens": 1.5}, TypeError),
        ({"input_tokens": True}, TypeError),
    ],
)
def test_bad_token_counts_raise(kwargs: dict[str, object], error: type, storage: Storage) -> None:
    limiter = tokens_limiter(storage, tokens="1000/minute")
    with pytest.raises(error):
        limiter.reserve("u", "m", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="-5"):
        limiter.reserve("u", "m").settle(-5, 0)


def test_limits_validation() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Limits()
    with pytest.raises(ValueError, match="-2"):
        Limits(max_concurrent=-2)
    with pytest.raises(ValueError, match="bad limit"):
        Limits(tokens="lots")


def settlements(quarters: int, estimated: int, actual: int) -> st.SearchStrategy[list[Step]]:
    """Reservations over time: a time step (in quarter seconds, exact in floats), the tokens estimated, the
    tokens used (``None``: cancelled) and how many operations later each settles."""
    return st.lists(
        st.tuples(
            st.integers(0, quarters).map(lambda n: n / 4),
            st.integers(0, estimated),
            st.one_of(st.none(), st.integers(0, actual)),
            st.integers(0, 3),
        ),
        min_size=1,
        max_size=40,
    )


Step = tuple[float, int, "int | None", int]
operations = settlements(30, 400, 600)


def test_sliding_log_settlements_match_a_reference_log(
    storage_name: str, storage_for: StorageFactory
) -> None:
    """Exact token accounting under out-of-order settlements, refunds, overages and cancellations: each
    decision as the reference log says and as memory gives it, and a log that keeps only entries that count
    (at an instant whose reservations now count nothing, none; else at most one per reservation made then).
    """

    @examples_on(storage_name, 200)
    @given(steps=operations)
    def check(steps: list[Step]) -> None:
        clock = FakeClock(0.0)
        limiter = RateLimiter(tokens="1000/10 seconds", storage=storage_for(clock))
        twin = RateLimiter(tokens="1000/10 seconds", storage=MemoryStorage(clock=clock))
        log: list[list[float]] = []  # [time, cost] of every admitted reservation
        pending: list[tuple[int, tuple[Reservation, Reservation], list[float], int | None]] = []
        for index, (step, estimate, actual, delay) in enumerate(steps):
            clock.advance(step)
            live = [(t, cost) for t, cost in log if t > clock.now - 10]
            used = sum(cost for _, cost in live)
            reservation, theirs = (one.reserve("u", "m", input_tokens=estimate) for one in (limiter, twin))
            assert reservation.decision == theirs.decision
            assert reservation.allowed == (used + estimate <= 1000)
            if reservation.allowed:
                assert reservation.decision.remaining == 1000 - used - estimate
                entry = [clock.now, float(estimate)]
                log.append(entry)
                pending.append((index + delay, (reservation, theirs), entry, actual))
            else:  # until enough of the oldest units have left
                freed = 0.0
                for t, cost in live:
                    freed += cost
                    if used - freed + estimate <= 1000:
                        assert reservation.decision.retry_after == t + 10 - clock.now
                        break
            for due in [p for p in pending if p[0] <= index]:
                pending.remove(due)
                _, held, entry, settled_to = due
                if entry[0] > clock.now - 10:  # a settlement lands only while its charge still counts
                    entry[1] = float(settled_to or 0)
                for one in held:
                    if settled_to is None:
                        one.cancel()
                    else:
                        one.settle(settled_to, 0)
            expected = sum(cost for t, cost in log if t > clock.now - 10)
            assert limiter.get_request_count("u", "m", unit="tokens") == expected
            instants = {t for t, _ in log}
            bound = sum(
                len([1 for t, _ in log if t == instant])
                for instant in instants
                if sum(cost for t, cost in log if t == instant)
            )
            assert stored_entries(limiter) <= bound

    check()


def test_two_reserving_limits_hold_and_give_back_together(storage: Storage) -> None:
    """``Both`` (a path under two rules) with two token-limited limiters: one joint reservation, settled,
    renewed and released as one; the second's denial cancels the first's."""
    from ratelimit_middleware.both import Both
    from ratelimit_middleware.reservation import JointReservation

    loose = tokens_limiter(storage, tokens="10000/minute", max_concurrent=5)
    strict = MultiTierRateLimiter(per_model=Limits(tokens="1000/minute", max_concurrent=1), storage=storage)
    both = Both(loose, strict)

    async def scenario() -> None:
        held = await both.areserve("u", "m", input_tokens=300)
        assert isinstance(held, JointReservation) and held.allowed
        assert held.decisions["concurrent"].remaining == 0 and held.decisions["tokens"].remaining == 700
        assert held.lease == held.parts[1].lease  # expiring slots (on Redis) are renewed together
        assert await held.arenew() is True
        busy = await both.areserve("u", "m", input_tokens=300)  # the strict rule's one slot is taken
        assert not busy.allowed and busy.decision.unit == "concurrent"
        assert await loose.aget_request_count("u", "m", unit="tokens") == 300  # busy's 300 went back
        await held.asettle(100, 0)
        assert await held.arenew() is False and held.settled
        assert await strict.aget_request_count("u", "m", unit="concurrent") == 0
        assert await loose.aget_request_count("u", "m", unit="concurrent") == 0

    asyncio.run(scenario())
    with both.reserve("u", "m", input_tokens=100) as held:
        assert held.allowed and strict.get_request_count("u", "m", unit="concurrent") == 1
    assert loose.get_request_count("u", "m", unit="tokens") == 200
    assert strict.get_request_count("u", "m", unit="tokens") == 200
    assert loose.get_request_count("u", "m", unit="concurrent") == 0


def test_a_joint_reservation_settles_every_part_even_when_one_fails() -> None:
    """A storage that fails to settle one part (Redis gone, failing closed) must not keep the other's slot."""
    from ratelimit_middleware.both import Both
    from ratelimit_middleware.errors import RateLimiterUnavailable
    from ratelimit_middleware.reservation import JointReservation

    class SettlesNothing(MultiTierRateLimiter):
        def reserve(self, user: str, model: str, **tokens: int) -> Any:
            reservation = super().reserve(user, model, **tokens)
            _, receipt, settlement = reservation._charge  # type: ignore[misc]

            class Down:
                lease = None

                def adjust(self, *args: object) -> None:
                    raise RateLimiterUnavailable("the rate limiter cannot reach Redis")

            reservation._charge = (Down(), receipt, settlement)  # type: ignore[assignment]
            return reservation

    down = SettlesNothing(per_user_model=Limits(tokens="1000/minute", max_concurrent=1))
    kept = MultiTierRateLimiter(per_model=Limits(tokens="1000/minute", max_concurrent=1))
    held = Both(down, kept).reserve("u", "m", input_tokens=10)
    assert isinstance(held, JointReservation)
    with pytest.raises(RateLimiterUnavailable):
        held.settle(5, 0)
    assert kept.get_request_count("u", "m", unit="concurrent") == 0  # given back all the same


def test_a_second_limit_that_raises_gives_the_first_reservation_back() -> None:
    from ratelimit_middleware.both import Both
    from ratelimit_middleware.errors import RateLimiterUnavailable

    class Unreachable(MultiTierRateLimiter):
        def reserve(self, user: str, model: str, **tokens: int) -> Any:
            raise RateLimiterUnavailable("the rate limiter cannot reach Redis")

        async def areserve(self, user: str, model: str, **tokens: int) -> Any:
            raise RateLimiterUnavailable("the rate limiter cannot reach Redis")

    first = MultiTierRateLimiter(per_user_model=Limits(tokens="1000/minute", max_concurrent=1))
    both = Both(first, Unreachable(per_model=Limits(tokens="1000/minute")))
    with pytest.raises(RateLimiterUnavailable):
        both.reserve("u", "m", input_tokens=10)
    with pytest.raises(RateLimiterUnavailable):
        asyncio.run(both.areserve("u", "m", input_tokens=10))
    assert first.get_request_count("u", "m", unit="concurrent") == 0
    assert first.get_request_count("u", "m", unit="tokens") == 0


def test_a_joint_reservation_with_a_shadowed_part_renews_what_it_holds() -> None:
    from ratelimit_middleware.both import Both
    from ratelimit_middleware.shadow import Shadow

    held = MultiTierRateLimiter(per_user_model=Limits(tokens="1000/minute", max_concurrent=1))
    full = MultiTierRateLimiter(per_model=Limits(tokens="10/minute"))
    reservation = Both(held, Shadow(full)).reserve("u", "m", input_tokens=100)  # the shadow would deny
    assert reservation.allowed and not reservation.settled
    assert reservation.renew() is True
    reservation.settle(50, 0)
    assert reservation.settled and reservation.renew() is False
    assert held.get_request_count("u", "m", unit="tokens") == 50


def test_a_local_fallback_beside_a_stricter_limit_reports_the_stricter_figures() -> None:
    """Observers still see the fallback, and the headers describe the limit that binds."""
    from ratelimit_middleware.both import Both
    from ratelimit_middleware.errors import LocalDecision

    class Local(RateLimiter):
        def check(self, user: str, model: str, cost: int = 1) -> Any:
            return LocalDecision.of(super().check(user, model, cost))

    decision = Both(Local(limit="100/minute"), RateLimiter(limit="2/minute")).check("u", "m")
    assert isinstance(decision, LocalDecision) and (decision.limit, decision.remaining) == (2, 1)


def test_a_denied_reservation_reports_what_was_left_before_it(storage: Storage) -> None:
    """It charged nothing: its requests decision says the request it counted is still there to use."""
    limiter = tokens_limiter(storage, requests="10/minute", tokens="100/minute")
    assert limiter.reserve("u", "m", input_tokens=60).allowed
    denied = limiter.reserve("u", "m", input_tokens=60)
    assert not denied.allowed and denied.decision.unit == "tokens"
    assert denied.decisions["requests"].allowed and denied.decisions["requests"].remaining == 9
    assert limiter.reserve("u", "m", input_tokens=10).decisions["requests"].remaining == 8


gcra_operations = settlements(12, 20, 30)


@settings(max_examples=300, deadline=None)
@given(steps=gcra_operations)
def test_gcra_settlements_never_count_less_than_the_charges_as_they_stand(
    steps: list[Step],
) -> None:
    """GCRA keeps one time, not the charges, so a settlement cannot always be exact; it must never erase
    other charges. After every step the count is at least a bucket replayed from scratch with each charge at
    its current value (the estimate until settled), and equal while every settlement landed at once."""
    clock = FakeClock(0.0)
    limiter = RateLimiter(tokens="4096/8 seconds", algorithm="gcra", storage=MemoryStorage(clock=clock))
    interval = 8 / 4096  # 2**-9: every sum below is exact; 1,200 tokens at most never fill the bucket
    charges: list[list[float]] = []  # [time, tokens] of every reservation, in order
    pending: list[tuple[int, object, list[float], int | None]] = []
    exact = True
    for index, (step, estimate, actual, delay) in enumerate(steps):
        clock.advance(step)
        reservation = limiter.reserve("u", "m", input_tokens=estimate)
        assert reservation.allowed
        charge = [clock.now, float(estimate)]
        charges.append(charge)
        pending.append((index + delay, reservation, charge, actual))
        for due in [p for p in pending if p[0] <= index]:
            pending.remove(due)
            _, held, charge, settled_to = due
            exact = exact and charge[0] == clock.now
            charge[1] = float(settled_to or 0)
            if settled_to is None:
                held.cancel()  # type: ignore[attr-defined]
            else:
                held.settle(settled_to, 0)  # type: ignore[attr-defined]
        tat = -math.inf
        for t, tokens in charges:
            tat = max(tat, t) + tokens * interval
        reference = max(math.ceil((tat - clock.now) / interval), 0)
        counted = limiter.get_request_count("u", "m", unit="tokens")
        assert counted >= reference
        if exact:
            assert counted == reference
