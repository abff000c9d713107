"""The gRPC interceptors, through real servers (``grpc.server`` and ``grpc.aio.server``) and real clients on
loopback ports. The service is defined without protoc: generic handlers over raw bytes."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Literal, cast

import grpc
import grpc.aio
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from ratelimit_middleware import Limits, MultiTierRateLimiter, RateLimiter
from ratelimit_middleware.grpc import (
    AsyncRateLimitInterceptor,
    RateLimitInterceptor,
    peer_address,
    request_view,
)
from ratelimit_middleware.keys import from_json_body
from ratelimit_middleware.observe import Event, EventHook
from ratelimit_middleware.request import RequestView

from .conftest import FakeClock

SERVICE = "llm.Generator"
COMPLETE = f"/{SERVICE}/Complete"
STREAM = f"/{SERVICE}/Stream"
FAIL = f"/{SERVICE}/Fail"
ECHO = f"/{SERVICE}/Echo"
PROTO = f"/{SERVICE}/Proto"
HEALTH = "/grpc.health.v1.Health/Check"
TIMEOUT = 5.0  # an upper bound on waits that normally end at once
OnError = Literal["allow", "deny"]


def user(name: str, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return (("x-user-id", name), *extra)


def metadata_of(call: Any) -> dict[str, Any]:
    return dict(call.trailing_metadata() or ())


def denial(error: grpc.RpcError) -> tuple[grpc.StatusCode, str, dict[str, Any]]:
    call = cast(grpc.Call, error)
    return call.code(), call.details() or "", metadata_of(call)


def retry_delay(error: grpc.RpcError) -> float:
    """The delay of the ``google.rpc.RetryInfo`` detail, decoded the way clients do."""
    return retry_seconds(rpc_status.from_call(cast(grpc.Call, error)))


def retry_seconds(status: status_pb2.Status | None) -> float:
    assert status is not None
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info)
    return info.retry_delay.seconds + info.retry_delay.nanos / 1e9


def usage_of(method: str, response: bytes) -> tuple[int, int] | None:
    """Responses ``b"usage:IN,OUT"`` report their usage."""
    if not response.startswith(b"usage:"):
        return None
    first, second = response[len(b"usage:") :].split(b",")
    return int(first), int(second)


# -- the thread-based server ---------------------------------------------------------------------------


class SyncService:
    """Handlers over bytes; ``Stream`` sends ``first``, then waits for ``release`` before ``last``."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.cancelled = threading.Event()
        self.started = threading.Event()
        self.finished = threading.Event()
        self.between = threading.Event()

    def complete(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"wait":  # a slow model: runs on after the client's deadline
            self.started.set()
            self.release.wait(TIMEOUT)
            self.finished.set()
        return b"usage:30,70" if request == b"usage" else b"ok:" + request

    def stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        context.add_callback(self.cancelled.set)  # runs after the interceptor's own callback
        yield b"first"
        self.between.set()  # producing the next response
        self.release.wait(TIMEOUT)
        yield b"last"

    def fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        raise RuntimeError("the model crashed")

    def echo(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for request in requests:
            yield b"echo:" + request

    def handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Complete": grpc.unary_unary_rpc_method_handler(self.complete),
                "Stream": grpc.unary_stream_rpc_method_handler(self.stream),
                "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
                "Echo": grpc.stream_stream_rpc_method_handler(self.echo),
                "Proto": grpc.unary_unary_rpc_method_handler(
                    lambda request, context: request,
                    request_deserializer=status_pb2.Status.FromString,
                    response_serializer=status_pb2.Status.SerializeToString,
                ),
            },
        )


def health_handlers() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(lambda request, _: b"SERVING")}
    )


@contextmanager
def sync_server(
    interceptor: RateLimitInterceptor, service: SyncService, options: Sequence[tuple[str, Any]] = ()
) -> Iterator[grpc.Channel]:
    server = grpc.server(ThreadPoolExecutor(max_workers=8), interceptors=[interceptor])
    server.add_generic_rpc_handlers((service.handlers(), health_handlers()))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
    try:
        yield channel
    finally:
        service.release.set()
        channel.close()
        server.stop(None).wait(TIMEOUT)


@pytest.fixture
def service() -> SyncService:
    return SyncService()


