"""RateLimitMiddleware: real requests through Starlette and FastAPI, and raw ASGI where messages matter."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket
from werkzeug.test import Client

from ratelimit_middleware import MultiTierRateLimiter, RateLimiter, keys
from ratelimit_middleware.asgi import Message, RateLimitMiddleware, ScopeHeaders, request_view
from ratelimit_middleware.contract import HTTPResponse
from ratelimit_middleware.errors import UncheckedDecision
from ratelimit_middleware.keys import from_header
from ratelimit_middleware.request import RequestView
from ratelimit_middleware.wsgi import RateLimitWSGI

from .asgi_helpers import body_of, call, headers_of, http_scope, status_of


async def echo(request: Request) -> Response:
    body = await request.body()
    return JSONResponse({"sha256": hashlib.sha256(body).hexdigest(), "length": len(body)})


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


async def stream(request: Request) -> Response:
    async def events() -> Any:
        for index in range(5):
            yield f"data: {index}\n\n"
            await asyncio.sleep(0)

    return StreamingResponse(events(), media_type="text/event-stream")


async def websocket_echo(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(await websocket.receive_text())
    await websocket.close()


def make_app(**options: Any) -> Starlette:
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", echo, methods=["POST"]),
            Route("/v1/embeddings", echo, methods=["POST"]),
            Route("/hello", hello),
            Route("/health", hello),
            Route("/stream", stream),
            WebSocketRoute("/ws", websocket_echo),
        ]
    )
    app.add_middleware(RateLimitMiddleware, **options)
    return app


def post(client: TestClient, user: str = "alice", path: str = "/v1/chat/completions", **kwargs: Any) -> Any:
    headers = {"X-User-ID": user, **kwargs.pop("headers", {})}
    return client.post(path, json=kwargs.pop("json", {"model": "gpt-4o"}), headers=headers, **kwargs)


def test_allows_then_denies_with_the_429_contract() -> None:
    client = TestClient(make_app(limiter="2/minute"))
    first = post(client)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["RateLimit"] == '"per_user_model";r=1;t=60'
    assert "retry-after" not in first.headers
    assert "x-ratelimit-limit-requests" in first.headers["access-control-expose-headers"]
    assert post(client).status_code == 200
    denied = post(client)
    assert denied.status_code == 429
    assert denied.headers["content-type"] == "application/json"
    assert denied.headers["retry-after"] == "60"
    assert 59_000 < int(denied.headers["retry-after-ms"]) <= 60_000
    assert denied.headers["x-should-retry"] == "true"
    error = denied.json()["error"]
    assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded" and error["param"] is None
    assert "2 requests per 1 minute" in error["message"]


def test_users_and_models_get_separate_buckets() -> None:
    client = TestClient(make_app(limiter="1/minute"))
    assert post(client, "alice").status_code == 200
    assert post(client, "alice").status_code == 429
    assert post(client, "bob").status_code == 200
    assert post(client, "alice", json={"model": "llama"}).status_code == 200
    assert post(client, "alice", json={"model": "gpt-4o"}, headers={"X-Model": "mistral"}).status_code == 200


def test_default_middleware_needs_no_options() -> None:
    client = TestClient(make_app())
    response = post(client)
    assert response.status_code == 200
    assert response.headers["x-ratelimit-limit-requests"] == "100"
    assert response.headers["RateLimit-Policy"] == '"per_user_model";q=100;w=3600'


def test_multitier_limiter_names_the_binding_tier() -> None:
    limiter = MultiTierRateLimiter(per_user_model="5/minute", per_model="2/minute")
    client = TestClient(make_app(limiter=limiter))
    assert post(client, "a").status_code == 200
    assert post(client, "b").status_code == 200
    denied = post(client, "c")
    assert denied.status_code == 429
    assert denied.headers["RateLimit-Policy"] == '"per_model";q=2;w=60'
    assert "per_model" in denied.json()["error"]["message"]


def test_exempt_paths_and_methods() -> None:
    client = TestClient(make_app(limiter="1/minute", exempt_paths=["/health"]))
    for _ in range(3):
        response = client.get("/health", headers={"X-User-ID": "a"})
        assert response.status_code == 200 and "x-ratelimit-limit-requests" not in response.headers
    assert client.options("/hello").status_code != 429  # OPTIONS (CORS preflight) is exempt by default
    assert client.options("/hello").status_code != 429


@pytest.mark.parametrize(
    "variant", ["/v1/chat/completions/", "//v1/chat/completions", "/v1//chat/completions"]
)
def test_another_spelling_of_a_limited_path_is_limited_too(variant: str) -> None:
    app = make_app(limiter="100/minute", path_limits={"POST /v1/chat/completions": "1/minute"})
    sent_first = asyncio.run(call(app, http_scope("/v1/chat/completions", headers=[("X-User-ID", "a")])))
    assert status_of(sent_first) == 200
    sent = asyncio.run(call(app, http_scope(variant, headers=[("X-User-ID", "a")])))
    assert status_of(sent) == 429  # an app may route it alike (a catch-all, Flask without strict slashes)


def test_a_spelling_under_two_rules_gets_both_limits() -> None:
    app = make_app(limiter="1/minute", path_limits={"/public/*": "100/minute"})

    async def anything(request: Request) -> Response:
        return PlainTextResponse(request.url.path)

    app.router.routes.append(Route("/{rest:path}", anything))
    statuses = [
        status_of(asyncio.run(call(app, http_scope("//public/x", "GET", [("X-User-ID", "a")]))))
        for _ in range(2)
    ]
    assert statuses == [200, 429]  # the catch-all serves it: the stricter default applies too


def test_path_limits_replace_the_default_and_none_exempts() -> None:
    app = make_app(limiter="1/minute", path_limits={"/v1/embeddings": "3/minute", "/hello": None})
    client = TestClient(app)
    assert [post(client, path="/v1/embeddings").status_code for _ in range(4)] == [200, 200, 200, 429]
    assert [client.get("/hello", headers={"X-User-ID": "a"}).status_code for _ in range(3)] == [200] * 3
    assert [post(client).status_code for _ in range(2)] == [200, 429]


def test_another_spelling_never_reaches_the_limited_endpoint() -> None:
    """Starlette routes the path as the server decoded it, once: these reach no endpoint, so no limit."""
    app = make_app(limiter="100/minute", path_limits={"/v1/chat/completions": "1/minute"})
    asyncio.run(call(app, http_scope("/v1/chat/completions", headers=[("X-User-ID", "a")])))
    for spelling in ("/v1/%63hat/completions", "/v1/./chat/completions", "/v1/x/../chat/completions"):
        assert status_of(asyncio.run(call(app, http_scope(spelling, headers=[("X-User-ID", "a")])))) == 404


def test_encoded_dot_segments_do_not_reach_an_exemption() -> None:
    """``/v1/models/%252e%252e%252fhealth`` reaches Starlette as below: its ``{model}`` route, not /health."""

    async def model(request: Request) -> Response:
        return PlainTextResponse(request.path_params["model"])

    app = make_app(limiter="1/minute", exempt_paths=["/health"])
    app.router.routes.append(Route("/v1/models/{model}", model))
    statuses = [
        status_of(asyncio.run(call(app, http_scope(path, "GET", [("X-User-ID", "a")]))))
        for path in ("/v1/models/a", "/v1/models/%2e%2e%2fhealth", "/v1/models/..%2f..%2fhealth")
    ]
    assert statuses == [200, 429, 429]


def test_lifespan_and_websocket_pass_through_untouched() -> None:
    with TestClient(make_app(limiter="0/minute")) as client, client.websocket_connect("/ws") as websocket:
        websocket.send_text("ping")
        assert websocket.receive_text() == "ping"


def test_streaming_passes_through_unbuffered() -> None:
    sent = asyncio.run(call(make_app(limiter="5/minute"), http_scope("/stream", "GET", [("X-User-ID", "a")])))
    assert status_of(sent) == 200
    chunks = [
        message["body"] for message in sent if message["type"] == "http.response.body" and message["body"]
    ]
    assert chunks == [f"data: {index}\n\n".encode() for index in range(5)]
    assert headers_of(sent)["x-ratelimit-remaining-requests"] == "4"


@pytest.mark.parametrize(
    ("chunks", "max_body_size"),
    [
        ([b'{"model": "gpt-4o", "messages": []}'], 1024),
        ([b'{"model": ', b'"gpt-4o", ', b'"messages": []}'], 1024),
        ([b"\x00\xff binary, not JSON \xfe"], 1024),
        ([b'{"model": "x"}' + b" " * 5000], 100),
        ([b"a" * 60, b"b" * 60, b"c" * 60], 100),
        ([b""], 1024),
    ],
)
def test_body_reaches_the_app_byte_for_byte(chunks: list[bytes], max_body_size: int) -> None:
    app = make_app(limiter="5/minute", max_body_size=max_body_size)
    sent = asyncio.run(call(app, http_scope(headers=[("X-User-ID", "a")]), chunks))
    assert status_of(sent) == 200
    body = b"".join(chunks)
    assert json.loads(body_of(sent)) == {"sha256": hashlib.sha256(body).hexdigest(), "length": len(body)}


def test_model_from_the_body_only_under_the_cap() -> None:
    limiter = RateLimiter(limit="1/minute")
    app = make_app(limiter=limiter, max_body_size=64)
    small = b'{"model": "gpt-4o"}'
    large = b'{"model": "gpt-4o", "pad": "' + b"x" * 100 + b'"}'
    for body in (small, large):
        assert status_of(asyncio.run(call(app, http_scope(headers=[("X-User-ID", "a")]), [body]))) == 200
    assert limiter.get_request_count("a", "gpt-4o") == 1
    assert limiter.get_request_count("a", "default") == 1  # over the cap: no model from the body


def test_body_is_not_read_when_no_key_needs_it() -> None:
    received: list[Message] = []

    async def run() -> list[Message]:
        sent: list[Message] = []
        incoming = [{"type": "http.request", "body": b"{}", "more_body": False}]

        async def receive() -> Message:
            message = incoming.pop(0) if incoming else {"type": "http.disconnect"}
            received.append(message)
            return message

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                assert received == []  # the middleware read nothing before the app answered...
            sent.append(message)

        async def app_that_ignores_the_body(scope: Any, receive: Any, send: Any) -> None:
            await PlainTextResponse("ok")(scope, receive, send)

        middleware = RateLimitMiddleware(app_that_ignores_the_body, "5/minute")
        scope = http_scope(headers=[("X-User-ID", "a"), ("X-Model", "m")])
        await middleware(scope, receive, send)
        return sent

    assert status_of(asyncio.run(run())) == 200


def test_spoofed_forwarded_for_does_not_change_the_user() -> None:
    client = TestClient(make_app(limiter="1/minute"))
    assert client.get("/hello", headers={"X-Forwarded-For": "1.1.1.1"}).status_code == 200
    assert client.get("/hello", headers={"X-Forwarded-For": "2.2.2.2"}).status_code == 429


def test_api_keys_identify_users_without_x_user_id() -> None:
    client = TestClient(make_app(limiter="1/minute"))
    assert client.get("/hello", headers={"Authorization": "Bearer key-1"}).status_code == 200
    assert client.get("/hello", headers={"Authorization": "Bearer key-1"}).status_code == 429
    assert client.get("/hello", headers={"Authorization": "Bearer key-2"}).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {"X-User-ID": "\x7f\x01 odd", "X-Model": "\x00"},
        {"Authorization": "Bearer"},
        {"Authorization": "", "X-API-Key": "   "},
        {"X-Forwarded-For": ",,,", "Forwarded": "for=;;"},
        {"X-User-ID": "u" * 10_000},
        {"Content-Length": "5"},
    ],
)
def test_malformed_headers_never_cause_a_500(headers: dict[str, str]) -> None:
    app = make_app(limiter="5/minute")
    scope = http_scope(headers=list(headers.items()))
    assert status_of(asyncio.run(call(app, scope, [b"{not json"]))) == 200


def test_a_changing_second_authorization_line_does_not_reset_the_limit() -> None:
    """Starlette authenticates the first line: keyed on all of them joined, each request was a new key."""
    client = TestClient(make_app(limiter="2/minute", user_key=keys.api_key()))
    sent = [
        client.get("/hello", headers=[("Authorization", "Bearer sk-valid"), ("Authorization", f"x{index}")])
        for index in range(3)
    ]
    assert [response.status_code for response in sent] == [200, 200, 429]


def test_huge_identities_are_hashed_not_stored_raw() -> None:
    limiter = RateLimiter(limit="5/minute")
    client = TestClient(make_app(limiter=limiter))
    assert post(client, user="u" * 10_000).status_code == 200
    stored_users = [key[0] for key in limiter._backend._stores[0]]  # type: ignore[attr-defined]
    assert all(len(user) <= 256 for user in stored_users)


def test_huge_identities_with_lone_surrogates_are_limited() -> None:
    """Hashing a long identity once raised on a lone surrogate (JSON can carry one): the key failure let the
    request through."""
    body = b'{"model": "\\ud800' + b"m" * 300 + b'"}'
    client = TestClient(make_app(limiter="2/minute", on_error="allow"))
    sent = [
        client.post("/v1/chat/completions", content=body, headers={"X-User-ID": "u"}).status_code
        for _ in range(3)
    ]
    assert sent == [200, 200, 429]


def test_identities_hash_apart_whatever_their_surrogates() -> None:
    """ "\\udcc3\\udca9" escapes to the UTF-8 bytes of "é": the two must still count apart."""
    client = TestClient(make_app(limiter="1/minute"))
    for model in ("\udcc3\udca9" + "m" * 300, "é" + "m" * 300):
        body = json.dumps({"model": model}).encode()
        assert (
            client.post("/v1/chat/completions", content=body, headers={"X-User-ID": "u"}).status_code == 200
        )


def plain_wsgi(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def failing_key(request: RequestView) -> str:
    raise RuntimeError("key store is down")


def test_failing_key_function_allows_by_default_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    client = TestClient(make_app(limiter="1/minute", user_key=failing_key))
    with caplog.at_level(logging.WARNING, logger="ratelimit_middleware"):
        assert [post(client).status_code for _ in range(3)] == [200, 200, 200]
    assert "key store is down" in caplog.text
    logged = [record for record in caplog.records if "key store is down" in record.getMessage()]
    assert len(logged) == 1  # logged once, not once per request


def failing_after_the_body(request: RequestView) -> str:
    request.json()
    raise RuntimeError("key store is down")


def test_a_key_failing_once_the_body_is_read_is_logged_alone(caplog: pytest.LogCaptureFixture) -> None:
    """The key functions run again once the body is read: a failure then was logged chained to the internal
    ``BodyNotLoaded`` ("During handling of the above exception...")."""
    asgi_client = TestClient(make_app(limiter="1/minute", user_key=failing_after_the_body))
    wsgi_client = Client(RateLimitWSGI(plain_wsgi, user_key=failing_after_the_body))
    with caplog.at_level(logging.WARNING, logger="ratelimit_middleware"):
        assert post(asgi_client).status_code == 200
        assert wsgi_client.post("/", data=b"{}").status_code == 200
    logged = [record for record in caplog.records if "key store is down" in record.getMessage()]
    assert len(logged) == 2
    assert "BodyNotLoaded" not in caplog.text
    assert all(record.exc_info is None or record.exc_info[1].__context__ is None for record in logged)


def test_a_blank_user_key_falls_back_to_the_client_address() -> None:
    """A user key answering "" put every such client in one shared bucket."""
    app = RateLimitWSGI(plain_wsgi, limiter="1/minute", user_key=lambda request: "")
    client = Client(app)
    peers = ("10.0.0.1", "10.0.0.2", "10.0.0.1")
    statuses = [client.get("/", environ_base={"REMOTE_ADDR": peer}).status_code for peer in peers]
    assert statuses == [200, 200, 429]


def test_failing_key_function_denies_with_503_when_asked() -> None:
    client = TestClient(make_app(limiter="1/minute", user_key=failing_key, on_error="deny"))
    response = post(client)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "rate_limiter_unavailable"


class BrokenLimiter:
    def check(self, user: str, model: str, cost: int = 1) -> Any:
        raise ConnectionError("backend unreachable")

    async def acheck(self, user: str, model: str, cost: int = 1) -> Any:
        raise ConnectionError("backend unreachable")


@pytest.mark.parametrize(("on_error", "status"), [("allow", 200), ("deny", 503)])
def test_failing_limiter_follows_the_policy(on_error: str, status: int) -> None:
    client = TestClient(make_app(limiter=BrokenLimiter(), on_error=on_error))
    assert post(client).status_code == status


def test_custom_deny_handler_and_headers_off() -> None:
    def handler(request: RequestView, decision: Any) -> HTTPResponse:
        return HTTPResponse(429, [("Content-Type", "text/plain")], f"slow down {request.path}".encode())

    client = TestClient(make_app(limiter="1/minute", deny_handler=handler, add_headers=False))
    allowed = post(client)
    assert allowed.status_code == 200 and "x-ratelimit-limit-requests" not in allowed.headers
    denied = post(client)
    assert denied.status_code == 429 and denied.text == "slow down /v1/chat/completions"


def test_failing_deny_handler_falls_back_to_the_default_429() -> None:
    def handler(request: RequestView, decision: Any) -> HTTPResponse:
        raise ValueError("bug")

    client = TestClient(make_app(limiter="1/minute", deny_handler=handler))
    post(client)
    denied = post(client)
    assert denied.status_code == 429 and denied.json()["error"]["code"] == "rate_limit_exceeded"


@pytest.mark.parametrize(
    "answer",
    [
        None,
        {"status": 429},
        HTTPResponse(429, [("Bad Name", "x")], b""),
        HTTPResponse(429, [("X-Note", "two\r\nlines")], b""),
        HTTPResponse(429, [("X-Note", "\u20ac")], b""),
        HTTPResponse(429, [("X-Note", " padded")], b""),
        HTTPResponse(429, [("X-Note", "padded\t")], b""),
        HTTPResponse(429, [("Transfer-Encoding", "chunked")], b"x"),
        HTTPResponse(429, [("Connection", "close")], b"x"),
        HTTPResponse(99, [], b""),
        HTTPResponse(101, [], b""),
        HTTPResponse(204, [], b""),
        HTTPResponse(304, [], b"x"),
        HTTPResponse(429, [], "text"),  # type: ignore[arg-type]
    ],
)
def test_a_deny_handler_answer_no_server_can_send_gets_the_default_429(answer: object) -> None:
    client = TestClient(make_app(limiter="1/minute", deny_handler=lambda request, decision: answer))
    post(client)
    denied = post(client)
    assert denied.status_code == 429 and denied.json()["error"]["code"] == "rate_limit_exceeded"


def test_a_deny_handler_reading_a_body_no_key_function_loaded_gets_none() -> None:
    """The body is read for key functions only: a handler's ``request.json()`` is then ``None``."""

    def handler(request: RequestView, decision: Any) -> HTTPResponse:
        return HTTPResponse(429, [], repr(request.json()).encode())

    client = TestClient(make_app(limiter="1/minute", deny_handler=handler))
    for _ in range(2):  # X-Model given: the default model key never reads the body
        denied = post(client, headers={"X-Model": "m"})
    assert denied.status_code == 429 and denied.text == "None"


