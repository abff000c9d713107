"""Per-route limits in Flask: the decorator."""

from __future__ import annotations

from flask import Blueprint, Flask, Response, jsonify, request

from ratelimit_middleware.flask import limit
from ratelimit_middleware.keys import from_json_body


def blueprint(name: str) -> Blueprint:
    """Two modules defining a view with the same function name."""
    bp = Blueprint(name, __name__, url_prefix=f"/{name}")

    @bp.get("/x")
    @limit("1/minute")
    def handler() -> str:
        return name

    return bp


def make_app() -> Flask:
    app = Flask(__name__)

    @app.get("/limited")
    @limit("2/minute;100/day")
    def limited() -> Response:
        return jsonify(ok=True)

    @app.post("/completions")
    @limit("1/minute", model_key=from_json_body("model"))
    def completions() -> Response:
        return jsonify(request.get_json())

    @app.get("/async")
    @limit("1/minute")
    async def limited_async() -> str:
        return "async"

    app.register_blueprint(blueprint("one"))
    app.register_blueprint(blueprint("two"))
    return app


def test_decorated_view_limits_and_adds_headers() -> None:
    client = make_app().test_client()
    first = client.get("/limited", headers={"X-User-ID": "a"})
    assert first.status_code == 200 and first.json == {"ok": True}
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert client.get("/limited", headers={"X-User-ID": "a"}).status_code == 200
    denied = client.get("/limited", headers={"X-User-ID": "a"})
    assert denied.status_code == 429
    assert denied.json["error"]["code"] == "rate_limit_exceeded"
    assert denied.headers["Retry-After"] == "60"
    assert client.get("/limited", headers={"X-User-ID": "b"}).status_code == 200


def test_body_keys_leave_the_body_for_the_view() -> None:
    client = make_app().test_client()
    first = client.post("/completions", json={"model": "m1", "n": 1}, headers={"X-User-ID": "a"})
    assert first.json == {"model": "m1", "n": 1}
    assert client.post("/completions", json={"model": "m1"}, headers={"X-User-ID": "a"}).status_code == 429
    assert client.post("/completions", json={"model": "m2"}, headers={"X-User-ID": "a"}).status_code == 200


def test_same_function_names_in_different_blueprints_never_share() -> None:
    client = make_app().test_client()
    assert client.get("/one/x", headers={"X-User-ID": "a"}).text == "one"
    assert client.get("/two/x", headers={"X-User-ID": "a"}).text == "two"
    assert client.get("/one/x", headers={"X-User-ID": "a"}).status_code == 429


def test_async_views() -> None:
    client = make_app().test_client()
    assert client.get("/async", headers={"X-User-ID": "a"}).text == "async"
    assert client.get("/async", headers={"X-User-ID": "a"}).status_code == 429
