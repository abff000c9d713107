"""Per-route limits in FastAPI: the decorator (no request parameter needed) and the dependency."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel
from starlette.testclient import TestClient

from ratelimit_middleware import RateLimiter
from ratelimit_middleware.fastapi import RateLimit, RateLimitExceeded, limit, rate_limit_exceeded_handler
from ratelimit_middleware.keys import from_json_body


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
