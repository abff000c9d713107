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
from functools import lru_cache
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
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
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


_OPENAI_UNITS = {
    "requests": "requests",
    "tokens": "tokens",
    "input_tokens": "tokens",
    "output_tokens": "tokens",
}
"""Which of OpenAI's ``x-ratelimit-*-requests`` / ``-tokens`` headers a unit fills."""


@lru_cache(maxsize=4096)
def _policy(tier: str, unit: str, limit: int, window: float) -> tuple[str, str]:
    """``(quoted policy name, RateLimit-Policy item)`` of one limit: built once, they never change.

    ``"per_user_model";q=100;w=3600``; other units name themselves: ``"per_user_model-tokens"`` with a vendor
    parameter (tokens are not a registered quota unit), ``qu="concurrent-requests"`` for concurrency.
    """
    name = f'"{tier}"' if unit == "requests" else f'"{tier}-{unit.replace("_", "-")}"'
    if unit == "concurrent":
        return name, f'{name};q={limit};qu="concurrent-requests"'
    item = f"{name};q={limit};w={math.ceil(window)}"
    return name, item if unit == "requests" else f'{item};x-unit="{unit}"'


def _reset(decision: Decision) -> float:
    return decision.reset_after if decision.allowed else float(retry_after_seconds(decision))


def informational_headers(decision: Decision, *others: Decision) -> list[tuple[str, str]]:
    """The headers for every limited response, allowed or denied (not ``Retry-After``).

    ``decision`` is the binding one; ``others`` are the binding decisions of the other units of a
    reservation (tokens, concurrency), which get their own policy items and OpenAI's ``-tokens`` headers.
    """
    items, states = [], []
    by_openai_unit: dict[str, tuple[Decision, float]] = {}
    for current in (decision, *others):
        name, item = _policy(current.tier, current.unit, current.limit, current.window_seconds)
        reset = _reset(current)
        items.append(item)
        states.append(f"{name};r={current.remaining};t={math.ceil(reset)}")
        openai_unit = _OPENAI_UNITS.get(current.unit)
        if openai_unit is not None and openai_unit not in by_openai_unit:
            by_openai_unit[openai_unit] = current, reset
    headers = [
        ("RateLimit-Policy", ", ".join(items)),
        ("RateLimit", ", ".join(states)),
        ("X-RateLimit-Limit", str(decision.limit)),
        ("X-RateLimit-Remaining", str(decision.remaining)),
        ("X-RateLimit-Reset", str(math.ceil(_reset(decision)))),
    ]
    for openai_unit, (current, reset) in by_openai_unit.items():
        headers += [
            (f"x-ratelimit-limit-{openai_unit}", str(current.limit)),
            (f"x-ratelimit-remaining-{openai_unit}", str(current.remaining)),
            (f"x-ratelimit-reset-{openai_unit}", go_duration(reset)),
        ]
    headers.append(("Access-Control-Expose-Headers", EXPOSED_HEADERS))
    return headers


def _message(decision: Decision, wait: float) -> str:
    """OpenAI-style: names the tier and the limit, the amounts for token limits, and the wait."""
    where = f"Rate limit reached ({decision.tier})"
    if decision.unit == "concurrent":
        return (
            f"{where}: {decision.limit} concurrent requests are in flight. Please try again in {wait:.3f}s."
        )
    unit = decision.unit.replace("_", " ")
    per = f"{unit} per {describe_seconds(decision.window_seconds)}"
    if math.isinf(decision.retry_after):
        return (
            f"{where}: this request needs {decision.cost} {unit}, more than the limit of "
            f"{decision.limit} {per}; it can never be allowed."
        )
    if decision.unit == "requests":
        return f"{where}: limit {decision.limit} {per}. Please try again in {wait:.3f}s."
    used = "" if decision.used is None else f", Used {decision.used}"
    amounts = f"Limit {decision.limit}{used}, Requested {decision.cost}"
    return f"{where} on {per}: {amounts}. Please try again in {wait:.3f}s."


_ERROR_TYPES = {"requests": "requests", "concurrent": "concurrency"}


def denial_response(decision: Decision, *others: Decision) -> HTTPResponse:
    """The 429 for a denied decision: OpenAI's error body and every back-off header.

    ``others`` are the binding decisions of the other units of a reservation, for the informational headers.
    """
    wait = _wait(decision)
    never = math.isinf(decision.retry_after)
    error_type = _ERROR_TYPES.get(decision.unit, "tokens")
    message = _message(decision, wait)
    body = {"error": {"message": message, "type": error_type, "param": None, "code": "rate_limit_exceeded"}}
    headers = [
        ("Content-Type", "application/json"),
        ("Retry-After", str(retry_after_seconds(decision))),
        ("retry-after-ms", str(math.ceil(wait * 1000))),
        ("x-should-retry", "false" if never or wait > SHOULD_RETRY_MAX_SECONDS else "true"),
        *informational_headers(decision, *others),
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
