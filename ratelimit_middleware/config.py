"""What a limit is: an amount per window, one or several windows at once, parsed from strings.

``RateLimitConfig(100, 3600)`` is one window; ``RateLimitConfig.parse("10/minute;1000/day")`` is two windows
that are checked together (a request must fit both). Every backend and algorithm reads limits from here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import NamedTuple

__all__ = [
    "MAX_AMOUNT",
    "MAX_WINDOW",
    "MIN_WINDOW",
    "UNITS",
    "LimitSpec",
    "Limits",
    "RateLimitConfig",
    "TierSpec",
    "Window",
    "as_config",
    "check_amount",
]

# Window lengths users know from other limiters. A month is 30 days and a year 365 days, as in `limits`.
_UNIT_SECONDS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
    "w": 604800.0,
    "week": 604800.0,
    "month": 2592000.0,
    "y": 31536000.0,
    "year": 31536000.0,
}
# Full unit names and the abbreviations of several letters also take a plural "s" ("5 minutes", "2 hrs");
# single letters do not: "10/ms" would read as per millisecond, and "hs" is no unit.
_FULL_NAMES = ("second", "minute", "hour", "day", "week", "month", "year")
_PLURALS = {f"{name}s": name for name in (*_FULL_NAMES, "sec", "min", "hr")}
_ITEM = re.compile(
    r"^\s*(?P<amount>\d+)\s*(?:/|\s+per\s+)\s*(?P<count>\d+(?:\.\d+)?)?\s*(?P<unit>[a-z]+)\s*$",
    re.IGNORECASE,
)
_LOOSE_ITEM = re.compile(r"^\s*(?P<amount>[^\s/]+)\s*(?:/|\s+per\s+)", re.IGNORECASE)


def _what_is_wrong(part: str, match: re.Match[str] | None) -> str:
    """Why ``part`` is not a limit: its amount, its unit, or its shape."""
    shape = (
        f"expected '<amount>/<unit>' or '<amount> per <n> <unit>' with unit one of {', '.join(_FULL_NAMES)} "
        "(or plural; also sec, min, hr and s, m, h, d, w, y)"
    )
    if match is not None:
        return f"unknown unit {match['unit']!r}: {shape}"
    loose = _LOOSE_ITEM.match(part)
    if loose is not None and not loose["amount"].isdigit():
        return f"the amount {loose['amount']!r} must be a whole number >= 0"
    return shape


MAX_AMOUNT = 2**53
"""The largest limit, cost or token count: Redis scripts count in doubles, exact only up to 2**53 (as does
the sliding log in memory). GCRA, which counts in float time, takes smaller limits (``GCRA_MAX_LIMIT``)."""
MIN_WINDOW = 0.001
"""The shortest window in seconds: one millisecond, the resolution of Redis TTLs."""
MAX_WINDOW = 100 * 31536000.0
"""The longest window in seconds: 100 years (a longer one overflows the algorithms' time arithmetic)."""
_NAMES = ((86400.0, "day"), (3600.0, "hour"), (60.0, "minute"), (1.0, "second"))


def check_amount(value: object, what: str) -> int:
    """``value`` if it is an int from 0 to ``MAX_AMOUNT`` (a limit, a cost, a token count); else the error
    naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {value!r}")
    if not 0 <= value <= MAX_AMOUNT:
        raise ValueError(f"{what} must be >= 0 and <= 2**53, got {value!r}")
    return value


def _check_seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"window_seconds must be a number of seconds, got {value!r}")
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond any float
        seconds = math.inf
    if not MIN_WINDOW <= seconds <= MAX_WINDOW:
        raise ValueError(
            f"window_seconds must be from {MIN_WINDOW:g} (1 ms) to {MAX_WINDOW:g} (100 years), got {value!r}"
        )
    return seconds


def describe_seconds(seconds: float) -> str:
    """``3600.0`` -> ``"1 hour"``, ``90.0`` -> ``"90 seconds"``: for messages and ``str()``."""
    for size, name in _NAMES:
        count = seconds / size
        if count >= 1 and count == int(count):
            n = int(count)
            return f"{n} {name}" if n == 1 else f"{n} {name}s"
    return f"{seconds:g} seconds"


class Window(NamedTuple):
    """One limit: at most ``max_requests`` units in any ``seconds`` (as the algorithm defines "any")."""

    max_requests: int
    seconds: float

    def __str__(self) -> str:
        return f"{self.max_requests} per {describe_seconds(self.seconds)}"


def _window(item: object) -> Window:
    """A ``(max_requests, window_seconds)`` pair of ``from_windows``, checked."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise TypeError(f"a window must be a (max_requests, window_seconds) pair, got {item!r}")
    return Window(check_amount(item[0], "max_requests"), _check_seconds(item[1]))


class RateLimitConfig:
    """One or more windows that a request must fit all at once.

    ``RateLimitConfig(100, 3600)`` allows 100 units per hour. ``parse`` reads the strings of other limiters:
    ``"100/hour"``, ``"10 per minute"``, ``"100/5 minutes"``, and several windows joined by ``;`` or ``,``.
    """

    __slots__ = ("windows",)
    windows: tuple[Window, ...]

    def __init__(self, max_requests: int, window_seconds: float) -> None:
        object.__setattr__(self, "windows", (_window((max_requests, window_seconds)),))

    @classmethod
    def from_windows(cls, windows: Iterable[tuple[int, float]]) -> RateLimitConfig:
        """A config of several ``(max_requests, window_seconds)`` pairs, checked together."""
        if isinstance(windows, (str, bytes)) or not isinstance(windows, Iterable):
            hint = (
                f": to parse a limit string, use RateLimitConfig.parse({windows!r})"
                if isinstance(windows, str)
                else ""
            )
            raise TypeError(
                f"windows must be an iterable of (max_requests, window_seconds) pairs, got {windows!r}{hint}"
            )
        items = tuple(windows)
        if len(items) == 2 and not any(isinstance(item, (tuple, list)) for item in items):
            raise TypeError(f"windows must be pairs, got one pair {windows!r} unwrapped: pass [{windows!r}]")
        built = tuple(_window(item) for item in items)
        if not built:
            raise ValueError("a RateLimitConfig needs at least one window")
        config = cls.__new__(cls)
        object.__setattr__(config, "windows", built)
        return config

    @classmethod
    def parse(cls, text: str) -> RateLimitConfig:
        """Parse ``"10/minute;1000/day"``-style text; raise ``ValueError`` naming the bad part."""
        if not isinstance(text, str):
            raise TypeError(f"a limit string must be a str, got {text!r}")
        parts = [part for part in re.split(r"[;,]", text) if part.strip()]
        if not parts:
            raise ValueError(f"no limit in {text!r}: expected e.g. '100/hour' or '10 per minute'")
        windows = []
        for part in parts:
            match = _ITEM.match(part)
            unit = match["unit"].lower() if match else ""
            unit = _PLURALS.get(unit, unit)
            if match is None or unit not in _UNIT_SECONDS:
                raise ValueError(f"bad limit {part.strip()!r} in {text!r}: {_what_is_wrong(part, match)}")
            count = float(match["count"]) if match["count"] else 1.0
            try:
                windows.append(_window((int(match["amount"]), count * _UNIT_SECONDS[unit])))
            except ValueError as error:
                raise ValueError(f"bad limit {part.strip()!r} in {text!r}: {error}") from None
        return cls.from_windows(windows)

    def _single(self) -> Window:
        if len(self.windows) != 1:
            raise AttributeError(
                f"{self} has {len(self.windows)} windows; read .windows instead of a single field"
            )
        return self.windows[0]

    @property
    def max_requests(self) -> int:
        """The amount of a single-window config."""
        return self._single().max_requests

    @property
    def window_seconds(self) -> float:
        """The window length of a single-window config, in seconds."""
        return self._single().seconds

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("RateLimitConfig is immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RateLimitConfig) and other.windows == self.windows

    def __hash__(self) -> int:
        return hash(self.windows)

    def __str__(self) -> str:
        return "; ".join(str(window) for window in self.windows)

    def __repr__(self) -> str:
        return f"RateLimitConfig.parse({str(self)!r})"


LimitSpec = RateLimitConfig | str
"""What every limiter accepts as a limit: a config, or a string for ``RateLimitConfig.parse``."""

UNITS = ("requests", "tokens", "input_tokens", "output_tokens", "concurrent")
"""What a limit counts: requests; tokens (input plus output), or input or output tokens only; requests in
flight."""


class Limits:
    """Everything one tier enforces at once: requests, tokens and requests in flight.

    ``Limits(requests="60/minute", tokens="100000/minute;2000000/day", max_concurrent=4)``. ``tokens`` counts
    input plus output tokens; ``input_tokens`` and ``output_tokens`` count one side only. Token limits are
    charged by ``reserve()`` (an estimate, settled later with the real usage); ``max_concurrent`` holds a slot
    from ``reserve()`` until the reservation is settled or cancelled.
    """

    __slots__ = ("input_tokens", "max_concurrent", "output_tokens", "requests", "tokens")

    def __init__(
        self,
        requests: LimitSpec | None = None,
        *,
        tokens: LimitSpec | None = None,
        input_tokens: LimitSpec | None = None,
        output_tokens: LimitSpec | None = None,
        max_concurrent: int | None = None,
    ) -> None:
        self.requests = None if requests is None else as_config(requests, "requests")
        self.tokens = None if tokens is None else as_config(tokens, "tokens")
        self.input_tokens = None if input_tokens is None else as_config(input_tokens, "input_tokens")
        self.output_tokens = None if output_tokens is None else as_config(output_tokens, "output_tokens")
        self.max_concurrent = (
            None if max_concurrent is None else check_amount(max_concurrent, "max_concurrent")
        )
        if all(getattr(self, name) is None for name in self.__slots__):
            raise ValueError(
                "Limits needs at least one of requests, tokens, input_tokens, output_tokens, max_concurrent"
            )

    def configs(self) -> list[tuple[str, RateLimitConfig]]:
        """``(unit, config)`` for each windowed limit set, in the order of ``UNITS``."""
        return [(unit, config) for unit in UNITS[:4] if (config := getattr(self, unit)) is not None]

    def __repr__(self) -> str:
        fields = [
            f"{name}={getattr(self, name)!r}" for name in self.__slots__ if getattr(self, name) is not None
        ]
        return f"Limits({', '.join(fields)})"


TierSpec = Limits | RateLimitConfig | str
"""What a tier accepts: a request limit (config or string), or ``Limits`` for tokens and concurrency too."""


def as_config(spec: LimitSpec, what: str) -> RateLimitConfig:
    """Normalise a config or limit string; ``what`` names the argument in errors."""
    if isinstance(spec, RateLimitConfig):
        return spec
    if isinstance(spec, str):
        return RateLimitConfig.parse(spec)
    raise TypeError(f"{what} must be a RateLimitConfig or a limit string like '100/hour', got {spec!r}")
