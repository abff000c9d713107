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
from collections.abc import Callable
from functools import lru_cache
from json.encoder import encode_basestring_ascii
from operator import attrgetter
from typing import AnyStr, Generic, NamedTuple

from .config import describe_seconds
from .decision import Decision

__all__ = [
    "EXPOSED_HEADER_NAMES",
    "HTTPResponse",
    "RawResponse",
    "denial_response",
    "go_duration",
    "informational_headers",
    "raw_denial_response",
    "raw_informational_headers",
    "retry_after_seconds",
    "unavailable_response",
]

SHOULD_RETRY_MAX_SECONDS = 60.0

EXPOSED_HEADER_NAMES = (
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
)
"""Every header the contract may send that a browser script needs exposed (``Access-Control-Expose-Headers``
lists them): give them to a CORS middleware's ``expose_headers``, which replaces the list."""
EXPOSED_HEADERS = ", ".join(EXPOSED_HEADER_NAMES)


class HTTPResponse(NamedTuple):
    """A complete response, framework-neutral: what a denial handler returns."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


def go_duration(seconds: float) -> str:
    """Go-style durations as in OpenAI's reset headers: ``"20ms"``, ``"1.5s"``, ``"6m0s"``, ``"1h2m3s"``.

    Rounded up to the millisecond, as ``Retry-After`` is to the second (a client that waits it is not early),
    before it is split: 119.9997 s reads ``2m0s``, and a positive wait never ``0ms``.
    """
    if seconds <= 0:
        return "0s"
    millis = math.ceil(seconds * 1000)
    if millis < 1000:
        return f"{millis}ms"
    whole, millis = divmod(millis, 1000)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs}.{millis:03d}".rstrip("0").rstrip(".") + "s" if millis else f"{secs}s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    return f"{minutes}m{text}" if minutes else text


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

_ERROR_TYPES = {"requests": "requests", "concurrent": "concurrency"}

_MAX_REMEMBERED_RESETS = 1024


class RawResponse(NamedTuple):
    """An ``HTTPResponse`` whose headers are written as an ASGI server takes them (bytes, lower-case)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


_Header = tuple[AnyStr, AnyStr]
_Denied = tuple[_Header[AnyStr], _Header[AnyStr], list[_Header[AnyStr]]]
"""``Retry-After``, ``x-should-retry`` and the informational headers of a denial."""
_MAX_REMEMBERED_DENIALS = 64  # per limit: waits of up to about a minute, as clients count them down


class _Reset(Generic[AnyStr]):
    """One reset, written: what the headers say of it."""

    __slots__ = ("duration", "pair", "seconds", "then")

    def __init__(self, wire: _Wire[AnyStr], reset: float) -> None:
        self.seconds: AnyStr = wire.number(str(math.ceil(reset)))
        """Whole seconds, rounded up."""
        self.duration: AnyStr = wire.number(go_duration(reset))
        """A Go duration (OpenAI's reset headers)."""
        self.then: AnyStr = wire.then + self.seconds
        """The end of a ``RateLimit`` item: ``;t=`` and the seconds."""
        self.pair: tuple[AnyStr, AnyStr] = (wire.reset, self.seconds)
        """``X-RateLimit-Reset``."""


class _Parts(Generic[AnyStr]):
    """The constant parts of one limit's informational headers, as text or as ASGI bytes (``wire``): its
    header pairs that never change built once, so that a response writes only what does (remaining, and a
    reset other than the window)."""

    __slots__ = ("at_window", "denials", "limit", "limit_pair", "openai", "policy", "policy_pair", "state")

    def __init__(
        self,
        wire: _Wire[AnyStr],
        policy: AnyStr,
        state: AnyStr,
        limit: AnyStr,
        openai: tuple[AnyStr, ...] | None,
        window: float,
    ) -> None:
        self.policy: AnyStr = policy
        """Its ``RateLimit-Policy`` item."""
        self.policy_pair: tuple[AnyStr, AnyStr] = (wire.policy, policy)
        self.state: AnyStr = state
        """The start of its ``RateLimit`` item: ``"per_user_model";r=``."""
        self.limit: AnyStr = limit
        self.limit_pair: tuple[AnyStr, AnyStr] = (wire.limit, limit)
        self.openai: tuple[tuple[AnyStr, AnyStr], AnyStr, AnyStr] | None = (
            None if openai is None else ((openai[0], limit), openai[1], openai[2])
        )
        """OpenAI's limit header, and its remaining and reset header names, for its unit if it has them."""
        self.at_window: _Reset[AnyStr] = _Reset(wire, window)
        """A reset one window ahead: every allowed request of a sliding log."""
        self.denials: dict[int, _Denied[AnyStr]] = {}
        """The headers of its denials that depend on the whole seconds to wait only, by those seconds."""


