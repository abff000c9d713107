"""Path rules: normalisation that cannot be bypassed, and pattern matching."""

from __future__ import annotations

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
    assert rules.match("GET", "/health") == (True, "health")
    assert rules.match("GET", "/health/x") == (False, None)


@pytest.mark.parametrize("bad", ["", "   ", "v1/chat", 42])
def test_bad_patterns_raise(bad: object) -> None:
    with pytest.raises(ValueError, match="pattern"):
        PathRules([(bad, None)])  # type: ignore[list-item]
