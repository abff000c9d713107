"""Throughput and memory of the in-memory core, side by side with the ``limits`` package.

Each of our four algorithms is compared with its nearest ``limits`` strategy on
``limits.storage.MemoryStorage``: sliding_log with MovingWindowRateLimiter, sliding_window with
SlidingWindowCounterRateLimiter, fixed_window with FixedWindowRateLimiter. ``limits`` has no GCRA, so
the gcra rows are compared with its FixedWindowRateLimiter, and say so.

Throughput, in three scenarios:

1. ``hot key, allowed``: one user and model, every call allowed (10**7 per hour).
2. ``10k keys, allowed``: users ``user-0`` .. ``user-9999`` on one model, round-robin, every call
   allowed (10**4 per hour), all 10,000 keys held throughout.
3. ``hot key, denied``: one key already at its limit (5 per hour), every timed call denied.

The allowed limits are chosen so that no call is denied and no GCRA key ever becomes idle (fully
recovered, hence dropped by the sweep and re-created on its next request): GCRA's emission interval,
window / limit, must exceed the time between two requests on a key. With 10**9 per hour (3.6 us) the
gcra rows would measure key churn instead of the allowed path.

Decisions per second through the public calls, ``RateLimiter.allow(user, model)`` and
``limiter.hit(item, user, model)``: one thread, garbage collector on as usual, ``time.perf_counter``.
Each repeat builds fresh limiters and sets them up (and checks the expected answer) outside the timed
region, then calls in batches for about 0.2 s. Repeats of ours and of ``limits`` are interleaved,
alternating which goes first, so that machine noise hits both alike. Figures are medians over the
repeats; the ratio is the median of the paired per-repeat ratios ours / limits (above 1: ours is
faster).

Memory, with ``tracemalloc`` (bytes requested from Python's allocators, without allocator slack):
bytes per key is the growth from a first request by each of N distinct users on one model, divided by
N, at several N since dict tables grow by doubling. The user strings exist beforehand and are not
counted; ``limits`` builds and stores a key string of its own per key, which is counted. For
sliding_log (and ``limits``' moving window) also bytes per stored request: one key holding 10,000
admitted requests, minus the same key holding one, divided by the 9,999 extra requests.

Run from the repository root::

    .venv/bin/python benchmarks/bench_core.py           # full run, about a minute or two
    .venv/bin/python benchmarks/bench_core.py --quick   # shorter and rougher
    .venv/bin/python benchmarks/bench_core.py --algorithm sliding_log --algorithm gcra  # only these

It prints progress lines, then Markdown tables that can be pasted into DESIGN.md.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import itertools
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import limits
from limits import RateLimitItem, RateLimitItemPerHour, storage, strategies

import ratelimit_middleware
from ratelimit_middleware import ALGORITHMS, RateLimiter

MODEL = "gpt-4"
HOT_USER = "alice"
ROUND_ROBIN_KEYS = 10_000
HOT_LIMIT = 10**7  # per hour: never reached; GCRA interval 0.36 ms, far above the gap between calls
SPREAD_LIMIT = 10**4  # per hour, per key: GCRA interval 0.36 s, above the ~30 ms between visits
DENY_LIMIT = 5  # per hour
BATCH = 1_000  # calls between two looks at the clock (hot key scenarios)
MEMORY_LIMIT = 100  # per hour, for bytes per key
LOG_ENTRIES = 10_000  # admitted requests on one key, for bytes per stored request

LimitsStrategy = type[strategies.RateLimiter]

# Our algorithm -> (the closest limits strategy, its name).
PEERS: dict[str, tuple[LimitsStrategy, str]] = {
    "sliding_log": (strategies.MovingWindowRateLimiter, "moving window"),
    "sliding_window": (strategies.SlidingWindowCounterRateLimiter, "sliding window counter"),
    "gcra": (strategies.FixedWindowRateLimiter, "fixed window (limits has no GCRA)"),
    "fixed_window": (strategies.FixedWindowRateLimiter, "fixed window"),
}

# How the summary tables name each of our algorithms, with its peer.
LABELS = {
    "sliding_log": "sliding_log (vs limits moving window)",
    "sliding_window": "sliding_window (vs limits sliding window counter)",
    "gcra": "gcra (vs limits fixed window: limits has no GCRA)",
    "fixed_window": "fixed_window (vs limits fixed window)",
}


# -- the two contenders ----------------------------------------------------------------------------


class Contender:
    """One limiter under test: set up outside the timed region, then timed calls."""

    def decide(self, user: str, model: str) -> bool:
        raise NotImplementedError

    def timed(self, batch: Sequence[str], seconds: float) -> tuple[int, float]:
        """Call once for each user of ``batch``, batch after batch, for about ``seconds``."""
        raise NotImplementedError

    def settle(self) -> None:
        """Wait for background work this limiter started, so it cannot run during the next one."""

    def held(self) -> int | None:
        """The number of keys held, when the limiter says."""
        return None


class Ours(Contender):
    def __init__(self, algorithm: str, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limiter = RateLimiter(max_requests=limit, window_seconds=3600, algorithm=algorithm, clock=clock)

    def decide(self, user: str, model: str) -> bool:
        return self.limiter.allow(user, model)

    def held(self) -> int | None:
        return len(self.limiter)

    def timed(self, batch: Sequence[str], seconds: float) -> tuple[int, float]:
        allow = self.limiter.allow
        model = MODEL
        calls = 0
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            for user in batch:
                allow(user, model)
            calls += len(batch)
            now = time.perf_counter()
            if now >= deadline:
                return calls, now - start


class Theirs(Contender):
    def __init__(self, strategy: LimitsStrategy, limit: int) -> None:
        self.storage = storage.MemoryStorage()
        self.limiter = strategy(self.storage)
        self.item: RateLimitItem = RateLimitItemPerHour(limit)

    def decide(self, user: str, model: str) -> bool:
        return self.limiter.hit(self.item, user, model)

    def timed(self, batch: Sequence[str], seconds: float) -> tuple[int, float]:
        hit = self.limiter.hit
        item = self.item
        model = MODEL
        calls = 0
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            for user in batch:
                hit(item, user, model)
            calls += len(batch)
            now = time.perf_counter()
            if now >= deadline:
                return calls, now - start

    def settle(self) -> None:
        # MemoryStorage re-arms a 10 ms threading.Timer on each hit to expire keys in the background.
        self.storage.timer.join()


# -- throughput ------------------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    limit: int
    batch: list[str]  # the users of one timed batch
    warm: list[str]  # the calls made before timing, all allowed
    expect: bool  # what every timed call returns
    probe: str  # the user checked before and after timing
    keys: int  # the keys a limiter holds throughout


def scenarios() -> list[Scenario]:
    users = [f"user-{i}" for i in range(ROUND_ROBIN_KEYS)]
    hot = [HOT_USER] * BATCH
    return [
        Scenario("hot key, allowed", HOT_LIMIT, hot, [HOT_USER] * 10, True, HOT_USER, 1),
        Scenario("10k keys, allowed", SPREAD_LIMIT, users, users, True, users[0], len(users)),
        Scenario("hot key, denied", DENY_LIMIT, hot, [HOT_USER] * DENY_LIMIT, False, HOT_USER, 1),
    ]


@dataclass
class Row:
    algorithm: str
    scenario: str
    peer: str
    ours: list[float] = field(default_factory=list)  # decisions per second, one per repeat
    theirs: list[float] = field(default_factory=list)  # paired with ``ours`` by repeat
    ours_calls: list[int] = field(default_factory=list)
    theirs_calls: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return statistics.median(o / t for o, t in zip(self.ours, self.theirs, strict=True))


def run_once(contender: Contender, scenario: Scenario, seconds: float) -> tuple[int, float]:
    """Set up, check the answer, time, check again: ``(calls, decisions per second)``."""
    for user in scenario.warm:
        contender.decide(user, MODEL)
    before = contender.decide(scenario.probe, MODEL)
    calls, elapsed = contender.timed(scenario.batch, seconds)
    after = contender.decide(scenario.probe, MODEL)
    held = contender.held()
    contender.settle()
    if before is not scenario.expect or after is not scenario.expect:
        raise RuntimeError(
            f"expected {scenario.expect} throughout, got {before} before timing, {after} after"
        )
    if held is not None and held != scenario.keys:
        raise RuntimeError(f"expected {scenario.keys:,} keys held after timing, found {held:,}")
    return calls, calls / elapsed


def measure_throughput(scenario: Scenario, algorithm: str, repeats: int, seconds: float) -> Row:
    """Interleaved repeats of ours and the peer; a repeat counts only if both sides ran cleanly."""
    strategy, peer = PEERS[algorithm]
    row = Row(algorithm, scenario.name, peer)
    for repeat in range(repeats):
        results: dict[str, tuple[int, float]] = {}
        for side in ("ours", "limits") if repeat % 2 == 0 else ("limits", "ours"):
            contender: Contender
            if side == "ours":
                contender = Ours(algorithm, scenario.limit)
            else:
                contender = Theirs(strategy, scenario.limit)
            try:
                results[side] = run_once(contender, scenario, seconds)
            except RuntimeError as error:
                row.problems.append(f"repeat {repeat}, {side}: {error}")
        if len(results) == 2:
            row.ours_calls.append(results["ours"][0])
            row.ours.append(results["ours"][1])
            row.theirs_calls.append(results["limits"][0])
            row.theirs.append(results["limits"][1])
    return row


# -- memory ----------------------------------------------------------------------------------------


def traced_growth(contender: Contender, calls: Callable[[], object]) -> int:
    """Bytes still allocated after ``calls()`` that were not before it."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        calls()
        contender.settle()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def bytes_per_key(contender: Contender, users: list[str]) -> float:
    def first_requests() -> None:
        decide = contender.decide
        for user in users:
            decide(user, MODEL)

    return traced_growth(contender, first_requests) / len(users)


