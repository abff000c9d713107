"""Token budgets and concurrency limits through the real middlewares: reserve, serve, settle."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import zlib
from typing import Any

import pytest
from fastapi import FastAPI
from flask import Flask
from flask import Response as FlaskResponse
from flask import request as flask_request
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from ratelimit_middleware import Limits, MultiTierRateLimiter
from ratelimit_middleware.asgi import RateLimitMiddleware
from ratelimit_middleware.config import MAX_AMOUNT
from ratelimit_middleware.observe import Observer
from ratelimit_middleware.wsgi import RateLimitWSGI

from .asgi_helpers import body_of, call, headers_of, http_scope, status_of


def usage_event(prompt: int, completion: int) -> str:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"


async def completions(request: Request) -> Response:
    """A mock LLM: usage and behaviour chosen by headers."""
    body = await request.json()
    prompt, completion = int(request.headers.get("x-in", "10")), int(request.headers.get("x-out", "20"))
    if "x-raise" in request.headers:
        raise RuntimeError("the model crashed")
    status = int(request.headers.get("x-status", "200"))
    if body.get("stream"):

        async def events() -> Any:
            yield 'data: {"choices": [{"delta": {"content": "hello"}}]}\n\n'
            if "x-cut" not in request.headers:
                yield usage_event(prompt, completion)
                yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", status_code=status)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    return JSONResponse({"choices": [], "usage": usage}, status_code=status)


ALICE = {"X-User-ID": "alice"}


def limiter(**limits: Any) -> MultiTierRateLimiter:
    return MultiTierRateLimiter(per_user_model=Limits(**limits))


def asgi_client(limits: MultiTierRateLimiter, **options: Any) -> TestClient:
    app = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])
    app.add_middleware(RateLimitMiddleware, limiter=limits, **options)
    return TestClient(app, raise_server_exceptions=False)


def chat(client: Any, max_tokens: int = 100, stream: bool = False, **headers: str) -> Any:
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 40}], "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
    sent = {"X-User-ID": "alice", **{f"x-{k.replace('_', '-')}": v for k, v in headers.items()}}
    return client.post("/v1/chat/completions", json=body, headers=sent)


def test_usage_from_the_json_response_settles_the_reservation() -> None:
    limits = limiter(tokens="1000/minute")
    client = asgi_client(limits)
    response = chat(client, max_tokens=500, **{"in": "12", "out": "30"})
    assert response.status_code == 200
    assert response.headers["x-ratelimit-limit-tokens"] == "1000"
    assert response.headers["x-ratelimit-remaining-tokens"] == str(
        1000 - 10 - 500
    )  # the estimate, at admission
    assert limits.get_request_count("alice", "m", unit="tokens") == 42  # settled to the real usage


def test_usage_from_a_stream_settles_the_reservation() -> None:
    limits = limiter(tokens="1000/minute")
    response = chat(asgi_client(limits), stream=True, **{"in": "7", "out": "5"})
    assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
    assert limits.get_request_count("alice", "m", unit="tokens") == 12


def test_a_stream_without_usage_is_charged_for_what_it_carried() -> None:
    limits = limiter(tokens="1000/minute")
    chat(asgi_client(limits), stream=True, max_tokens=500, cut="1")
    assert limits.get_request_count("alice", "m", unit="tokens") == 10 + 2  # prompt estimate + "hello"


@pytest.mark.parametrize("failure", [{"status": "500"}, {"status": "503"}, {"raise": "1"}, {"status": "400"}])
def test_failed_calls_are_refunded(failure: dict[str, str]) -> None:
    limits = limiter(requests="100/minute", tokens="1000/minute", max_concurrent=1)
    client = asgi_client(limits)
    assert chat(client, **failure).status_code >= 400
    assert limits.get_request_count("alice", "m", unit="tokens") == 0
    assert limits.get_request_count("alice", "m", unit="concurrent") == 0
    assert limits.get_request_count("alice", "m") == 1  # the request itself stays counted


def test_usage_beyond_the_largest_amount_still_frees_the_slot() -> None:
    limits = limiter(tokens="1000/minute", max_concurrent=1)
    client = asgi_client(limits)
    assert chat(client, **{"in": str(2**60)}).status_code == 200
    assert limits.get_request_count("alice", "m", unit="concurrent") == 0
    assert limits.get_request_count("alice", "m", unit="tokens") >= MAX_AMOUNT  # charged the cap


def test_token_denial_is_a_429_of_type_tokens() -> None:
    limits = limiter(requests="100/minute", tokens="1000/minute")
    client = asgi_client(limits)
    chat(client, max_tokens=800, **{"in": "10", "out": "800"})
    denied = chat(client, max_tokens=300)
    assert denied.status_code == 429
    error = denied.json()["error"]
    assert error["type"] == "tokens" and error["code"] == "rate_limit_exceeded"
    assert "Limit 1000, Used 810, Requested 310" in error["message"]
    assert denied.headers["x-ratelimit-remaining-tokens"] == "0"
    assert denied.headers["x-ratelimit-limit-requests"] == "100"
    policy = denied.headers["RateLimit-Policy"]
    assert policy.startswith('"per_user_model-tokens";q=1000;w=60;x-unit="tokens"')
    assert '"per_user_model";q=100;w=60' in policy
    assert int(denied.headers["retry-after"]) >= 1


def test_requests_too_large_for_the_budget_can_never_pass() -> None:
    denied = chat(asgi_client(limiter(tokens="1000/minute")), max_tokens=5000)
    assert denied.status_code == 429
    assert denied.headers["x-should-retry"] == "false"
    assert "can never be allowed" in denied.json()["error"]["message"]


def test_concurrency_slot_is_held_until_the_stream_ends() -> None:
    limits = limiter(max_concurrent=1)
    release = asyncio.Event()

    async def slow_stream(scope: Any, receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        await send({"type": "http.response.body", "body": b"data: first\n\n", "more_body": True})
        await release.wait()
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    app = RateLimitMiddleware(slow_stream, limits)

    async def scenario() -> tuple[list[Any], list[Any], list[Any]]:
        first = asyncio.create_task(call(app, http_scope(headers=[("X-User-ID", "a")]), [b"{}"]))
        await asyncio.sleep(0)  # let the first request take its slot and start streaming
        while limits.get_request_count("a", "default", unit="concurrent") == 0:
            await asyncio.sleep(0)
        second = await call(app, http_scope(headers=[("X-User-ID", "a")]), [b"{}"])
        release.set()
        done = await first
        third = await call(app, http_scope(headers=[("X-User-ID", "a")]), [b"{}"])
        return done, second, third

    done, second, third = asyncio.run(scenario())
    assert status_of(done) == 200 and body_of(done) == b"data: first\n\ndata: [DONE]\n\n"
    assert status_of(second) == 429
    assert (
        headers_of(second)["ratelimit-policy"] == '"per_user_model-concurrent";q=1;qu="concurrent-requests"'
    )
    assert json.loads(body_of(second))["error"]["type"] == "concurrency"
    assert headers_of(second)["retry-after"] == "1"
    assert status_of(third) == 200


def test_slot_released_when_the_client_disconnects() -> None:
    limits = limiter(max_concurrent=1)

    async def disconnecting_stream(scope: Any, receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        raise asyncio.CancelledError  # the server cancels the app when its client goes away

    app = RateLimitMiddleware(disconnecting_stream, limits)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(call(app, http_scope(headers=[("X-User-ID", "a")]), [b"{}"]))
    assert limits.get_request_count("a", "default", unit="concurrent") == 0


def test_no_slot_or_token_leak_after_10000_mixed_requests() -> None:
    limits = limiter(max_concurrent=4, tokens="1000000000/minute")
    outcomes = ["ok", "fail", "raise", "cut"]

    async def mixed(scope: Any, receive: Any, send: Any) -> None:
        kind = dict(scope["headers"])[b"x-kind"].decode()
        if kind == "raise":
            raise RuntimeError("boom")
        status = 500 if kind == "fail" else 200
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        if kind == "cut":
            raise asyncio.CancelledError
        await send(
            {"type": "http.response.body", "body": b'{"usage": {"prompt_tokens": 1, "completion_tokens": 1}}'}
        )

    app = RateLimitMiddleware(mixed, limits)

    async def scenario() -> None:
        for index in range(10_000):
            scope = http_scope(
                headers=[("X-User-ID", "a"), ("X-Model", "m"), ("X-Kind", outcomes[index % 4])]
            )
            with contextlib.suppress(RuntimeError, asyncio.CancelledError):
                await call(app, scope, [b'{"max_tokens": 5}'])

    asyncio.run(scenario())
    assert limits.get_request_count("a", "m", unit="concurrent") == 0


class BufferedClient:
    """Flask's test client reading each whole response, as a WSGI server does (it closes the iterable)."""

    def __init__(self, app: Flask) -> None:
        self.client = app.test_client()

    def post(self, *args: Any, **kwargs: Any) -> Any:
        return self.client.post(*args, buffered=True, **kwargs)