def test_unary_calls_pass_until_the_limit_then_resource_exhausted_with_retry_info(
    clock: FakeClock, service: SyncService
) -> None:
    interceptor = RateLimitInterceptor(RateLimiter(2, 60, clock=clock))
    with sync_server(interceptor, service) as channel:
        complete = channel.unary_unary(COMPLETE)
        remaining = []
        for _ in range(2):
            response, call = complete.with_call(b"hi", metadata=user("a"))
            assert response == b"ok:hi"
            remaining.append(metadata_of(call)["x-ratelimit-remaining-requests"])
        assert remaining == ["1", "0"]
        assert metadata_of(call)["x-ratelimit-limit-requests"] == "2"

        with pytest.raises(grpc.RpcError) as denied:
            complete(b"hi", metadata=user("a"))
        code, details, metadata = denial(denied.value)
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "per_user_model" in details and "limit 2 requests per 1 minute" in details
        assert "try again in 60.000s" in details
        assert metadata["retry-after-ms"] == "60000" and metadata["retry-after"] == "60"
        assert metadata["grpc-retry-pushback-ms"] == "60000" and metadata["x-should-retry"] == "true"
        assert metadata["x-ratelimit-remaining-requests"] == "0"
        assert retry_delay(denied.value) == 60.0

        clock.advance(60)
        assert complete(b"again", metadata=user("a")) == b"ok:again"


def test_users_come_from_metadata_then_the_api_key_then_the_peer(
    clock: FakeClock, service: SyncService
) -> None:
    limiter = RateLimiter(1, 60, clock=clock)
    with sync_server(RateLimitInterceptor(limiter), service) as channel:
        complete = channel.unary_unary(COMPLETE)

        def status(metadata: tuple[tuple[str, str], ...] = ()) -> grpc.StatusCode:
            return complete.future(b"", metadata=metadata).code()

        ok, exhausted = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED
        assert [status(user("a")), status(user("a")), status(user("b"))] == [ok, exhausted, ok]
        assert status(user("a", ("x-model", "other"))) is ok  # another model, another bucket
        assert [status((("authorization", "Bearer k1"),)) for _ in range(2)] == [ok, exhausted]
        assert status((("authorization", "Bearer k2"),)) is ok
        assert [status(), status()] == [ok, exhausted]  # no identity: the peer's address
        assert limiter.get_request_count("ip:127.0.0.1", "default") == 1
        assert limiter.get_request_count("a", "other") == 1


def test_a_server_stream_is_counted_and_denied(clock: FakeClock, service: SyncService) -> None:
    service.release.set()
    with sync_server(RateLimitInterceptor(RateLimiter(1, 60, clock=clock)), service) as channel:
        stream = channel.unary_stream(STREAM)
        assert list(stream(b"", metadata=user("a"))) == [b"first", b"last"]
        with pytest.raises(grpc.RpcError) as denied:
            list(stream(b"", metadata=user("a")))
        code, _, metadata = denial(denied.value)
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and metadata["retry-after-ms"] == "60000"


def test_a_bidi_stream_is_counted_and_denied(clock: FakeClock, service: SyncService) -> None:
    with sync_server(RateLimitInterceptor(RateLimiter(1, 60, clock=clock)), service) as channel:
        echo = channel.stream_stream(ECHO)
        assert list(echo(iter([b"1", b"2"]), metadata=user("a"))) == [b"echo:1", b"echo:2"]
        with pytest.raises(grpc.RpcError) as denied:
            list(echo(iter([b"3"]), metadata=user("a")))
        assert denial(denied.value)[0] is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_stream_holds_its_concurrency_slot_until_it_ends(service: SyncService) -> None:
    limiter = RateLimiter(max_concurrent=1)
    with sync_server(RateLimitInterceptor(limiter), service) as channel:
        stream = channel.unary_stream(STREAM)
        first = stream(b"", metadata=user("a"))
        assert next(first) == b"first"
        assert limiter.get_request_count("a", "default", unit="concurrent") == 1

        with pytest.raises(grpc.RpcError) as denied:
            next(stream(b"", metadata=user("a")))
        code, details, metadata = denial(denied.value)
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "1 concurrent requests" in details
        assert "retry-after-ms" in metadata and retry_delay(denied.value) > 0
        assert next(stream(b"", metadata=user("b"))) == b"first"  # another user has a slot of their own

        service.release.set()
        assert list(first) == [b"last"]  # the end of the stream gave the slot back before the status
        assert list(stream(b"", metadata=user("a"))) == [b"first", b"last"]
        assert limiter.get_request_count("a", "default", unit="concurrent") == 0


