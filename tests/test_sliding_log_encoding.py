"""The sliding log's four layouts are one algorithm: the same answers and figures as the pair layout.

A log of requests of cost 1 is a float (one request), ``bytes`` of a few times or an ``array('d')`` of more,
with the cumulative costs implicit; it moves to the pair layout (a bytearray of ``(time, cumulative
cost)``) when it first logs another cost or settles a charge. These tests pin when each move happens, and
drive the same traffic through a log left to choose its layout and through a reference kept in the pair
layout from its first entry, comparing every verdict and count.
"""

from __future__ import annotations

import copy
import struct
from array import array

from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit_middleware.algorithms.sliding_log import _FEW, Log, SlidingLog

from .conftest import log_entries as entries


def as_pairs(log: Log | None) -> bytearray | None:
    """``log`` in the pair layout, converted independently of the module's own conversion."""
    if log is None or isinstance(log, bytearray):
        return log
    return bytearray(b"".join(struct.pack("dd", *entry) for entry in entries(log)))


def test_unit_costs_stay_compact_until_another_cost() -> None:
    log = SlidingLog(10, 60.0)
    state = log.admit(None, 0.0, 1)
    assert type(state) is float and state == 0.0  # a time of zero is still a log, not "no log"
    state = log.commit(state, 1.0, 1)
    assert type(state) is bytes and entries(state) == [(0.0, 1.0), (1.0, 2.0)]
    state = log.admit(state, 2.0, 1)
    assert type(state) is bytes and entries(state) == [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)]
    state = log.admit(state, 3.0, 2)  # the first other cost: pairs, cumulative costs made explicit
    assert type(state) is bytearray and entries(state) == [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0), (3.0, 5.0)]
    state = log.commit(state, 4.0, 1)  # and pairs for good
    assert type(state) is bytearray and entries(state)[-1] == (4.0, 6.0)


def test_a_few_times_are_bytes_cut_to_the_live_ones_and_more_an_array() -> None:
    log = SlidingLog(100, 100.0)
    state = None
    for second in range(_FEW - 1):
        state = log.admit(state, float(second), 1)
    assert type(state) is bytes and len(state) == 8 * (_FEW - 1)
    state = log.admit(state, 102.0, 1)  # [0, 2] have expired: cut, and the rest stays bytes
    assert type(state) is bytes and [time for time, _ in entries(state)] == [*range(3, _FEW - 1), 102.0]
    while type(state) is bytes:
        state = log.admit(state, 102.5, 1)
    assert type(state) is array and len(state) == _FEW + 1  # in place from now on
    assert log.admit(state, 102.5, 1) is state
    assert log.admit(log.commit(log.admit(None, 1.0, 1), 2.0, 1), 200.0, 1) == 200.0  # all expired: a float


def test_a_first_request_of_another_cost_starts_in_pairs() -> None:
    log = SlidingLog(10, 60.0)
    assert entries(log.commit(None, 5.0, 3)) == [(5.0, 3.0)]
    assert type(log.commit(None, 5.0, 3)) is bytearray
    assert type(log.admit(None, 5.0, 3)) is bytearray


def test_a_single_expired_request_is_replaced() -> None:
    log = SlidingLog(1, 60.0)
    assert log.admit(0.0, 59.0, 1) is None
    assert log.admit(0.0, 60.0, 1) == 60.0  # [0, 60) is over: the new time alone, still a float
    assert log.commit(0.0, 59.0, 1) == struct.pack("dd", 0.0, 59.0)


def test_settling_a_charge_moves_to_pairs_only_when_something_changes() -> None:
    log = SlidingLog(10, 60.0)
    single = log.commit(None, 10.0, 1)
    assert log.adjust(single, 80.0, 10.0, 1, 5) == single  # the charge has expired: nothing to settle
    assert log.adjust(single, 20.0, 15.0, 0, -1) == single  # nothing was charged at 15: nothing to refund
    settled = log.adjust(single, 20.0, 10.0, 1, 4)
    assert type(settled) is bytearray and entries(settled) == [(10.0, 5.0)]
    times = log.commit(log.commit(single, 11.0, 1), 12.0, 1)
    refunded = log.adjust(times, 20.0, 11.0, 1, -1)  # the emptied entry goes
    assert type(refunded) is bytearray and entries(refunded) == [(10.0, 1.0), (12.0, 2.0)]
    assert log.used(refunded, 20.0) == 2


