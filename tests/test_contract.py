"""The wire contract: headers and bodies computed from a Decision."""

from __future__ import annotations

import json
import math

import pytest

from ratelimit_middleware import Decision
from ratelimit_middleware.contract import (
    denial_response,
    go_duration,
    informational_headers,
    retry_after_seconds,
    unavailable_response,
)


def denied(retry_after: float, window: float = 60.0, cost: int = 1) -> Decision:
    return Decision(False, 10, 0, retry_after, max(retry_after, 1.0), "per_user_model", window, cost)


def allowed(remaining: int = 7, reset_after: float = 12.5) -> Decision:
    return Decision(True, 10, remaining, 0.0, reset_after, "per_model", 3600.0, 1)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.02, "20ms"), (0.0001, "1ms"), (0, "0ms"), (1.5, "1.5s"), (1, "1s"), (59.25, "59.25s"),
     (360, "6m0s"), (3723, "1h2m3s"), (86400, "24h0m0s")],
)  # fmt: skip
def test_go_durations_like_openai(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


@pytest.mark.parametrize(("wait", "header"), [(0.001, 1), (0.5, 1), (1.0, 1), (1.01, 2), (41.2, 42)])
def test_retry_after_is_whole_seconds_rounded_up_at_least_one(wait: float, header: int) -> None:
    assert retry_after_seconds(denied(wait)) == header


def test_denial_response_has_openai_body_and_every_header() -> None:
    response = denial_response(denied(41.2))
    assert response.status == 429
    headers = dict(response.headers)
    body = json.loads(response.body)
    assert set(body) == {"error"}
    error = body["error"]
    assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded" and error["param"] is None
    assert "10 requests per 1 minute" in error["message"] and "41.200s" in error["message"]
    assert headers["Content-Type"] == "application/json"
    assert headers["Retry-After"] == "42"
    assert headers["retry-after-ms"] == "41200"
    assert headers["x-should-retry"] == "true"
    assert headers["RateLimit-Policy"] == '"per_user_model";q=10;w=60'
    assert headers["RateLimit"] == '"per_user_model";r=0;t=42'
    assert headers["x-ratelimit-limit-requests"] == "10"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "42s"
    assert (headers["X-RateLimit-Limit"], headers["X-RateLimit-Remaining"], headers["X-RateLimit-Reset"]) == (
        "10",
        "0",
        "42",
    )


@pytest.mark.parametrize(
    ("wait", "should"), [(1.0, "true"), (60.0, "true"), (60.5, "false"), (3600, "false")]
)
def test_should_retry_false_beyond_a_minute(wait: float, should: str) -> None:
    assert dict(denial_response(denied(wait)).headers)["x-should-retry"] == should


def test_a_cost_that_can_never_pass_says_do_not_retry() -> None:
    response = denial_response(denied(math.inf, window=300.0, cost=500))
    headers = dict(response.headers)
    assert headers["x-should-retry"] == "false"
    assert headers["Retry-After"] == "300"
    assert "needs 500 requests" in json.loads(response.body)["error"]["message"]


def test_informational_headers_for_allowed_requests() -> None:
    headers = dict(informational_headers(allowed()))
    assert "Retry-After" not in headers
    assert headers["RateLimit"] == '"per_model";r=7;t=13'
    assert headers["RateLimit-Policy"] == '"per_model";q=10;w=3600'
    assert headers["x-ratelimit-reset-requests"] == "12.5s"
    exposed = headers["Access-Control-Expose-Headers"]
    for name in ("RateLimit", "x-ratelimit-remaining-requests", "Retry-After", "retry-after-ms"):
        assert name in exposed


def test_unavailable_response_is_a_503_with_retry() -> None:
    response = unavailable_response()
    assert response.status == 503
    assert dict(response.headers)["Retry-After"] == "1"
    assert json.loads(response.body)["error"]["code"] == "rate_limiter_unavailable"