def test_a_deny_handler_content_length_is_replaced_by_the_true_one() -> None:
    def handler(request: RequestView, decision: Any) -> HTTPResponse:
        return HTTPResponse(429, [("Content-Length", "999"), ("Content-Type", "text/plain")], b"slow")

    client = TestClient(make_app(limiter="1/minute", deny_handler=handler))
    post(client)
    denied = post(client)
    assert denied.status_code == 429 and denied.text == "slow"
    assert denied.headers.get_list("content-length") == ["4"]


def test_custom_key_functions() -> None:
    client = TestClient(
        make_app(limiter="1/minute", user_key=from_header("X-Team"), model_key=from_header("X-M"))
    )
    assert client.get("/hello", headers={"X-Team": "t1", "X-M": "a"}).status_code == 200
    assert client.get("/hello", headers={"X-Team": "t1", "X-M": "a"}).status_code == 429
    assert client.get("/hello", headers={"X-Team": "t1", "X-M": "b"}).status_code == 200


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"limiter": 5}, TypeError),
        ({"limiter": "often"}, ValueError),
        ({"on_error": "ignore"}, ValueError),
        ({"max_body_size": -1}, ValueError),
        ({"user_key": "X-User"}, TypeError),
        ({"path_limits": {"v1": "1/minute"}}, ValueError),
        ({"path_limits": {"/v1": 3}}, TypeError),
    ],
)
def test_bad_options_fail_at_start_up(options: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        RateLimitMiddleware(Starlette(), **options)


# The view reads a scope's headers in place (a dict of the raw bytes when that is exact); it must answer every
# look-up as the decoded, joined mapping does, whatever the case, repeats or bytes of the names.
_raw_names = st.sampled_from(
    [
        b"x-user-id",
        b"X-User-ID",
        b"x-model",
        b"authorization",
        b"x-api-key",
        b"host",
        b"\xc0-name",
        b"\xe0-name",
        b"1-2",
    ]
)
_raw_values = st.binary(max_size=8).filter(lambda value: b"," not in value) | st.sampled_from(
    [b" u1 ", b"", b"\xe9t\xe9"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_raw_names, _raw_values), max_size=6))