class _Rule(NamedTuple):
    """What never changes in the headers and messages of one limit."""

    text: _Parts[str]
    raw: _Parts[bytes]
    per: str
    """``"requests per 1 hour"``, for messages."""
    error_type: str


def _encode_value(text: str) -> bytes:
    return text.encode("latin-1", "replace")


def _encode_name(name: str) -> bytes:
    return name.lower().encode("latin-1")


@lru_cache(maxsize=4096)
def _rule(tier: str, unit: str, limit: int, window: float) -> _Rule:
    """The constant parts of one limit's headers and messages: built once, they never change.

    ``"per_user_model";q=100;w=3600``; other units name themselves: ``"per_user_model-tokens"`` with a vendor
    parameter (tokens are not a registered quota unit), ``qu="concurrent-requests"`` for concurrency.
    """
    name = f'"{tier}"' if unit == "requests" else f'"{tier}-{unit.replace("_", "-")}"'
    if unit == "concurrent":
        policy = f'{name};q={limit};qu="concurrent-requests"'
    else:
        policy = f"{name};q={limit};w={math.ceil(window)}"
        if unit != "requests":
            policy = f'{policy};x-unit="{unit}"'
    openai_unit = _OPENAI_UNITS.get(unit)
    openai = None
    if openai_unit is not None:
        openai = tuple(f"x-ratelimit-{field}-{openai_unit}" for field in ("limit", "remaining", "reset"))
    text = _Parts(_TEXT, policy, f"{name};r=", str(limit), openai, window)
    raw = _Parts(
        _RAW,
        _encode_value(policy),
        _encode_value(text.state),
        _encode_value(text.limit),
        None if openai is None else tuple(_encode_name(header) for header in openai),
        window,
    )
    per = f"{unit.replace('_', ' ')} per {describe_seconds(window)}"
    return _Rule(text, raw, per, _ERROR_TYPES.get(unit, "tokens"))


class _Wire(Generic[AnyStr]):
    """How the headers are written: as text, or as ASGI sends them (``asgi.encode_headers``: names
    lower-cased, values in latin-1 with characters outside it replaced)."""

    def __init__(
        self,
        parts: Callable[[_Rule], _Parts[AnyStr]],
        name: Callable[[str], AnyStr],
        value: Callable[[str], AnyStr],
        number: Callable[[str], AnyStr],
        count: Callable[[int], AnyStr],
    ) -> None:
        self.parts: Callable[[_Rule], _Parts[AnyStr]] = parts
        self.number: Callable[[str], AnyStr] = number
        """Writes the figures that change (ASCII digits and durations)."""
        self.count: Callable[[int], AnyStr] = count
        """Writes a count (``number(str(count))`` in one call)."""
        names = [name(header) for header in _HEADER_NAMES]
        self.policy: AnyStr = names[0]
        self.state: AnyStr = names[1]
        self.limit: AnyStr = names[2]
        self.remaining: AnyStr = names[3]
        self.reset: AnyStr = names[4]
        self.expose: tuple[AnyStr, AnyStr] = (names[5], value(EXPOSED_HEADERS))
        self.comma: AnyStr = value(", ")
        self.then: AnyStr = value(";t=")
        self.json: tuple[AnyStr, AnyStr] = (names[6], value("application/json"))
        self.retry_after: AnyStr = names[7]
        self.retry_after_ms: AnyStr = names[8]
        self.should_retry: tuple[tuple[AnyStr, AnyStr], tuple[AnyStr, AnyStr]] = (
            (names[9], value("true")),
            (names[9], value("false")),
        )
        self._resets: dict[float, _Reset[AnyStr]] = {}

    def written_reset(self, seconds: float) -> _Reset[AnyStr]:
        """A reset ``seconds`` ahead, written.

        Remembered: most resets repeat (a denial's in whole seconds; an allowed sliding log resets a whole
        window ahead, which each limit keeps written: ``_Parts.at_window``), and writing a duration costs more
        than the rest of a header.
        """
        written = self._resets.get(seconds)
        if written is None:
            if len(self._resets) >= _MAX_REMEMBERED_RESETS:
                self._resets.clear()
            written = self._resets[seconds] = _Reset(self, seconds)
        return written