def in_flight(limiter: RateLimiter, user_id: str = "a") -> int:
    return limiter.get_request_count(user_id, "default", unit="concurrent")


def freed(limiter: RateLimiter) -> bool:
    """Whether the slot is given back, as the server's thread does once the handler is out (bounded wait)."""
    deadline = time.monotonic() + TIMEOUT
    while in_flight(limiter) and time.monotonic() < deadline:
        time.sleep(0.001)
    return in_flight(limiter) == 0


def test_a_stream_cancelled_by_the_client_gives_its_slot_back_once_its_handler_is_out(
    service: SyncService,
) -> None:
    limiter = RateLimiter(max_concurrent=1)
    with sync_server(RateLimitInterceptor(limiter), service) as channel:
        stream = channel.unary_stream(STREAM)
        first = stream(b"", metadata=user("a"))
        assert next(first) == b"first"
        assert service.between.wait(TIMEOUT)  # the handler is producing its next response
        first.cancel()
        assert service.cancelled.wait(TIMEOUT)  # the server saw the RPC end, while its handler still waits
        assert in_flight(limiter) == 1  # the handler still runs: its slot is in use
        service.release.set()
        assert freed(limiter)
        assert next(stream(b"", metadata=user("a"))) == b"first"


def test_a_unary_call_past_its_deadline_holds_its_slot_until_its_handler_returns(
    service: SyncService,
) -> None:
    """The end of the RPC (a deadline, a cancel) released the slot while the handler still ran: a client
    with short deadlines had any number of handlers running at once."""
    limiter = RateLimiter(max_concurrent=1)
    with sync_server(RateLimitInterceptor(limiter), service) as channel:
        complete = channel.unary_unary(COMPLETE)
        with pytest.raises(grpc.RpcError) as late:
            complete(b"wait", metadata=user("a"), timeout=0.05)
        assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert service.started.wait(TIMEOUT) and not service.finished.is_set()
        with pytest.raises(grpc.RpcError) as busy:
            complete(b"x", metadata=user("a"))
        assert busy.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        service.release.set()
        assert service.finished.wait(TIMEOUT) and freed(limiter)
        assert complete(b"x", metadata=user("a")) == b"ok:x"


def failing_user_key(request: RequestView) -> str | None:
    raise KeyError("x-tenant")


@pytest.mark.parametrize("on_error", ["allow", "deny"])
def test_a_failing_key_function_never_crashes_the_call(
    on_error: OnError, service: SyncService, caplog: pytest.LogCaptureFixture
) -> None:
    interceptor = RateLimitInterceptor("1/minute", user_key=failing_user_key, on_error=on_error)
    with sync_server(interceptor, service) as channel:
        complete = channel.unary_unary(COMPLETE)
        if on_error == "allow":
            assert [complete(b"x", metadata=user("a")) for _ in range(3)] == [b"ok:x"] * 3
        else:
            for _ in range(2):
                with pytest.raises(grpc.RpcError) as denied:
                    complete(b"x", metadata=user("a"))
                code, _, metadata = denial(denied.value)
                assert code is grpc.StatusCode.UNAVAILABLE
                assert metadata["retry-after-ms"] == "1000" and retry_delay(denied.value) == 1.0
    failures = [record for record in caplog.records if "the key function failed" in record.getMessage()]
    assert len(failures) == 1  # logged once a minute, not once per call


def test_tokens_settle_with_the_usage_reported_and_are_refunded_when_the_handler_fails(
    clock: FakeClock, service: SyncService
) -> None:
    limiter = RateLimiter(tokens="1000/minute", max_concurrent=4, clock=clock)
    interceptor = RateLimitInterceptor(limiter, estimator=lambda method, metadata: (100, 400), usage=usage_of)
    with sync_server(interceptor, service) as channel:
        response, call = channel.unary_unary(COMPLETE).with_call(b"usage", metadata=user("a"))
        assert response == b"usage:30,70"
        assert metadata_of(call)["x-ratelimit-remaining-tokens"] == "500"  # after the estimate
        assert limiter.get_request_count("a", "default", unit="tokens") == 100  # settled to 30 + 70

        with pytest.raises(grpc.RpcError) as failed:
            channel.unary_unary(FAIL)(b"", metadata=user("a"))
        assert cast(grpc.Call, failed.value).code() is grpc.StatusCode.UNKNOWN
        assert limiter.get_request_count("a", "default", unit="tokens") == 100  # refunded
        assert limiter.get_request_count("a", "default", unit="concurrent") == 0


