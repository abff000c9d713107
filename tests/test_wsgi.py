"""RateLimitWSGI: real requests through Flask and werkzeug, and raw WSGI where the input stream matters."""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import pytest
from flask import Flask, Response, jsonify, request
from hypothesis import given, settings
from hypothesis import strategies as st
from werkzeug.test import Client, EnvironBuilder

from ratelimit_middleware import MultiTierRateLimiter, RateLimiter
from ratelimit_middleware.keys import from_json_body
from ratelimit_middleware.request import RequestView
from ratelimit_middleware.wsgi import RateLimitWSGI, _ReplayInput, request_view


def make_app(**options: Any) -> Flask:
    app = Flask(__name__)

    @app.post("/v1/chat/completions")
    def echo() -> Any:
        body = request.get_data()
        return jsonify(sha256=hashlib.sha256(body).hexdigest(), length=len(body))

    @app.get("/hello")
    def hello() -> str:
        return "hello"

    @app.get("/health")
    def health() -> str:
        return "ok"

    @app.get("/stream")
    def stream() -> Response:
        return Response((f"data: {i}\n\n" for i in range(5)), mimetype="text/event-stream")

    app.wsgi_app = RateLimitWSGI(app.wsgi_app, **options)  # type: ignore[method-assign]
    return app


def post(client: Any, user: str = "alice", **kwargs: Any) -> Any:
    headers = {"X-User-ID": user, **kwargs.pop("headers", {})}
    return client.post("/v1/chat/completions", json=kwargs.pop("json", {"model": "gpt-4o"}), headers=headers)


def test_default_needs_no_options_100_per_hour() -> None:
    app = Flask(__name__)
    app.get("/")(lambda: "ok")
    app.wsgi_app = RateLimitWSGI(app.wsgi_app)  # type: ignore[method-assign]
    response = app.test_client().get("/", headers={"X-User-ID": "a"})
    assert response.status_code == 200
    assert response.headers["x-ratelimit-limit-requests"] == "100"
    assert response.headers["RateLimit-Policy"] == '"per_user_model";q=100;w=3600'


def test_allows_then_denies_with_the_429_contract() -> None:
    client = make_app(limiter="2/minute").test_client()
    assert post(client).headers["x-ratelimit-remaining-requests"] == "1"
    assert post(client).status_code == 200
    denied = post(client)
    assert denied.status_code == 429
    assert denied.headers["Content-Type"] == "application/json"
    assert denied.headers["Retry-After"] == "60"
    assert denied.headers["x-should-retry"] == "true"
    assert denied.json["error"]["code"] == "rate_limit_exceeded"
    assert int(denied.headers["Content-Length"]) == len(denied.data)


def test_models_from_body_and_header_separate_buckets() -> None:
    limiter = MultiTierRateLimiter(per_user_model="1/minute")
    client = make_app(limiter=limiter).test_client()
    assert post(client, json={"model": "a"}).status_code == 200
    assert post(client, json={"model": "a"}).status_code == 429
    assert post(client, json={"model": "b"}).status_code == 200
    assert post(client, json={"model": "a"}, headers={"X-Model": "c"}).status_code == 200


def test_exempt_and_path_limits() -> None:
    client = make_app(
        limiter="1/minute", exempt_paths=["/health"], path_limits={"/hello": "2/minute"}
    ).test_client()
    assert [client.get("/health").status_code for _ in range(3)] == [200, 200, 200]
    assert [client.get("/hello", headers={"X-User-ID": "a"}).status_code for _ in range(3)] == [200, 200, 429]
    assert client.get("/hello/", headers={"X-User-ID": "a"}).status_code == 429  # both spellings limited
    assert client.get("/x/../hello", headers={"X-User-ID": "b"}).status_code == 404  # routed to no view


def test_a_trailing_slash_does_not_dodge_a_rule_when_flask_serves_both_spellings() -> None:
    app = Flask(__name__)
    app.url_map.strict_slashes = False  # /chat and /chat/ both reach the view, no redirect

    @app.get("/chat/")
    def chat() -> str:
        return "ok"

    app.wsgi_app = RateLimitWSGI(  # type: ignore[method-assign]
        app.wsgi_app, limiter="1000/hour", path_limits={"/chat/": "2/minute"}
    )
    client = app.test_client()
    paths = ("/chat", "/chat/", "/chat")
    assert [client.get(path, headers={"X-User-ID": "a"}).status_code for path in paths] == [200, 200, 429]