_HEADER_NAMES = (  # the informational headers', then the denial's own
    "RateLimit-Policy",
    "RateLimit",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "Access-Control-Expose-Headers",
    "Content-Type",
    "Retry-After",
    "retry-after-ms",
    "x-should-retry",
)
_TEXT = _Wire(attrgetter("text"), str, str, str, str)
_RAW = _Wire(attrgetter("raw"), _encode_name, _encode_value, str.encode, b"%d".__mod__)


def _figures(wire: _Wire[AnyStr], decision: Decision) -> tuple[_Parts[AnyStr], AnyStr, _Reset[AnyStr]]:
    """``(constant parts, remaining, reset)`` of one decision, written."""
    reset = decision.reset_after if decision.allowed else float(retry_after_seconds(decision))
    parts = wire.parts(_rule(decision.tier, decision.unit, decision.limit, decision.window_seconds))
    written = parts.at_window if reset == decision.window_seconds else wire.written_reset(reset)
    return parts, wire.count(decision.remaining), written


def _informational(
    wire: _Wire[AnyStr], decision: Decision, others: tuple[Decision, ...]
) -> list[tuple[AnyStr, AnyStr]]:
    parts, remaining, reset = _figures(wire, decision)
    headers = [
        parts.policy_pair,
        (wire.state, parts.state + remaining + reset.then),
        parts.limit_pair,
        (wire.remaining, remaining),
        reset.pair,
    ]
    if parts.openai is not None:
        limit_pair, remaining_name, reset_name = parts.openai
        headers += (limit_pair, (remaining_name, remaining), (reset_name, reset.duration))
    if others:  # a reservation: every unit's item, and OpenAI's headers of each unit named once
        policies, states = [parts.policy], [headers[1][1]]
        named = [] if parts.openai is None else [parts.openai[1]]  # by their remaining header's name
        for other in others:
            parts, remaining, reset = _figures(wire, other)
            policies.append(parts.policy)
            states.append(parts.state + remaining + reset.then)
            if parts.openai is not None and parts.openai[1] not in named:
                limit_pair, remaining_name, reset_name = parts.openai
                named.append(remaining_name)
                headers += (limit_pair, (remaining_name, remaining), (reset_name, reset.duration))
        headers[0] = (wire.policy, wire.comma.join(policies))
        headers[1] = (wire.state, wire.comma.join(states))
    headers.append(wire.expose)
    return headers


def informational_headers(decision: Decision, *others: Decision) -> list[tuple[str, str]]:
    """The headers for every limited response, allowed or denied (not ``Retry-After``).

    ``decision`` is the binding one; ``others`` are the binding decisions of the other units of a
    reservation (tokens, concurrency), which get their own policy items and OpenAI's ``-tokens`` headers.
    """
    return _informational(_TEXT, decision, others)


def raw_informational_headers(decision: Decision, *others: Decision) -> list[tuple[bytes, bytes]]:
    """``informational_headers`` as an ASGI server takes them (``asgi.encode_headers`` of them), written
    from parts encoded once per limit."""
    return _informational(_RAW, decision, others)


def _message(decision: Decision, rule: _Rule, wait: str) -> str:
    """OpenAI-style: names the tier and the limit, the amounts for token limits, and the wait (``"1.250"``
    seconds)."""
    where = f"Rate limit reached ({decision.tier})"
    if decision.unit == "concurrent":
        return f"{where}: {decision.limit} concurrent requests are in flight. Please try again in {wait}s."
    if math.isinf(decision.retry_after):
        return (
            f"{where}: this request needs {decision.cost} {decision.unit.replace('_', ' ')}, more than the "
            f"limit of {decision.limit} {rule.per}; it can never be allowed."
        )
    if decision.unit == "requests":
        return f"{where}: limit {decision.limit} {rule.per}. Please try again in {wait}s."
    used = "" if decision.used is None else f", Used {decision.used}"
    amounts = f"Limit {decision.limit}{used}, Requested {decision.cost}"
    return f"{where} on {rule.per}: {amounts}. Please try again in {wait}s."


