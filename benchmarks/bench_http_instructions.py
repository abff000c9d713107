"""Server work per request in instructions: the noise-free complement of ``bench_http.py``'s wrk runs.

On a shared machine, requests per second and CPU time move by several percent between runs, as much as the
throughput targets themselves. Instructions do not: valgrind's callgrind counts every instruction a
process executes, whatever else runs beside it. Each server of ``bench_http.py``'s part A (the same apps
and commands: uvicorn serving the Starlette app, gunicorn serving the Flask app, with its sync worker
here, see ``server_command``) runs under callgrind twice, serving ``SHORT`` and then ``LONG`` requests
(``GET /`` with the benchmark's ``X-User-ID`` and ``X-Model`` headers, one at a time over 4 keep-alive
connections where the server keeps them, from this process); the difference of the two totals over
``LONG - SHORT`` is the work of one request, start-up and shutdown cancelled. "Kept" is bare over variant:
the share of the bare app's capacity kept if the time per instruction stayed the same.

It does not see what instructions cost: cache and branch-prediction effects, which make the same
instructions slower beside another program's (see DESIGN.md, "HTTP overhead"), show only in the timings of
``bench_http.py``. Run from the repository root (about 8 minutes; valgrind from Debian's packages)::

    .venv/bin/python benchmarks/bench_http_instructions.py          # both groups
    .venv/bin/python benchmarks/bench_http_instructions.py wsgi     # Flask only
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_http  # benchmarks/ is sys.path[0] when this file is run as a script

SHORT, LONG = 200, 1200
CONNECTIONS = 4
VARIANTS = {"asgi": bench_http.ASGI_WRK, "wsgi": bench_http.WSGI_WRK}  # the servers of bench_http's part A
_TOTAL = re.compile(rb"^(?:summary|totals): (\d+)", re.MULTILINE)


def server_command(group: str, port: int) -> list[str]:
    """``bench_http``'s server, but gunicorn's default sync worker instead of gthread: one thread, so that
    the same requests always take the same instructions (gthread's poller and thread pool take more or
    fewer turns as its threads happen to be scheduled, and bare Flask measured 0.96M to 1.09M per request).
    A sync worker closes every connection: each request also pays for accepting one."""
    command = bench_http.server_command(group, port)
    if group == "wsgi":
        at = command.index("--worker-class")
        command[at : at + 4] = ["--worker-class", "sync"]
    return command


def instructions(group: str, variant: str, requests: int, work: Path) -> int:
    """Instructions executed by every process of one server (gunicorn forks a worker) serving ``requests``."""
    out = work / f"{group}-{variant}-{requests}"
    out.mkdir()
    port = bench_http.free_port()
    path = os.pathsep.join([str(bench_http.PACKAGE_DIR), str(bench_http.BENCH_DIR)])
    env = {**os.environ, "BENCH_VARIANT": variant, "PYTHONPATH": path, "PYTHONHASHSEED": "0"}
    command = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/callgrind.%p",
        *server_command(group, port),
    ]  # fmt: skip
    with (out / "log").open("wb") as log:
        server = subprocess.Popen(
            command, cwd=bench_http.PACKAGE_DIR, env=env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        send(port, requests, expect=429 if variant.endswith("_deny") else 200, server=server, log=out / "log")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=120)
    return sum(int(_TOTAL.search(file.read_bytes()).group(1)) for file in out.glob("callgrind.*"))  # type: ignore[union-attr]


def send(port: int, requests: int, expect: int, server: subprocess.Popen[bytes], log: Path) -> None:
    """Wait for the server (slow under valgrind), then send ``requests`` requests; the first one of a deny
    variant is allowed."""
    deadline = time.monotonic() + 300
    while True:
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start:\n{log.read_text(errors='replace')[-2000:]}")
        try:
            http.client.HTTPConnection("127.0.0.1", port, timeout=5).connect()
            break
        except OSError:
            time.sleep(0.2)
    connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=120) for _ in range(CONNECTIONS)]
    headers = {"X-User-ID": bench_http.USER, "X-Model": bench_http.MODEL}
    for index in range(requests):
        connection = connections[index % CONNECTIONS]
        connection.request("GET", "/", headers=headers)
        response = connection.getresponse()
        response.read()
        if index and response.status != expect:
            raise RuntimeError(f"request {index}: status {response.status}, expected {expect}")
    for connection in connections:
        connection.close()


def main(argv: list[str]) -> None:
    """``argv``: the groups to measure, ``asgi`` and/or ``wsgi`` (default both)."""
    groups = argv or list(VARIANTS)
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install -y valgrind)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench_http_instructions_") as work:
        digest = bench_http.snapshot_package(Path(work) / "package")
        print(f"bench_http_instructions: {bench_http.machine()}")
        print(f"code: ratelimit_middleware of {bench_http.git_state()}, snapshot {digest}")
        print(
            f"instructions per request: callgrind, ({LONG} requests - {SHORT}) / {LONG - SHORT}\n", flush=True
        )
        rows: dict[str, dict[str, float]] = {}
        for group in groups:
            variants = VARIANTS[group]
            rows[group] = {}
            for variant in variants:
                short = instructions(group, variant, SHORT, Path(work))
                long = instructions(group, variant, LONG, Path(work))
                rows[group][variant] = (long - short) / (LONG - SHORT)
                print(f"  {group} {variant}: {rows[group][variant] / 1000:,.1f}k", flush=True)
    print("\n| app / server | variant | instructions per request | added to bare | kept (bare / variant) |")
    print("|---|---|---:|---:|---:|")
    for group, per_variant in rows.items():
        server = "Starlette / uvicorn" if group == "asgi" else "Flask / gunicorn"
        bare = per_variant["bare"]
        for variant, count in per_variant.items():
            added = (count - bare) / 1000
            print(f"| {server} | {variant} | {count / 1000:,.1f}k | {added:+,.1f}k | {bare / count:.1%} |")
    print(f"\n(total {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])