def test_dot_segments_do_not_reach_an_exemption_through_a_path_route() -> None:
    app = make_app(limiter="2/minute", exempt_paths=["/health"])

    @app.get("/v1/files/<path:name>")
    def files(name: str) -> str:
        return name

    client = app.test_client()
    statuses = [client.get("/v1/files/a", headers={"X-User-ID": "a"}).status_code for _ in range(2)]
    environ = EnvironBuilder(path="/v1/files/a", headers={"X-User-ID": "a"}).get_environ()
    environ["PATH_INFO"] = "/v1/files/../../health"  # as a server passes it on: werkzeug routes it to files()
    started: list[str] = []
    list(app(environ, lambda status, headers, exc_info=None: started.append(status)))
    assert statuses == [200, 200] and started == ["429 Too Many Requests"]


def test_method_rules_match_lower_case_methods_and_head() -> None:
    app = make_app(limiter="100/minute", path_limits={"GET /hello": "1/minute"})
    client = app.test_client()
    assert client.get("/hello", headers={"X-User-ID": "a"}).status_code == 200
    assert client.head("/hello", headers={"X-User-ID": "a"}).status_code == 429
    environ = EnvironBuilder(path="/hello", method="GET", headers={"X-User-ID": "a"}).get_environ()
    environ["REQUEST_METHOD"] = "get"  # werkzeug upper-cases it and runs the GET view
    started: list[str] = []
    list(app(environ, lambda status, headers, exc_info=None: started.append(status)))
    assert started[0].startswith("429")


@pytest.mark.parametrize(("status", "line"), [(418, "418 I'm a Teapot"), (599, "599 Unknown")])
def test_a_deny_handler_status_gets_its_reason_phrase(status: int, line: str) -> None:
    from ratelimit_middleware.contract import HTTPResponse

    app = make_app(limiter="1/minute", deny_handler=lambda request, decision: HTTPResponse(status, [], b""))
    started: list[str] = []
    for _ in range(2):
        environ = EnvironBuilder(path="/hello", headers={"X-User-ID": "a"}).get_environ()
        list(app(environ, lambda status, headers, exc_info=None: started.append(status)))
    assert started == ["200 OK", line]


def test_streaming_responses_pass_through_unbuffered() -> None:
    app = make_app(limiter="5/minute")
    environ = EnvironBuilder(path="/stream", headers={"X-User-ID": "a"}).get_environ()
    started: list[tuple[str, list[tuple[str, str]]]] = []
    iterable = app(environ, lambda status, headers, exc_info=None: started.append((status, headers)))
    chunks = list(iterable)
    assert started[0][0] == "200 OK"
    assert ("x-ratelimit-remaining-requests", "4") in started[0][1]
    assert [chunk for chunk in chunks if chunk] == [f"data: {i}\n\n".encode() for i in range(5)]


@pytest.mark.parametrize(
    ("body", "max_body_size"),
    [
        (b'{"model": "gpt-4o", "messages": []}', 1024),
        (b"\x00\xff binary, not JSON \xfe", 1024),
        (b'{"model": "x"}' + b" " * 5000, 100),
        (b"line one\nline two\n" * 50, 100),
        (b"", 1024),
    ],
)
def test_body_reaches_the_app_byte_for_byte(body: bytes, max_body_size: int) -> None:
    client = make_app(limiter="5/minute", max_body_size=max_body_size).test_client()
    response = client.post("/v1/chat/completions", data=body, headers={"X-User-ID": "a"})
    assert response.status_code == 200
    assert response.json == {"sha256": hashlib.sha256(body).hexdigest(), "length": len(body)}


def test_model_from_the_body_only_under_the_cap() -> None:
    limiter = RateLimiter(limit="1/minute")
    client = make_app(limiter=limiter, max_body_size=64).test_client()
    post(client, json={"model": "gpt-4o"})
    post(client, json={"model": "gpt-4o", "pad": "x" * 100})
    assert limiter.get_request_count("alice", "gpt-4o") == 1
    assert limiter.get_request_count("alice", "default") == 1


def test_chunked_body_without_length_is_read_when_terminated() -> None:
    app = make_app(limiter=RateLimiter(limit="1/minute"))
    body = b'{"model": "m1"}'
    builder = EnvironBuilder(path="/v1/chat/completions", method="POST", headers={"X-User-ID": "a"})
    environ = builder.get_environ()
    environ.pop("CONTENT_LENGTH", None)
    environ["wsgi.input"] = io.BytesIO(body)
    environ["wsgi.input_terminated"] = True
    status: list[str] = []
    result = b"".join(app(environ, lambda s, h, e=None: status.append(s)))
    assert status == ["200 OK"]
    assert json.loads(result)["length"] == len(body)


class BrokenInput(io.RawIOBase):
    """A request body whose client went away after ``head``: the server's stream raises, as werkzeug's does
    for a client gone or a malformed chunk."""

    def __init__(self, head: bytes) -> None:
        self.head = head

    def read(self, size: int = -1) -> bytes:
        if self.head:
            data, self.head = self.head, b""
            return data
        raise OSError("the client went away")