def test_a_settlement_removes_the_entries_it_empties() -> None:
    """Entries logged at one instant settle as one, a refund taking from the last first: those it takes to
    zero go, later cumulative costs staying right; an overage after that logs a new entry there; a log with
    nothing left is forgotten."""
    log = SlidingLog(100, 60.0)
    state = log.commit(log.commit(log.commit(None, 10.0, 5), 10.0, 3), 11.0, 2)
    state = log.adjust(state, 12.0, 10.0, 5, -6)  # takes the 3, then 3 of the 5
    assert state is not None and entries(state) == [(10.0, 2.0), (11.0, 4.0)]
    state = log.adjust(state, 12.0, 10.0, 3, -2)
    assert state is not None and entries(state) == [(11.0, 2.0)]
    state = log.adjust(state, 12.0, 10.0, 0, 4)  # a charge of 0 at 10 settled at 4
    assert state is not None and entries(state) == [(10.0, 4.0), (11.0, 6.0)]
    assert log.evaluate(state, 12.0, 0) == (True, 94, 0.0, 59.0)  # reset by the newest entry (at 11)
    state = log.adjust(state, 13.0, 11.0, 2, -2)
    assert state is not None and entries(state) == [(10.0, 4.0)]
    assert log.evaluate(state, 13.0, 0) == (True, 96, 0.0, 57.0)  # now by the entry at 10
    assert log.adjust(state, 13.0, 10.0, 4, -4) is None
    assert log.adjust(log.commit(None, 10.0, 1), 20.0, 10.0, 1, -1) is None  # a single time, too


def test_an_integer_clock_works() -> None:
    """Seconds as ints (a FakeClock(0), say): the first log is the int 0, and the next layouts take ints."""
    log = SlidingLog(2, 10)
    state = log.admit(None, 0, 1)
    assert state == 0 and state is not None  # a log, not "no log"
    state = log.admit(state, 1, 1)
    assert log.evaluate(state, 5, 1) == (False, 0, 5.0, 6.0)
    assert log.admit(state, 5, 1) is None
    assert log.admit(state, 10, 1) is not None


steps = st.one_of(
    st.integers(min_value=0, max_value=24).map(lambda n: n / 8),
    st.floats(min_value=0.0, max_value=3.0, allow_nan=False),
)
# (time step, cost, settlement of the last charge or 0): a run of costs of 1 long enough to fill arrays and
# cut their expired entries, then any mix; mostly costs of 1 and no settlements, so that layouts live long.
unit_run = st.integers(0, 150).flatmap(
    lambda n: st.lists(steps.map(lambda step: (step, 1, 0)), min_size=n, max_size=n)
)
mixed = st.lists(
    st.tuples(
        steps, st.sampled_from([1, 1, 1, 1, 1, 2, 3, 12]), st.sampled_from([0, 0, 0, 0, 0, 0, -3, -1, 1, 2])
    ),
    max_size=60,
)
traffic = st.tuples(unit_run, mixed).map(lambda runs: runs[0] + runs[1]).filter(bool)


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(min_value=1, max_value=40),
    window=st.sampled_from([0.3, 1.0, 2.0, 5.0, 10.0]),
    start=st.sampled_from([0.0, 1000.0, 1e9 + 0.1]),
    traffic=traffic,
)
def test_compact_layouts_answer_like_pairs(
    limit: int, window: float, start: float, traffic: list[tuple[float, int, int]]
) -> None:
    """Decision by decision, allowed, remaining, retry_after, reset_after, counts and idleness match a
    reference kept in pairs; and a log moves to pairs exactly on its first other cost or landed settlement."""
    algorithm = SlidingLog(limit, window)
    log: Log | None = None
    reference: bytearray | None = None
    now, charged_at, charged, moved = start, None, 0, False
    for step, cost, settle in traffic:
        now += step
        cost = min(cost, limit)
        for probe in {0, 1, cost, limit}:
            assert algorithm.evaluate(log, now, probe) == algorithm.evaluate(reference, now, probe)
        assert algorithm.used(log, now) == algorithm.used(reference, now)
        if log is not None and reference is not None:
            assert algorithm.idle(log, now) == algorithm.idle(reference, now)
        committed = algorithm.commit(copy.copy(log), now, cost)
        admitted, expected = algorithm.admit(log, now, cost), algorithm.admit(reference, now, cost)
        assert (admitted is None) == (expected is None)
        assert admitted is None or admitted == committed  # in the same layout, compacted alike
        if admitted is not None:
            log, reference, charged_at, charged = admitted, as_pairs(expected), now, cost
            moved = moved or cost != 1
        if settle and charged_at is not None:
            moved = moved or charged_at > now - window  # a settlement lands while its charge counts
            log = algorithm.adjust(log, now, charged_at, charged, settle)
            reference = as_pairs(algorithm.adjust(reference, now, charged_at, charged, settle))
            moved = moved and log is not None  # a log emptied is forgotten: the next starts afresh
        assert isinstance(log, bytearray) == moved