def _body(decision: Decision, rule: _Rule, wait: str) -> str:
    """What ``json.dumps`` makes of OpenAI's error object, written out around the message."""
    return (
        f'{{"error": {{"message": {encode_basestring_ascii(_message(decision, rule, wait))}, '
        f'"type": "{rule.error_type}", "param": null, "code": "rate_limit_exceeded"}}}}'
    )


_WAIT_MARK = "\x00"  # stands for the wait in a body built once: json writes it as \u0000, found nowhere else


@lru_cache(maxsize=4096)
def _body_around_wait(tier: str, unit: str, limit: int, window: float) -> tuple[bytes, bytes]:
    """The body of a request or concurrency limit's denial, which changes only with the wait, split around
    it: built once per limit."""
    rule = _rule(tier, unit, limit, window)
    stub = Decision(False, limit, 0, 0.0, 0.0, tier, window, 1, unit)
    head, tail = _body(stub, rule, _WAIT_MARK).rsplit(encode_basestring_ascii(_WAIT_MARK)[1:-1], 1)
    return head.encode(), tail.encode()


def _denial(
    wire: _Wire[AnyStr], decision: Decision, others: tuple[Decision, ...]
) -> tuple[list[_Header[AnyStr]], bytes]:
    """The headers and body of the 429 for a denied decision, written for ``wire``."""
    rule = _rule(decision.tier, decision.unit, decision.limit, decision.window_seconds)
    never = math.isinf(decision.retry_after)
    wait = _wait(decision)
    if not never and (decision.unit == "requests" or decision.unit == "concurrent"):
        head, tail = _body_around_wait(decision.tier, decision.unit, decision.limit, decision.window_seconds)
        body = head + f"{wait:.3f}".encode() + tail
    else:
        body = _body(decision, rule, f"{wait:.3f}").encode()
    retry_after, should_retry, informational = _denied_headers(wire, rule, decision, others, never, wait)
    headers = [wire.json, retry_after, (wire.retry_after_ms, wire.number(str(math.ceil(wait * 1000))))]
    headers.append(should_retry)
    headers += informational
    return headers, body


def _denied_headers(
    wire: _Wire[AnyStr],
    rule: _Rule,
    decision: Decision,
    others: tuple[Decision, ...],
    never: bool,
    wait: float,
) -> _Denied[AnyStr]:
    """The headers of a denial that depend on the whole seconds to wait only (for one unit: a limit's
    denials repeat them until the next second), remembered per limit."""
    seconds = max(1, math.ceil(wait))
    memo = wire.parts(rule).denials
    remembered = not (others or never or decision.remaining)  # one unit, a wait, nothing remaining
    if remembered:
        denied = memo.get(seconds)
        if denied is not None:
            return denied
    # Over a minute, whole seconds tell the same as the wait: `seconds > 60` exactly when `wait > 60`.
    denied = (
        (wire.retry_after, wire.number(str(seconds))),
        wire.should_retry[never or wait > SHOULD_RETRY_MAX_SECONDS],
        _informational(wire, decision, others),
    )
    if remembered:
        if len(memo) >= _MAX_REMEMBERED_DENIALS:
            memo.clear()
        memo[seconds] = denied
    return denied


def denial_response(decision: Decision, *others: Decision) -> HTTPResponse:
    """The 429 for a denied decision: OpenAI's error body and every back-off header.

    ``others`` are the binding decisions of the other units of a reservation, for the informational headers.
    The body is what ``json.dumps`` makes of ``{"error": {"message": ..., "type": ..., "param": None, "code":
    "rate_limit_exceeded"}}``.
    """
    return HTTPResponse(429, *_denial(_TEXT, decision, others))


def raw_denial_response(decision: Decision, *others: Decision) -> RawResponse:
    """``denial_response`` with its headers as an ASGI server takes them (``asgi.encode_headers`` of them),
    written from parts encoded once per limit."""
    return RawResponse(429, *_denial(_RAW, decision, others))


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