def retrying(service_name: str) -> list[tuple[str, Any]]:
    """Channel options for gRPC's own retries of RESOURCE_EXHAUSTED, with a backoff far too long to wait."""
    policy = {
        "maxAttempts": 2,
        "initialBackoff": "30s",
        "maxBackoff": "30s",
        "backoffMultiplier": 1,
        "retryableStatusCodes": ["RESOURCE_EXHAUSTED"],
    }
    config = {"methodConfig": [{"name": [{"service": service_name}], "retryPolicy": policy}]}
    return [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config))]


def test_grpc_retry_policies_wait_what_the_denial_says(service: SyncService) -> None:
    """``grpc-retry-pushback-ms``: the client's retry waits the limiter's 0.1 s, not its own 30 s backoff."""
    interceptor = RateLimitInterceptor(RateLimiter(1, 0.1))
    with sync_server(interceptor, service, retrying(SERVICE)) as channel:
        complete = channel.unary_unary(COMPLETE)
        assert complete(b"", metadata=user("a")) == b"ok:"
        started = time.monotonic()
        assert complete(b"", metadata=user("a"), timeout=TIMEOUT) == b"ok:"  # denied once, then retried
        assert time.monotonic() - started < 2  # the policy alone would wait a random 0-30 s


def test_a_call_that_can_never_pass_is_not_retried(service: SyncService) -> None:
    interceptor = RateLimitInterceptor(
        RateLimiter(tokens="100/minute"), estimator=lambda method, metadata: (500, 0)
    )
    with sync_server(interceptor, service, retrying(SERVICE)) as channel:
        with pytest.raises(grpc.RpcError) as denied:
            channel.unary_unary(COMPLETE)(b"", metadata=user("a"), timeout=TIMEOUT)
        code, details, metadata = denial(denied.value)
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "never be allowed" in details
        assert metadata["x-should-retry"] == "false" and metadata["grpc-retry-pushback-ms"] == "-1"
        assert "grpc-status-details-bin" not in metadata  # no RetryInfo: nothing to wait for


def test_a_limiter_that_raises_follows_on_error(service: SyncService) -> None:
    """A negative estimate makes ``reserve`` raise: the limiter failed, the call gets UNAVAILABLE."""
    interceptor = RateLimitInterceptor(
        RateLimiter(tokens="1000/minute"), estimator=lambda method, metadata: (-1, 0), on_error="deny"
    )
    with sync_server(interceptor, service) as channel, pytest.raises(grpc.RpcError) as denied:
        channel.unary_unary(COMPLETE)(b"", metadata=user("a"))
    assert denial(denied.value)[0] is grpc.StatusCode.UNAVAILABLE


def test_exempt_methods_and_method_limits(clock: FakeClock, service: SyncService) -> None:
    interceptor = RateLimitInterceptor(
        RateLimiter(1, 60, clock=clock),
        exempt_methods=["/grpc.health.v1.Health/*"],
        method_limits={COMPLETE: RateLimiter(3, 60, clock=clock)},
    )
    with sync_server(interceptor, service) as channel:
        assert [channel.unary_unary(HEALTH)(b"") for _ in range(3)] == [b"SERVING"] * 3
        complete = channel.unary_unary(COMPLETE)
        assert [complete(b"", metadata=user("a")) for _ in range(3)] == [b"ok:"] * 3
        with pytest.raises(grpc.RpcError):
            complete(b"", metadata=user("a"))


def test_request_body_gives_key_functions_the_protobuf_message(
    clock: FakeClock, service: SyncService
) -> None:
    limiter = RateLimiter(1, 60, clock=clock)
    interceptor = RateLimitInterceptor(
        limiter, model_key=from_json_body("message"), request_body=json_format.MessageToJson
    )
    with sync_server(interceptor, service) as channel:
        echo = channel.unary_unary(
            PROTO,
            request_serializer=status_pb2.Status.SerializeToString,
            response_deserializer=status_pb2.Status.FromString,
        )

        def status(model: str) -> grpc.StatusCode:
            return echo.future(status_pb2.Status(message=model), metadata=user("a")).code()

        ok, exhausted = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED
        assert [status("m1"), status("m2"), status("m1")] == [ok, ok, exhausted]
        assert limiter.get_request_count("a", "m2") == 1


