"""The functions an application hands an integration (key functions, estimators, handlers) or a storage
(clocks): plain callables.

They are called while a request is decided, without awaiting: an async one would return a coroutine, and
every request would fail (and pass unlimited under ``on_error="allow"``). So they are refused when given.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable

__all__ = ["check_hook", "checked_clock"]


def check_hook(function: object, name: str) -> None:
    """Fail unless ``function`` is ``None`` or a plain (not async) callable; ``name`` names the option."""
    if function is None:
        return
    if not callable(function):
        raise TypeError(f"{name} must be callable, got {function!r}")
    call = getattr(function, "__call__", None)  # noqa: B004 - an object with an async __call__
    if inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(call):
        raise TypeError(
            f"{name} must be a plain function, not async ({function!r}): it is called while the request is "
            "decided, without awaiting; do async lookups in the app or cache them"
        )


def checked_clock(clock: object) -> Callable[[], float]:
    """``clock`` (a plain callable of no arguments), its readings checked to be finite numbers of seconds.

    An injected clock is checked at each reading: one infinite reading would pin a storage's never-going-back
    time at infinity, and NaN compares false with every time, so either would admit without limit.
    """
    if clock is time.monotonic:
        return time.monotonic
    check_hook(clock, "clock")
    try:
        inspect.signature(clock).bind()  # type: ignore[arg-type] # callable: checked above
    except TypeError:
        raise TypeError(f"clock must take no arguments, got {clock!r}") from None
    except ValueError:  # no signature to read (some builtins): its readings are still checked
        pass
    read = clock

    def checked() -> float:
        now = read()  # type: ignore[operator] # callable: checked above
        if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
            raise ValueError(f"clock {read!r} read {now!r}: a clock must return a finite number of seconds")
        return now

    return checked
