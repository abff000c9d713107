"""Path rules: normalisation that cannot be bypassed, and pattern matching."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from ratelimit_middleware.routes import PathRules, normalize_path


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("/v1/chat", "/v1/chat"),
        ("/v1/chat/", "/v1/chat"),
        ("//v1//chat//", "/v1/chat"),
        ("/v1/./chat", "/v1/chat"),
        ("/v1/x/../chat", "/v1/chat"),
        ("/../v1/chat", "/v1/chat"),
        ("/v1/%63hat", "/v1/chat"),
        ("/v1/%2563hat", "/v1/chat"),
        ("/v1%2Fchat", "/v1/chat"),
        ("", "/"),
        ("/", "/"),
        ("/%ZZ", "/%ZZ"),
    ],
)
def test_normalize_path(raw: str, normalized: str) -> None:
    assert normalize_path(raw) == normalized


def test_patterns_exact_prefix_and_method() -> None:
    rules = PathRules([("POST /v1/chat", "chat-post"), ("/v1/*", "v1"), ("/health/", "health")])
    assert rules.match("POST", "/v1/chat") == (True, "chat-post")
    assert rules.match("GET", "/v1/chat") == (True, "v1")
    assert rules.match("GET", "/v1") == (True, "v1")
    assert rules.match("GET", "/v10") == (False, None)
    assert rules.match("GET", "/health/") == (True, "health")
    assert rules.match("GET", "/health") == (False, None)  # as written: the app routes them apart
    assert rules.match("GET", "/health/x") == (False, None)


@pytest.mark.parametrize("bad", ["", "   ", "v1/chat", 42])
def test_bad_patterns_raise(bad: object) -> None:
    with pytest.raises(ValueError, match="pattern"):
        PathRules([(bad, None)])  # type: ignore[list-item]


def test_an_exemption_needs_the_path_as_routed_and_normalised() -> None:
    rules = PathRules([("/health", None), ("/healthz/", None), ("/docs/*", None), ("/v1/*", "v1")])
    for exempt in ("/health", "/healthz/", "/docs", "/docs/x", "/docs//x"):
        assert rules.match("GET", exempt) == (True, None), exempt
    # a catch-all route (/{path:path}, /<path:p>) serves these as something else: the default limit
    for other in ("/health/", "//health", "/health//", "/healthz"):
        assert rules.match("GET", other) == (False, None), other
    # routed by the app as a /v1/files/<path> or /v1/models/{model} request: never /health's exemption
    assert rules.match("GET", "/v1/files/../../health") == (True, "v1")
    assert rules.match("GET", "/v1/models/%2e%2e%2f%2e%2e%2fhealth") == (True, "v1")
    # below /docs/ as routed, but a proxy or the app may resolve it to /v1/chat: the default limit
    assert rules.match("GET", "/docs/../v1/chat") == (False, None)
    assert rules.match("GET", "/docs/%2e%2e/v1/chat") == (False, None)


def test_a_rule_matches_the_path_as_routed_and_no_other_spelling() -> None:
    rules = PathRules([("/v1/images/*", "images"), ("/public/*", "loose"), ("/v1/chat", "chat")])
    assert rules.match("GET", "/v1/images/%2e%2e%2fx") == (True, "images")
    assert rules.match("GET", "/v1/images/a/../../x") == (True, "images")
    # routed to a catch-all or a /files/{name:path} route: the default limit, never the looser /public/*
    for spelling in ("/files/%2e%2e/public/x", "/files/../public/x", "//public/x"):
        assert rules.match("GET", spelling) == (False, None), spelling
    assert rules.match("POST", "/v1/chat") == (True, "chat")
    # the frameworks redirect these or route them to no /v1/chat endpoint: the default limit
    for other in ("/v1/chat/", "//v1/chat", "/v1/%63hat", "/v1/./chat", "/v1/x/../chat"):
        assert rules.match("POST", other) == (False, None), other


def test_methods_compare_in_upper_case_and_get_covers_head() -> None:
    rules = PathRules([("GET /report", "report"), ("POST /chat", "chat")])
    assert rules.match("HEAD", "/report") == (True, "report")
    assert rules.match("get", "/report") == (True, "report")
    assert rules.match("post", "/chat") == (True, "chat")
    assert rules.match("HEAD", "/chat") == (False, None)


def test_match_all_gives_each_spelling_its_rule() -> None:
    rules = PathRules([("/chat/", "strict"), ("/public/*", "loose"), ("/health", None)])
    assert rules.match_all("GET", "/chat") == [(False, None), (True, "strict")]  # Flask may serve /chat too
    assert rules.match_all("GET", "//public/x") == [(False, None), (True, "loose")]
    assert rules.match_all("GET", "/health/") == [(False, None), (True, None)]  # not exempt as given
    assert PathRules([("/v1/*", "v1")]).match_all("GET", "/v1/x") == [(True, "v1")]  # one spelling


@pytest.mark.parametrize("bad", ["/v1/chat*", "/api/*/admin", "/*x"])
def test_a_star_only_ends_a_pattern(bad: str) -> None:
    with pytest.raises(ValueError, match="only end"):
        PathRules([(bad, "x")])


_NEVER_MATCHING = [
    ("GET|POST /x", "one HTTP method"),
    ("GET,POST /x", "one HTTP method"),
    ("GET /x /y", "one path, optionally behind a method"),
    ("/x /y", "one path, optionally behind a method"),
    ("/x?model=a", "never the query"),
    ("POST /v1/*?x", "never the query"),
]


def _ok_wsgi(environ: object, start_response: Callable[..., object]) -> list[bytes]:
    start_response("200 OK", [])
    return [b"ok"]


async def _ok_asgi(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize("option", ["path_limits", "exempt_paths"])
@pytest.mark.parametrize("middleware", ["asgi", "wsgi"])
@pytest.mark.parametrize(("pattern", "why"), _NEVER_MATCHING)
def test_a_pattern_that_could_never_match_is_refused(
    option: str, middleware: str, pattern: str, why: str
) -> None:
    """It was accepted and never matched: the path's own limit never applied, an exemption never exempted."""
    from ratelimit_middleware.asgi import RateLimitMiddleware
    from ratelimit_middleware.wsgi import RateLimitWSGI

    rules: dict[str, Any] = (
        {"path_limits": {pattern: "1/minute"}} if option == "path_limits" else {"exempt_paths": [pattern]}
    )
    build = (
        (lambda: RateLimitMiddleware(_ok_asgi, "100/hour", **rules))
        if middleware == "asgi"
        else (lambda: RateLimitWSGI(_ok_wsgi, "100/hour", **rules))
    )
    with pytest.raises(ValueError, match=rf"{why}.*{re.escape(repr(pattern))}$"):
        build()


def test_the_one_method_one_path_patterns_apply_through_the_middleware() -> None:
    from werkzeug.test import Client

    from ratelimit_middleware.wsgi import RateLimitWSGI

    client = Client(
        RateLimitWSGI(
            _ok_wsgi,
            "100/hour",
            path_limits={"GET /x": "1/minute", "post  /x": "1/minute"},  # any spacing, any case
            exempt_paths=["/health"],
        )
    )
    assert [client.get("/x").status_code for _ in range(2)] == [200, 429]
    assert [client.post("/x").status_code for _ in range(2)] == [200, 429]
    assert [client.get("/x", query_string="model=a").status_code for _ in range(1)] == [429]  # query ignored
    assert [client.get("/health").status_code for _ in range(3)] == [200, 200, 200]
