"""HTTP overhead of our middlewares, side by side with slowapi (Starlette) and flask-limiter (Flask).

Two measurements, in one run; the apps are in ``benchmarks/http_apps.py`` (one JSON route, bare or behind
one limiter; allow variants 10**9 requests per hour, deny variants 1 per hour, every limiter keyed on the
``X-User-ID`` header, each with its default in-memory storage and algorithm). Two controls: our middleware
with ``add_headers=False``, and the bare app sending the nine headers ours adds (what the server pays to
write them). The run first copies ``ratelimit_middleware`` to a temporary snapshot, which the in-process
part and every server import, so that one run measures one version of the code even while the working
tree is being edited.

B. In process, no sockets (run first): each app is called directly, in a tight loop. ASGI: a scope, a
   ``receive`` replaying the prepared messages (bodies in 64 KiB chunks, then ``http.disconnect``) and a
   no-op ``send``, on one asyncio loop. WSGI: a copy of a prepared environ with a fresh ``wsgi.input``, a
   no-op ``start_response``, the iterable consumed and closed. Each case is calibrated to about 0.08 s per
   sample (0.04 s with ``--quick``); samples of all cases of a group are interleaved, and repeated 5 times
   (3). Figures are medians over the repeats of microseconds per request; "added" is the median of the
   paired per-repeat differences from the bare app. Header keys: the requests carry ``X-User-ID`` and
   ``X-Model``. Body keys: ``POST /v1/chat/completions`` with a JSON body whose ``"model"`` our default
   model key reads when no ``X-Model`` header is sent (the route reads the body itself too, as an
   inference API would).

A. Over real sockets on 127.0.0.1 with wrk: uvicorn (1 worker, no access log; uvloop and httptools only if
   installed, else asyncio and h11) serving the Starlette app, gunicorn (1 gthread worker with 4 threads,
   which keeps connections alive; the default sync worker closes every connection, and the port churn of a
   connection per request made its runs noisy) serving the Flask app. The machine has 2 cores, so
   servers are pinned to CPU 0 and wrk (1 thread, 64 connections) to CPU 1 when ``taskset`` exists. All
   servers of a group run at once, idle but one; the runs of each repeat go through every server in turn
   (rotated), after a 1 s warm-up each: 3 runs of 5 s (1 of 2 s with ``--quick``). Figures are medians of
   the requests per second over the runs, and the server's CPU time per request (user + system of its
   process group, from ``/proc``, over each run). "Of bare" is the median of the per-run ratios to the bare
   app; "of bare by CPU" the same with CPU per request (bare over limited: the capacity kept), which the
   throughput targets are judged on, as other processes on a shared machine skew it less than req/s.

Run from the repository root::

    .venv/bin/python benchmarks/bench_http.py            # about 4 minutes
    .venv/bin/python benchmarks/bench_http.py --quick    # about 1 minute
    .venv/bin/python benchmarks/bench_http.py --profile  # also: where our middlewares spend their time

It prints progress lines, the figures with the team's targets (PASS/FAIL per line), then Markdown tables
that can be pasted into DESIGN.md. It asserts nothing: a target missed is reported, not raised.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import hashlib
import http.client
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import pstats
import re
import shutil
import signal
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

import http_apps  # benchmarks/ is sys.path[0] when this file is run as a script

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
# Where ratelimit_middleware is imported from: a snapshot of the working tree taken when the run starts, so
# that every server and the in-process part measure the same code while the tree is being edited.
PACKAGE_DIR = ROOT

USER = "bench-user"
MODEL = "gpt-4"
BODY_SIZES = (200, 10_000, 100_000)
CHUNK = 64 * 1024  # bytes per http.request message, as a server would hand a large body over
GUNICORN_THREADS = 4

# The team's targets for our middlewares (header keys).
TARGET_ADDED_US = 10.0
TARGET_KEEP = 0.95
# Measured on this machine before, for comparison: (share of bare throughput kept, us added when allowing,
# us added when denying).
REFERENCE = {
    "slowapi": (0.70, 92.0, 440.0),
    "flask-limiter": (0.63, 250.0, None),
}

Message = dict[str, Any]
Send = Callable[[Message], Awaitable[None]]


@dataclass
class Settings:
    quick: bool
    repeats: int  # in-process samples per case
    sample_seconds: float
    wrk_repeats: int
    wrk_seconds: int
    warmup_seconds: int
    connections: int


# -- B. in process ----------------------------------------------------------------------------------------


def asgi_scope(method: str, path: str, headers: dict[str, str]) -> dict[str, Any]:
    """An HTTP scope as uvicorn builds it."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 51000),
        "scheme": "http",
        "method": method,
        "root_path": "",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [
            (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()
        ],
        "state": {},
    }


def body_messages(body: bytes) -> list[Message]:
    """The ``http.request`` messages of a body, in chunks of at most ``CHUNK`` bytes."""
    if not body:
        return [{"type": "http.request", "body": b"", "more_body": False}]
    chunks = [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)]
    return [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
        for i, chunk in enumerate(chunks)
    ]


_DISCONNECT: Message = {"type": "http.disconnect"}


class Replay:
    """A ``receive`` that returns the prepared messages, then ``http.disconnect``."""

    __slots__ = ("_messages",)

    def __init__(self, messages: list[Message]) -> None:
        self._messages = iter(messages)

    async def __call__(self) -> Message:
        return next(self._messages, _DISCONNECT)