def test_shadow_mode_reports_but_never_denies(clock: FakeClock, service: SyncService) -> None:
    events: list[Event] = []
    interceptor = RateLimitInterceptor(
        RateLimiter(1, 60, clock=clock), shadow=True, observers=[EventHook(events.append)]
    )
    with sync_server(interceptor, service) as channel:
        complete = channel.unary_unary(COMPLETE)
        calls = [complete.with_call(b"", metadata=user("a"))[1] for _ in range(3)]
        assert [metadata_of(call)["x-ratelimit-remaining-requests"] for call in calls] == ["0"] * 3
    assert [(event.kind, event.user) for event in events] == [("shadow_denied", "a")] * 2


WITHOUT_GRPCIO_STATUS = """
import sys
sys.modules["grpc_status"] = None  # as if grpcio-status were not installed
from concurrent.futures import ThreadPoolExecutor
import grpc
from ratelimit_middleware import RateLimiter
from ratelimit_middleware.grpc import RateLimitInterceptor
server = grpc.server(ThreadPoolExecutor(2), interceptors=[RateLimitInterceptor(RateLimiter(1, 60))])
handler = grpc.unary_unary_rpc_method_handler(lambda request, context: b"ok")
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("s", {"C": handler}),))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
    channel.unary_unary("/s/C")(b"")
    try:
        channel.unary_unary("/s/C")(b"")
    except grpc.RpcError as error:
        print(error.code().name, " ".join(sorted(dict(error.trailing_metadata()))))
server.stop(None)
"""


def test_without_grpcio_status_denials_carry_the_retry_metadata_only() -> None:
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_GRPCIO_STATUS], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    code, keys = result.stdout.split(" ", 1)
    assert code == "RESOURCE_EXHAUSTED"
    assert {"retry-after-ms", "retry-after", "grpc-retry-pushback-ms"} <= set(keys.split())
    assert "grpc-status-details-bin" not in keys


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:127.0.0.1:50051", "127.0.0.1"),
        ("ipv6:[::1]:50051", "::1"),
        ("ipv6:%5B2001:db8::1%5D:443", "2001:db8::1"),
        ("unix:/tmp/grpc.sock", None),  # no address: an anonymous caller, as the log says
        ("unix:", None),
        ("", None),
    ],
)
def test_peer_address(peer: str, address: str | None) -> None:
    assert peer_address(peer) == address


@pytest.mark.parametrize(
    ("call", "says"),
    [
        (lambda: peer_address(5), "peer must be a str (grpc's context.peer()) or None, got 5"),
        (
            lambda: peer_address(b"ipv4:1.2.3.4:5"),
            "peer must be a str (grpc's context.peer()) or None, got b'",
        ),
        (lambda: request_view(5, None), "method must be the full method name (a str), got 5"),
        (
            lambda: request_view("/p.S/M", 5),
            "metadata must be (key, value) pairs of str keys, or None, got 5",
        ),
        (lambda: request_view("/p.S/M", [("k",)]), "metadata must be (key, value) pairs"),
        (lambda: request_view("/p.S/M", [(1, "v")]), "metadata must be (key, value) pairs of str keys"),
        (lambda: request_view("/p.S/M", None, 5), "peer must be a str"),
    ],
)
def test_the_public_helpers_name_a_bad_argument(call: Callable[[], object], says: str) -> None:
    """They raised AttributeError ('partition', 'endswith') or a bare unpacking error, or took a method that
    is no str as the path."""
    with pytest.raises(TypeError, match=re.escape(says)):
        call()


# -- grpc.aio ------------------------------------------------------------------------------------------