def test_scope_headers_answer_as_the_joined_mapping(raw: list[tuple[bytes, bytes]]) -> None:
    decoded = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in raw]
    plain = RequestView("GET", "/", decoded)
    view = request_view({"type": "http", "method": "GET", "path": "/", "headers": raw})
    for name in (
        "x-user-id",
        "X-User-ID",
        "x-model",
        "authorization",
        "x-api-key",
        "host",
        "\xe0-name",
        "1-2",
        "ŧ",
        "x",
    ):
        assert view.header(name) == plain.header(name)
        assert view.headers.get(name.lower()) == plain.headers.get(name.lower())
    assert dict(view.headers) == dict(plain.headers)
    assert ScopeHeaders(iter(raw)).get("x-model") == plain.headers.get("x-model")  # any iterable of pairs


@pytest.mark.parametrize("path", ["/docs/../v1/chat", "/docs/%2e%2e/v1/chat", "/docs/..%2fv1/chat"])
def test_an_exemption_is_not_reached_through_a_catch_all_route(path: str) -> None:
    from fastapi import FastAPI

    app = FastAPI()
    app.add_middleware(RateLimitMiddleware, limiter="1/minute", exempt_paths=["/docs/*"])

    @app.get("/{rest:path}")
    async def proxy(rest: str) -> dict[str, str]:  # a gateway that forwards (and may resolve) any path
        return {"proxied": rest}

    statuses = [
        status_of(asyncio.run(call(app, http_scope(path, "GET", [("X-User-ID", "a")])))) for _ in range(2)
    ]
    assert statuses == [200, 429]
    exempt = [status_of(asyncio.run(call(app, http_scope("/docs/index", "GET")))) for _ in range(3)]
    assert exempt == [200, 200, 200]