@pytest.mark.parametrize("head", [b"", b'{"model": "gp'])
def test_a_body_that_fails_to_read_is_none_to_the_keys_and_the_app_meets_the_failure(head: bytes) -> None:
    limiter = RateLimiter(limit="5/minute")
    read: list[bytes] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        stream = environ["wsgi.input"]
        read.append(stream.read(len(head)))
        with pytest.raises(OSError, match="went away"):
            stream.read(1)
        start_response("400 Bad Request", [("Content-Type", "text/plain")])
        return [b"bad body"]

    environ = EnvironBuilder(
        path="/v1/chat/completions", method="POST", headers={"X-User-ID": "a"}
    ).get_environ()
    environ["CONTENT_LENGTH"], environ["wsgi.input"] = "100", BrokenInput(head)
    status: list[str] = []
    assert (
        b"".join(RateLimitWSGI(app, limiter)(environ, lambda s, h, e=None: status.append(s))) == b"bad body"
    )
    assert status == ["400 Bad Request"] and read == [head]
    assert limiter.get_request_count("a", "default") == 1


def test_replay_input_never_reads_past_content_length() -> None:
    rest = io.BytesIO(b"cdefNEXT-REQUEST")
    stream = _ReplayInput(b"ab", rest, remaining=4)
    assert stream.read(3) == b"abc"
    assert stream.readline() == b"def"
    assert stream.read() == b""
    assert rest.read() == b"NEXT-REQUEST"
    lines = _ReplayInput(b"one\ntw", io.BytesIO(b"o\nthree\n"), remaining=8)
    assert list(lines) == [b"one\n", b"two\n", b"three\n"]
    assert _ReplayInput(b"a\nb\n", io.BytesIO(b""), remaining=0).readlines() == [b"a\n", b"b\n"]


def test_spoofed_forwarded_for_does_not_change_the_user() -> None:
    client = make_app(limiter="1/minute").test_client()
    assert client.get("/hello", headers={"X-Forwarded-For": "1.1.1.1"}).status_code == 200
    assert client.get("/hello", headers={"X-Forwarded-For": "2.2.2.2"}).status_code == 429


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"X-User-ID": "\x7f odd", "X-Model": " "}, b"{bad json"),
        ({"Authorization": "Bearer"}, b"[]"),
        ({"X-Forwarded-For": ",,,"}, b'{"model": {"nested": 1}}'),
        ({"Content-Type": "application/json"}, b"\xff\xfe\x00"),
    ],
)
def test_malformed_requests_never_cause_a_500(headers: dict[str, str], body: bytes) -> None:
    client = make_app(limiter="5/minute").test_client()
    assert client.post("/v1/chat/completions", data=body, headers=headers).status_code == 200


def test_bad_content_length_is_not_a_500() -> None:
    app = make_app(limiter="5/minute")
    environ = EnvironBuilder(path="/v1/chat/completions", method="POST", data=b"{}").get_environ()
    environ["CONTENT_LENGTH"] = "-3"
    status: list[str] = []
    b"".join(app(environ, lambda s, h, e=None: status.append(s)))
    assert status and not status[0].startswith("5")


def failing_key(view: Any) -> str:
    raise RuntimeError("boom")


@pytest.mark.parametrize(("on_error", "status"), [("allow", 200), ("deny", 503)])
def test_failing_key_function_follows_the_policy(on_error: str, status: int) -> None:
    client = make_app(limiter="1/minute", user_key=failing_key, on_error=on_error).test_client()
    response = client.get("/hello")
    assert response.status_code == status
    if status == 503:
        assert response.headers["Retry-After"] == "1"


def test_plain_wsgi_app_without_flask() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"plain"]

    client = Client(RateLimitWSGI(app, "1/minute"))
    assert client.get("/", headers={"X-User-ID": "u"}).status_code == 200
    denied = client.get("/", headers={"X-User-ID": "u"})
    assert denied.status_code == 429 and denied.headers["Retry-After"] == "60"


# The view reads an environ's headers in place, one variable per look-up, as werkzeug does; for an environ in
# CGI form it answers as the mapping of every HTTP_* variable does.
_variables = st.sampled_from(
    [
        "HTTP_X_USER_ID",
        "HTTP_X_MODEL",
        "HTTP_AUTHORIZATION",
        "CONTENT_TYPE",
        "CONTENT_LENGTH",
        "HTTP_HOST",
        "PATH_INFO",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_variables, st.text(max_size=6), max_size=6))