class AsyncService:
    """``SyncService`` in async handlers: a coroutine, an async generator and a ``context.write`` stream."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def complete(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return b"ok:" + request

    async def stream(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        yield b"first"
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        yield b"last"

    async def echo(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        async for request in requests:
            yield b"echo:" + request

    async def write(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        await context.write(b"first")
        await self.release.wait()
        await context.write(b"last")

    async def write_usage(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        await context.write(b"text")
        await context.write(b"usage:3,4")

    def handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Complete": grpc.unary_unary_rpc_method_handler(self.complete),
                "Stream": grpc.unary_stream_rpc_method_handler(self.stream),
                "Write": grpc.unary_stream_rpc_method_handler(self.write),
                "WriteUsage": grpc.unary_stream_rpc_method_handler(self.write_usage),
                "Echo": grpc.stream_stream_rpc_method_handler(self.echo),
                "SyncComplete": grpc.unary_unary_rpc_method_handler(lambda request, _: b"sync:" + request),
                "SyncStream": grpc.unary_stream_rpc_method_handler(lambda request, _: iter([b"a", b"b"])),
            },
        )


@asynccontextmanager
async def aio_server(
    interceptor: AsyncRateLimitInterceptor, service: AsyncService
) -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers((service.handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        service.release.set()
        await channel.close()
        await server.stop(None)


def run(scenario: Callable[[], Any]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), TIMEOUT * 2))


async def until(condition: Callable[[], bool]) -> None:
    """Let the event loop run until ``condition`` holds (the server settles on its own loop)."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while not condition():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0)


def test_aio_unary_and_stream_calls_are_denied_with_retry_info(clock: FakeClock) -> None:
    async def scenario() -> None:
        service = AsyncService()
        service.release.set()
        async with aio_server(AsyncRateLimitInterceptor(RateLimiter(2, 60, clock=clock)), service) as channel:
            complete = channel.unary_unary(COMPLETE)
            call = complete(b"hi", metadata=user("a"))
            assert await call == b"ok:hi"
            assert (await call.trailing_metadata())["x-ratelimit-remaining-requests"] == "1"
            assert [r async for r in channel.unary_stream(STREAM)(b"", metadata=user("a"))] == [
                b"first",
                b"last",
            ]

            stream = channel.unary_stream(STREAM)
            for denied in (complete(b"", metadata=user("a")), stream(b"", metadata=user("a"))):
                assert await denied.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "try again in 60.000s" in await denied.details()
                metadata = await denied.trailing_metadata()
                assert metadata["retry-after-ms"] == "60000" and metadata["retry-after"] == "60"
                assert retry_seconds(await rpc_status.aio.from_call(denied)) == 60.0
            assert await complete(b"", metadata=user("b")) == b"ok:"

    run(scenario)


@pytest.mark.parametrize("method", [STREAM, f"/{SERVICE}/Write"])
def test_aio_streams_hold_their_slot_until_they_end_or_are_cancelled(method: str) -> None:
    async def scenario() -> None:
        service = AsyncService()
        limiter = RateLimiter(max_concurrent=1)
        async with aio_server(AsyncRateLimitInterceptor(limiter), service) as channel:
            stream = channel.unary_stream(method)

            def slots() -> int:
                return limiter.get_request_count("a", "default", unit="concurrent")

            first = stream(b"", metadata=user("a"))
            assert await first.read() == b"first"
            assert slots() == 1
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await stream(b"", metadata=user("a")).read()
            assert denial(denied.value)[0] is grpc.StatusCode.RESOURCE_EXHAUSTED

            first.cancel()  # the client goes away: the server cancels the handler, the slot comes back
            await until(lambda: slots() == 0)
            if method == STREAM:
                assert service.cancelled.is_set()

            second = stream(b"", metadata=user("a"))
            assert await second.read() == b"first"
            service.release.set()
            assert await second.read() == b"last"
            assert await second.code() is grpc.StatusCode.OK
            assert slots() == 0  # released before the status was sent

    run(scenario)


def test_aio_a_bidi_stream_holds_its_slot_until_the_client_is_done() -> None:
    async def scenario() -> None:
        limiter = RateLimiter(max_concurrent=1)
        async with aio_server(AsyncRateLimitInterceptor(limiter), AsyncService()) as channel:
            echo = channel.stream_stream(ECHO)
            first = echo(metadata=user("a"))
            await first.write(b"1")
            assert await first.read() == b"echo:1"
            assert await echo(metadata=user("a")).code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            await first.done_writing()
            assert await first.code() is grpc.StatusCode.OK
            assert limiter.get_request_count("a", "default", unit="concurrent") == 0
            second = echo(metadata=user("a"))
            await second.write(b"2")
            assert await second.read() == b"echo:2"
            await second.done_writing()
            assert await second.code() is grpc.StatusCode.OK

    run(scenario)


