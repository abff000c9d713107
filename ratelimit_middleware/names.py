"""Options that take one string or several (``exempt_paths``, ``exempt_methods``, ``shadow_plans``).

A bare ``str`` is one item, never its letters; anything else must be an iterable of ``str``, and an error
names the option and the value that is not (bytes, ``None``, a number).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["string_items"]


def string_items(value: object, option: str) -> tuple[str, ...]:
    """The strings of ``value`` (one string, or an iterable of them); else the ``TypeError`` naming
    ``option``."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (bytes, bytearray)) or not isinstance(value, Iterable):
        raise TypeError(f"{option} must be a str or a list of str, got {value!r}")
    items = tuple(value)
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{option} must hold strings, got {item!r} in {items!r}")
    return items
