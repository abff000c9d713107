"""The functions an application hands an integration (key functions, estimators, handlers, the app) or a
storage (clocks): checked when given, since a mistake there would otherwise surface on every request.

Hooks are called while a request is decided, without awaiting: an async one would return a coroutine, and
every request would fail (and pass unlimited under ``on_error="allow"``). A function that cannot take the
arguments it is called with would fail alike. So both are refused when given.
"""

from __future__ import annotations

import inspect
import math
import numbers
import time
from collections.abc import Callable
from typing import cast

__all__ = ["check_callable", "check_hook", "checked_clock"]


def check_callable(function: object, name: str, parameters: tuple[str, ...]) -> None:
    """Fail unless ``function`` is callable with one positional argument per name of ``parameters`` (which
    the error shows); ``name`` names the option. A callable without a signature (a builtin) is taken as it
    is."""
    if not callable(function):
        raise TypeError(f"{name} must be callable, got {function!r}")
    try:
        signature = inspect.signature(function, follow_wrapped=False)  # a decorator's wrapper is called
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*parameters)
    except TypeError as error:
        raise TypeError(
            f"{name} is called as {name}({', '.join(parameters)}), which {function!r} cannot take: {error}"
        ) from None


def check_hook(function: object, name: str, parameters: tuple[str, ...]) -> None:
    """Fail unless ``function`` is ``None`` or a plain (not async) callable taking ``parameters`` (see
    ``check_callable``); ``name`` names the option."""
    if function is None:
        return
    call = getattr(function, "__call__", None)  # noqa: B004 - an object with an async __call__
    if inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(call):
        raise TypeError(
            f"{name} must be a plain function, not async ({function!r}): it is called while the request is "
            "decided, without awaiting; do async lookups in the app or cache them"
        )
    check_callable(function, name, parameters)


def checked_clock(clock: object) -> Callable[[], float]:
    """``clock`` (a plain callable of no arguments), its readings checked to be finite numbers of seconds.

    An injected clock is checked at each reading: one infinite reading would pin a storage's never-going-back
    time at infinity, and NaN compares false with every time, so either would admit without limit.
    """
    if clock is time.monotonic:
        return time.monotonic
    check_hook(clock, "clock", ())
    read = cast("Callable[[], object]", clock)

    def checked() -> float:
        reading = read()
        now = reading if type(reading) is float else _seconds(reading)
        if not math.isfinite(now):
            raise ValueError(
                f"clock {read!r} read {reading!r}: a clock must return a finite number of seconds"
            )
        return now

    return checked


def _seconds(reading: object) -> float:
    """A clock's reading other than a float: an int, or another real number (a Fraction, numpy's), as a
    float; anything else (a bool, a string, None) as NaN, which no clock may read."""
    if isinstance(reading, bool) or not isinstance(reading, numbers.Real):
        return math.nan
    return float(reading)