def flask_app(limits: MultiTierRateLimiter) -> Flask:
    app = Flask(__name__)

    @app.post("/v1/chat/completions")
    def chat_view() -> FlaskResponse:
        if "X-Raise" in flask_request.headers:
            raise RuntimeError("the model crashed")
        if (flask_request.get_json() or {}).get("stream"):
            events = [
                'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n',
                usage_event(4, 6),
                "data: [DONE]\n\n",
            ]
            return FlaskResponse(iter(events), mimetype="text/event-stream")
        body = {"usage": {"prompt_tokens": 3, "completion_tokens": 9}}
        return FlaskResponse(json.dumps(body), mimetype="application/json")

    app.wsgi_app = RateLimitWSGI(app.wsgi_app, limits)  # type: ignore[method-assign]
    return app


def test_wsgi_settles_json_and_stream_usage_and_refunds_errors() -> None:
    limits = limiter(tokens="1000/minute", max_concurrent=2)
    client = BufferedClient(flask_app(limits))
    response = chat(client, max_tokens=400)
    assert response.status_code == 200 and response.headers["x-ratelimit-limit-tokens"] == "1000"
    assert limits.get_request_count("alice", "m", unit="tokens") == 12
    streamed = chat(client, max_tokens=400, stream=True)
    assert streamed.status_code == 200 and b"[DONE]" in streamed.data
    assert limits.get_request_count("alice", "m", unit="tokens") == 22
    assert chat(client, **{"raise": "1"}).status_code == 500
    assert limits.get_request_count("alice", "m", unit="tokens") == 22
    assert limits.get_request_count("alice", "m", unit="concurrent") == 0


class Settlements(Observer):
    def __init__(self) -> None:
        self.seen: list[tuple[int, int] | None] = []

    def settlement(self, model: str, reserved: tuple[int, int], actual: tuple[int, int] | None) -> None:
        self.seen.append(actual)


def raw_wsgi_usage(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps({"usage": {"prompt_tokens": 3, "completion_tokens": 9}}).encode()]


@pytest.mark.parametrize("closes", [0, 2])
def test_wsgi_settles_once_when_the_body_ends_whether_closed_never_or_twice(closes: int) -> None:
    """PEP 3333 servers call ``close()`` once; a wrapper that never does, or does twice, must neither keep
    the slot nor report the settlement twice."""
    limits = limiter(tokens="1000/minute", max_concurrent=1)
    settlements = Settlements()
    app = RateLimitWSGI(raw_wsgi_usage, limits, observers=[settlements])
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/v1/chat/completions",
        "HTTP_X_USER_ID": "alice",
        "HTTP_X_MODEL": "m",
        "wsgi.input": io.BytesIO(b""),
    }
    body = app(environ, lambda status, headers, exc_info=None: None)
    assert b"".join(body) == b'{"usage": {"prompt_tokens": 3, "completion_tokens": 9}}'
    for _ in range(closes):
        body.close()  # type: ignore[attr-defined]
    assert limits.get_request_count("alice", "m", unit="concurrent") == 0
    assert limits.get_request_count("alice", "m", unit="tokens") == 12
    assert settlements.seen == [(3, 9)]


