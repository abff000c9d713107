"""The wire contract: headers and bodies computed from a Decision."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit_middleware import Decision
from ratelimit_middleware.asgi import encode_headers
from ratelimit_middleware.config import describe_seconds
from ratelimit_middleware.contract import (
    _MAX_REMEMBERED_DENIALS,
    EXPOSED_HEADERS,
    HTTPResponse,
    _rule,
    denial_response,
    go_duration,
    informational_headers,
    raw_denial_response,
    raw_informational_headers,
    retry_after_seconds,
    unavailable_response,
)


def denied(retry_after: float, window: float = 60.0, cost: int = 1) -> Decision:
    return Decision(False, 10, 0, retry_after, max(retry_after, 1.0), "per_user_model", window, cost)


def allowed(remaining: int = 7, reset_after: float = 12.5) -> Decision:
    return Decision(True, 10, remaining, 0.0, reset_after, "per_model", 3600.0, 1)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.02, "20ms"), (0.0001, "1ms"), (0, "0s"), (1.5, "1.5s"), (1, "1s"), (59.25, "59.25s"),
     (360, "6m0s"), (3723, "1h2m3s"), (86400, "24h0m0s"), (59.9996, "1m0s"), (119.9997, "2m0s"),
     (3599.9999, "1h0m0s"), (61.0004, "1m1.001s"), (0.9996, "1s"), (1.0005, "1.001s")],
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


# The headers and bodies are built from parts cached per limit (text and ASGI bytes). These properties check
# them, over changing figures and limits, against a plain build of the contract without any cache.


def _reference_go_duration(seconds: float) -> str:
    if seconds <= 0:
        return "0s"
    if math.ceil(seconds * 1000) < 1000:
        return f"{math.ceil(seconds * 1000)}ms"
    total = math.ceil(seconds * 1000)  # milliseconds
    hours, minutes, secs = total // 3_600_000, total // 60_000 % 60, total % 60_000 / 1000
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


def _reference_informational(decision: Decision, *others: Decision) -> list[tuple[str, str]]:
    items, states = [], []
    by_openai_unit: dict[str, tuple[Decision, float]] = {}
    for current in (decision, *others):
        name = (
            f'"{current.tier}"'
            if current.unit == "requests"
            else f'"{current.tier}-{current.unit.replace("_", "-")}"'
        )
        if current.unit == "concurrent":
            items.append(f'{name};q={current.limit};qu="concurrent-requests"')
        else:
            item = f"{name};q={current.limit};w={math.ceil(current.window_seconds)}"
            items.append(item if current.unit == "requests" else f'{item};x-unit="{current.unit}"')
        reset = current.reset_after if current.allowed else float(retry_after_seconds(current))
        states.append(f"{name};r={current.remaining};t={math.ceil(reset)}")
        openai_unit = (
            "requests" if current.unit == "requests" else "tokens" if "tokens" in current.unit else None
        )
        if openai_unit is not None and openai_unit not in by_openai_unit:
            by_openai_unit[openai_unit] = current, reset
    reset = decision.reset_after if decision.allowed else float(retry_after_seconds(decision))
    headers = [
        ("RateLimit-Policy", ", ".join(items)),
        ("RateLimit", ", ".join(states)),
        ("X-RateLimit-Limit", str(decision.limit)),
        ("X-RateLimit-Remaining", str(decision.remaining)),
        ("X-RateLimit-Reset", str(math.ceil(reset))),
    ]
    for openai_unit, (current, current_reset) in by_openai_unit.items():
        headers += [
            (f"x-ratelimit-limit-{openai_unit}", str(current.limit)),
            (f"x-ratelimit-remaining-{openai_unit}", str(current.remaining)),
            (f"x-ratelimit-reset-{openai_unit}", _reference_go_duration(current_reset)),
        ]
    return [*headers, ("Access-Control-Expose-Headers", EXPOSED_HEADERS)]


def _reference_denial(decision: Decision, *others: Decision) -> HTTPResponse:
    never = math.isinf(decision.retry_after)
    wait = decision.window_seconds if never else decision.retry_after
    where = f"Rate limit reached ({decision.tier})"
    unit = decision.unit.replace("_", " ")
    per = f"{unit} per {describe_seconds(decision.window_seconds)}"
    if decision.unit == "concurrent":
        message = (
            f"{where}: {decision.limit} concurrent requests are in flight. Please try again in {wait:.3f}s."
        )
    elif never:
        message = (
            f"{where}: this request needs {decision.cost} {unit}, more than the limit of "
            f"{decision.limit} {per}; it can never be allowed."
        )
    elif decision.unit == "requests":
        message = f"{where}: limit {decision.limit} {per}. Please try again in {wait:.3f}s."
    else:
        used = "" if decision.used is None else f", Used {decision.used}"
        message = (
            f"{where} on {per}: Limit {decision.limit}{used}, Requested {decision.cost}. "
            f"Please try again in {wait:.3f}s."
        )
    error_type = {"requests": "requests", "concurrent": "concurrency"}.get(decision.unit, "tokens")
    body = {"error": {"message": message, "type": error_type, "param": None, "code": "rate_limit_exceeded"}}
    headers = [
        ("Content-Type", "application/json"),
        ("Retry-After", str(max(1, math.ceil(wait)))),
        ("retry-after-ms", str(math.ceil(wait * 1000))),
        ("x-should-retry", "false" if never or wait > 60 else "true"),
        *_reference_informational(decision, *others),
    ]
    return HTTPResponse(429, headers, json.dumps(body).encode())


seconds = st.one_of(
    st.floats(min_value=0, max_value=200_000, allow_nan=False),
    st.integers(0, 5000).map(lambda n: n * 60 + 0.0005),  # rounding at the minute
    st.sampled_from([0.0004, 0.9995, 59.9995, 59.9996, 3599.9996, 60.0, 3600.0]),
)
decisions = st.builds(
    Decision,
    allowed=st.booleans(),
    limit=st.integers(1, 10**9),
    remaining=st.integers(0, 10**9),
    retry_after=st.one_of(seconds, st.just(math.inf)),
    reset_after=seconds,
    tier=st.sampled_from(["per_user_model", "per_model", "global", "plan-gold", "tïer", "ŧier"]),
    window_seconds=st.sampled_from([0.5, 1.0, 60.0, 90.0, 3600.0, 86400.0]),
    cost=st.integers(1, 10**6),
    unit=st.sampled_from(["requests", "tokens", "input_tokens", "output_tokens", "concurrent"]),
    used=st.one_of(st.none(), st.integers(0, 10**6)),
)


@settings(max_examples=500, deadline=None)
@given(seconds)
def test_go_duration_matches_the_plain_build(value: float) -> None:
    assert go_duration(value) == _reference_go_duration(value)


@settings(max_examples=500, deadline=None)
@given(st.lists(decisions, min_size=1, max_size=4))
def test_headers_match_the_plain_build_in_text_and_asgi_bytes(batch: list[Decision]) -> None:
    headers = informational_headers(*batch)
    assert headers == _reference_informational(*batch)
    assert raw_informational_headers(*batch) == encode_headers(headers)


@settings(max_examples=300, deadline=None)
@given(st.lists(decisions, min_size=1, max_size=4), st.lists(st.booleans(), min_size=4, max_size=4))
def test_headers_of_resets_a_window_ahead_match_the_plain_build(
    batch: list[Decision], at_window: list[bool]
) -> None:
    """A reset one window ahead (every allowed request of a sliding log) is written once per limit."""
    batch = [
        decision._replace(reset_after=decision.window_seconds) if moved else decision
        for decision, moved in zip(batch, at_window, strict=False)
    ]
    for _ in range(2):
        headers = informational_headers(*batch)
        assert headers == _reference_informational(*batch)
        assert raw_informational_headers(*batch) == encode_headers(headers)


@settings(max_examples=500, deadline=None)
@given(st.lists(decisions, min_size=1, max_size=4))
def test_denials_match_the_plain_build(batch: list[Decision]) -> None:
    denied = batch[0]._replace(allowed=False, retry_after=batch[0].retry_after or 0.5)
    reference = _reference_denial(denied, *batch[1:])
    assert denial_response(denied, *batch[1:]) == reference
    assert raw_denial_response(denied, *batch[1:]) == (429, encode_headers(reference.headers), reference.body)


def test_repeated_figures_of_one_limit_give_fresh_equal_headers() -> None:
    first, second = allowed(remaining=7), allowed(remaining=6, reset_after=11.0)
    for decision in (first, second, first, second):
        assert informational_headers(decision) == _reference_informational(decision)
        assert raw_informational_headers(decision) == encode_headers(_reference_informational(decision))
    informational_headers(first).append(("X-Mutated", "1"))  # a caller's list is its own
    assert informational_headers(first) == _reference_informational(first)


def test_encode_headers_remembers_only_a_bounded_number_of_names() -> None:
    names = [f"X-Custom-{i}" for i in range(400)]
    for _ in range(2):
        assert encode_headers([(name, "vé\u0100") for name in names]) == [
            (name.lower().encode(), "vé?".encode("latin-1")) for name in names
        ]


def test_written_resets_are_remembered_within_a_bound() -> None:
    from ratelimit_middleware.contract import _MAX_REMEMBERED_RESETS, _TEXT

    for i in range(3 * _MAX_REMEMBERED_RESETS):
        decision = allowed(reset_after=i / 7)
        assert informational_headers(decision) == _reference_informational(decision)
        assert len(_TEXT._resets) <= _MAX_REMEMBERED_RESETS


def test_denials_of_one_limit_are_remembered_by_the_second_within_a_bound() -> None:
    first = None
    for tenths in range(0, 2000, 3):  # waits from 0.5 s to 200 s: every second, and some several times
        decision = Decision(False, 10, 0, 0.5 + tenths / 10, 0.0, "per_model", 3600.0, 1)
        response = raw_denial_response(decision)
        reference = _reference_denial(decision)
        assert response == (429, encode_headers(reference.headers), reference.body)
        first = first or response
    again = raw_denial_response(Decision(False, 10, 0, 0.5, 0.0, "per_model", 3600.0, 1))
    assert again == first and again.headers is not first.headers
    parts = _rule("per_model", "requests", 10, 3600.0).raw
    assert 0 < len(parts.denials) <= _MAX_REMEMBERED_DENIALS
