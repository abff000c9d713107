"""RateLimitConfig: construction, parsing of limit strings, and the errors for bad input."""

from __future__ import annotations

import math
import re

import pytest

from ratelimit_middleware import MultiTierRateLimiter, RateLimitConfig, RateLimiter, Window
from ratelimit_middleware.config import MAX_AMOUNT, MAX_WINDOW, MIN_WINDOW, check_amount


def test_config_holds_one_window() -> None:
    config = RateLimitConfig(100, 3600)
    assert config.max_requests == 100
    assert config.window_seconds == 3600.0
    assert config.windows == (Window(100, 3600.0),)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100/hour", [(100, 3600.0)]),
        ("10 per minute", [(10, 60.0)]),
        ("10 PER Minute", [(10, 60.0)]),
        ("5/second", [(5, 1.0)]),
        ("5/s", [(5, 1.0)]),
        ("7/day", [(7, 86400.0)]),
        ("100/5 minutes", [(100, 300.0)]),
        ("100 per 5 minutes", [(100, 300.0)]),
        ("3/10s", [(3, 10.0)]),
        ("10/hrs", [(10, 3600.0)]),
        ("10/2 hrs", [(10, 7200.0)]),
        ("10/mins", [(10, 60.0)]),
        ("10 per 5 mins", [(10, 300.0)]),
        ("10/30 secs", [(10, 30.0)]),
        ("10/HRS", [(10, 3600.0)]),
        ("3/2 days", [(3, 172800.0)]),
        ("3 per 2 hours", [(3, 7200.0)]),
        ("1000/month", [(1000, 30 * 86400.0)]),
        ("0/hour", [(0, 3600.0)]),
        ("10/minute;1000/day", [(10, 60.0), (1000, 86400.0)]),
        (" 10/minute , 1000/day ", [(10, 60.0), (1000, 86400.0)]),
        ("10/minute;", [(10, 60.0)]),
    ],
)
def test_parse_accepts_common_forms(text: str, expected: list[tuple[int, float]]) -> None:
    assert RateLimitConfig.parse(text).windows == tuple(Window(a, s) for a, s in expected)


