"""Per-route limits in Flask: the decorator."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable

import pytest
from flask import Blueprint, Flask, Response, jsonify, request
from werkzeug.test import EnvironBuilder, run_wsgi_app

from ratelimit_middleware.flask import RateLimitExceeded, limit
from ratelimit_middleware.keys import from_json_body
from ratelimit_middleware.observe import Event, EventHook


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


@pytest.mark.parametrize("handled", [429, RateLimitExceeded])
def test_an_error_handler_for_429_answers_denials_with_the_rate_limit_headers(handled: object) -> None:
    """As flask-limiter users do: ``@app.errorhandler(429)`` replaces the body; the headers stay."""
    app = make_app()
    seen: list[RateLimitExceeded] = []

    @app.errorhandler(handled)  # type: ignore[arg-type]
    def too_many(error: RateLimitExceeded) -> tuple[str, int]:
        seen.append(error)
        return "slow down", 429

    client = app.test_client()
    for _ in range(2):
        client.get("/limited", headers={"X-User-ID": "a"})
    denied = client.get("/limited", headers={"X-User-ID": "a"})
    assert (denied.status_code, denied.text) == (429, "slow down")
    assert denied.headers["Retry-After"] == "60" and denied.headers["RateLimit"].endswith(";r=0;t=60")
    assert denied.headers["Content-Type"].startswith("text/html")  # the handler's own
    assert isinstance(seen[0], RateLimitExceeded) and seen[0].denial.status == 429


def test_a_catch_all_exception_handler_does_not_turn_denials_into_its_answer() -> None:
    """A common logging handler, ``@app.errorhandler(Exception)``, caught the raised denial: a 500."""
    app = make_app()

    @app.errorhandler(Exception)
    def internal(error: Exception) -> tuple[str, int]:
        return "internal", 500

    client = app.test_client()
    statuses = [client.get("/limited", headers={"X-User-ID": "a"}).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    denied = client.get("/limited", headers={"X-User-ID": "a"})
    assert denied.json["error"]["code"] == "rate_limit_exceeded" and denied.headers["Retry-After"] == "60"


def test_a_blueprint_s_429_handler_answers_its_own_views_denials() -> None:
    app = Flask(__name__)
    shop = Blueprint("shop", __name__)

    @shop.get("/buy")
    @limit("1/minute")
    def buy() -> str:
        return "bought"

    @shop.errorhandler(429)
    def later(error: RateLimitExceeded) -> tuple[str, int]:
        return "come back later", 429

    app.register_blueprint(shop)
    client = app.test_client()
    assert client.get("/buy", headers={"X-User-ID": "a"}).text == "bought"
    denied = client.get("/buy", headers={"X-User-ID": "a"})
    assert (denied.status_code, denied.text, denied.headers["Retry-After"]) == (429, "come back later", "60")


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


def test_shadow_mode_lets_denied_requests_through_with_the_headers() -> None:
    events: list[Event] = []
    app = Flask(__name__)

    @app.get("/shadow")
    @limit("1/minute", shadow=True, observers=[EventHook(events.append)])
    def shadow() -> str:
        return "ok"

    client = app.test_client()
    responses = [client.get("/shadow", headers={"X-User-ID": "a"}) for _ in range(3)]
    assert [response.text for response in responses] == ["ok"] * 3
    assert [response.headers["x-ratelimit-remaining-requests"] for response in responses] == ["0"] * 3
    assert [event.kind for event in events] == ["shadow_denied"] * 2


# Chunked uploads (no Content-Length, an input the server terminates): the decorator reads at most
# max_body_size + 1 bytes of them, and the view still reads the body byte for byte, whether or not something
# opened or read Flask's request.stream before the decorator (a before_request hook).


def open_stream() -> None:
    request.stream.read(0)


def read_body() -> None:
    request.get_data()  # cached by Flask


def upload_app(hook: Callable[[], None] | None) -> Flask:
    app = Flask(__name__)
    if hook is not None:
        app.before_request(hook)

    @app.post("/upload")
    @limit("1/minute", model_key=from_json_body("model"), max_body_size=1024)
    def upload() -> dict[str, object]:
        read = request.environ["test.input"].tell()  # bytes taken from the server's input before the view
        return {"read_before_view": read, "sha256": hashlib.sha256(request.get_data()).hexdigest()}

    return app


def post_chunked(app: Flask, body: bytes) -> tuple[str, dict[str, object]]:
    server_input = io.BytesIO(body)
    environ = EnvironBuilder(
        "/upload", method="POST", headers={"X-User-ID": "a"}, input_stream=server_input
    ).get_environ()
    environ["test.input"] = server_input
    del environ["CONTENT_LENGTH"]
    environ["wsgi.input_terminated"] = True  # as servers that decode chunked bodies say
    answer, status, _ = run_wsgi_app(app, environ, buffered=True)
    return status, json.loads(b"".join(answer))


@pytest.mark.parametrize("hook", [None, open_stream])
def test_chunked_body_over_the_cap_is_read_no_further_and_reaches_the_view_whole(
    hook: Callable[[], None] | None,
) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    status, answer = post_chunked(upload_app(hook), body)
    assert status == "200 OK"
    assert answer == {"read_before_view": 1025, "sha256": hashlib.sha256(body).hexdigest()}


@pytest.mark.parametrize("hook", [None, open_stream, read_body])
def test_chunked_body_under_the_cap_reaches_the_key_function_and_the_view(
    hook: Callable[[], None] | None,
) -> None:
    app = upload_app(hook)

    def upload(model: str) -> str:
        body = json.dumps({"model": model, "prompt": "hello"}).encode()
        status, answer = post_chunked(app, body)
        if status == "200 OK":
            assert answer["sha256"] == hashlib.sha256(body).hexdigest()
        return status

    assert [upload("m1"), upload("m1"), upload("m2")] == ["200 OK", "429 TOO MANY REQUESTS", "200 OK"]


@pytest.mark.parametrize(
    ("middleware", "route", "statuses", "limit_shown"),
    [("100/minute", "2/minute", [200, 200, 429], "2"), ("2/minute", "100/minute", [200, 200, 429], "2")],
)
def test_a_view_under_the_middleware_sends_one_set_of_headers_for_the_binding_limit(
    middleware: str, route: str, statuses: list[int], limit_shown: str
) -> None:
    from ratelimit_middleware.wsgi import RateLimitWSGI

    app = Flask(__name__)
    app.wsgi_app = RateLimitWSGI(app.wsgi_app, limiter=middleware)  # type: ignore[method-assign]

    @app.get("/view")
    @limit(route)
    def view() -> str:
        return "ok"

    client = app.test_client()
    responses = [client.get("/view", headers={"X-User-ID": "a"}) for _ in statuses]
    assert [response.status_code for response in responses] == statuses
    for response in responses:
        for name in ("X-RateLimit-Limit", "x-ratelimit-remaining-requests", "RateLimit-Policy", "RateLimit"):
            assert len(response.headers.getlist(name)) == 1, (name, response.headers)
        assert response.headers["x-ratelimit-limit-requests"] == limit_shown


def test_the_middleware_writes_the_binding_headers_when_a_limited_view_aborts() -> None:
    from flask import abort

    from ratelimit_middleware.wsgi import RateLimitWSGI

    app = Flask(__name__)
    app.wsgi_app = RateLimitWSGI(app.wsgi_app, limiter="100/minute")  # type: ignore[method-assign]

    @app.get("/aborts")
    @limit("2/minute")
    def aborts() -> str:
        abort(400)

    @app.get("/quiet")
    @limit("1/minute", add_headers=False)
    def quiet() -> str:
        return "ok"

    @app.get("/stacked")
    @limit("5/minute")
    @limit("2/minute")
    def stacked() -> str:
        return "ok"

    client = app.test_client()
    aborted = client.get("/aborts", headers={"X-User-ID": "a"})
    assert aborted.status_code == 400 and aborted.headers.getlist("x-ratelimit-limit-requests") == ["2"]
    quiets = [client.get("/quiet", headers={"X-User-ID": "a"}) for _ in range(2)]
    assert [response.status_code for response in quiets] == [200, 429]
    assert [response.headers.getlist("x-ratelimit-limit-requests") for response in quiets] == [["100"], ["1"]]
    for response in [client.get("/stacked", headers={"X-User-ID": "a"}) for _ in range(3)]:
        assert response.headers.getlist("x-ratelimit-limit-requests") == ["2"]


@pytest.mark.parametrize("reader", ["input_stream", "wsgi.input"])
def test_a_view_reading_the_raw_input_gets_the_whole_body(reader: str) -> None:
    app = Flask(__name__)

    @app.post("/raw")
    @limit("5/minute", model_key=from_json_body("model"))
    def raw() -> dict[str, str]:
        stream = request.input_stream if reader == "input_stream" else request.environ["wsgi.input"]
        return {"read": stream.read().decode()}

    body = json.dumps({"model": "m", "prompt": "x" * 100})
    response = app.test_client().post("/raw", data=body, content_type="application/json")
    assert response.status_code == 200 and response.json == {"read": body}


def test_an_aborting_view_gets_the_headers_of_its_own_limits() -> None:
    from flask import abort

    app = Flask(__name__)

    @app.errorhandler(404)
    def not_found(error: Exception) -> tuple[dict[str, str], int]:
        return {"error": "no such model"}, 404

    @app.get("/aborts")
    @limit("5/minute")
    @limit("2/minute")
    def aborts() -> str:
        abort(404)

    response = app.test_client().get("/aborts", headers={"X-User-ID": "a"})
    assert response.status_code == 404 and response.json == {"error": "no such model"}
    assert response.headers.getlist("x-ratelimit-limit-requests") == ["2"]