def test_wsgi_token_denial() -> None:
    client = BufferedClient(flask_app(limiter(tokens="300/minute")))
    chat(client, max_tokens=250)  # settles to 12
    denied = chat(client, max_tokens=290)
    assert denied.status_code == 429 and denied.json["error"]["type"] == "tokens"


def test_decorators_refuse_token_limits() -> None:
    from ratelimit_middleware.fastapi import limit as fastapi_limit
    from ratelimit_middleware.flask import limit as flask_limit

    for decorator in (fastapi_limit, flask_limit):
        with pytest.raises(TypeError, match="RateLimitMiddleware"):
            decorator(limiter(tokens="10/minute"))


def test_custom_estimator() -> None:
    limits = limiter(tokens="1000/minute")
    client = asgi_client(limits, estimator=lambda request: (900, 0))
    assert chat(client).headers["x-ratelimit-remaining-tokens"] == "100"


async def usage_if_asked(request: Request) -> Response:
    """A stream that reports usage only when the request asks for it, as OpenAI does."""
    body = await request.json()
    assert int(request.headers["content-length"]) == len(await request.body())

    async def events() -> Any:
        yield 'data: {"choices": [{"delta": {"content": "' + "y" * 400 + '"}}]}\n\n'
        if (body.get("stream_options") or {}).get("include_usage"):
            yield usage_event(3, 4)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@pytest.mark.parametrize(("stream_usage", "charged"), [(True, 7), (False, 10 + 100)])
def test_stream_usage_asks_openai_compatible_servers_for_usage(stream_usage: bool, charged: int) -> None:
    limits = limiter(tokens="1000/minute")
    app = Starlette(routes=[Route("/v1/chat/completions", usage_if_asked, methods=["POST"])])
    app.add_middleware(RateLimitMiddleware, limiter=limits, stream_usage=stream_usage)
    response = chat(TestClient(app), stream=True, max_tokens=500)
    assert response.status_code == 200
    assert limits.get_request_count("alice", "m", unit="tokens") == charged


def test_stream_usage_asks_for_usage_even_of_a_client_that_said_not_to() -> None:
    """``"include_usage": false`` kept the usage chunk away: the stream was charged only the text counted."""
    limits = limiter(tokens="1000/minute")
    app = Starlette(routes=[Route("/v1/chat/completions", usage_if_asked, methods=["POST"])])
    app.add_middleware(RateLimitMiddleware, limiter=limits, stream_usage=True)
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "x" * 40}],
        "max_tokens": 500,
        "stream": True,
        "stream_options": {"include_usage": False},
    }
    response = TestClient(app).post("/v1/chat/completions", json=body, headers={"X-User-ID": "alice"})
    assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
    assert '"usage"' not in response.text  # it said not to: the chunk is the middleware's alone
    assert limits.get_request_count("alice", "m", unit="tokens") == 7


def test_stream_usage_still_tells_the_app_when_the_client_leaves() -> None:
    """The rewritten body replaces the server's; what the server sends after it (a disconnect) still comes."""
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(json.loads((await receive())["body"]))
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        seen.append((await asyncio.wait_for(receive(), 5))["type"])
        await send({"type": "http.response.body", "body": b""})

    middleware = RateLimitMiddleware(app, limiter=limiter(tokens="1000/minute"), stream_usage=True)
    body = json.dumps(
        {"model": "m", "stream": True, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    )
    messages = [
        {"type": "http.request", "body": body.encode(), "more_body": False},
        {"type": "http.disconnect"},
    ]

    async def receive() -> Any:
        return messages.pop(0)

    async def send(message: Any) -> None:
        pass

    scope = http_scope(headers=[("X-User-ID", "alice"), ("Content-Type", "application/json")])
    asyncio.run(middleware(scope, receive, send))
    assert seen[0]["stream_options"] == {"include_usage": True}
    assert seen[1] == "http.disconnect"


def test_stream_usage_in_wsgi() -> None:
    limits = limiter(tokens="1000/minute")
    app = Flask(__name__)

    @app.post("/v1/chat/completions")
    def view() -> FlaskResponse:
        body = flask_request.get_json()
        events = ['data: {"choices": [{"delta": {"content": "hi"}}]}\n\n']
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(usage_event(5, 6))
        return FlaskResponse(iter([*events, "data: [DONE]\n\n"]), mimetype="text/event-stream")

    app.wsgi_app = RateLimitWSGI(app.wsgi_app, limits, stream_usage=True)  # type: ignore[method-assign]
    assert chat(BufferedClient(app), stream=True).status_code == 200
    assert limits.get_request_count("alice", "m", unit="tokens") == 11


USAGE_ONLY = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "choices": [],
    "usage": {"prompt_tokens": 6, "completion_tokens": 9, "total_tokens": 15},
}
WITH_CHOICES = {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"content": "lo"}}], "usage": {"x": 1}}


def asked_events(eol: bytes) -> list[bytes]:
    """A stream as a server sends it when asked for usage: a usage chunk that has choices (some servers put
    usage on every chunk) stays whole; only the one without choices, last, is the middleware's."""
    events = [
        b'data: {"choices": [{"index": 0, "delta": {"content": "hel"}}]}',
        b"data: " + json.dumps(WITH_CHOICES).encode(),
        b": keep-alive",
        b"data: " + json.dumps(USAGE_ONLY).encode(),
        b"data: [DONE]",
    ]
    return [event + eol + eol for event in events]


def unasked(events: list[bytes]) -> bytes:
    """What a client that did not ask for usage gets of ``events``: all but the usage chunk."""
    return b"".join(event for event in events if b'"choices": []' not in event)


def pieces(events: list[bytes], split: str) -> list[bytes]:
    """The stream in the pieces an app sends it in: an event each, all at once, or a byte each (every event
    end, CRLF included, cut everywhere)."""
    stream = b"".join(events)
    return {"events": events, "whole": [stream], "bytes": [stream[i : i + 1] for i in range(len(stream))]}[
        split
    ]


def chat_body(asks: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "m",
        "messages": [{"role": "user", "content": "x" * 40}],
        "max_tokens": 100,
        "stream": True,
    }
    return {**body, "stream_options": {"include_usage": True}} if asks else body