@pytest.mark.parametrize("on_error", ["allow", "deny"])
def test_aio_a_failing_key_function_never_crashes_the_call(on_error: OnError) -> None:
    async def scenario() -> None:
        interceptor = AsyncRateLimitInterceptor("1/minute", user_key=failing_user_key, on_error=on_error)
        async with aio_server(interceptor, AsyncService()) as channel:
            complete = channel.unary_unary(COMPLETE)
            if on_error == "allow":
                assert [await complete(b"x") for _ in range(2)] == [b"ok:x"] * 2
            else:
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    await complete(b"x")
                code, _, metadata = denial(denied.value)
                assert code is grpc.StatusCode.UNAVAILABLE and metadata["retry-after-ms"] == "1000"

    run(scenario)


def test_aio_server_limits_sync_handlers_and_reservations(clock: FakeClock) -> None:
    async def scenario() -> None:
        limiter = MultiTierRateLimiter(
            per_user_model=Limits(requests="1/minute", max_concurrent=2), clock=clock
        )
        async with aio_server(AsyncRateLimitInterceptor(limiter), AsyncService()) as channel:
            sync_complete = channel.unary_unary(f"/{SERVICE}/SyncComplete")
            assert await sync_complete(b"x", metadata=user("a")) == b"sync:x"
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await sync_complete(b"x", metadata=user("a"))
            code, _, metadata = denial(denied.value)
            assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and metadata["retry-after-ms"] == "60000"
            assert limiter.get_request_count("a", "default", unit="concurrent") == 0

    run(scenario)


def test_plans_route_each_call_to_its_plan(service: SyncService) -> None:
    from ratelimit_middleware.plans import Plans
    from ratelimit_middleware.shadow import Shadow

    def plans() -> Plans:
        return Plans(
            {"free": {"*": {"per_user_model": "1/minute"}}, "pro": {"*": {"per_user_model": "100/minute"}}},
            default_plan="free",
            plan_key=lambda request: request.header("x-plan"),
        )

    for limiter in (plans(), Shadow(plans())):
        with sync_server(RateLimitInterceptor(limiter), service) as channel:
            complete = channel.unary_unary(COMPLETE)
            calls = [complete.with_call(b"hi", metadata=user("a", ("x-plan", "pro")))[1] for _ in range(2)]
            assert [metadata_of(call)["x-ratelimit-limit-requests"] for call in calls] == ["100", "100"]


def test_a_usage_answer_the_limiter_cannot_take_settles_the_estimate(service: SyncService) -> None:
    limiter = RateLimiter(tokens="1000/minute", max_concurrent=1)
    interceptor = RateLimitInterceptor(
        limiter, estimator=lambda method, metadata: (100, 400), usage=lambda method, response: (None, 5)
    )
    with sync_server(interceptor, service) as channel:
        for _ in range(2):  # the slot is given back each time
            assert channel.unary_unary(COMPLETE)(b"hi", metadata=user("a")) == b"ok:hi"
    assert limiter.get_request_count("a", "default", unit="tokens") == 1000
    assert limiter.get_request_count("a", "default", unit="concurrent") == 0