def test_rules_match_the_path_the_app_routes_under_a_root_path_or_a_mount() -> None:
    from starlette.routing import Mount

    inner = make_app(limiter="100/minute", path_limits={"/hello": "1/minute"}, exempt_paths=["/health"])
    outer = Starlette(routes=[Mount("/api", app=inner)])
    for app, scope_root in ((outer, ""), (inner, "/api")):
        statuses = []
        for _ in range(2):
            scope = http_scope("/api/hello", "GET", [("X-User-ID", f"a{scope_root}")])
            scope["root_path"] = scope_root  # uvicorn --root-path /api: the path includes it
            statuses.append(status_of(asyncio.run(call(app, scope))))
        assert statuses == [200, 429], scope_root
        health = http_scope("/api/health", "GET")
        health["root_path"] = scope_root
        sent = asyncio.run(call(app, health))
        assert status_of(sent) == 200 and "x-ratelimit-limit-requests" not in headers_of(sent)


def test_no_user_key_and_no_client_address_is_one_bucket_said_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = make_app(limiter="1/minute")
    with caplog.at_level(logging.WARNING, logger="ratelimit_middleware"):
        statuses = [
            status_of(asyncio.run(call(app, http_scope("/hello", "GET", client=None)))) for _ in range(3)
        ]
    assert statuses == [200, 429, 429]
    warnings = [record for record in caplog.records if "anonymous" in record.getMessage()]
    assert len(warnings) == 1 and "client_ip(trusted_proxies" in warnings[0].getMessage()