def streaming_app(sent: list[bytes]) -> Starlette:
    """An OpenAI-compatible server that sends ``sent`` when the request asks for usage."""

    async def endpoint(request: Request) -> Response:
        assert ((await request.json()).get("stream_options") or {}).get("include_usage") is True

        async def events() -> Any:
            for piece in sent:
                yield piece

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", endpoint, methods=["POST"])])


@pytest.mark.parametrize("split", ["events", "whole", "bytes"])
@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize("asks", [False, True], ids=["unasked", "asked"])
def test_the_usage_chunk_the_middleware_asked_for_is_not_passed_on(
    eol: bytes, split: str, asks: bool
) -> None:
    """The usage chunk (no choices) reached clients that never asked for it, which crash on
    ``chunk.choices[0]``; the stream still settles with its usage. A client that asked gets it as sent."""
    events = asked_events(eol)
    limits = limiter(tokens="1000/minute")
    app = streaming_app(pieces(events, split))
    app.add_middleware(RateLimitMiddleware, limiter=limits, stream_usage=True)
    response = TestClient(app).post("/v1/chat/completions", json=chat_body(asks), headers=ALICE)
    assert response.status_code == 200
    assert response.content == (b"".join(events) if asks else unasked(events))
    assert limits.get_request_count("alice", "m", unit="tokens") == 15


@pytest.mark.parametrize("split", ["events", "whole", "bytes"])
@pytest.mark.parametrize("eol", [b"\n", b"\r\n"], ids=["lf", "crlf"])
@pytest.mark.parametrize("asks", [False, True], ids=["unasked", "asked"])
def test_the_usage_chunk_the_middleware_asked_for_is_not_passed_on_in_wsgi(
    eol: bytes, split: str, asks: bool
) -> None:
    events = asked_events(eol)
    limits = limiter(tokens="1000/minute")
    app = Flask(__name__)

    @app.post("/v1/chat/completions")
    def view() -> FlaskResponse:
        assert (flask_request.get_json()["stream_options"] or {}).get("include_usage") is True
        return FlaskResponse(iter(pieces(events, split)), mimetype="text/event-stream")

    app.wsgi_app = RateLimitWSGI(app.wsgi_app, limits, stream_usage=True)  # type: ignore[method-assign]
    response = BufferedClient(app).post("/v1/chat/completions", json=chat_body(asks), headers=ALICE)
    assert response.status_code == 200
    assert response.data == (b"".join(events) if asks else unasked(events))
    assert limits.get_request_count("alice", "m", unit="tokens") == 15


def passes_in_asgi(sent: list[bytes]) -> list[bytes]:
    """The body of each message the middleware sends on, for each message of ``sent`` the app sends."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for index, piece in enumerate(sent):
            await send({"type": "http.response.body", "body": piece, "more_body": index < len(sent) - 1})

    middleware = RateLimitMiddleware(app, limiter=limiter(tokens="1000/minute"), stream_usage=True)
    body = json.dumps(chat_body(False)).encode()
    scope = http_scope(headers=[("X-User-ID", "alice"), ("Content-Type", "application/json")])
    return [message["body"] for message in asyncio.run(call(middleware, scope, [body]))[1:]]


def passes_in_wsgi(sent: list[bytes]) -> list[bytes]:
    """The chunks the middleware yields, for each chunk of ``sent`` a Flask view yields."""
    app = Flask(__name__)
    app.add_url_rule(
        "/v1/chat/completions",
        "chat",
        lambda: FlaskResponse(iter(sent), mimetype="text/event-stream"),
        methods=["POST"],
    )
    app.wsgi_app = RateLimitWSGI(  # type: ignore[method-assign]
        app.wsgi_app, limiter(tokens="1000/minute"), stream_usage=True
    )
    response = app.test_client().post(
        "/v1/chat/completions", json=chat_body(False), headers=ALICE, buffered=False
    )
    with contextlib.closing(response):
        return list(response.response)


@pytest.mark.parametrize("passes", [passes_in_asgi, passes_in_wsgi], ids=["asgi", "wsgi"])
def test_events_pass_on_as_soon_as_they_are_complete(passes: Any) -> None:
    """Only an event not complete yet is held back: each piece the app sends carries on the events it
    completes, at once, whether it holds one event or one byte."""
    events = asked_events(b"\r\n")
    passed_on, offset = [], 0  # (where each event the client gets ends in the stream, the event)
    for event in events:
        offset += len(event)
        if b'"choices": []' not in event:
            passed_on.append((offset, event))
    for sent in (events, pieces(events, "bytes")):
        expected, start = [], 0
        for piece in sent:  # the events this piece completes, less the usage chunk
            end = start + len(piece)
            expected.append(b"".join(event for stop, event in passed_on if start < stop <= end))
            start = end
        assert passes(sent) == expected


def test_a_stream_of_a_set_length_or_compressed_keeps_its_usage_chunk() -> None:
    """Taking bytes out would make a Content-Length wrong, and compressed events cannot be seen: such
    streams pass as they are, and still settle."""
    stream = b"".join(asked_events(b"\n"))

    async def sized(request: Request) -> Response:
        return Response(stream, media_type="text/event-stream")

    limits = limiter(tokens="1000/minute")
    app = Starlette(routes=[Route("/v1/chat/completions", sized, methods=["POST"])])
    app.add_middleware(RateLimitMiddleware, limiter=limits, stream_usage=True)
    response = TestClient(app).post("/v1/chat/completions", json=chat_body(False), headers=ALICE)
    assert response.content == stream and response.headers["content-length"] == str(len(stream))
    assert limits.get_request_count("alice", "m", unit="tokens") == 15

    compressed = streaming_app([stream])
    compressed.add_middleware(GZipMiddleware, minimum_size=0, exclude_content_types=())
    compressed.add_middleware(RateLimitMiddleware, limiter=limits, stream_usage=True)
    response = TestClient(compressed).post("/v1/chat/completions", json=chat_body(False), headers=ALICE)
    assert response.headers["content-encoding"] == "gzip" and response.content == stream
    assert limits.get_request_count("alice", "m", unit="tokens") == 30


def provider_event(event: dict[str, Any]) -> str:
    """An event as providers send it: named by its type, if it has one (OpenAI's chat chunks have none)."""
    name = f"event: {event['type']}\n" if "type" in event else ""
    return f"{name}data: {json.dumps(event)}\n\n"


ANTHROPIC_CUT = [  # the client went away before message_delta: only message_start's placeholder usage came
    {"type": "message_start", "message": {"usage": {"input_tokens": 25, "output_tokens": 1}}},
    *[{"type": "content_block_delta", "delta": {"type": "text_delta", "text": "z" * 40}}] * 5,
]
RESPONSES_STREAM = [
    {"type": "response.created", "response": {"status": "in_progress", "usage": None}},
    {"type": "response.output_text.delta", "delta": "Hello world. " * 10},
    {"type": "response.completed", "response": {"usage": {"input_tokens": 7, "output_tokens": 90}}},
]


CHAT_TOOLS_CUT = [  # reasoning, then a tool call, and no usage
    *[{"choices": [{"index": 0, "delta": {"reasoning_content": "r" * 40}}]}] * 5,
    *[
        {
            "choices": [
                {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "a" * 40}}]}}
            ]
        }
    ]
    * 5,
]
ANTHROPIC_THINKING_CUT = [
    ANTHROPIC_CUT[0],
    *[{"type": "content_block_delta", "delta": {"type": "thinking_delta", "thinking": "t" * 40}}] * 5,
    *[{"type": "content_block_delta", "delta": {"type": "input_json_delta", "partial_json": "j" * 40}}] * 5,
]
RESPONSES_IMAGE_STREAM = [  # an event of 1.5 MB (a base64 image) stopped the reading of the stream
    RESPONSES_STREAM[0],
    {"type": "response.image_generation_call.partial_image", "partial_image_b64": "A" * 1_500_000},
    *RESPONSES_STREAM[1:],
]


