"""Per-route limits in FastAPI and Starlette: the decorator (no request parameter needed in FastAPI) and the
dependency."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from fastapi import APIRouter, Depends, FastAPI, Response, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.endpoints import HTTPEndpoint
from starlette.requests import Request
from starlette.routing import Route
from starlette.testclient import TestClient

from ratelimit_middleware import RateLimiter
from ratelimit_middleware.asgi import ASGIApp, Message
from ratelimit_middleware.contract import HTTPResponse
from ratelimit_middleware.decision import Decision
from ratelimit_middleware.fastapi import RateLimit, RateLimitExceeded, limit, rate_limit_exceeded_handler
from ratelimit_middleware.keys import from_json_body
from ratelimit_middleware.observe import Event, EventHook
from ratelimit_middleware.request import RequestView

from .asgi_helpers import body_of, http_scope, status_of


class Completion(BaseModel):
    model: str
    prompt: str = ""


def make_app() -> FastAPI:
    app = FastAPI()

    @app.get("/async")
    @limit("2/minute")
    async def limited_async(q: int = 0) -> dict[str, int]:
        return {"q": q}

    @app.get("/sync")
    @limit("1/minute")
    def limited_sync() -> dict[str, str]:
        return {"ok": "sync"}

    @app.get("/response")
    @limit("5/minute")
    async def own_response() -> PlainTextResponse:
        return PlainTextResponse("mine")

    @app.post("/completions")
    @limit("1/minute", model_key=from_json_body("model"))
    async def completions(body: Completion) -> dict[str, str]:
        return {"model": body.model, "prompt": body.prompt}

    @app.get("/dependency", dependencies=[Depends(RateLimit("1/minute"))])
    async def with_dependency() -> dict[str, bool]:
        return {"ok": True}

    return app


def router_with_handler(prefix: str) -> APIRouter:
    """Two modules defining an endpoint with the same function name."""
    router = APIRouter(prefix=prefix)

    @router.get("/x")
    @limit("1/minute")
    async def handler() -> dict[str, str]:
        return {"from": prefix}

    return router


def get(client: TestClient, path: str, user: str = "alice") -> Any:
    return client.get(path, headers={"X-User-ID": user})


def test_decorated_async_endpoint_without_request_parameter() -> None:
    client = TestClient(make_app())
    first = client.get("/async?q=7", headers={"X-User-ID": "a"})
    assert first.status_code == 200 and first.json() == {"q": 7}
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["RateLimit-Policy"] == '"per_user_model";q=2;w=60'
    assert get(client, "/async", "a").status_code == 200
    denied = get(client, "/async", "a")
    assert denied.status_code == 429
    assert denied.json()["error"]["code"] == "rate_limit_exceeded"
    assert denied.headers["retry-after"] == "60"
    assert get(client, "/async", "b").status_code == 200


def test_decorated_sync_endpoint_and_own_response() -> None:
    client = TestClient(make_app())
    assert get(client, "/sync").json() == {"ok": "sync"}
    assert get(client, "/sync").status_code == 429
    response = get(client, "/response")
    assert response.text == "mine" and response.headers["x-ratelimit-remaining-requests"] == "4"


def test_decorator_keeps_the_openapi_schema_clean() -> None:
    schema = make_app().openapi()
    parameters = schema["paths"]["/async"]["get"].get("parameters", [])
    assert [parameter["name"] for parameter in parameters] == ["q"]


def test_decorated_endpoint_keeps_its_own_request_and_response_parameters() -> None:
    app = FastAPI()

    @app.get("/own")
    @limit("2/minute")
    async def own(request: Request, response: Response) -> dict[str, str]:
        response.headers["X-Mine"] = "yes"
        return {"path": request.url.path}

    client = TestClient(app)
    first = get(client, "/own")
    assert first.json() == {"path": "/own"} and first.headers["x-mine"] == "yes"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert "parameters" not in app.openapi()["paths"]["/own"]["get"]


def test_body_keys_in_a_decorator_leave_the_body_for_the_endpoint() -> None:
    client = TestClient(make_app())
    first = client.post("/completions", json={"model": "m1", "prompt": "hi"}, headers={"X-User-ID": "a"})
    assert first.json() == {"model": "m1", "prompt": "hi"}
    assert client.post("/completions", json={"model": "m1"}, headers={"X-User-ID": "a"}).status_code == 429
    assert client.post("/completions", json={"model": "m2"}, headers={"X-User-ID": "a"}).status_code == 200


def test_same_function_names_in_different_modules_never_share() -> None:
    app = FastAPI()
    app.include_router(router_with_handler("/one"))
    app.include_router(router_with_handler("/two"))
    client = TestClient(app)
    assert get(client, "/one/x").json() == {"from": "/one"}
    assert get(client, "/two/x").json() == {"from": "/two"}
    assert get(client, "/one/x").status_code == 429
    assert get(client, "/two/x").status_code == 429


def test_shared_limiter_object_is_shared_on_purpose() -> None:
    shared = RateLimiter(limit="1/minute")
    app = FastAPI()

    @app.get("/a")
    @limit(shared)
    async def a() -> str:
        return "a"

    @app.get("/b")
    @limit(shared)
    async def b() -> str:
        return "b"

    client = TestClient(app)
    assert get(client, "/a").status_code == 200
    assert get(client, "/b").status_code == 429


def test_dependency_form_raises_an_http_exception_with_headers() -> None:
    client = TestClient(make_app())
    allowed = get(client, "/dependency")
    assert allowed.status_code == 200 and allowed.headers["x-ratelimit-remaining-requests"] == "0"
    denied = get(client, "/dependency")
    assert denied.status_code == 429
    assert denied.headers["retry-after"] == "60"
    assert "1 requests per 1 minute" in denied.json()["detail"]


def test_dependency_with_the_handler_answers_in_openai_shape() -> None:
    app = make_app()
    app.add_exception_handler(RateLimitExceeded, rate_limit_exceeded_handler)
    client = TestClient(app)
    get(client, "/dependency")
    denied = get(client, "/dependency")
    assert denied.status_code == 429
    assert denied.json()["error"]["type"] == "requests"
    assert denied.headers["x-should-retry"] == "true"


def test_decorator_on_starlette_endpoints() -> None:
    @limit("2/minute")
    async def function(request: Request) -> JSONResponse:
        return JSONResponse({"path": request.url.path})

    @limit("1/minute")
    def sync_function(request: Request) -> PlainTextResponse:
        return PlainTextResponse("sync")

    class Endpoint(HTTPEndpoint):
        @limit("1/minute")
        async def get(self, request: Request) -> PlainTextResponse:
            return PlainTextResponse("method")

    routes = [Route("/function", function), Route("/sync", sync_function), Route("/method", Endpoint)]
    client = TestClient(Starlette(routes=routes))
    first = get(client, "/function")
    assert first.json() == {"path": "/function"} and first.headers["x-ratelimit-remaining-requests"] == "1"
    assert get(client, "/function").status_code == 200
    denied = get(client, "/function")
    assert denied.status_code == 429 and denied.json()["error"]["code"] == "rate_limit_exceeded"
    assert denied.headers["retry-after"] == "60"
    assert get(client, "/function", "b").status_code == 200
    for path, text in (("/sync", "sync"), ("/method", "method")):
        assert get(client, path).text == text
        assert get(client, path).status_code == 429


def test_decorator_called_without_a_request_says_what_it_needs() -> None:
    @limit("1/minute")
    async def endpoint() -> None:
        return None

    with pytest.raises(TypeError, match="Starlette endpoints called with their Request"):
        asyncio.run(endpoint())


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b'{"error": {"message": "wait a minute", "type": "requests"}}', "wait a minute"),
        (b"slow down", "slow down"),
        (b"[]", "[]"),
        (b'{"error": "busy"}', '{"error": "busy"}'),
        (b"", "Too Many Requests"),
    ],
)
def test_rate_limit_exceeded_detail_from_any_body(body: bytes, detail: str) -> None:
    assert RateLimitExceeded(HTTPResponse(429, [], body)).detail == detail


@pytest.mark.parametrize(
    ("content_type", "body"), [("text/plain", b"slow down"), ("application/json", b"[]")]
)
def test_dependency_sends_the_deny_handlers_response_whatever_its_body(
    content_type: str, body: bytes
) -> None:
    def deny(request: RequestView, decision: Decision) -> HTTPResponse:
        return HTTPResponse(429, [("Content-Type", content_type), ("X-Denied-By", "handler")], body)

    app = FastAPI()
    app.add_exception_handler(RateLimitExceeded, rate_limit_exceeded_handler)

    @app.get("/x", dependencies=[Depends(RateLimit("1/minute", deny_handler=deny))])
    async def x() -> dict[str, bool]:
        return {"ok": True}

    client = TestClient(app)
    assert get(client, "/x").status_code == 200
    denied = get(client, "/x")
    assert denied.status_code == 429 and denied.content == body
    assert denied.headers["content-type"] == content_type and denied.headers["x-denied-by"] == "handler"


def test_shadow_mode_lets_denied_requests_through_with_the_headers() -> None:
    events: list[Event] = []
    options: dict[str, Any] = {"shadow": True, "observers": [EventHook(events.append)]}
    app = FastAPI()

    @app.get("/decorator")
    @limit("1/minute", **options)
    async def decorated() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/dependency", dependencies=[Depends(RateLimit("1/minute", **options))])
    async def dependency() -> dict[str, bool]:
        return {"ok": True}

    client = TestClient(app)
    for path in ("/decorator", "/dependency"):
        responses = [get(client, path) for _ in range(3)]
        assert [response.json() for response in responses] == [{"ok": True}] * 3
        assert [response.headers["x-ratelimit-remaining-requests"] for response in responses] == ["0"] * 3
    assert [event.kind for event in events] == ["shadow_denied"] * 4


def test_decorator_adds_headers_to_any_response_the_dependency_to_built_ones_only() -> None:
    """FastAPI drops the headers a dependency sets when the endpoint returns its own Response: the
    ``RateLimit`` docstring and INTEGRATION.md say so, and point to ``@limit``."""

    async def events() -> AsyncIterator[str]:
        yield "data: 1\n\n"

    def own_json() -> JSONResponse:
        return JSONResponse({"ok": True})

    def own_stream() -> StreamingResponse:
        return StreamingResponse(events(), media_type="text/event-stream")

    app = FastAPI()
    for name, make in (("json", own_json), ("stream", own_stream)):
        app.get(f"/decorator/{name}")(limit("5/minute")(make))
        app.get(f"/dependency/{name}", dependencies=[Depends(RateLimit("5/minute"))])(make)

    @app.get("/dependency/data", dependencies=[Depends(RateLimit("5/minute"))])
    async def data() -> dict[str, bool]:
        return {"ok": True}

    client = TestClient(app)
    paths = [
        "/decorator/json",
        "/decorator/stream",
        "/dependency/data",
        "/dependency/json",
        "/dependency/stream",
    ]
    remaining = {path: get(client, path).headers.get("x-ratelimit-remaining-requests") for path in paths}
    assert remaining == {
        "/decorator/json": "4",
        "/decorator/stream": "4",
        "/dependency/data": "4",
        "/dependency/json": None,
        "/dependency/stream": None,
    }


def test_a_body_another_reader_consumed_gives_the_key_functions_nothing() -> None:
    async def drain(request: Request) -> None:
        async for _ in request.stream():
            pass

    limited = RateLimit("1/minute", model_key=from_json_body("model"))
    app = FastAPI()

    @app.post("/x", dependencies=[Depends(drain), Depends(limited)])
    async def x() -> dict[str, bool]:
        return {"ok": True}

    client = TestClient(app)
    assert client.post("/x", json={"model": "m1"}, headers={"X-User-ID": "a"}).status_code == 200
    assert client.post("/x", json={"model": "m2"}, headers={"X-User-ID": "a"}).status_code == 429


# Chunked uploads (no Content-Length): every form reads at most max_body_size + 1 bytes of them, in whole
# messages, and the endpoint still reads the body byte for byte. Each app logs "endpoint" to ``events`` when
# the endpoint starts, and ``post_chunked`` logs "chunk" for each message read.

UPLOAD_OPTIONS: dict[str, Any] = {"model_key": from_json_body("model"), "max_body_size": 1024}


async def digest(request: Request, events: list[str]) -> dict[str, str]:
    events.append("endpoint")
    return {"sha256": hashlib.sha256(await request.body()).hexdigest()}


def fastapi_decorator(events: list[str]) -> ASGIApp:
    app = FastAPI()

    @app.post("/upload")
    @limit("1/minute", **UPLOAD_OPTIONS)
    async def upload(request: Request) -> dict[str, str]:
        return await digest(request, events)

    return app


def fastapi_dependency(events: list[str]) -> ASGIApp:
    app = FastAPI()

    @app.post("/upload", dependencies=[Depends(RateLimit("1/minute", **UPLOAD_OPTIONS))])
    async def upload(request: Request) -> dict[str, str]:
        return await digest(request, events)

    return app


def starlette_decorator(events: list[str]) -> ASGIApp:
    @limit("1/minute", **UPLOAD_OPTIONS)
    async def upload(request: Request) -> JSONResponse:
        return JSONResponse(await digest(request, events))

    return Starlette(routes=[Route("/upload", upload, methods=["POST"])])


UPLOAD_APPS = pytest.mark.parametrize(
    "make_app", [fastapi_decorator, fastapi_dependency, starlette_decorator]
)


def post_chunked(app: ASGIApp, body: bytes, events: list[str], chunk_size: int) -> list[Message]:
    """POST ``body`` with no Content-Length, in messages of ``chunk_size`` bytes."""
    chunks = deque(body[start : start + chunk_size] for start in range(0, len(body), chunk_size))
    sent: list[Message] = []

    async def receive() -> Message:
        if not chunks:
            return {"type": "http.disconnect"}
        events.append("chunk")
        chunk = chunks.popleft()
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = http_scope("/upload", headers=[("X-User-ID", "a"), ("Transfer-Encoding", "chunked")])
    asyncio.run(app(scope, receive, send))
    return sent


@UPLOAD_APPS
def test_chunked_body_over_the_cap_is_read_no_further_and_reaches_the_endpoint_whole(
    make_app: Callable[[list[str]], ASGIApp],
) -> None:
    events: list[str] = []
    body = bytes(range(256)) * 4096  # 1 MiB in 16 messages of 64 KiB
    sent = post_chunked(make_app(events), body, events, 65536)
    assert status_of(sent) == 200
    assert events[:2] == ["chunk", "endpoint"]  # one message was enough to pass the 1 KiB cap
    assert events.count("chunk") == 16
    assert json.loads(body_of(sent)) == {"sha256": hashlib.sha256(body).hexdigest()}


@UPLOAD_APPS
def test_chunked_body_under_the_cap_reaches_the_key_function_and_the_endpoint(
    make_app: Callable[[list[str]], ASGIApp],
) -> None:
    events: list[str] = []
    app = make_app(events)

    def upload(model: str) -> int:
        body = json.dumps({"model": model, "prompt": "hello"}).encode()
        sent = post_chunked(app, body, events, 7)
        if status_of(sent) == 200:
            assert json.loads(body_of(sent)) == {"sha256": hashlib.sha256(body).hexdigest()}
        return status_of(sent)

    assert [upload("m1"), upload("m1"), upload("m2")] == [200, 429, 200]  # the key function saw the model


RATE_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "ratelimit-policy",
    "ratelimit",
)


@pytest.mark.parametrize(
    ("middleware", "route", "limit_shown"), [("100/minute", "3/minute", "3"), ("2/minute", "100/minute", "2")]
)
def test_a_route_under_the_middleware_sends_one_set_of_headers_for_the_binding_limit(
    middleware: str, route: str, limit_shown: str
) -> None:
    from ratelimit_middleware.asgi import RateLimitMiddleware

    app = FastAPI()
    app.add_middleware(RateLimitMiddleware, limiter=middleware)

    @app.get("/json")
    @limit(route)
    async def as_json() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/own")
    @limit(route)
    async def own() -> PlainTextResponse:
        return PlainTextResponse("ok")

    client = TestClient(app)
    for path in ("/json", "/own"):
        response = client.get(path, headers={"X-User-ID": path})
        assert response.status_code == 200
        for name in RATE_HEADERS:
            assert len(response.headers.get_list(name)) == 1, (path, name, response.headers)
        assert response.headers["x-ratelimit-limit-requests"] == limit_shown


def test_a_route_denial_under_the_middleware_carries_the_route_headers_only() -> None:
    from ratelimit_middleware.asgi import RateLimitMiddleware

    app = FastAPI()
    app.add_middleware(RateLimitMiddleware, limiter="100/minute")

    @app.get("/tight")
    @limit("1/minute")
    async def tight() -> dict[str, bool]:
        return {"ok": True}

    client = TestClient(app)
    assert client.get("/tight", headers={"X-User-ID": "a"}).status_code == 200
    denied = client.get("/tight", headers={"X-User-ID": "a"})
    assert denied.status_code == 429
    assert denied.headers.get_list("x-ratelimit-limit-requests") == ["1"]
    assert denied.headers.get_list("x-ratelimit-remaining-requests") == ["0"]


def test_a_deny_handler_repeated_headers_are_all_sent() -> None:
    def deny(request: RequestView, decision: Decision) -> HTTPResponse:
        return HTTPResponse(429, [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")], b"no")

    app = FastAPI()

    @app.get("/x")
    @limit("1/minute", deny_handler=deny)
    async def x() -> dict[str, bool]:
        return {"ok": True}

    client = TestClient(app)
    client.get("/x")
    denied = client.get("/x")
    assert denied.status_code == 429 and denied.headers.get_list("set-cookie") == ["a=1", "b=2"]


def one_set(response: Any) -> str:
    """The one value of each rate limit header; returns the limit they name."""
    for name in RATE_HEADERS:
        assert len(response.headers.get_list(name)) == 1, (name, response.headers)
    return str(response.headers["x-ratelimit-limit-requests"])


def layered_app(middleware: Any = "100/minute") -> FastAPI:
    from fastapi import HTTPException

    from ratelimit_middleware import Limits, MultiTierRateLimiter
    from ratelimit_middleware.asgi import RateLimitMiddleware

    app = FastAPI()
    if middleware == "tokens":
        middleware = MultiTierRateLimiter(per_user_model=Limits("100/minute", tokens="100000/minute"))
    app.add_middleware(RateLimitMiddleware, limiter=middleware)

    @app.get("/dependency", dependencies=[Depends(RateLimit("2/minute"))])
    async def dependency() -> JSONResponse:
        return JSONResponse({"ok": True})

    @app.get("/raises")
    @limit("2/minute")
    async def raises() -> dict[str, bool]:
        raise HTTPException(400, "bad")

    @app.get("/quiet")
    @limit("1/minute", add_headers=False)
    async def quiet() -> dict[str, bool]:
        return {"ok": True}

    return app


@pytest.mark.parametrize("path", ["/dependency", "/raises"])
def test_the_middleware_writes_the_binding_headers_on_any_response_of_a_limited_route(path: str) -> None:
    client = TestClient(layered_app())
    response = client.get(path, headers={"X-User-ID": "a"})
    assert response.status_code in (200, 400) and one_set(response) == "2"


def test_token_headers_survive_a_route_limit_inside_a_token_middleware() -> None:
    client = TestClient(layered_app("tokens"))
    response = client.get("/dependency", headers={"X-User-ID": "a"})
    assert one_set(response) == "2" and response.headers.get_list("x-ratelimit-limit-tokens") == ["100000"]


def test_a_route_without_headers_that_denies_sends_its_429_alone() -> None:
    client = TestClient(layered_app())
    assert one_set(client.get("/quiet", headers={"X-User-ID": "a"})) == "100"  # the middleware's
    assert one_set(denied := client.get("/quiet", headers={"X-User-ID": "a"})) == "1"
    assert denied.status_code == 429


def test_stacked_decorators_send_one_set_for_the_binding_limit() -> None:
    app = FastAPI()

    @app.get("/stacked")
    @limit("5/minute")
    @limit("2/minute")
    async def stacked() -> dict[str, bool]:
        return {"ok": True}

    client = TestClient(app)
    responses = [client.get("/stacked") for _ in range(3)]
    assert [response.status_code for response in responses] == [200, 200, 429]
    assert [one_set(response) for response in responses] == ["2", "2", "2"]


def test_limit_awaits_a_callable_object_with_an_async_call() -> None:
    class Endpoint:
        async def __call__(self, q: str) -> dict[str, str]:
            return {"q": q}

    app = FastAPI()
    app.add_api_route("/object", limit("5/minute")(Endpoint()), methods=["GET"])
    response = TestClient(app).get("/object", params={"q": "hi"})
    assert response.status_code == 200 and response.json() == {"q": "hi"}


def test_stacked_middlewares_and_dependencies_send_one_set_for_the_binding_limit() -> None:
    from starlette.routing import Mount

    from ratelimit_middleware.asgi import RateLimitMiddleware

    inner = Starlette(routes=[Route("/x", lambda request: PlainTextResponse("ok"))])
    inner.add_middleware(RateLimitMiddleware, limiter="2/minute")
    outer = Starlette(routes=[Mount("/api", app=inner)])
    outer.add_middleware(RateLimitMiddleware, limiter="100/minute")
    mounted = [TestClient(outer).get("/api/x", headers={"X-User-ID": "a"}) for _ in range(3)]

    router = APIRouter(dependencies=[Depends(RateLimit("100/minute"))])

    @router.get("/two", dependencies=[Depends(RateLimit("2/minute"))])
    async def two() -> dict[str, bool]:
        return {"ok": True}

    @router.get("/decorated")
    @limit("2/minute")
    async def decorated() -> dict[str, bool]:
        return {"ok": True}

    app = FastAPI()
    app.include_router(router)
    client = TestClient(app)
    for responses in (
        mounted,
        [client.get("/two") for _ in range(3)],
        [client.get("/decorated") for _ in range(3)],
    ):
        assert [response.status_code for response in responses] == [200, 200, 429]
        assert [one_set(response) for response in responses] == ["2", "2", "2"]
        assert [response.headers["x-ratelimit-remaining-requests"] for response in responses] == [
            "1",
            "0",
            "0",
        ]


def test_limit_under_a_dependency_writes_the_set_on_the_response_it_returns() -> None:
    router = APIRouter(dependencies=[Depends(RateLimit("100/minute"))])

    @router.get("/own")
    @limit("5/minute")
    async def own() -> JSONResponse:
        return JSONResponse({"ok": True})

    @router.get("/events")
    @limit("5/minute")
    async def events() -> StreamingResponse:
        async def stream() -> AsyncIterator[str]:
            yield "data: 1\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    app = FastAPI()
    app.include_router(router)
    client = TestClient(app)
    for path in ("/own", "/events"):
        response = client.get(path)
        assert response.status_code == 200 and one_set(response) == "5", path


def test_a_dependency_rewrites_only_its_own_header_lines() -> None:
    def expose_request_id(response: Response) -> None:
        response.headers.append("Access-Control-Expose-Headers", "X-Request-Id")

    router = APIRouter(dependencies=[Depends(RateLimit("100/minute")), Depends(expose_request_id)])

    @router.get("/inner", dependencies=[Depends(RateLimit("5/minute"))])
    async def inner() -> dict[str, bool]:
        return {"ok": True}

    app = FastAPI()
    app.include_router(router)
    response = TestClient(app).get("/inner")
    assert one_set(response) == "5"
    assert "X-Request-Id" in response.headers.get_list("access-control-expose-headers")


def test_an_app_level_dependency_passes_websockets_untouched() -> None:
    app = FastAPI(dependencies=[Depends(RateLimit("1/minute"))])

    @app.websocket("/ws")
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    client = TestClient(app)
    for _ in range(2):
        with client.websocket_connect("/ws") as websocket:
            websocket.send_text("hi")
            assert websocket.receive_text() == "hi"


def test_an_inner_503_carries_no_headers_of_the_middleware() -> None:
    from ratelimit_middleware.asgi import RateLimitMiddleware

    class Broken(RateLimiter):
        async def acheck(self, user: str, model: str, cost: int = 1) -> Decision:
            raise RuntimeError("storage down")

        def check(self, user: str, model: str, cost: int = 1) -> Decision:
            raise RuntimeError("storage down")

    app = FastAPI()
    app.add_middleware(RateLimitMiddleware, limiter="100/minute")

    @app.get("/x")
    @limit(Broken(limit="5/minute"), on_error="deny")
    async def x() -> dict[str, bool]:
        return {"ok": True}

    response = TestClient(app).get("/x", headers={"X-User-ID": "a"})
    assert response.status_code == 503 and "x-ratelimit-limit-requests" not in response.headers


def test_limit_refuses_a_websocket_endpoint_when_decorating() -> None:
    """It was accepted, then every connection failed with a TypeError."""

    async def talk(websocket: WebSocket) -> None:
        await websocket.accept()

    with pytest.raises(TypeError, match="not websocket endpoints"):
        limit("1/minute")(talk)


def test_an_unannotated_starlette_websocket_endpoint_is_refused_by_name() -> None:
    from starlette.routing import WebSocketRoute

    @limit("1/minute")
    async def talk(websocket):  # type: ignore[no-untyped-def]  # as Starlette endpoints are written
        await websocket.accept()

    client = TestClient(Starlette(routes=[WebSocketRoute("/ws", talk)]))
    with pytest.raises(TypeError, match="not websocket endpoints"), client.websocket_connect("/ws"):
        pass


def test_limit_refuses_generator_endpoints_which_fastapi_streams_itself() -> None:
    async def events() -> AsyncIterator[str]:
        yield "data: 1\n\n"

    def lines() -> Any:
        yield "x"

    for endpoint in (events, lines):
        with pytest.raises(TypeError, match="Depends\\(RateLimit"):
            limit("5/minute")(endpoint)


def test_limit_sees_through_wrappers_as_fastapi_does() -> None:
    def plain(function: Any) -> Any:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return function(*args, **kwargs)

        return wrapper

    class Streams:
        def __call__(self) -> Any:
            yield "x"

    for generator in (plain(lambda: (yield "x")), Streams()):
        with pytest.raises(TypeError, match="generator endpoint"):
            limit("5/minute")(generator)

    @plain
    async def wrapped_coroutine() -> dict[str, bool]:
        return {"ok": True}

    def sync_endpoint() -> dict[str, bool]:
        return {"ok": True}

    @functools.wraps(sync_endpoint)
    async def async_wrapper() -> dict[str, bool]:  # an async decorator around a sync function
        return sync_endpoint()

    app = FastAPI()
    app.add_api_route("/wrapped", limit("1/minute")(wrapped_coroutine), methods=["GET"])
    app.add_api_route("/async-wrapper", limit("1/minute")(async_wrapper), methods=["GET"])
    client = TestClient(app)
    for path in ("/wrapped", "/async-wrapper"):
        assert [client.get(path).status_code for _ in range(2)] == [200, 429], path


def test_a_raising_endpoint_gets_the_headers_of_its_own_limits() -> None:
    from fastapi import HTTPException

    app = FastAPI()

    not_found = HTTPException(
        status_code=404,
        detail="no such model",
        headers={"X-Reason": "model", "Access-Control-Expose-Headers": "X-Reason"},
    )  # one object raised for every request, built by keyword as FastAPI's docs do

    @app.get("/raises")
    @limit("5/minute")
    @limit("2/minute")
    async def raises() -> dict[str, bool]:
        raise not_found

    @app.get("/open")
    async def unlimited() -> dict[str, bool]:
        raise not_found

    client = TestClient(app)
    response = client.get("/raises", headers={"X-User-ID": "a"})
    assert response.status_code == 404 and one_set(response) == "2"
    assert response.headers["x-reason"] == "model"  # the endpoint's own headers stay
    exposed = response.headers["access-control-expose-headers"]
    assert exposed.startswith("X-Reason, ") and "x-ratelimit-limit-requests" in exposed.lower()
    assert "x-ratelimit-limit-requests" not in client.get("/open").headers  # the shared object is untouched
    assert not_found.headers == {"X-Reason": "model", "Access-Control-Expose-Headers": "X-Reason"}


def test_a_raised_exception_subclass_keeps_its_type_and_fields() -> None:
    from fastapi import HTTPException

    class ModelGone(HTTPException):
        def __init__(self, *, model: str) -> None:
            super().__init__(status_code=410, detail=f"{model} is gone")
            self.model = model

    app = FastAPI()

    @app.exception_handler(ModelGone)
    async def gone(request: Any, error: ModelGone) -> JSONResponse:
        return JSONResponse({"gone": error.model}, status_code=410, headers=error.headers)

    @app.get("/old")
    @limit("5/minute")
    async def old() -> dict[str, bool]:
        raise ModelGone(model="gpt-3")

    response = TestClient(app).get("/old", headers={"X-User-ID": "a"})
    assert response.status_code == 410 and response.json() == {"gone": "gpt-3"}
    assert response.headers["x-ratelimit-limit-requests"] == "5"


def test_raised_exceptions_of_odd_kinds_keep_their_fields() -> None:
    """Subclasses with a builtin base of their own, or with slots: copied whole (they were 500s)."""
    from fastapi import HTTPException

    class UpstreamTimeout(HTTPException, TimeoutError):
        def __init__(self) -> None:
            super().__init__(status_code=504, detail="upstream timed out")

    class Coded(HTTPException):
        __slots__ = ("code",)

        def __init__(self, code: str) -> None:
            super().__init__(status_code=418, detail="teapot")
            self.code = code

    app = FastAPI()

    @app.exception_handler(Coded)
    async def coded(request: Any, error: Coded) -> JSONResponse:
        return JSONResponse({"code": error.code}, status_code=418, headers=error.headers)

    @app.get("/slow")
    @limit("5/minute")
    async def slow() -> dict[str, bool]:
        raise UpstreamTimeout()

    @app.get("/coded")
    @limit("5/minute")
    async def with_code() -> dict[str, bool]:
        raise Coded("E42")

    client = TestClient(app)
    slow_response = client.get("/slow", headers={"X-User-ID": "a"})
    assert slow_response.status_code == 504 and slow_response.headers["x-ratelimit-limit-requests"] == "5"
    coded_response = client.get("/coded", headers={"X-User-ID": "a"})
    assert coded_response.status_code == 418 and coded_response.json() == {"code": "E42"}
    assert coded_response.headers["x-ratelimit-limit-requests"] == "5"
