"""Throughput, round trips and memory of the Redis backend, side by side with the ``limits`` package.

Each of our four algorithms is compared with its nearest ``limits`` strategy on ``limits``' Redis
storages (``limits.aio.storage.RedisStorage`` with its redis-py implementation for async,
``limits.storage.RedisStorage`` for sync): sliding_log with MovingWindowRateLimiter, sliding_window
with SlidingWindowCounterRateLimiter, fixed_window with FixedWindowRateLimiter. ``limits`` has no GCRA,
so the gcra rows are compared with its FixedWindowRateLimiter.

Throughput, decisions per second through the public calls (``acheck``/``check`` and ``hit``):

- ``async``: one asyncio process, 100 concurrent callers, each deciding one request after another;
- ``sync``: one thread, one decision after another;
- ``hot key``: one user and model; ``10k keys``: users ``user-0`` .. ``user-9999`` round-robin on one model;
- ``multi-tier``: a per-user-and-model limit and a per-model limit, both checked on each request (ours: one
  atomic script; ``limits``: one ``hit`` per limit, as it has no multi-limit call).

Every call is allowed (limits of 10**9 per hour), so the rows measure the allowed path. Round trips per
decision: ours counts the requests it sends (a pipelined batch counts once); ``limits`` does not pipeline,
so its round trips are the commands its redis-py client sends (counted by wrapping ``execute_command``).
Each repeat flushes Redis, warms up (connections, scripts), then times ``decisions`` calls; repeats of ours
and of ``limits`` are interleaved, alternating which goes first. Figures are medians over the repeats; the
ratio is the median of the paired per-repeat ratios ours / limits (above 1: ours is faster).

Memory per active key, after one request by each of 10,000 users (and, for the logs, 10 requests by each of
1,000 users), with limits of 1,000 per hour (so that GCRA keys stay alive: they expire when the bucket is
full again): ``MEMORY USAGE`` of the keys (median), and the growth of Redis' ``used_memory`` divided by the
keys (which includes Redis' own per-key overhead: its dict and expiry entries).

The script starts its own ``redis-server`` on a free loopback port and stops it. Run from the repository
root::

    .venv/bin/python benchmarks/bench_redis.py           # full run, a few minutes
    .venv/bin/python benchmarks/bench_redis.py --quick   # shorter and rougher
    .venv/bin/python benchmarks/bench_redis.py --mode async --algorithm sliding_log --repeats 9

It prints progress lines (with the lowest and highest ratio of the repeats), then Markdown tables that can be
pasted into DESIGN.md.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import limits
import redis
from limits import RateLimitItemPerHour
from limits import storage as limits_storage
from limits import strategies as limits_strategies
from limits.aio import storage as limits_aio_storage
from limits.aio import strategies as limits_aio_strategies

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ratelimit_middleware import MultiTierRateLimiter, RateLimiter, RedisStorage

ALLOW_ALL = 10**9
MEMORY_LIMIT = 1_000
CALLERS = 100
KEYS = 10_000
NEAREST = {
    "sliding_log": "MovingWindowRateLimiter",
    "sliding_window": "SlidingWindowCounterRateLimiter",
    "fixed_window": "FixedWindowRateLimiter",
    "gcra": "FixedWindowRateLimiter",
}


# -- the server ------------------------------------------------------------------------------------------


class Server:
    """A throwaway redis-server on a free loopback port."""

    def __init__(self) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            sys.exit("redis-server is not on PATH (apt-get install -y redis-server)")
        self.directory = tempfile.mkdtemp(prefix="bench-redis-")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.process = subprocess.Popen(
            [executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.directory, "--logfile", os.path.join(self.directory, "redis.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.url = f"redis://127.0.0.1:{self.port}"
        self.admin = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.admin.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    sys.exit("redis-server did not start")
                time.sleep(0.05)
        self.version = str(self.admin.info("server")["redis_version"])

    def stop(self) -> None:
        self.admin.close()
        self.process.terminate()
        self.process.wait(timeout=10)
        shutil.rmtree(self.directory, ignore_errors=True)


# -- contenders --------------------------------------------------------------------------------------------


@dataclass
class Contender:
    """One side of a row: a way to decide (sync, or returning an awaitable), its round trips so far."""

    decide: Callable[[str, str], Any]
    round_trips: Callable[[], int]
    close: Callable[[], Any] = lambda: None


def ours(
    server: Server, algorithm: str, multi_tier: bool, asynchronous: bool = False, limit: int = ALLOW_ALL
) -> Contender:
    """Ours: a limiter on a ``RedisStorage`` from the URL (sync and asyncio connections of its own)."""
    # A generous timeout, and failures raised rather than answered by a policy: a benchmark must not
    # count fail-open decisions. The default key prefix, as users have it: key length moves the memory.
    storage = RedisStorage(server.url, timeout=5.0, on_error="deny")
    limiter: RateLimiter | MultiTierRateLimiter
    if multi_tier:
        every = f"{limit}/hour"
        limiter = MultiTierRateLimiter(
            per_user_model=every, per_model=every, algorithm=algorithm, storage=storage
        )
    else:
        limiter = RateLimiter(limit, 3600, algorithm=algorithm, storage=storage)
    if asynchronous:
        return Contender(limiter.acheck, lambda: storage.connection.round_trips, storage.aclose)
    return Contender(limiter.check, lambda: storage.connection.round_trips, storage.close)


def counted(client: Any) -> Callable[[], int]:
    """Count the commands ``client`` (``limits``' redis-py client) sends: each is a round trip."""
    sent = [0]
    send = client.execute_command

    def execute_command(*args: Any, **options: Any) -> Any:
        sent[0] += 1
        return send(*args, **options)

    client.execute_command = execute_command
    return lambda: sent[0]


def _items(limit: int) -> tuple[RateLimitItemPerHour, RateLimitItemPerHour]:
    return RateLimitItemPerHour(limit), RateLimitItemPerHour(limit, namespace="PER-MODEL")


def theirs(
    server: Server, algorithm: str, multi_tier: bool, asynchronous: bool = False, limit: int = ALLOW_ALL
) -> Contender:
    """``limits``: its Redis storage (async: its redis-py implementation) and the nearest strategy."""
    per_user_model, per_model = _items(limit)
    if asynchronous:
        store = limits_aio_storage.RedisStorage(f"async+{server.url}", implementation="redispy")
        limiter = getattr(limits_aio_strategies, NEAREST[algorithm])(store)

        async def adecide(user: str, model: str) -> bool:
            if multi_tier:  # no atomic multi-limit call: one hit per limit
                return await limiter.hit(per_user_model, user, model) and await limiter.hit(per_model, model)
            return bool(await limiter.hit(per_user_model, user, model))

        client = store.bridge.storage  # its redis-py client
        return Contender(adecide, counted(client), client.aclose)
    sync_store = limits_storage.RedisStorage(server.url)
    strategy = getattr(limits_strategies, NEAREST[algorithm])(sync_store)

    def decide(user: str, model: str) -> bool:
        if multi_tier:
            return bool(strategy.hit(per_user_model, user, model) and strategy.hit(per_model, model))
        return bool(strategy.hit(per_user_model, user, model))

    return Contender(decide, counted(sync_store.storage), sync_store.storage.close)


# -- timing ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    mode: str  # "async" or "sync"
    algorithm: str
    keys: str  # "hot key" or "10k keys"
    multi_tier: bool = False

    @property
    def label(self) -> str:
        return self.keys + (", multi-tier" if self.multi_tier else "")

    def users(self, count: int) -> list[str]:
        if self.keys == "hot key":
            return ["hot"] * count
        return [f"user-{i % KEYS}" for i in range(count)]


def time_sync(contender: Contender, users: Sequence[str]) -> tuple[float, int]:
    """(seconds, round trips) for deciding on ``users`` one after another, after a warm-up."""
    decide = contender.decide
    for user in users[:200]:  # connections, scripts
        decide(user, "m")
    before = contender.round_trips()
    started = time.perf_counter()
    for user in users:
        decide(user, "m")
    seconds = time.perf_counter() - started
    trips = contender.round_trips() - before
    contender.close()
    return seconds, trips


async def time_async(contender: Contender, users: Sequence[str]) -> tuple[float, int]:
    """(seconds, round trips) for ``CALLERS`` concurrent callers sharing ``users``, after a warm-up."""
    decide: Callable[[str, str], Awaitable[Any]] = contender.decide
    share = len(users) // CALLERS

    async def caller(names: Sequence[str]) -> None:
        for user in names:
            await decide(user, "m")

    await asyncio.gather(*(caller(users[i : i + 2]) for i in range(CALLERS)))
    before = contender.round_trips()
    started = time.perf_counter()
    await asyncio.gather(*(caller(users[i * share : (i + 1) * share]) for i in range(CALLERS)))
    seconds = time.perf_counter() - started
    trips = contender.round_trips() - before
    closing = contender.close()
    if inspect.isawaitable(closing):
        await closing
    return seconds, trips


@dataclass
class Row:
    scenario: Scenario
    rates: dict[str, list[float]] = field(default_factory=lambda: {"ours": [], "limits": []})
    trips: dict[str, list[float]] = field(default_factory=lambda: {"ours": [], "limits": []})

    def median(self, name: str) -> float:
        return statistics.median(self.rates[name])

    def round_trips(self, name: str) -> float:
        return statistics.median(self.trips[name])

    def ratios(self) -> list[float]:
        """Ours / limits, per repeat."""
        return [a / b for a, b in zip(self.rates["ours"], self.rates["limits"], strict=True)]

    def ratio(self) -> float:
        return statistics.median(self.ratios())


def run_once(server: Server, scenario: Scenario, name: str, decisions: int) -> tuple[float, float]:
    """(decisions per second, round trips per decision) for one contender in one scenario."""
    server.admin.flushall()
    users = scenario.users(decisions)
    make = ours if name == "ours" else theirs
    if scenario.mode == "sync":
        seconds, trips = time_sync(make(server, scenario.algorithm, scenario.multi_tier), users)
    else:

        async def measured() -> tuple[float, int]:
            return await time_async(make(server, scenario.algorithm, scenario.multi_tier, True), users)

        seconds, trips = asyncio.run(measured())
    return len(users) / seconds, trips / len(users)


def measure(server: Server, scenario: Scenario, repeats: int, decisions: int) -> Row:
    row = Row(scenario)
    for repeat in range(repeats):
        order = ["ours", "limits"] if repeat % 2 == 0 else ["limits", "ours"]
        for name in order:
            rate, trips = run_once(server, scenario, name, decisions)
            row.rates[name].append(rate)
            row.trips[name].append(trips)
    print(
        f"  {scenario.mode:5} {scenario.algorithm:14} {scenario.label:22} ours {row.median('ours'):>9,.0f}/s"
        f"  limits {row.median('limits'):>9,.0f}/s  x{row.ratio():.2f} (x{min(row.ratios()):.2f} to"
        f" x{max(row.ratios()):.2f})",
        flush=True,
    )
    return row


# -- memory ----------------------------------------------------------------------------------------------


@dataclass
class Memory:
    algorithm: str
    requests: int
    ours: tuple[float, float]  # (MEMORY USAGE median, used_memory growth per key)
    theirs: tuple[float, float]


def memory_per_key(
    server: Server, make: Callable[[], Contender], requests: int, users: int
) -> tuple[float, float]:
    admin = server.admin
    admin.flushall()
    contender = make()
    contender.decide("warm-up", "m")
    admin.flushall()
    before = int(admin.info("memory")["used_memory"])
    for user in range(users):
        for _ in range(requests):
            contender.decide(f"user-{user}", "m")
    grown = int(admin.info("memory")["used_memory"]) - before
    keys = list(admin.scan_iter(count=1000))
    usage = statistics.median(admin.memory_usage(key, samples=0) or 0 for key in keys[:500])
    contender.close()
    return usage, grown / max(len(keys), 1)


def measure_memory(server: Server, algorithm: str, requests: int, users: int) -> Memory:
    return Memory(
        algorithm,
        requests,
        memory_per_key(server, lambda: ours(server, algorithm, False, limit=MEMORY_LIMIT), requests, users),
        memory_per_key(server, lambda: theirs(server, algorithm, False, limit=MEMORY_LIMIT), requests, users),
    )


# -- report ----------------------------------------------------------------------------------------------


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int) -> str:
    rule = "|" + "|".join("---" if i < text_columns else "---:" for i in range(len(header))) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def scenarios(modes: Sequence[str], algorithms: Sequence[str]) -> list[Scenario]:
    found = [
        Scenario("async", algorithm, keys)
        for algorithm in ("sliding_log", "sliding_window", "fixed_window", "gcra")
        for keys in ("hot key", "10k keys")
    ]
    found.append(Scenario("async", "sliding_log", "10k keys", multi_tier=True))
    found += [
        Scenario("sync", algorithm, keys)
        for algorithm in ("sliding_log", "fixed_window")
        for keys in ("hot key", "10k keys")
    ]
    found.append(Scenario("sync", "sliding_log", "10k keys", multi_tier=True))
    return [scenario for scenario in found if scenario.mode in modes and scenario.algorithm in algorithms]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and decisions: rougher figures")
    parser.add_argument(
        "--mode", choices=["async", "sync"], action="append", help="only these rows (repeatable)"
    )
    parser.add_argument("--algorithm", choices=list(NEAREST), action="append", help="only these (repeatable)")
    parser.add_argument("--repeats", type=int, help="repeats of each row (default 5; 1 with --quick)")
    options = parser.parse_args()
    repeats, decisions, sync_decisions = (1, 10_000, 3_000) if options.quick else (5, 40_000, 10_000)
    repeats = options.repeats or repeats
    algorithms = options.algorithm or list(NEAREST)
    server = Server()
    try:
        print(
            f"redis-server {server.version}, Python {platform.python_version()}, "
            f"redis-py {redis.__version__}, limits {limits.__version__}, {os.cpu_count()} CPUs; "
            f"{repeats} repeats, {decisions:,} async and "
            f"{sync_decisions:,} sync decisions each, {CALLERS} async callers",
            flush=True,
        )
        rows = [
            measure(server, scenario, repeats, decisions if scenario.mode == "async" else sync_decisions)
            for scenario in scenarios(options.mode or ["async", "sync"], algorithms)
        ]
        memory = [
            measure_memory(server, algorithm, requests, users)
            for algorithm, requests, users in [
                ("sliding_log", 1, KEYS), ("sliding_log", 10, 1_000), ("sliding_window", 1, KEYS),
                ("fixed_window", 1, KEYS), ("gcra", 1, KEYS),
            ]
            if algorithm in algorithms
        ]  # fmt: skip
    finally:
        server.stop()
    print()
    header = ["mode", "algorithm (limits strategy)", "scenario", "ours dec/s", "ours RT/dec"]
    header += ["limits dec/s", "limits RT/dec", "ours / limits"]
    table = []
    for row in rows:
        scenario = row.scenario
        table.append(
            [
                scenario.mode,
                f"{scenario.algorithm} ({NEAREST[scenario.algorithm]})",
                scenario.label,
                f"{row.median('ours'):,.0f}",
                f"{row.round_trips('ours'):.3f}",
                f"{row.median('limits'):,.0f}",
                f"{row.round_trips('limits'):.2f}",
                f"{row.ratio():.2f}x",
            ]
        )
    print(markdown(header, table, 3))
    print()
    header = ["algorithm", "requests per key", "ours MEMORY USAGE", "ours used_memory / key"]
    header += ["limits MEMORY USAGE", "limits used_memory / key"]
    table = [
        [m.algorithm, str(m.requests), *(f"{value:.0f} B" for value in (*m.ours, *m.theirs))] for m in memory
    ]
    print(markdown(header, table, 2))


if __name__ == "__main__":
    main()