def in_pieces(events: list[dict[str, Any]]) -> Any:
    """The stream of ``events``, sent 64 KiB at a time as servers do."""
    for event in map(provider_event, events):
        for start in range(0, len(event), 64 * 1024):
            yield event[start : start + 64 * 1024]


@pytest.mark.parametrize(
    ("answer", "charged"),
    [
        ({"data": [], "usage": {"prompt_tokens": 8, "total_tokens": 8}}, 8),  # OpenAI's embeddings
        (ANTHROPIC_CUT, 25 + 50),
        (RESPONSES_STREAM, 7 + 90),
        (RESPONSES_IMAGE_STREAM, 7 + 90),
        (CHAT_TOOLS_CUT, 10 + 100),
        (ANTHROPIC_THINKING_CUT, 25 + 100),
        (  # Anthropic's input_tokens leaves out the cached prompt
            {"usage": {"input_tokens": 3, "cache_creation_input_tokens": 2000, "output_tokens": 5}},
            2003 + 5,
        ),
    ],
    ids=[
        "openai-embeddings",
        "anthropic-cut-stream",
        "responses-api-stream",
        "responses-api-image-stream",
        "chat-reasoning-and-tool-call-cut-stream",
        "anthropic-thinking-and-tool-use-cut-stream",
        "anthropic-prompt-cache",
    ],
)
def test_provider_responses_settle_to_what_they_report_or_carried(
    answer: dict[str, Any] | list[dict[str, Any]], charged: int
) -> None:
    """A JSON body, or a stream of these events."""

    async def provider(request: Request) -> Response:
        if isinstance(answer, dict):
            return JSONResponse(answer)
        return StreamingResponse(in_pieces(answer), media_type="text/event-stream")

    limits = limiter(tokens="10000/minute")
    app = Starlette(routes=[Route("/v1/chat/completions", provider, methods=["POST"])])
    app.add_middleware(RateLimitMiddleware, limiter=limits)
    assert chat(TestClient(app), max_tokens=2000).status_code == 200
    assert limits.get_request_count("alice", "m", unit="tokens") == charged


def embeddings(inputs: int) -> dict[str, Any]:
    """OpenAI's answer to embeddings in base64 (the openai client's default): 8 KiB each, the usage last."""
    vector = base64.b64encode(bytes(range(256)) * 24).decode()
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": index, "embedding": vector} for index in range(inputs)],
        "model": "e",
        "usage": {"prompt_tokens": 80_000, "total_tokens": 80_000},
    }


@pytest.mark.parametrize("gzip", [False, True])
def test_usage_after_a_megabyte_of_embeddings_is_charged(gzip: bool) -> None:
    """200 base64 embeddings pass 1 MiB before the usage: it was never read and the estimate stood, so a
    40,000 tokens a minute budget let through call after call of 80,000 tokens."""

    async def answer(request: Request) -> Response:
        return JSONResponse(embeddings(200))

    limits = limiter(tokens="40000/minute")
    app = Starlette(routes=[Route("/v1/embeddings", answer, methods=["POST"])])
    if gzip:
        app.add_middleware(GZipMiddleware)
    app.add_middleware(RateLimitMiddleware, limiter=limits)
    client = TestClient(app)
    body = {"model": "e", "input": ["a passage to embed"] * 200}
    first = client.post("/v1/embeddings", json=body, headers={"X-User-ID": "alice"})
    assert first.status_code == 200 and len(first.content) > 1536 * 1024
    assert (first.headers.get("content-encoding") == "gzip") is gzip
    assert limits.get_request_count("alice", "e", unit="tokens") == 80_000
    assert client.post("/v1/embeddings", json=body, headers={"X-User-ID": "alice"}).status_code == 429


def test_a_prompt_of_token_ids_is_counted() -> None:
    """Token ids counted nothing: 80,000 of them passed a 40,000 tokens a minute budget."""
    limits = limiter(tokens="40000/minute")
    app = Starlette(routes=[Route("/v1/embeddings", lambda request: JSONResponse({}), methods=["POST"])])
    app.add_middleware(RateLimitMiddleware, limiter=limits)
    body = {"model": "e", "input": [[42] * 400] * 200}
    denied = TestClient(app).post("/v1/embeddings", json=body, headers={"X-User-ID": "alice"})
    assert denied.status_code == 429 and "can never be allowed" in denied.json()["error"]["message"]


COMPLETION = {
    "choices": [{"message": {"content": "x" * 800}}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 200},
}