def log_growth(contender: Contender, count: int) -> int:
    """Bytes that ``count`` admitted requests on one key leave allocated."""

    def requests() -> None:
        decide = contender.decide
        for _ in range(count):
            if not decide(HOT_USER, MODEL):
                raise RuntimeError("a request was denied while filling the log")

    return traced_growth(contender, requests)


@dataclass
class LogMemory:
    single: int  # bytes for one key holding one request
    full: int  # bytes for one key holding LOG_ENTRIES requests

    @property
    def per_request(self) -> float:
        return (self.full - self.single) / (LOG_ENTRIES - 1)


HELD = (1, 2, 3, 4, 5, 8, 16, 17, 32, 100)  # requests per key, for the sliding log's bytes per key


def bytes_per_key_holding(held: int, users: list[str]) -> float:
    """The sliding log's bytes per key once each of ``users`` has ``held`` requests in its window."""
    ours = Ours("sliding_log", 10**6, clock=itertools.count(1_000.0, 1e-4).__next__)  # distinct times

    def requests() -> None:
        decide = ours.decide
        for _ in range(held):
            for user in users:
                decide(user, MODEL)

    return traced_growth(ours, requests) / len(users)


def measure_log(make: Callable[[], Contender]) -> LogMemory:
    return LogMemory(log_growth(make(), 1), log_growth(make(), LOG_ENTRIES))


