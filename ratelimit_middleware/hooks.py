"""The functions an application hands an integration (key functions, estimators, handlers): plain callables.

They are called while a request is decided, without awaiting: an async one would return a coroutine, and
every request would fail (and pass unlimited under ``on_error="allow"``). So they are refused when given.
"""

from __future__ import annotations

import inspect

__all__ = ["check_hook"]


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