def test_compressed_responses_are_metered() -> None:
    """GZipMiddleware inside the limiter: usage read from the gzip body, which reaches the client as sent."""

    async def completion(request: Request) -> Response:
        return JSONResponse(COMPLETION)

    limits = limiter(tokens="10000/minute")
    app = Starlette(routes=[Route("/v1/chat/completions", completion, methods=["POST"])])
    app.add_middleware(GZipMiddleware, minimum_size=100)
    app.add_middleware(RateLimitMiddleware, limiter=limits)
    response = chat(TestClient(app), max_tokens=4000)
    assert response.headers["content-encoding"] == "gzip" and response.json() == COMPLETION
    assert limits.get_request_count("alice", "m", unit="tokens") == 205


def test_compressed_responses_are_metered_in_wsgi() -> None:
    limits = limiter(tokens="10000/minute")
    app = Flask(__name__)

    @app.post("/v1/chat/completions")
    def deflated() -> FlaskResponse:
        body = zlib.compress(json.dumps(COMPLETION).encode())  # deflate: zlib's format
        return FlaskResponse(body, mimetype="application/json", headers={"Content-Encoding": "deflate"})

    app.wsgi_app = RateLimitWSGI(app.wsgi_app, limits)  # type: ignore[method-assign]
    response = chat(BufferedClient(app), max_tokens=4000)
    assert json.loads(zlib.decompress(response.data)) == COMPLETION
    assert limits.get_request_count("alice", "m", unit="tokens") == 205


def test_an_encoding_the_meter_cannot_read_keeps_the_estimate_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def brotli(request: Request) -> Response:
        return Response(
            b"\x1b\x03 not really brotli", media_type="application/json", headers={"content-encoding": "br"}
        )

    limits = limiter(tokens="10000/minute")
    app = Starlette(routes=[Route("/v1/chat/completions", brotli, methods=["POST"])])
    app.add_middleware(RateLimitMiddleware, limiter=limits)
    client = TestClient(app)
    with caplog.at_level(logging.WARNING, logger="ratelimit_middleware"):
        for _ in range(3):
            chat(client, max_tokens=100)
    assert limits.get_request_count("alice", "m", unit="tokens") == 3 * (10 + 100)
    # Records of this middleware only: a background thread of another test may log meanwhile.
    messages = [record.getMessage() for record in caplog.records]
    assert [message for message in messages if "Content-Encoding" in message] == [
        "a response in Content-Encoding 'br' cannot be metered in full: its reservation keeps the estimate, "
        "or what was read"
    ]


async def listing(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [], "body": len(await request.body())})


def test_a_request_without_a_body_counts_as_a_request_only() -> None:
    """GET /v1/models asks for nothing to be generated; a body that is not JSON, or too large to read, may."""
    limits = limiter(requests="100/minute", tokens="3000/minute")
    app = Starlette(routes=[Route("/v1/models", listing, methods=["GET", "POST"])])
    app.add_middleware(RateLimitMiddleware, limiter=limits, max_body_size=1000)
    client = TestClient(app)
    for _ in range(5):
        response = client.get("/v1/models", headers={"X-User-ID": "alice"})
        assert response.status_code == 200 and response.headers["x-ratelimit-remaining-tokens"] == "3000"
    assert limits.get_request_count("alice", "default", unit="tokens") == 0
    assert limits.get_request_count("alice", "default") == 5
    client.post("/v1/models", content=b"prompt=not json", headers={"X-User-ID": "alice"})
    assert limits.get_request_count("alice", "default", unit="tokens") == 1024
    client.post("/v1/models", json={"messages": "x" * 2000}, headers={"X-User-ID": "alice"})  # over the cap
    assert limits.get_request_count("alice", "default", unit="tokens") == 2048


async def no_usage(request: Request) -> Response:
    """Anthropic's token count and OpenAI's moderations: no usage in the answer."""
    if request.url.path.endswith("/count_tokens"):
        return JSONResponse({"input_tokens": 14})
    return JSONResponse({"id": "modr", "results": [{"flagged": False}]})


def test_endpoints_that_generate_nothing_reserve_no_output() -> None:
    """count_tokens and moderations kept the 1024 output tokens reserved (they report no usage), and were
    refused for ever under a budget of 1000 tokens a minute; a chat request without max_tokens keeps them."""
    limits = limiter(tokens="1000/minute")
    paths = ("/v1/messages/count_tokens", "/v1/moderations", "/v1/chat/completions")
    app = Starlette(routes=[Route(path, no_usage, methods=["POST"]) for path in paths])
    app.add_middleware(RateLimitMiddleware, limiter=limits)
    client = TestClient(app)
    messages = [{"role": "user", "content": "x" * 40}]
    counted = client.post(
        "/v1/messages/count_tokens", json={"model": "c", "messages": messages}, headers=ALICE
    )
    assert counted.status_code == 200 and limits.get_request_count("alice", "c", unit="tokens") == 0
    moderated = client.post("/v1/moderations", json={"model": "o", "input": "x" * 40}, headers=ALICE)
    assert moderated.status_code == 200 and limits.get_request_count("alice", "o", unit="tokens") == 10
    chat_body = {"model": "m", "messages": messages}
    assert client.post("/v1/chat/completions", json=chat_body, headers=ALICE).status_code == 429


def chunked_body() -> Any:
    yield b'{"model": "m", "stream": true, '
    yield b'"messages": [{"role": "user", "content": "hi"}]}'


def test_stream_usage_rewrites_a_chunked_body_with_its_content_length_alone() -> None:
    async def framing(request: Request) -> Response:
        body = await request.body()
        return JSONResponse({"headers": dict(request.headers), "body": json.loads(body)})

    app = Starlette(routes=[Route("/v1/chat/completions", framing, methods=["POST"])])
    app.add_middleware(RateLimitMiddleware, limiter=limiter(tokens="10000/minute"), stream_usage=True)
    seen = (
        TestClient(app)
        .post("/v1/chat/completions", content=chunked_body(), headers={"X-User-ID": "a"})
        .json()
    )
    assert seen["body"]["stream_options"] == {"include_usage": True}
    assert "transfer-encoding" not in seen["headers"]
    assert seen["headers"]["content-length"] == str(len(json.dumps(seen["body"])))