@dataclass
class MemoryRow:
    algorithm: str
    peer: str
    ours: dict[int, float]  # N -> bytes per key
    theirs: dict[int, float]
    ours_keys: dict[int, int]  # N -> keys our limiter reports holding afterwards


def measure_memory(
    algorithm: str, sizes: Sequence[int], theirs_cache: dict[LimitsStrategy, dict[int, float]]
) -> MemoryRow:
    """Bytes per key at each N for ours, and for the peer (measured once per limits strategy)."""
    strategy, peer = PEERS[algorithm]
    row = MemoryRow(algorithm, peer, {}, theirs_cache.setdefault(strategy, {}), {})
    for size in sizes:
        users = [f"user-{i}" for i in range(size)]
        ours = Ours(algorithm, MEMORY_LIMIT)
        row.ours[size] = bytes_per_key(ours, users)
        row.ours_keys[size] = len(ours.limiter)
        del ours
        if size not in row.theirs:
            row.theirs[size] = bytes_per_key(Theirs(strategy, MEMORY_LIMIT), users)
    return row


# -- output ----------------------------------------------------------------------------------------


def source_digest() -> str:
    """A digest of the package's sources, to tie figures to a version of the code."""
    root = Path(ratelimit_middleware.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def rate(value: float) -> str:
    return f"{value:,.0f}"


def span(values: Sequence[float]) -> str:
    low, high = round(min(values)), round(max(values))
    return f"{low}" if low == high else f"{low}-{high}"


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table; columns after the second are right-aligned."""
    right = [index > 1 for index in range(len(header))]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = (
            cell.rjust(width) if flush else cell.ljust(width)
            for cell, width, flush in zip(cells, widths, right, strict=True)
        )
        return "| " + " | ".join(padded) + " |"

    rule = "|".join(
        "-" * (width + 1) + ":" if flush else "-" * (width + 2)
        for width, flush in zip(widths, right, strict=True)
    )
    return "\n".join([line(header), f"|{rule}|", *(line(row) for row in rows)])


def print_throughput(row: Row) -> None:
    if not (row.ours and row.theirs):
        print(f"  {row.algorithm:<15} FAILED: {'; '.join(row.problems)}")
        return
    print(
        f"  {row.algorithm:<15} ours {rate(statistics.median(row.ours)):>9}/s "
        f"[{rate(min(row.ours))} to {rate(max(row.ours))}]  "
        f"limits {rate(statistics.median(row.theirs)):>9}/s "
        f"[{rate(min(row.theirs))} to {rate(max(row.theirs))}]  "
        f"ratio {row.ratio:.2f}x  ({row.peer})"
    )
    for problem in row.problems:
        print(f"    WARNING {problem}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Throughput and memory of the in-memory core, against limits."
    )
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repeats; smaller N")
    parser.add_argument(
        "--algorithm",
        action="append",
        choices=list(ALGORITHMS),
        help="measure only this algorithm (repeat the option for several; default: all four)",
    )
    args = parser.parse_args(argv)
    repeats, seconds = (3, 0.1) if args.quick else (7, 0.2)
    sizes = (20_000, 50_000) if args.quick else (50_000, 100_000, 150_000)
    order = [name for name in ALGORITHMS if name in (args.algorithm or ALGORITHMS)]

    started = time.perf_counter()
    print(
        "bench_core: ratelimit_middleware in-memory core vs limits MemoryStorage "
        f"(package sources sha256 {source_digest()})"
    )
    print(
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"limits {limits.__version__}; {repeats} interleaved repeats of ~{seconds} s; gc enabled"
    )
    print()

    rows: list[Row] = []
    for scenario in scenarios():
        print(f"== {scenario.name}: decisions/s, median [min to max]")
        for algorithm in order:
            row = measure_throughput(scenario, algorithm, repeats, seconds)
            rows.append(row)
            print_throughput(row)
            if scenario.name == "hot key, allowed" and algorithm == "sliding_log" and row.ours:
                print(
                    "    the hot key's log grows during timing, to about "
                    f"{statistics.median(row.ours_calls):,.0f} entries (ours) and "
                    f"{statistics.median(row.theirs_calls):,.0f} (limits) per repeat"
                )
    print()

    print(f"== memory (tracemalloc): bytes per key at N = {', '.join(f'{n:,}' for n in sizes)}")
    memory: list[MemoryRow] = []
    theirs_cache: dict[LimitsStrategy, dict[int, float]] = {}
    for algorithm in order:
        mem = measure_memory(algorithm, sizes, theirs_cache)
        memory.append(mem)
        ours_each = ", ".join(f"{mem.ours[n]:.1f}" for n in sizes)
        theirs_each = ", ".join(f"{mem.theirs[n]:.1f}" for n in sizes)
        held = ", ".join(f"{mem.ours_keys[n]:,}" for n in sizes)
        print(f"  {algorithm:<15} ours {ours_each} (keys held: {held})")
        print(f"  {'':<15} limits {theirs_each} ({mem.peer})")
    logs: tuple[LogMemory, LogMemory] | None = None  # (ours, limits), for sliding_log
    if "sliding_log" in order:
        clock = itertools.count(1_000.0, 0.001).__next__  # 1 ms per request: distinct entries
        logs = (
            measure_log(lambda: Ours("sliding_log", 10**6, clock=clock)),
            measure_log(lambda: Theirs(strategies.MovingWindowRateLimiter, 10**6)),
        )
        print(f"== memory: one key holding 1 and {LOG_ENTRIES:,} requests")
        for name, log in zip(("sliding_log", "limits moving window"), logs, strict=True):
            print(f"  {name:<21} {log.single:,} B and {log.full:,} B: ", end="")
            print(f"{log.per_request:.1f} B per stored request")
        users = [f"user-{i}" for i in range(sizes[0])]
        print(f"== memory: sliding_log bytes per key holding n requests (N = {sizes[0]:,}; goal 200 + 16 n)")
        for held in HELD:
            per_key = bytes_per_key_holding(held, users)
            verdict = "within" if per_key <= 200 + 16 * held else "OVER"
            print(f"  n = {held:<4} {per_key:7.1f} B  {verdict} {200 + 16 * held}")
    print()

    print("### Throughput (decisions per second, median)")
    print()
    table = [
        [
            LABELS[row.algorithm],
            row.scenario,
            rate(statistics.median(row.ours)) if row.ours else "failed",
            rate(statistics.median(row.theirs)) if row.theirs else "failed",
            f"{row.ratio:.2f}x" if row.ours and row.theirs else "n/a",
        ]
        for row in sorted(rows, key=lambda row: order.index(row.algorithm))
    ]
    print(markdown(["algorithm", "scenario", "ours dec/s", "limits dec/s", "ratio"], table))
    print()
    print(
        f"One thread, one public call per decision; median of {repeats} interleaved repeats of "
        f"~{seconds} s; ratio = median of the paired per-repeat ratios ours / limits "
        "(above 1: ours is faster)."
    )
    print()

    print("### Memory (tracemalloc, bytes)")
    print()
    mem_table = [
        [
            LABELS[mem.algorithm],
            f"per key (N = {', '.join(f'{n // 1000}k' for n in sizes)})",
            span(list(mem.ours.values())),
            span(list(mem.theirs.values())),
        ]
        for mem in memory
    ]
    if logs is not None:
        mem_table.append(
            [
                LABELS["sliding_log"],
                f"per stored request (1 key, {LOG_ENTRIES // 1000}k requests)",
                *(f"{log.per_request:.1f}" for log in logs),
            ]
        )
    print(markdown(["algorithm", "measure", "ours", "limits"], mem_table))
    print()
    key_string = sys.getsizeof(RateLimitItemPerHour(MEMORY_LIMIT).key_for("user-99999", MODEL))
    print(
        "Per key: growth from a first request by each of N users on one model, / N, as a range "
        "over N. The user strings are not counted (each would add about "
        f"{sys.getsizeof('user-99999')} B to either library); limits' figure includes the key "
        f"string it builds and stores (about {key_string} B here)."
    )
    print()
    print(f"total time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