def test_an_estimate_that_is_not_two_token_counts_follows_on_error(
    service: SyncService, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = RateLimiter(tokens="1000/minute")
    interceptor = RateLimitInterceptor(limiter, estimator=lambda method, metadata: (2.5, 1), on_error="deny")
    with sync_server(interceptor, service) as channel, pytest.raises(grpc.RpcError) as failed:
        channel.unary_unary(COMPLETE)(b"hi", metadata=user("a"))
    assert cast(grpc.Call, failed.value).code() is grpc.StatusCode.UNAVAILABLE
    assert "the estimator must return (input_tokens, output_tokens)" in caplog.text and "2.5" in caplog.text


def test_a_request_body_that_is_not_json_text_is_named(
    service: SyncService, caplog: pytest.LogCaptureFixture
) -> None:
    interceptor = RateLimitInterceptor(RateLimiter(5, 60), request_body=lambda message: {"model": "m"})
    with sync_server(interceptor, service) as channel:
        assert channel.unary_unary(COMPLETE)(b"hi", metadata=user("a")) == b"ok:hi"  # on_error="allow"
    assert "request_body must return JSON text (str or bytes) or None, got dict" in caplog.text


def test_aio_a_sync_stream_is_denied_without_blocking_the_server() -> None:
    """The aio server calls a sync stream's function on its event loop: the limiter, and the abort of a
    denial, must not run there (the abort waits on that loop: the whole server hung)."""

    async def scenario() -> None:
        service = AsyncService()
        async with aio_server(AsyncRateLimitInterceptor(RateLimiter(1, 60)), service) as channel:
            stream = channel.unary_stream(f"/{SERVICE}/SyncStream")
            assert [r async for r in stream(b"", metadata=user("a"))] == [b"a", b"b"]
            denied = stream(b"", metadata=user("a"), timeout=TIMEOUT)
            assert await denied.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert await channel.unary_unary(COMPLETE)(b"", metadata=user("b")) == b"ok:"

    run(scenario)


def test_a_failure_after_the_call_was_served_is_no_denial(
    service: SyncService, caplog: pytest.LogCaptureFixture
) -> None:
    from prometheus_client import CollectorRegistry

    from ratelimit_middleware.metrics import PrometheusMetrics

    def broken_usage(method: str, response: bytes) -> tuple[int, int] | None:
        raise ValueError("unreadable usage")

    metrics = PrometheusMetrics(registry=CollectorRegistry())
    limiter = RateLimiter(tokens="1000/minute")
    interceptor = RateLimitInterceptor(
        limiter, usage=broken_usage, on_error="deny", observers=[metrics], estimator=lambda m, h: (10, 20)
    )
    with sync_server(interceptor, service) as channel:
        assert channel.unary_unary(COMPLETE)(b"hi", metadata=user("a")) == b"ok:hi"
    labels = {"stage": "usage_function", "outcome": "unsettled"}
    assert metrics.registry.get_sample_value("ratelimit_failures_total", labels) == 1
    assert "denied with 503" not in caplog.text and "served" in caplog.text
    assert limiter.get_request_count("a", "default", unit="tokens") == 30  # the estimate stands


def test_aio_a_stream_written_with_context_write_settles_with_its_usage() -> None:
    async def scenario() -> None:
        limiter = RateLimiter(tokens="1000/minute")
        interceptor = AsyncRateLimitInterceptor(limiter, estimator=lambda m, h: (10, 20), usage=usage_of)
        async with aio_server(interceptor, AsyncService()) as channel:
            written = channel.unary_stream(f"/{SERVICE}/WriteUsage")(b"", metadata=user("a"))
            assert [message async for message in written] == [b"text", b"usage:3,4"]
            await until(lambda: limiter.get_request_count("a", "default", unit="tokens") == 7)

    run(scenario)


def test_add_metadata_must_be_a_boolean() -> None:
    with pytest.raises(TypeError, match="add_metadata must be True or False, got 'false'"):
        RateLimitInterceptor(RateLimiter(5, 60), add_metadata="false")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "rules",
    [
        {"method_limits": {f"GET {COMPLETE}": "1/minute"}},
        {"method_limits": {f"POST {COMPLETE}": "1/minute"}},
        {"exempt_methods": ["GET /grpc.health.v1.Health/*"]},
        {"exempt_methods": "GET /grpc.health.v1.Health/*"},
    ],
)
def test_method_patterns_with_an_http_method_are_refused(rules: dict[str, Any]) -> None:
    """Calls are looked up as POST to the full method name: a GET rule was accepted and never applied."""
    for interceptor in (RateLimitInterceptor, AsyncRateLimitInterceptor):
        with pytest.raises(ValueError, match=r"^a gRPC method pattern is a full .*: '(GET|POST) /"):
            interceptor("100/hour", **rules)


@pytest.mark.parametrize(
    ("rules", "error", "says"),
    [
        ({"method_limits": ["/a.B/*"]}, TypeError, r"^method_limits must be a mapping of method pattern to "),
        (
            {"method_limits": {"/a.B/C": 5}},
            TypeError,
            r"^method_limits\['/a.B/C'\] must be a limiter, .* 5$",
        ),
        ({"method_limits": {"a.B/C": "1/minute"}}, ValueError, r"^a gRPC method pattern .*: 'a.B/C'$"),
        ({"exempt_methods": ["a.B/C"]}, ValueError, r"^a gRPC method pattern .*: 'a.B/C'$"),
    ],
)
def test_bad_method_rules_are_named_as_the_interceptor_takes_them(
    rules: dict[str, Any], error: type[Exception], says: str
) -> None:
    """The gate's messages named its HTTP options (path_limits) or spoke of path patterns."""
    for interceptor in (RateLimitInterceptor, AsyncRateLimitInterceptor):
        with pytest.raises(error, match=says):
            interceptor("100/hour", **rules)
