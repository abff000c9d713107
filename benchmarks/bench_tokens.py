"""Token-limited decisions (reserve, then settle) beside request-only decisions, in memory and on Redis.

For each backend the same tier is measured three ways, in one run with interleaved repeats:

- ``check``: a request limit only (``Limits(requests=...)``), one ``check`` per request;
- ``reserve+settle``: requests, tokens and a concurrency cap (``Limits(requests, tokens, max_concurrent)``),
  one ``reserve`` then one ``settle`` per request (what the middlewares do), reported per request;
- on Redis, sync (one call after another) and async (100 concurrent callers, one process).

Limits are high enough that everything is allowed. Medians of the repeats; the ratio is reserve+settle over
check (below 1: a token-limited request costs more than a request-only one). Not a test: it prints figures.
Run from the repository root: ``.venv/bin/python benchmarks/bench_tokens.py [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable

from bench_redis import Server

from ratelimit_middleware import Limits, MultiTierRateLimiter, RedisStorage
from ratelimit_middleware.backends.base import Storage

REQUESTS = "1000000000/hour"
TOKENS = "1000000000000/hour"


def limiter(storage: Storage | None, tokens: bool) -> MultiTierRateLimiter:
    limits = Limits(REQUESTS, tokens=TOKENS, max_concurrent=1000) if tokens else Limits(REQUESTS)
    return MultiTierRateLimiter(per_user_model=limits, storage=storage)


def sync_rate(make: Callable[[], MultiTierRateLimiter], tokens: bool, calls: int) -> float:
    subject = make()
    started = time.perf_counter()
    for index in range(calls):
        user = f"user-{index % 1000}"
        if tokens:
            subject.reserve(user, "m", input_tokens=500, output_tokens=500).settle(400, 300)
        else:
            subject.check(user, "m")
    return calls / (time.perf_counter() - started)


async def async_rate(make: Callable[[], MultiTierRateLimiter], tokens: bool, calls: int) -> float:
    subject = make()

    async def caller(offset: int) -> None:
        for index in range(offset, calls, 100):
            user = f"user-{index % 1000}"
            if tokens:
                reservation = await subject.areserve(user, "m", input_tokens=500, output_tokens=500)
                await reservation.asettle(400, 300)
            else:
                await subject.acheck(user, "m")

    started = time.perf_counter()
    await asyncio.gather(*(caller(offset) for offset in range(100)))
    return calls / (time.perf_counter() - started)


def row(name: str, rate: Callable[[bool], float], repeats: int) -> None:
    checks, reserves = [], []
    for _ in range(repeats):
        checks.append(rate(False))
        try:
            reserves.append(rate(True))
        except TypeError as error:  # a storage without token support
            print(f"| {name} | {statistics.median(checks):,.0f} | not supported: {error} | |")
            return
    check, reserve = statistics.median(checks), statistics.median(reserves)
    print(f"| {name} | {check:,.0f} | {reserve:,.0f} | {reserve / check:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and repeats")
    args = parser.parse_args()
    repeats, memory_calls, redis_calls = (3, 20_000, 2_000) if args.quick else (5, 100_000, 10_000)
    print("| backend | check: requests/s | reserve+settle: requests/s | ratio |")
    print("|---|---:|---:|---:|")
    row("memory", lambda tokens: sync_rate(lambda: limiter(None, tokens), tokens, memory_calls), repeats)
    server = Server()
    try:
        prefixes = iter(range(10**6))

        def on_redis(tokens: bool) -> MultiTierRateLimiter:
            return limiter(RedisStorage(server.url, key_prefix=f"bench{next(prefixes)}"), tokens)

        row("redis, sync", lambda tokens: sync_rate(lambda: on_redis(tokens), tokens, redis_calls), repeats)
        row(
            "redis, async (100 callers)",
            lambda tokens: asyncio.run(async_rate(lambda: on_redis(tokens), tokens, redis_calls * 3)),
            repeats,
        )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
