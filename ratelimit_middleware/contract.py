"""The rate limit contract on the wire: headers and 429 bodies that every client understands.

Pure functions of a ``Decision``; the middlewares and decorators only send what these return.

- ``Retry-After``: whole seconds, rounded up, at least 1 (RFC 9110 delay-seconds; urllib3 rejects fractions);
  ``retry-after-ms``: the precise wait, which the openai and anthropic SDKs read first; ``x-should-retry``:
  ``false`` when the wait is over 60 seconds, so SDKs do not hammer the server.
- IETF draft-ietf-httpapi-ratelimit-headers-11: ``RateLimit-Policy`` and ``RateLimit`` for the binding policy.
- OpenAI's ``x-ratelimit-{limit,remaining,reset}-requests`` and the common ``X-RateLimit-*``.
- The 429 body in OpenAI's error shape, with a message naming the limit and the wait.

A request whose cost exceeds the limit can never pass: its 429 says ``x-should-retry: false`` and, since a
header cannot say "never", ``Retry-After`` is the window length.
"""

from __future__ import annotations

import json
import math
from typing import NamedTuple

from .config import describe_seconds
from .decision import Decision

__all__ = [
    "HTTPResponse",
    "denial_response",
    "go_duration",
    "informational_headers",
    "retry_after_seconds",
    "unavailable_response",
]

SHOULD_RETRY_MAX_SECONDS = 60.0

EXPOSED_HEADERS = ", ".join(
    [
        "RateLimit-Policy",
        "RateLimit",
        "X-RateLimit-Limit",
        "X-RateLimit-Remaining",
        "X-RateLimit-Reset",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
        "Retry-After",
        "retry-after-ms",
        "x-should-retry",
    ]
)


class HTTPResponse(NamedTuple):
    """A complete response, framework-neutral: what a denial handler returns."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


def go_duration(seconds: float) -> str:
    """Go-style durations as in OpenAI's reset headers: ``"20ms"``, ``"1.5s"``, ``"6m0s"``, ``"1h2m3s"``."""
    if seconds < 1:
        return f"{max(math.ceil(seconds * 1000), 0)}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{int(hours)}h{int(minutes)}m{text}"
    if minutes:
        return f"{int(minutes)}m{text}"
    return text


def _wait(decision: Decision) -> float:
    """The wait a client should honour: retry_after, or the window for a request that can never pass."""
    return decision.window_seconds if math.isinf(decision.retry_after) else decision.retry_after


def retry_after_seconds(decision: Decision) -> int:
    """``Retry-After`` in whole seconds: rounded up, at least 1."""
    return max(1, math.ceil(_wait(decision)))


def informational_headers(decision: Decision) -> list[tuple[str, str]]:
    """The headers for every limited response, allowed or denied (not ``Retry-After``)."""
    policy = f'"{decision.tier}"'
    reset = decision.reset_after if decision.allowed else float(retry_after_seconds(decision))
    reset_seconds = str(math.ceil(reset))
    return [
        ("RateLimit-Policy", f"{policy};q={decision.limit};w={math.ceil(decision.window_seconds)}"),
        ("RateLimit", f"{policy};r={decision.remaining};t={reset_seconds}"),
        ("X-RateLimit-Limit", str(decision.limit)),
        ("X-RateLimit-Remaining", str(decision.remaining)),
        ("X-RateLimit-Reset", reset_seconds),
        ("x-ratelimit-limit-requests", str(decision.limit)),
        ("x-ratelimit-remaining-requests", str(decision.remaining)),
        ("x-ratelimit-reset-requests", go_duration(reset)),
        ("Access-Control-Expose-Headers", EXPOSED_HEADERS),
    ]


def denial_response(decision: Decision) -> HTTPResponse:
    """The 429 for a denied decision: OpenAI's error body and every back-off header."""
    wait = _wait(decision)
    never = math.isinf(decision.retry_after)
    limit = f"{decision.limit} requests per {describe_seconds(decision.window_seconds)}"
    if never:
        message = (
            f"Rate limit reached ({decision.tier}): this request costs {decision.cost}, more than the limit "
            f"of {limit}; it can never be allowed."
        )
    else:
        message = f"Rate limit reached ({decision.tier}): limit {limit}. Please try again in {wait:.3f}s."
    body = {"error": {"message": message, "type": "requests", "param": None, "code": "rate_limit_exceeded"}}
    headers = [
        ("Content-Type", "application/json"),
        ("Retry-After", str(retry_after_seconds(decision))),
        ("retry-after-ms", str(math.ceil(wait * 1000))),
        ("x-should-retry", "false" if never or wait > SHOULD_RETRY_MAX_SECONDS else "true"),
        *informational_headers(decision),
    ]
    return HTTPResponse(429, headers, json.dumps(body).encode())


def unavailable_response(retry_after: int = 1) -> HTTPResponse:
    """The 503 sent when the limiter fails and the policy is to deny (fail closed)."""
    body = {
        "error": {
            "message": "Rate limiting is temporarily unavailable; please retry shortly.",
            "type": "server_error",
            "param": None,
            "code": "rate_limiter_unavailable",
        }
    }
    headers = [
        ("Content-Type", "application/json"),
        ("Retry-After", str(retry_after)),
        ("retry-after-ms", str(retry_after * 1000)),
        ("x-should-retry", "true"),
    ]
    return HTTPResponse(503, headers, json.dumps(body).encode())