@pytest.mark.parametrize(
    "text",
    [
        *("", ";", "hundred/hour", "10/fortnight", "10", "-5/hour", "10/0 minutes", "1.5/hour", "10//hour"),
        # An "s" ends a full unit name or an abbreviation of several letters: "ms" is no "m", nor "hs" an "h".
        *("10/ms", "10/hs", "10/ys", "10/ds", "10/ws", "10/ss"),
        # Windows and amounts out of range.
        *("10/0.0000001 seconds", "10/101 years", f"10/{'9' * 400} seconds", f"{2**53 + 1}/minute"),
    ],
)
def test_parse_rejects_bad_strings_naming_them(text: str) -> None:
    with pytest.raises(ValueError, match="limit") as raised:
        RateLimitConfig.parse(text)
    assert repr(text) in str(raised.value)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("1.5/minute", "the amount '1.5' must be a whole number >= 0"),
        ("-1/minute", "the amount '-1' must be a whole number >= 0"),
        ("ten per minute", "the amount 'ten' must be a whole number >= 0"),
        ("10/fortnight", "unknown unit 'fortnight'"),
        ("10/ms", "month, year (or plural; also sec, min, hr and s, m, h, d, w, y)"),
    ],
)
def test_parse_says_what_is_wrong_with_a_limit(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        RateLimitConfig.parse(text)


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(TypeError, match="str"):
        RateLimitConfig.parse(100)  # type: ignore[arg-type]


def test_multi_window_config_has_no_single_fields() -> None:
    config = RateLimitConfig.parse("10/minute;1000/day")
    with pytest.raises(AttributeError, match="2 windows"):
        _ = config.max_requests


@pytest.mark.parametrize(
    ("amount", "seconds", "error", "named"),
    [
        (-1, 60, ValueError, "-1"),
        (10, 0, ValueError, "0"),
        (10, -5, ValueError, "-5"),
        (10, math.nan, ValueError, "nan"),
        (10, math.inf, ValueError, "inf"),
        (1.5, 60, TypeError, "1.5"),
        (True, 60, TypeError, "True"),
        ("10", 60, TypeError, "'10'"),
        (10, "60", TypeError, "'60'"),
        (2**53 + 1, 60, ValueError, str(2**53 + 1)),  # Redis counts in doubles, exact up to 2**53
        (10**400, 60, ValueError, "max_requests"),
        (10, 1e-320, ValueError, "1e-320"),  # crashed the fixed window
        (10, 0.0009, ValueError, "0.0009"),
        (10, 1.5e308, ValueError, "1.5e[+]308"),  # made an infinite window
        (10, 10**400, ValueError, "window_seconds"),
    ],
)
def test_bad_config_names_the_value(amount: object, seconds: object, error: type, named: str) -> None:
    with pytest.raises(error, match=named):
        RateLimitConfig(amount, seconds)  # type: ignore[arg-type]
    with pytest.raises(error, match=named):
        RateLimiter(amount, seconds)  # type: ignore[arg-type]


def test_from_windows_needs_a_window() -> None:
    with pytest.raises(ValueError, match="at least one window"):
        RateLimitConfig.from_windows([])


@pytest.mark.parametrize("window", [10, (10, 60, 1), "10/minute", None])
def test_from_windows_names_an_item_that_is_no_pair(window: object) -> None:
    with pytest.raises(
        TypeError, match=rf"\(max_requests, window_seconds\) pair, got {re.escape(repr(window))}"
    ):
        RateLimitConfig.from_windows([window])  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("windows", "says"),
    [
        (None, "windows must be an iterable of (max_requests, window_seconds) pairs, got None"),
        ("10/minute", "got '10/minute': to parse a limit string, use RateLimitConfig.parse('10/minute')"),
        (
            b"10/minute",
            "windows must be an iterable of (max_requests, window_seconds) pairs, got b'10/minute'",
        ),
        ((10, 60), "windows must be pairs, got one pair (10, 60) unwrapped: pass [(10, 60)]"),
    ],
)
def test_from_windows_names_windows_that_are_no_list_of_pairs(windows: object, says: str) -> None:
    """None was "'NoneType' object is not iterable"; a string was iterated ("...pair, got '1'"), and so was
    one pair ("...pair, got 10")."""
    with pytest.raises(TypeError, match=re.escape(says) + "$"):
        RateLimitConfig.from_windows(windows)  # type: ignore[arg-type]


def test_the_bounds_themselves_are_accepted() -> None:
    assert RateLimitConfig(MAX_AMOUNT, MIN_WINDOW).windows == (Window(2**53, 0.001),)
    assert RateLimitConfig.parse("1/100 years").windows == (Window(1, MAX_WINDOW),)
    assert check_amount(2**53, "cost") == 2**53
    with pytest.raises(ValueError, match="cost"):
        check_amount(2**53 + 1, "cost")


def test_config_is_immutable_hashable_and_round_trips() -> None:
    config = RateLimitConfig.parse("10/minute;1000/day")
    with pytest.raises(AttributeError):
        config.windows = ()  # type: ignore[misc]
    assert config == RateLimitConfig.parse(str(config))
    assert eval(repr(config)) == config
    assert len({config, RateLimitConfig.parse("10 per minute; 1000 per day")}) == 1
    assert str(RateLimitConfig(90, 90)) == "90 per 90 seconds"


def test_parsed_configs_and_strings_are_accepted_as_tiers() -> None:
    limiter = MultiTierRateLimiter(per_user_model=RateLimitConfig.parse("2/minute"), per_model="100/hour")
    assert limiter.allow("a", "m") == (True, None)
    with pytest.raises(TypeError, match="per_model"):
        MultiTierRateLimiter(per_model=100)  # type: ignore[arg-type]
