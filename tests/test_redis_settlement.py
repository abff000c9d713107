"""The scripts' ``adjust`` mode is the Python algorithms' ``adjust``: settling a charge after the fact.

Token settlements use it, and the cluster's refunds (``refund`` mode, which is ``adjust`` by minus the cost).
Under random charges, settlements (refunds and overages, of charges made at any earlier time) and clock
steps, the script and the pure Python algorithm agree on every count and every verdict.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit_middleware import ALGORITHMS
from ratelimit_middleware.algorithms import algorithm_class
from ratelimit_middleware.backends.redis.connection import Arg, Call, Connection
from ratelimit_middleware.backends.redis.scripts import script_for

from .conftest import live_server, unique_prefix
from .redis_server import RedisServer

PAD = "600000"  # the injected times stand still while Redis' own clock runs: keep keys alive
LEASE = "60.0"  # the lease of concurrency slots and its id (unused by these rules, but part of every call)


def verdict(reply: list[Any]) -> tuple[bool, int, float, float]:
    return reply[0] == 1, int(reply[1]), float(reply[2]), float(reply[3])


class OnRedis:
    """One rule's key driven through the script, with injected times."""

    def __init__(self, connection: Connection, algorithm: str, limit: int, window: float) -> None:
        self.connection = connection
        self.script = script_for(algorithm)
        self.key = f"{unique_prefix()}:settle".encode()
        self.rule = [str(limit), repr(window)]

    def run(self, mode: str, now: float, amount: int, at: float | None = None, charged: int = 0) -> Any:
        args: list[Arg] = [mode, repr(now), PAD, LEASE, "", *self.rule, str(amount)]
        if mode == "adjust":  # and the time and units of the charge it settles
            args += (repr(at), str(charged))
        return self.connection.evaluate(Call(self.script, [self.key], args))


@settings(max_examples=60, deadline=None)
@given(
    algorithm=st.sampled_from(sorted(ALGORITHMS)),
    limit=st.sampled_from([1, 5, 40]),
    window=st.sampled_from([1.0, 2.5, 10.0]),
    ops=st.lists(
        st.tuples(
            st.integers(0, 30).map(lambda n: n / 10),  # clock step
            st.sampled_from(["charge", "charge", "settle", "settle", "look"]),
            st.integers(0, 12),  # cost, or how far back the settled charge is
            st.integers(-12, 12),  # settlement change (bounded below by what was charged)
        ),
        max_size=40,
    ),
)
def test_the_scripts_settle_charges_as_the_algorithms_do(
    redis_server: RedisServer, algorithm: str, limit: int, window: float, ops: list[Any]
) -> None:
    connection = Connection(live_server().url, timeout=5.0, setup=5.0)
    python = algorithm_class(algorithm)(limit, window)
    redis_key = OnRedis(connection, algorithm, limit, window)
    state: Any = None
    now = 1_000.0
    charges: list[list[float]] = []  # [time, units still charged]
    for step, kind, number, change in ops:
        now += step
        if kind == "charge":
            cost = min(number, limit)
            expected = python.evaluate(state, now, cost)
            reply = redis_key.run("decide", now, cost)
            assert verdict(reply) == expected
            if expected[0] and cost:
                state = python.commit(state, now, cost)
                charges.append([now, float(cost)])
        elif kind == "settle" and charges:
            charge = charges[-1 - number % len(charges)]
            delta = max(change, -int(charge[1]))  # a refund never exceeds what was charged
            if delta:
                state = python.adjust(state, now, charge[0], int(charge[1]), delta)
                redis_key.run("adjust", now, delta, at=charge[0], charged=int(charge[1]))
                charge[1] += delta
        assert redis_key.run("used", now, 0) == python.used(state, now)
        assert verdict(redis_key.run("decide", now, 0)) == python.evaluate(state, now, 0)
        assert verdict(redis_key.run("decide", now, 0)) == python.evaluate(state, now, 0)
    connection.close()