def test_stream_usage_rewrites_a_chunked_body_with_its_content_length_alone_in_wsgi() -> None:
    app = Flask(__name__)

    @app.post("/v1/chat/completions")
    def framing() -> Any:
        return {
            "transfer_encoding": flask_request.headers.get("Transfer-Encoding"),
            "content_length": flask_request.content_length,
            "body": flask_request.get_json(),
        }

    app.wsgi_app = RateLimitWSGI(  # type: ignore[method-assign]
        app.wsgi_app, limiter(tokens="10000/minute"), stream_usage=True
    )
    seen = (
        app.test_client()
        .post(
            "/v1/chat/completions",
            input_stream=io.BytesIO(b"".join(chunked_body())),
            headers={"X-User-ID": "a", "Transfer-Encoding": "chunked", "Content-Type": "application/json"},
        )
        .json
    )
    assert seen["body"]["stream_options"] == {"include_usage": True}
    assert seen["transfer_encoding"] is None
    assert seen["content_length"] == len(json.dumps(seen["body"]))


def test_a_denial_to_head_has_no_body_in_wsgi() -> None:
    app = Flask(__name__)
    app.add_url_rule("/v1/models", "models", lambda: {"data": []}, methods=["GET"])
    app.wsgi_app = RateLimitWSGI(app.wsgi_app, "1/minute")  # type: ignore[method-assign]
    client = app.test_client()
    client.get("/v1/models", headers={"X-User-ID": "a"})
    denied_get = client.get("/v1/models", headers={"X-User-ID": "a"})
    denied_head = client.head("/v1/models", headers={"X-User-ID": "a"})
    assert denied_get.status_code == denied_head.status_code == 429
    assert denied_head.data == b""
    assert (
        denied_head.headers["Content-Length"]
        == denied_get.headers["Content-Length"]
        == str(len(denied_get.data))
    )


HEAD_USAGE = {"usage": {"prompt_tokens": 5, "completion_tokens": 7}}  # 12: what the app reports
HEAD_STREAM = [
    'data: {"choices": [{"delta": {"content": "hello"}}]}\n\n',
    f"data: {json.dumps(HEAD_USAGE)}\n\n",
]


def generated_in_asgi(limits: MultiTierRateLimiter, method: str, path: str, body: bytes) -> bytes:
    """A Starlette app whose GET routes generate; HEAD runs them, streams included (Starlette sends the body
    and the server drops it). The body the client gets."""

    async def answer(request: Request) -> Response:
        return JSONResponse(HEAD_USAGE)

    async def stream(request: Request) -> Response:
        return StreamingResponse(iter(HEAD_STREAM), media_type="text/event-stream")

    app = Starlette(routes=[Route("/answer", answer), Route("/stream", stream)])  # GET, and HEAD with it
    app.add_middleware(RateLimitMiddleware, limiter=limits)
    response = TestClient(app).request(method, path, content=body, headers=ALICE)
    assert response.status_code == 200
    return response.content


def generated_in_wsgi(limits: MultiTierRateLimiter, method: str, path: str, body: bytes) -> bytes:
    """The same app in Flask (werkzeug drops a HEAD's body itself, a stream's before it runs)."""
    app = Flask(__name__)
    app.add_url_rule("/answer", "answer", lambda: HEAD_USAGE)
    app.add_url_rule(
        "/stream", "stream", lambda: FlaskResponse(iter(HEAD_STREAM), mimetype="text/event-stream")
    )
    app.wsgi_app = RateLimitWSGI(app.wsgi_app, limits)  # type: ignore[method-assign]
    response = app.test_client().open(path, method=method, data=body, headers=ALICE, buffered=True)
    assert response.status_code == 200
    return response.data