def test_environ_headers_answer_as_the_mapping_of_every_variable(environ: dict[str, str]) -> None:
    pairs = [
        (name[5:].replace("_", "-") if name.startswith("HTTP_") else name.replace("_", "-"), value)
        for name, value in environ.items()
        if name.startswith("HTTP_") or name in ("CONTENT_TYPE", "CONTENT_LENGTH")
    ]
    plain = RequestView("GET", "/", pairs)
    view = request_view(environ)
    for name in (
        "x-user-id",
        "X-User-ID",
        "x_user_id",
        "x-model",
        "authorization",
        "content-type",
        "content-length",
        "host",
        "path-info",
        "ŧ",
    ):
        assert view.header(name) == plain.header(name)
        assert view.headers.get(name.lower()) == plain.headers.get(name.lower())
    assert dict(view.headers) == dict(plain.headers)


def test_environ_variables_of_header_names_are_remembered_within_a_bound() -> None:
    from ratelimit_middleware.wsgi import _MAX_VARIABLES, _VARIABLES

    environ = {f"HTTP_X_CUSTOM_{i}": str(i) for i in range(400)}
    view = request_view(environ)
    for _ in range(2):
        assert [view.header(f"X-Custom-{i}") for i in range(400)] == [str(i) for i in range(400)]
    assert len(_VARIABLES) <= _MAX_VARIABLES


class _Trickle(io.RawIOBase):
    """An input that returns at most 7 bytes a read, as a raw socket may."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def read(self, size: int | None = -1) -> bytes:
        return self._data.read(7 if size is None or size < 0 else min(size, 7))


def test_a_body_that_arrives_in_short_reads_is_read_whole_for_the_key_functions() -> None:
    body = json.dumps({"model": "trickled", "pad": "x" * 100}).encode()
    models: list[str | None] = []

    def model_key(request: RequestView) -> str | None:
        models.append(from_json_body("model")(request))
        return models[-1]

    def echo(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [environ["wsgi.input"].read()]

    app = RateLimitWSGI(echo, limiter="5/minute", model_key=model_key)
    environ = EnvironBuilder(path="/", method="POST", headers={"X-User-ID": "a"}).get_environ()
    environ["wsgi.input"], environ["CONTENT_LENGTH"] = _Trickle(body), str(len(body))
    assert b"".join(app(environ, lambda status, headers, exc_info=None: None)) == body
    assert models[-1] == "trickled"


def test_non_ascii_paths_match_and_key_as_werkzeug_routes_them() -> None:
    from ratelimit_middleware.keys import from_path

    seen: list[str | None] = []
    cafe = from_path("/menu/{item}")

    def user_key(request: RequestView) -> str:
        seen.append(cafe(request))
        return "a"

    app = RateLimitWSGI(
        lambda environ, start_response: [start_response("200 OK", []) or b"ok"],
        limiter="100/minute",
        path_limits={"/menu/café": "1/minute"},
        user_key=user_key,
    )
    statuses: list[str] = []
    for _ in range(2):
        environ = EnvironBuilder(path="/menu/café").get_environ()
        assert environ["PATH_INFO"] == "/menu/caf\xc3\xa9"  # PEP 3333: the UTF-8 bytes, as latin-1
        list(app(environ, lambda status, headers, exc_info=None: statuses.append(status)))
    assert statuses == ["200 OK", "429 Too Many Requests"] and set(seen) == {"café"}


def test_stacked_middlewares_send_one_set_for_the_binding_limit() -> None:
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    inner = make_app()
    inner.wsgi_app = RateLimitWSGI(inner.wsgi_app, limiter="2/minute")  # type: ignore[method-assign]
    outer = RateLimitWSGI(DispatcherMiddleware(make_app(), {"/api": inner}), limiter="100/minute")
    client = Client(outer)
    responses = [client.get("/api/hello", headers={"X-User-ID": "a"}) for _ in range(3)]
    assert [response.status_code for response in responses] == [200, 200, 429]
    for response, remaining in zip(responses, ["1", "0", "0"], strict=True):
        assert response.headers.getlist("X-RateLimit-Limit") == ["2"]
        assert response.headers.getlist("x-ratelimit-remaining-requests") == [remaining]


def test_a_lazy_layer_between_the_middleware_and_a_limited_view_keeps_one_set() -> None:
    """A WSGI layer may run its app as the server iterates (a generator): the view's limit still folds in."""
    from ratelimit_middleware.flask import limit

    app = make_app()

    @app.get("/limited")
    @limit("2/minute")
    def limited() -> str:
        return "ok"

    inner = app.wsgi_app

    def lazy(environ: dict[str, Any], start_response: Any) -> Any:
        yield from inner(environ, start_response)

    app.wsgi_app = RateLimitWSGI(lazy, limiter="100/minute")  # type: ignore[method-assign]
    client = app.test_client()
    responses = [client.get("/limited", headers={"X-User-ID": "a"}) for _ in range(3)]
    assert [response.status_code for response in responses] == [200, 200, 429]
    for response in responses:
        assert response.headers.getlist("x-ratelimit-limit-requests") == ["2"]