def test_a_scope_used_again_gets_its_headers_again() -> None:
    app = make_app(limiter="10/minute")
    scope = http_scope("/hello", "GET", [("X-User-ID", "a")])
    remaining = [
        headers_of(asyncio.run(call(app, scope)))["x-ratelimit-remaining-requests"] for _ in range(2)
    ]
    copied = headers_of(asyncio.run(call(app, dict(scope))))["x-ratelimit-remaining-requests"]
    assert [*remaining, copied] == ["9", "8", "7"]


async def ok(scope: Any, receive: Any, send: Any) -> None:
    """A raw ASGI app that answers 200 "ok"."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


class FailsOpen(RateLimiter):
    """A limiter whose every decision is made as if its storage were down, failing open."""

    def check(self, user: str, model: str, cost: int = 1) -> Any:
        return UncheckedDecision.of(super().check(user, model, cost))

    async def acheck(self, user: str, model: str, cost: int = 1) -> Any:
        return self.check(user, model, cost)


def test_both_spellings_apply_with_a_token_limited_default() -> None:
    from ratelimit_middleware import Limits

    default = MultiTierRateLimiter(per_user_model=Limits("100/minute", tokens="10000000/minute"))
    app = RateLimitMiddleware(ok, limiter=default, path_limits={"/v1/chat": "2/minute"})
    sent = [asyncio.run(call(app, http_scope("/v1/chat/", "GET", [("X-User-ID", "a")]))) for _ in range(3)]
    assert [status_of(one) for one in sent] == [200, 200, 429]
    allowed = headers_of(sent[1])
    assert allowed["x-ratelimit-limit-requests"] == "2" and allowed["x-ratelimit-limit-tokens"] == "10000000"


def test_both_spellings_keep_a_fail_open_decision_unmarked_by_headers() -> None:
    app = make_app(limiter=FailsOpen(limit="100/minute"), path_limits={"/hello": "2/minute"})
    sent = asyncio.run(call(app, http_scope("/hello/", "GET", [("X-User-ID", "a")])))
    assert status_of(sent) in (200, 307) and "x-ratelimit-limit-requests" not in headers_of(sent)


def test_both_spellings_apply_when_both_limiters_reserve() -> None:
    from ratelimit_middleware import Limits

    default = MultiTierRateLimiter(per_user_model=Limits("100/minute", tokens="10000000/minute"))
    strict = MultiTierRateLimiter(per_user_model=Limits("100/minute", tokens="5000/minute", max_concurrent=1))
    app = RateLimitMiddleware(
        ok, limiter=default, path_limits={"/v1/chat": strict}, default_output_tokens=2000
    )
    sent = [  # a body without an output cap: the default output is expected
        asyncio.run(call(app, http_scope("/v1/chat/", "POST", [("X-User-ID", "a")]), [b"{}"]))
        for _ in range(3)
    ]
    # Each response settles both reservations (2,000 tokens each, its slot given back): the strict rule's
    # 5,000 tokens admit two, and the third is denied by its tokens, not by a slot left taken.
    assert [status_of(one) for one in sent] == [200, 200, 429]
    assert json.loads(body_of(sent[2]))["error"]["type"] == "tokens"
    assert headers_of(sent[1])["x-ratelimit-limit-tokens"] == "5000"
    assert strict.get_request_count("a", "default") == 2  # a denied reservation charges nothing
    # The strict rule's denial cancelled the default's reservation: the request counts, its tokens went back.
    assert default.get_request_count("a", "default") == 3
    assert default.reserve("a", "default", output_tokens=0).decisions["tokens"].remaining == 10_000_000 - 4000


def test_a_fail_open_check_never_admits_a_request_the_reservation_denies() -> None:
    from ratelimit_middleware import Limits

    metered = MultiTierRateLimiter(per_user_model=Limits("100/minute", tokens="100/minute"))
    app = RateLimitMiddleware(ok, limiter=metered, path_limits={"/v1/chat": FailsOpen(limit="100/minute")})
    sent = asyncio.run(call(app, http_scope("/v1/chat/", "POST", [("X-User-ID", "a")]), [b"{}"]))
    assert status_of(sent) == 429  # 1,024 tokens expected, 100 allowed


def test_an_estimate_that_is_not_two_token_counts_follows_on_error(caplog: pytest.LogCaptureFixture) -> None:
    from ratelimit_middleware import Limits

    limiter = MultiTierRateLimiter(per_user_model=Limits("100/minute", tokens="1000/minute"))
    app = RateLimitMiddleware(ok, limiter=limiter, estimator=lambda request: (12.5, 10), on_error="deny")
    sent = asyncio.run(call(app, http_scope("/v1/chat", "POST", [("X-User-ID", "a")])))
    assert status_of(sent) == 503
    assert "the token estimate failed" in caplog.text and "got (12.5, 10)" in caplog.text