@pytest.mark.parametrize("generated", [generated_in_asgi, generated_in_wsgi], ids=["asgi", "wsgi"])
@pytest.mark.parametrize("path", ["/answer", "/stream"])
def test_a_head_is_charged_its_estimate_in_asgi_and_wsgi_alike(generated: Any, path: str) -> None:
    """A HEAD gets no body, so none of the tokens its GET route generates: it is charged its estimate, as it
    was under WSGI (nothing without a body, the estimate of one it has), never the usage of the body the app
    made for it, as it was under ASGI. A GET is charged that usage."""
    limits = limiter(tokens="1000/minute")
    assert generated(limits, "GET", path, b"") != b""
    assert limits.get_request_count("alice", "default", unit="tokens") == 12
    assert generated(limits, "HEAD", path, b"") == b""
    assert limits.get_request_count("alice", "default", unit="tokens") == 12
    prompt = json.dumps({"messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 30}).encode()
    assert generated(limits, "HEAD", path, prompt) == b""
    assert limits.get_request_count("alice", "default", unit="tokens") == 12 + 10 + 30


def test_the_body_an_app_sends_to_a_head_goes_no_further() -> None:
    """Whatever server runs the app, one that would send a HEAD's body on included, the tokens an app
    generates for a HEAD never reach the client: they go uncharged, so they must."""
    answer = json.dumps(HEAD_USAGE).encode()
    length = str(len(answer))  # a HEAD's is the GET's

    async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", length.encode())]}
        )
        await send({"type": "http.response.body", "body": answer})

    def wsgi_app(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Length", length)])
        return [answer]

    limits = limiter(tokens="1000/minute")
    scope = http_scope(method="HEAD", headers=ALICE.items())
    sent = asyncio.run(call(RateLimitMiddleware(asgi_app, limits), scope))
    assert headers_of(sent)["content-length"] == length and body_of(sent) == b""
    environ = {
        "REQUEST_METHOD": "HEAD",
        "PATH_INFO": "/",
        "HTTP_X_USER_ID": "alice",
        "wsgi.input": io.BytesIO(),
    }
    body = RateLimitWSGI(wsgi_app, limits)(environ, lambda status, headers, exc_info=None: None)
    assert b"".join(body) == b""
    body.close()  # type: ignore[attr-defined]
    assert limits.get_request_count("alice", "default", unit="tokens") == 0


@pytest.mark.parametrize(("path_limits", "charged"), [(None, 30), ({"GET /v1/responses/*": "600/minute"}, 0)])
def test_a_retrieval_route_is_kept_from_charging_again_by_a_request_limit(
    path_limits: dict[str, str] | None, charged: int
) -> None:
    """INTEGRATION.md: a response reporting usage is charged it, a GET's too (an app may generate on one), so
    a route returning a stored response with its usage would charge it again: a path rule of requests only
    keeps it from doing so, and still limits it."""

    async def stored(request: Request) -> Response:
        return JSONResponse(
            {"id": "resp_1", "status": "completed", "usage": {"input_tokens": 10, "output_tokens": 20}}
        )

    limits = limiter(requests="100/minute", tokens="1000/minute")
    app = Starlette(routes=[Route("/v1/responses/{id}", stored)])
    app.add_middleware(RateLimitMiddleware, limiter=limits, path_limits=path_limits)
    client = TestClient(app)
    assert client.get("/v1/responses/resp_1", headers=ALICE).status_code == 200
    assert limits.get_request_count("alice", "default", unit="tokens") == charged


def test_stream_usage_leaves_other_apis_bodies_alone() -> None:
    """Anthropic's messages and OpenAI's responses refuse ``stream_options``: their bodies pass untouched."""
    seen: list[bytes] = []

    async def echo(request: Request) -> Response:
        seen.append(await request.body())
        return JSONResponse({"usage": {"input_tokens": 1, "output_tokens": 1}})

    app = Starlette(
        routes=[Route(path, echo, methods=["POST"]) for path in ("/v1/messages", "/v1/responses")]
    )
    app.add_middleware(RateLimitMiddleware, limiter=limiter(tokens="1000/minute"), stream_usage=True)
    body = b'{"model": "m", "stream": true, "max_tokens": 5}'
    client = TestClient(app)
    for path in ("/v1/messages", "/v1/responses"):
        assert client.post(path, content=body, headers={"X-User-ID": "a"}).status_code == 200
    assert seen == [body, body]


class ChatBody(BaseModel):
    """A request as a Pydantic-based server (vLLM, SGLang) reads it."""

    model: str
    messages: list[dict[str, str]]
    max_tokens: int | None = None
    n: int = 1


def pydantic_server(limits: MultiTierRateLimiter) -> TestClient:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat_view(body: ChatBody) -> dict[str, Any]:
        return {
            "choices": [],
            "usage": {"prompt_tokens": 1, "completion_tokens": (body.max_tokens or 16) * body.n},
        }

    app.add_middleware(RateLimitMiddleware, limiter=limits)
    return TestClient(app)


@pytest.mark.parametrize(
    "fields",
    [{"max_tokens": 50000}, {"max_tokens": 50000.0}, {"max_tokens": "50000"}, {"max_tokens": 5000, "n": 8.0}],
)
def test_output_caps_the_server_reads_as_ints_are_reserved(fields: dict[str, Any]) -> None:
    """The server generates 50000.0 or "50000" tokens as it would 50000: such requests were reserved the
    default 1024 output tokens and let through a 10,000 tokens a minute budget."""
    client = pydantic_server(limiter(tokens="10000/minute"))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    response = client.post("/v1/chat/completions", json=body, headers={"X-User-ID": "alice"})
    assert response.status_code == 429 and "can never be allowed" in response.json()["error"]["message"]


def test_a_completions_batch_is_reserved_for_every_prompt() -> None:
    limits = limiter(tokens="100000/minute")
    app = Starlette(routes=[Route("/v1/completions", lambda request: JSONResponse({}), methods=["POST"])])
    app.add_middleware(RateLimitMiddleware, limiter=limits)
    body = {"model": "m", "prompt": ["abcd"] * 8, "max_tokens": 1000}
    response = TestClient(app).post("/v1/completions", json=body, headers={"X-User-ID": "alice"})
    assert response.headers["x-ratelimit-remaining-tokens"] == str(100000 - 8 - 8000)


@pytest.mark.parametrize("field", [{"n": 10**20}, {"max_tokens": 2**60}])
def test_a_client_asking_for_more_than_any_limit_is_refused_not_let_through(field: dict[str, int]) -> None:
    """An estimate past 2**53 is a request no limit can pass (a 429 not to retry), not a limiter error that
    on_error="allow" would let through."""
    limits = limiter(tokens="1000/minute")
    app = Starlette(
        routes=[Route("/v1/chat/completions", lambda request: JSONResponse({}), methods=["POST"])]
    )
    app.add_middleware(RateLimitMiddleware, limiter=limits)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **field}
    response = TestClient(app).post("/v1/chat/completions", json=body, headers={"X-User-ID": "a"})
    assert response.status_code == 429 and response.headers["x-should-retry"] == "false"


def test_token_options_are_reported_when_no_limit_has_tokens(caplog: pytest.LogCaptureFixture) -> None:
    """An estimator or stream_usage with only request limits is never used: said once, at construction."""
    from ratelimit_middleware.grpc import RateLimitInterceptor

    def app(environ: Any, start_response: Any) -> list[bytes]:
        return []

    async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
        pass

    def estimate(request: Any) -> tuple[int, int]:
        return 1, 1

    def estimate_call(method: str, metadata: Any) -> tuple[int, int]:
        return 1, 1

    with caplog.at_level(logging.WARNING, logger="ratelimit_middleware"):
        RateLimitMiddleware(asgi_app, limiter="10/minute", estimator=estimate, stream_usage=True)
        RateLimitWSGI(app, limiter="10/minute", default_output_tokens=10)
        RateLimitInterceptor("10/minute", estimator=estimate_call)
        tokens = MultiTierRateLimiter(per_user_model=Limits(tokens="100/minute"))
        RateLimitMiddleware(asgi_app, limiter="10/minute", path_limits={"/v1/*": tokens}, estimator=estimate)
        RateLimitWSGI(app, limiter=tokens, stream_usage=True, default_output_tokens=10)
    assert [record.getMessage().split(" ignored")[0] for record in caplog.records] == [
        "estimator=, stream_usage=",
        "default_output_tokens=",
        "estimator=",
    ]