async def _no_send(message: Message) -> None:
    return None


async def run_asgi(
    app: Any, scope: dict[str, Any], messages: list[Message], n: int, send: Send = _no_send
) -> None:
    for _ in range(n):
        request_scope = scope.copy()
        request_scope["state"] = {}
        await app(request_scope, Replay(messages), send)


async def asgi_status(app: Any, scope: dict[str, Any], messages: list[Message]) -> tuple[int, dict[str, str]]:
    """Status and headers of one response (to check a case before timing it)."""
    seen: list[Message] = []

    async def send(message: Message) -> None:
        seen.append(message)

    await run_asgi(app, scope, messages, 1, send)
    start = next(message for message in seen if message["type"] == "http.response.start")
    return start["status"], {name.decode().lower(): value.decode() for name, value in start["headers"]}


def wsgi_environ(method: str, path: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """A WSGI environ as gunicorn builds it (``wsgi.input`` replaced on every call)."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "51000",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "HTTP_HOST": "127.0.0.1:8000",
    }
    for name, value in headers.items():
        key = name.upper().replace("-", "_")
        environ[key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}"] = value
    if body:
        environ["CONTENT_LENGTH"] = str(len(body))
    return environ


def _no_write(data: bytes) -> None:
    return None


def _no_start_response(
    status: str, headers: list[tuple[str, str]], exc_info: Any = None
) -> Callable[[bytes], None]:
    return _no_write


def run_wsgi(
    app: Callable[..., Any],
    environ: dict[str, Any],
    body: bytes,
    n: int,
    start_response: Callable[..., Any] = _no_start_response,
) -> None:
    for _ in range(n):
        request_environ = environ.copy()
        request_environ["wsgi.input"] = io.BytesIO(body)
        result = app(request_environ, start_response)
        for _chunk in result:
            pass
        close = getattr(result, "close", None)
        if close is not None:
            close()


def wsgi_status(app: Callable[..., Any], environ: dict[str, Any], body: bytes) -> tuple[int, dict[str, str]]:
    seen: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(
        status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        seen.append((status, headers))
        return _no_write

    run_wsgi(app, environ, body, 1, start_response)
    status, headers = seen[0]
    return int(status.split()[0]), {name.lower(): value for name, value in headers}


@dataclass
class Case:
    """One in-process case: ``run(n)`` serves n requests; ``check()`` returns one response's status."""

    label: str
    run: Callable[[int], None]
    check: Callable[[], tuple[int, dict[str, str]]]
    expect: int
    n: int = 0
    samples: list[float] = field(default_factory=list)  # microseconds per request

    @property
    def us(self) -> float:
        return statistics.median(self.samples)


def asgi_case(
    loop: asyncio.AbstractEventLoop, label: str, app: Any, scope: dict[str, Any], body: bytes, expect: int
) -> Case:
    messages = body_messages(body)
    return Case(
        label,
        lambda n: loop.run_until_complete(run_asgi(app, scope, messages, n)),
        lambda: loop.run_until_complete(asgi_status(app, scope, messages)),
        expect,
    )


def wsgi_case(label: str, app: Callable[..., Any], environ: dict[str, Any], body: bytes, expect: int) -> Case:
    return Case(
        label, lambda n: run_wsgi(app, environ, body, n), lambda: wsgi_status(app, environ, body), expect
    )


def chat_body(size: int) -> bytes:
    """A chat completion request of about ``size`` bytes, with ``"model"`` first as clients send it."""
    base = {"model": MODEL, "messages": [{"role": "user", "content": ""}], "max_tokens": 64}
    filler = max(size - len(json.dumps(base)), 0)
    base["messages"] = [{"role": "user", "content": "lorem ipsum " * (filler // 12) + "x" * (filler % 12)}]
    return json.dumps(base).encode()


def measure_group(title: str, cases: Sequence[Case], settings: Settings) -> None:
    """Check, warm up and calibrate every case, then take interleaved samples."""
    for case in cases:
        status, headers = case.check()
        if status != case.expect:
            raise SystemExit(f"{title} / {case.label}: expected status {case.expect}, got {status}")
        wants_headers = case.label.startswith("ours") and "noheaders" not in case.label and status == 200
        if wants_headers and "ratelimit" not in headers:
            raise SystemExit(f"{title} / {case.label}: no RateLimit header, is the middleware in place?")
        case.run(20)
        n = 50
        while True:  # calibrate: about settings.sample_seconds per sample
            start = time.perf_counter()
            case.run(n)
            elapsed = time.perf_counter() - start
            if elapsed >= settings.sample_seconds / 4 or n >= 1_000_000:
                break
            n *= 4
        case.n = max(20, int(n * settings.sample_seconds / elapsed))
    for repeat in range(settings.repeats):
        shift = repeat % len(cases)
        for case in [*cases[shift:], *cases[:shift]]:
            start = time.perf_counter()
            case.run(case.n)
            case.samples.append((time.perf_counter() - start) / case.n * 1e6)
    print(f"  {title}: {', '.join(f'{case.label} {case.us:.1f}' for case in cases)} (us/request)", flush=True)


def added(case: Case, bare: Case) -> float:
    """Median of the paired per-repeat differences, in microseconds."""
    return statistics.median(a - b for a, b in zip(case.samples, bare.samples, strict=True))


@dataclass
class InProcess:
    asgi: dict[str, Case]
    wsgi: dict[str, Case]
    asgi_body: dict[int, dict[str, Case]]
    wsgi_body: dict[int, dict[str, Case]]


ASGI_INPROCESS = (
    "bare",
    "bare_headers",
    "ours",
    "ours_noheaders",
    "ours_no_x_model",
    "slowapi",
    "slowapi_asgi",
    "ours_deny",
    "slowapi_deny",
)
WSGI_INPROCESS = (
    "bare",
    "bare_headers",
    "ours",
    "ours_noheaders",
    "ours_no_x_model",
    "flask_limiter",
    "ours_deny",
    "flask_limiter_deny",
)


def in_process(settings: Settings) -> InProcess:
    print("B. in process (us per request)", flush=True)
    started = time.monotonic()
    loop = asyncio.new_event_loop()
    header_keys = {"Host": "127.0.0.1:8000", "X-User-ID": USER, "X-Model": MODEL}
    no_model = {"Host": "127.0.0.1:8000", "X-User-ID": USER}

    # ours_no_x_model: the "ours" app, sent a GET without X-Model (the model key then reads the empty body).
    asgi: dict[str, Case] = {}
    for name in ASGI_INPROCESS:
        variant = "ours" if name == "ours_no_x_model" else name
        scope = asgi_scope("GET", "/", no_model if name == "ours_no_x_model" else header_keys)
        expect = 429 if name.endswith("_deny") else 200
        asgi[name] = asgi_case(loop, name, http_apps.make_asgi(variant), scope, b"", expect)
        if expect == 429:
            asgi[name].run(1)  # spend the one allowed request
    measure_group("Starlette, GET /", list(asgi.values()), settings)

    wsgi: dict[str, Case] = {}
    for name in WSGI_INPROCESS:
        variant = "ours" if name == "ours_no_x_model" else name
        environ = wsgi_environ("GET", "/", no_model if name == "ours_no_x_model" else header_keys, b"")
        expect = 429 if name.endswith("_deny") else 200
        wsgi[name] = wsgi_case(name, http_apps.make_wsgi(variant), environ, b"", expect)
        if expect == 429:
            wsgi[name].run(1)
    measure_group("Flask, GET /", list(wsgi.values()), settings)

    asgi_body: dict[int, dict[str, Case]] = {}
    wsgi_body: dict[int, dict[str, Case]] = {}
    path = "/v1/chat/completions"
    for size in BODY_SIZES:
        body = chat_body(size)
        typed = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        with_header, without = {**header_keys, **typed}, {**no_model, **typed}
        bare_scope, header_scope = (
            asgi_scope("POST", path, with_header),
            asgi_scope("POST", path, with_header),
        )
        body_scope = asgi_scope("POST", path, without)
        asgi_body[size] = {
            "bare": asgi_case(loop, "bare", http_apps.make_asgi("bare"), bare_scope, body, 200),
            "header": asgi_case(loop, "header key", http_apps.make_asgi("ours"), header_scope, body, 200),
            "body": asgi_case(loop, "body key", http_apps.make_asgi("ours"), body_scope, body, 200),
        }
        measure_group(f"Starlette, POST {len(body):,} B", list(asgi_body[size].values()), settings)
        with_environ = wsgi_environ("POST", path, with_header, body)
        without_environ = wsgi_environ("POST", path, without, body)
        wsgi_body[size] = {
            "bare": wsgi_case("bare", http_apps.make_wsgi("bare"), with_environ, body, 200),
            "header": wsgi_case("header key", http_apps.make_wsgi("ours"), with_environ, body, 200),
            "body": wsgi_case("body key", http_apps.make_wsgi("ours"), without_environ, body, 200),
        }
        measure_group(f"Flask, POST {len(body):,} B", list(wsgi_body[size].values()), settings)
    loop.close()
    print(f"  (in {time.monotonic() - started:.0f} s)", flush=True)
    return InProcess(asgi, wsgi, asgi_body, wsgi_body)


# -- A. over sockets with wrk ----------------------------------------------------------------------------


@dataclass
class WrkRun:
    rps: float
    requests: int
    non_2xx: int
    socket_errors: int
    p50_ms: float
    p99_ms: float
    cpu_us: float = 0.0  # server CPU time (all its processes, user + system) per request


@dataclass
class Server:
    group: str  # "asgi" or "wsgi"
    variant: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    runs: list[WrkRun] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return statistics.median(run.rps for run in self.runs)

    @property
    def cpu_us(self) -> float:
        return statistics.median(run.cpu_us for run in self.runs)


def pinned(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") and (os.cpu_count() or 1) >= 2 else []


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def uvicorn_options() -> list[str]:
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return ["--loop", loop, "--http", http]


def server_command(group: str, port: int) -> list[str]:
    python = sys.executable
    if group == "asgi":
        return [
            python, "-m", "uvicorn", "http_apps:make_asgi", "--factory", "--app-dir", str(BENCH_DIR),
            "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning",
            *uvicorn_options(),
        ]  # fmt: skip
    return [
        python, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1",
        "--worker-class", "gthread", "--threads", str(GUNICORN_THREADS), "--graceful-timeout", "1",
        "--pythonpath", str(BENCH_DIR), "--log-level", "warning", "http_apps:make_wsgi()",
    ]  # fmt: skip


def start_server(group: str, variant: str, logs: Path, package_dir: Path) -> Server:
    port = free_port()
    log = logs / f"{group}-{variant}.log"
    path = os.pathsep.join([str(package_dir), str(BENCH_DIR)])
    env = {**os.environ, "BENCH_VARIANT": variant, "PYTHONPATH": path}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*pinned(0), *server_command(group, port)],
            cwd=package_dir,  # python -m puts the working directory first on sys.path
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: gunicorn's worker is stopped with its master
        )
    return Server(group, variant, port, process, log)


def wait_ready(server: Server, timeout: float = 30.0) -> None:
    """Poll until the server answers ``GET /`` (200, or 429 for a deny variant)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.group}/{server.variant} exited:\n{server.log.read_text()[-2000:]}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=2)
            connection.request("GET", "/", headers={"X-User-ID": USER, "X-Model": MODEL})
            status = connection.getresponse().status
            connection.close()
            if status in (200, 429):
                check_package(server)
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{server.group}/{server.variant} did not answer within {timeout:.0f} s")


def check_package(server: Server) -> None:
    """Ours must run from the snapshot: ``http_apps`` logs where it imported ``ratelimit_middleware`` from."""
    if not server.variant.startswith("ours"):
        return
    log = server.log.read_text(errors="replace")
    found = re.search(r"ratelimit_middleware imported from (\S+)", log)
    if found is None or not found.group(1).startswith(str(PACKAGE_DIR)):
        raise RuntimeError(f"{server.group}/{server.variant} did not import the snapshot: {log[-500:]}")


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every live process in process group ``pgid`` (Linux ``/proc``)."""
    ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # fields[0] is field 3 (state) of proc(5)
        if int(fields[2]) == pgid:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def stop_server(server: Server) -> None:
    """Stop its process group: SIGTERM (gunicorn runs with a 1 s graceful timeout), else SIGKILL."""
    if server.process.poll() is not None:
        return
    try:
        os.killpg(server.process.pid, signal.SIGTERM)
        server.process.wait(timeout=5)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=5)


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * _UNITS_MS[unit]


def run_wrk(port: int, seconds: int, connections: int, pgid: int | None = None) -> WrkRun:
    command = [
        *pinned(1), "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
        "-H", f"X-User-ID: {USER}", "-H", f"X-Model: {MODEL}", f"http://127.0.0.1:{port}/",
    ]  # fmt: skip
    cpu_before = group_cpu_seconds(pgid) if pgid is not None else 0.0
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    cpu = group_cpu_seconds(pgid) - cpu_before if pgid is not None else 0.0
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return WrkRun(
        rps=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        requests=requests,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
        p50_ms=_ms(re.search(r"^\s+50%\s+(\S+)", out, re.MULTILINE).group(1)),  # type: ignore[union-attr]
        p99_ms=_ms(re.search(r"^\s+99%\s+(\S+)", out, re.MULTILINE).group(1)),  # type: ignore[union-attr]
        cpu_us=cpu / max(requests, 1) * 1e6,
    )


ASGI_WRK = ("bare", "bare_headers", "ours", "ours_noheaders", "slowapi", "ours_deny", "slowapi_deny")
WSGI_WRK = (
    "bare",
    "bare_headers",
    "ours",
    "ours_noheaders",
    "flask_limiter",
    "ours_deny",
    "flask_limiter_deny",
)


def over_sockets(settings: Settings) -> dict[str, dict[str, Server]]:
    print(
        f"A. over sockets: wrk -t1 -c{settings.connections} -d{settings.wrk_seconds}s, "
        f"{settings.wrk_repeats} run(s) per server",
        flush=True,
    )
    results: dict[str, dict[str, Server]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_http_") as logs:
        for group, variants in (("asgi", ASGI_WRK), ("wsgi", WSGI_WRK)):
            servers: dict[str, Server] = {}
            started = time.monotonic()
            try:
                for variant in variants:
                    servers[variant] = start_server(group, variant, Path(logs), PACKAGE_DIR)
                for server in servers.values():
                    wait_ready(server)
                ready = time.monotonic() - started
                for server in servers.values():
                    run_wrk(server.port, settings.warmup_seconds, settings.connections)
                ordered = list(servers.values())
                for repeat in range(settings.wrk_repeats):
                    shift = repeat % len(ordered)
                    for server in [*ordered[shift:], *ordered[:shift]]:
                        run = run_wrk(
                            server.port, settings.wrk_seconds, settings.connections, server.process.pid
                        )
                        server.runs.append(run)
                line = ", ".join(f"{server.variant} {server.rps:,.0f}" for server in ordered)
                print(
                    f"  {'Starlette/uvicorn' if group == 'asgi' else 'Flask/gunicorn'}: {line} (req/s; "
                    f"servers ready in {ready:.1f} s, group done in {time.monotonic() - started:.0f} s)",
                    flush=True,
                )
            finally:
                for server in servers.values():
                    stop_server(server)
            results[group] = servers
    return results


def paired_ratio(server: Server, bare: Server) -> float:
    """Throughput kept: the median of the per-run ratios of requests per second."""
    return statistics.median(a.rps / b.rps for a, b in zip(server.runs, bare.runs, strict=True))


def cpu_ratio(server: Server, bare: Server) -> float:
    """Capacity kept: the median of the per-run ratios of server CPU per request, bare over ``server``."""
    return statistics.median(b.cpu_us / a.cpu_us for a, b in zip(server.runs, bare.runs, strict=True))


# -- --profile: where our middlewares spend their time --------------------------------------------------


def _per_call_us(function: Callable[[], object], n: int = 20_000) -> float:
    """Best of 5 batches, in microseconds per call."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            function()
        best = min(best, (time.perf_counter() - start) / n * 1e6)
    return best


def _short_path(filename: str) -> str:
    if "ratelimit_middleware/" in filename:
        return "ratelimit_middleware/" + filename.rsplit("ratelimit_middleware/", 1)[1]
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1]
    return Path(filename).name if filename.startswith("/") else filename


def _print_profile(title: str, profiler: cProfile.Profile, count: int) -> None:
    entries = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in entries.values())
    print(
        f"\n  cProfile, {title}, {count:,} requests: {total / count * 1e6:.1f} us/request under the profiler "
        "(which inflates small calls). Own and cumulative us per request, calls per request:"
    )
    ranked = sorted(entries.items(), key=lambda item: item[1][2], reverse=True)
    ours = [item for item in ranked if "ratelimit_middleware" in item[0][0]]
    for heading, rows in (("top 8 overall", ranked[:8]), ("top 12 in ratelimit_middleware", ours[:12])):
        print(f"    {heading}:")
        for (filename, line, name), (_, calls, own, cumulative, _) in rows:
            print(
                f"      {own / count * 1e6:6.2f} {cumulative / count * 1e6:7.2f}  {calls / count:4.1f}x  "
                f"{name} ({_short_path(filename)}:{line})"
            )
    ours_own = sum(entry[1][2] for entry in ours)
    print(f"    own time in ratelimit_middleware: {ours_own / count * 1e6:.2f} us/request under the profiler")


def profile_ours(settings: Settings) -> None:
    """Component timings of our middlewares (no profiler), then cProfile of the Starlette and Flask apps."""
    from ratelimit_middleware import RateLimiter
    from ratelimit_middleware import wsgi as ours_wsgi
    from ratelimit_middleware.asgi import RateLimitMiddleware, encode_headers, request_view
    from ratelimit_middleware.contract import denial_response, go_duration, informational_headers
    from ratelimit_middleware.gate import Gate

    print("\nProfile: our middlewares, header keys (best of 5 batches, us per call)", flush=True)
    header_keys = {"Host": "127.0.0.1:8000", "X-User-ID": USER, "X-Model": MODEL}
    scope = asgi_scope("GET", "/", header_keys)
    environ = wsgi_environ("GET", "/", header_keys, b"")
    gate = Gate(RateLimiter(limit=http_apps.ALLOW_LIMIT))
    deny_gate = Gate(RateLimiter(limit=http_apps.DENY_LIMIT))
    deny_gate.limiter.check(USER, MODEL)
    allowed = gate.limiter.check(USER, MODEL)
    denied = deny_gate.limiter.check(USER, MODEL)
    view = request_view(scope)
    headers = informational_headers(allowed)
    denial_headers = denial_response(denied).headers
    loop = asyncio.new_event_loop()
    n = 5_000 if settings.quick else 15_000  # requests per batch (calls per batch for the components: 20,000)

    async def trivial(scope: Any, receive: Any, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})

    def trivial_wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    messages = body_messages(b"")

    def whole_asgi(app: Any) -> float:
        loop.run_until_complete(run_asgi(app, scope, messages, 200))
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            loop.run_until_complete(run_asgi(app, scope, messages, n))
            best = min(best, (time.perf_counter() - start) / n * 1e6)
        return best

    def whole_wsgi(app: Callable[..., Any]) -> float:
        return _per_call_us(lambda: run_wsgi(app, environ, b"", 1), n)

    async def acheck_loop() -> None:
        for _ in range(n):
            await gate.limiter.acheck(USER, MODEL)

    def acheck_us() -> float:
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            loop.run_until_complete(acheck_loop())
            best = min(best, (time.perf_counter() - start) / n * 1e6)
        return best

    allow, deny = RateLimiter(limit=http_apps.ALLOW_LIMIT), RateLimiter(limit=http_apps.DENY_LIMIT)
    base = whole_asgi(trivial)
    base_wsgi = whole_wsgi(trivial_wsgi)
    rows: list[tuple[str, float]] = [
        ("trivial raw ASGI app alone (the harness)", base),
        (
            "  + RateLimitMiddleware, allowed: added",
            whole_asgi(RateLimitMiddleware(trivial, limiter=allow)) - base,
        ),
        (
            "  + RateLimitMiddleware, allowed, add_headers=False: added",
            whole_asgi(RateLimitMiddleware(trivial, limiter=allow, add_headers=False)) - base,
        ),
        (
            "  + RateLimitMiddleware, denied: added",
            whole_asgi(RateLimitMiddleware(trivial, limiter=deny)) - base,
        ),
        ("trivial WSGI app alone (the harness)", base_wsgi),
        (
            "  + RateLimitWSGI, allowed: added",
            whole_wsgi(ours_wsgi.RateLimitWSGI(trivial_wsgi, limiter=allow)) - base_wsgi,
        ),
        (
            "  + RateLimitWSGI, allowed, add_headers=False: added",
            whole_wsgi(ours_wsgi.RateLimitWSGI(trivial_wsgi, limiter=allow, add_headers=False)) - base_wsgi,
        ),
        (
            "  + RateLimitWSGI, denied: added",
            whole_wsgi(ours_wsgi.RateLimitWSGI(trivial_wsgi, limiter=deny)) - base_wsgi,
        ),
        ("gate.limiter_for(method, path)", _per_call_us(lambda: gate.limiter_for("GET", "/"))),
        ("asgi.request_view(scope)", _per_call_us(lambda: request_view(scope))),
        ("asgi.request_view + gate.identify", _per_call_us(lambda: gate.identify(request_view(scope)))),
        (
            "wsgi.request_view + gate.identify",
            _per_call_us(lambda: gate.identify(ours_wsgi.request_view(environ))),
        ),
        ("limiter.check(user, model), allowed (sync)", _per_call_us(lambda: gate.limiter.check(USER, MODEL))),
        ("await limiter.acheck(user, model), allowed", acheck_us()),
        ("limiter.check(user, model), denied", _per_call_us(lambda: deny_gate.limiter.check(USER, MODEL))),
        ("gate.allowed_headers(decision): 9 headers", _per_call_us(lambda: gate.allowed_headers(allowed))),
        ("  of which go_duration(3600.0)", _per_call_us(lambda: go_duration(3600.0))),
        ("asgi.encode_headers(9 allowed headers)", _per_call_us(lambda: encode_headers(headers))),
        ("gate.denied(view, decision): the 429", _per_call_us(lambda: deny_gate.denied(view, denied))),
        (
            "asgi.encode_headers(14 denial headers)",
            _per_call_us(lambda: encode_headers(denial_headers)),
        ),
    ]
    try:  # newer trees: per request, is the limiter a Reserver?
        from ratelimit_middleware.checker import reserver_of as reserver
    except ImportError:
        reserver = getattr(gate, "reserver", None)
    if reserver is not None:
        rows.insert(9, ("gate.reserver(limiter)", _per_call_us(lambda: reserver(gate.limiter))))
    width = max(len(label) for label, _ in rows)
    for label, us in rows:
        print(f"  {label:<{width}}  {us:6.2f}")
    loop.close()

    count = 5_000 if settings.quick else 20_000
    for variant in ("ours", "ours_deny"):
        app = http_apps.make_asgi(variant)
        profile_loop = asyncio.new_event_loop()
        profile_loop.run_until_complete(run_asgi(app, scope, messages, 200))
        profiler = cProfile.Profile()
        profiler.enable()
        profile_loop.run_until_complete(run_asgi(app, scope, messages, count))
        profiler.disable()
        profile_loop.close()
        _print_profile(f"Starlette app '{variant}'", profiler, count)
    flask_app = http_apps.make_wsgi("ours")
    run_wsgi(flask_app, environ, b"", 200)
    profiler = cProfile.Profile()
    profiler.enable()
    run_wsgi(flask_app, environ, b"", count)
    profiler.disable()
    _print_profile("Flask app 'ours'", profiler, count)


# -- report ----------------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def machine() -> str:
    cpu = platform.processor() or "?"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = []
    for package in (
        "starlette",
        "uvicorn",
        "flask",
        "werkzeug",
        "gunicorn",
        "slowapi",
        "flask-limiter",
        "limits",
    ):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} -")
    return f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}; {', '.join(versions)}"


@dataclass
class Group:
    app: str  # "Starlette" or "Flask"
    key: str  # "asgi" or "wsgi"
    server: str
    ours: str
    peer: str  # the peer's name in REFERENCE
    peer_variant: str


GROUPS = (
    Group("Starlette", "asgi", "Starlette / uvicorn", "`RateLimitMiddleware`", "slowapi", "slowapi"),
    Group(
        "Flask",
        "wsgi",
        f"Flask / gunicorn gthread {GUNICORN_THREADS}",
        "`RateLimitWSGI`",
        "flask-limiter",
        "flask_limiter",
    ),
)


def target_lines(
    inproc: InProcess | None, sockets: dict[str, dict[str, Server]] | None
) -> list[tuple[str, ...]]:
    lines: list[tuple[str, ...]] = []
    for group in GROUPS:
        keep_ref, allow_ref, deny_ref = REFERENCE[group.peer]
        if inproc is not None:
            cases = inproc.asgi if group.key == "asgi" else inproc.wsgi
            bare = cases["bare"]
            for path, name in (("allowed", "ours"), ("denied", "ours_deny")):
                value = added(cases[name], bare)
                lines.append(
                    (
                        f"{group.app}: ours adds per {path} request (in process)",
                        f"{value:+.1f} us",
                        f"<= {TARGET_ADDED_US:.0f} us",
                        verdict(value <= TARGET_ADDED_US),
                    )
                )
            deny = cases["ours_deny"].us
            lines.append(
                (
                    f"{group.app}: a denied request vs the app's own (in process)",
                    f"{deny:.1f} vs {bare.us:.1f} us",
                    "cheaper",
                    verdict(deny < bare.us),
                )
            )
            for path, name, ref in (
                ("allowed", group.peer_variant, allow_ref),
                ("denied", f"{group.peer_variant}_deny", deny_ref),
            ):
                value = added(cases[name], bare)
                reference = f"ref. +{ref:.0f} us" if ref is not None else "ref. -"
                lines.append(
                    (
                        f"{group.app}: {group.peer} adds per {path} request (in process)",
                        f"{value:+.1f} us",
                        reference,
                        "-",
                    )
                )
        if sockets is not None:
            servers = sockets[group.key]
            # Verdicts on the server's CPU per request (its capacity): load elsewhere on the machine skews it
            # less than req/s, which also drops whenever wrk or the server is made to wait.
            keep, by_cpu = (
                paired_ratio(servers["ours"], servers["bare"]),
                cpu_ratio(servers["ours"], servers["bare"]),
            )
            lines.append(
                (
                    f"{group.app}: ours keeps of bare throughput, allowing (wrk)",
                    f"{by_cpu:.0%} by server CPU ({keep:.0%} by req/s)",
                    f">= {TARGET_KEEP:.0%}",
                    verdict(by_cpu >= TARGET_KEEP),
                )
            )
            deny = paired_ratio(servers["ours_deny"], servers["bare"])
            deny_cpu = cpu_ratio(servers["ours_deny"], servers["bare"])
            lines.append(
                (
                    f"{group.app}: ours denying, throughput vs bare (wrk)",
                    f"{deny_cpu:.0%} by server CPU ({deny:.0%} by req/s)",
                    "> 100%",
                    verdict(deny_cpu > 1.0),
                )
            )
            peer_keep = paired_ratio(servers[group.peer_variant], servers["bare"])
            peer_cpu = cpu_ratio(servers[group.peer_variant], servers["bare"])
            lines.append(
                (
                    f"{group.app}: {group.peer} keeps of bare throughput (wrk)",
                    f"{peer_cpu:.0%} by server CPU ({peer_keep:.0%} by req/s)",
                    f"ref. {keep_ref:.0%}",
                    "-",
                )
            )
    return lines


def report(inproc: InProcess | None, sockets: dict[str, dict[str, Server]] | None) -> None:
    if inproc is None and sockets is None:
        return
    print(
        "\nTargets for our middlewares (header keys), and the peers beside their reference figures. "
        "Throughput verdicts use the server's CPU time per request, bare over limited (the capacity "
        "kept), which other processes on the machine skew less than req/s; both are shown.\n"
    )
    lines = target_lines(inproc, sockets)
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    for line in lines:
        print("  " + "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip())

    print("\n### HTTP overhead\n")
    print(
        "Over sockets: wrk (1 thread, 64 connections) and one server process on loopback, each pinned to "
        "one of the 2 cores; median req/s of the runs, the median of the per-run ratios to the bare app, and "
        "the server's CPU time (user + system, from /proc) per request and the capacity kept (bare's CPU per "
        "request over this one's, median of the per-run ratios). In process: the app called directly, "
        "no sockets; median us per request, and the median of the per-repeat differences from the bare app. "
        "Requests carry `X-User-ID` and `X-Model` (header keys).\n"
    )
    print(
        "| app / server | limiter | path | req/s (wrk) | of bare | server CPU us/req | of bare by CPU "
        "| us/req in process | added us in process |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for group in GROUPS:
        rows = [
            ("none", "-", "bare"),
            ("none; the app sets the 9 headers ours adds", "-", "bare_headers"),
            (group.ours, "allowed", "ours"),
            (f"{group.ours}, `add_headers=False`", "allowed", "ours_noheaders"),
            (group.peer, "allowed", group.peer_variant),
            (group.ours, "denied", "ours_deny"),
            (group.peer, "denied", f"{group.peer_variant}_deny"),
        ]
        for limiter, path, name in rows:
            rps = ratio = cpu = kept = us = extra = "-"
            if sockets is not None and name in sockets[group.key]:
                server = sockets[group.key][name]
                rps = f"{server.rps:,.0f}"
                cpu = f"{server.cpu_us:.0f}"
                kept = "100%" if name == "bare" else f"{cpu_ratio(server, sockets[group.key]['bare']):.0%}"
                ratio = (
                    "100%" if name == "bare" else f"{paired_ratio(server, sockets[group.key]['bare']):.0%}"
                )
            if inproc is not None:
                cases = inproc.asgi if group.key == "asgi" else inproc.wsgi
                us = f"{cases[name].us:.1f}"
                extra = "-" if name == "bare" else f"{added(cases[name], cases['bare']):+.1f}"
            print(
                f"| {group.server} | {limiter} | {path} | {rps} | {ratio} | {cpu} | {kept} | {us} | {extra} |"
            )
    if inproc is not None:
        print("\nIn process, more variants (us per request, added over the bare app):\n")
        print("| app | variant | us/request | added us |")
        print("|---|---|---:|---:|")
        for group in GROUPS:
            cases = inproc.asgi if group.key == "asgi" else inproc.wsgi
            others = [("ours_no_x_model", f"{group.ours}, GET without `X-Model` (reads the empty body)")]
            if group.key == "asgi":
                others.append(("slowapi_asgi", "slowapi's `SlowAPIASGIMiddleware`, allowed"))
            for name, text in others:
                extra = added(cases[name], cases["bare"])
                print(f"| {group.app} | {text} | {cases[name].us:.1f} | {extra:+.1f} |")
        print(
            "\nBody-based model key, in process: `POST /v1/chat/completions` with a JSON chat request; the "
            "route reads the body itself too. Header key: `X-Model` sent; body key: no `X-Model`, so our "
            'default model key reads the body\'s `"model"`.\n'
        )
        print(
            "| app | body | bare us | header key: added us | body key: added us | body key over header key |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for group in GROUPS:
            table = inproc.asgi_body if group.key == "asgi" else inproc.wsgi_body
            for size, cases in table.items():
                bare = cases["bare"]
                header, body = added(cases["header"], bare), added(cases["body"], bare)
                over = added(cases["body"], cases["header"])
                print(
                    f"| {group.app} | {len(chat_body(size)):,} B | {bare.us:.1f} | {header:+.1f} | "
                    f"{body:+.1f} | {over:+.1f} |"
                )
    if sockets is not None:
        print(
            "\nwrk details: median p50 / p99 latency, per-run ratios to bare (min-max), server CPU us per "
            "request added over bare (median), share of non-2xx responses, socket errors\n"
        )
        print(
            "| server | variant | p50 ms | p99 ms | of bare, per run | server CPU added us | non-2xx "
            "| socket errors |"
        )
        print("|---|---|---:|---:|---|---:|---:|---:|")
        for group in GROUPS:
            servers = sockets[group.key]
            for server in servers.values():
                runs = server.runs
                ratios = [a.rps / b.rps for a, b in zip(runs, servers["bare"].runs, strict=True)]
                non_2xx = sum(run.non_2xx for run in runs) / max(sum(run.requests for run in runs), 1)
                p50 = statistics.median(run.p50_ms for run in runs)
                p99 = statistics.median(run.p99_ms for run in runs)
                errors = sum(run.socket_errors for run in runs)
                cpu_added = (
                    "-" if server.variant == "bare" else f"{server.cpu_us - servers['bare'].cpu_us:+.0f}"
                )
                print(
                    f"| {group.server} | {server.variant} | {p50:.2f} | {p99:.2f} | "
                    f"{min(ratios):.0%}-{max(ratios):.0%} | {cpu_added} | {non_2xx:.1%} | {errors} |"
                )


def package_digest(package: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def snapshot_package(destination: Path) -> str:
    """Copy ``ratelimit_middleware`` into ``destination`` and import it from there; returns its digest."""
    global PACKAGE_DIR
    shutil.copytree(
        ROOT / "ratelimit_middleware",
        destination / "ratelimit_middleware",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    PACKAGE_DIR = destination
    sys.path.insert(0, str(destination))
    importlib.invalidate_caches()
    import ratelimit_middleware

    if not str(ratelimit_middleware.__file__).startswith(str(destination)):
        raise SystemExit(
            f"ratelimit_middleware was imported from {ratelimit_middleware.__file__}, not the snapshot"
        )
    return package_digest(destination / "ratelimit_middleware")


def git_state() -> str:
    def git(*args: str) -> str:
        result = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False)
        return result.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "?"
    changed = [
        line for line in git("status", "--porcelain", "--", "ratelimit_middleware").splitlines() if line
    ]
    return f"git {head}" + (
        f" with {len(changed)} uncommitted file(s) in ratelimit_middleware" if changed else ""
    )


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter and rougher: about a minute")
    parser.add_argument("--no-wrk", action="store_true", help="skip A (over sockets)")
    parser.add_argument("--no-inprocess", action="store_true", help="skip B (in process)")
    parser.add_argument("--profile", action="store_true", help="also profile our ASGI middleware")
    args = parser.parse_args(argv)
    quick = args.quick
    settings = Settings(
        quick=quick,
        repeats=3 if quick else 5,
        sample_seconds=0.04 if quick else 0.08,
        wrk_repeats=1 if quick else 3,
        wrk_seconds=2 if quick else 5,
        warmup_seconds=1,
        connections=64,
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench_http_pkg_") as snapshot:
        run(args, settings, Path(snapshot))
    print(f"\n(total {time.monotonic() - started:.0f} s)")


def run(args: argparse.Namespace, settings: Settings, snapshot: Path) -> None:
    quick = settings.quick
    digest = snapshot_package(snapshot)
    print(f"bench_http{' --quick' if quick else ''}: {machine()}")
    print(
        f"code: ratelimit_middleware of {git_state()}, snapshot {digest} "
        f"taken {time.strftime('%Y-%m-%d %H:%M:%S')} (every server and the in-process part import it)"
    )
    pins = "server on CPU 0, wrk on CPU 1" if pinned(0) else "not pinned (no taskset)"
    print(
        f"servers: 1 uvicorn worker ({' '.join(uvicorn_options())}), 1 gunicorn gthread worker with "
        f"{GUNICORN_THREADS} threads; {pins}\n",
        flush=True,
    )
    print(f"load average before: {load()}", flush=True)
    gc.collect()
    inproc = None if args.no_inprocess else in_process(settings)
    sockets = None
    if not args.no_wrk:
        if shutil.which("wrk") is None:
            print("A. skipped: wrk is not installed (apt-get install -y wrk)")
        else:
            sockets = over_sockets(settings)
    print(f"load average after the measurements: {load()} (other processes on the machine skew the figures)")
    report(inproc, sockets)
    if args.profile:
        profile_ours(settings)
    if package_digest(ROOT / "ratelimit_middleware") != digest:
        print(
            "\nNote: ratelimit_middleware changed in the working tree during the run; the figures are those "
            "of the snapshot."
        )


if __name__ == "__main__":
    main()
