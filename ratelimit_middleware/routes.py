"""Which limit applies to a request path: exempt paths and per-path (and per-method) limits.

Paths are normalised before matching, and patterns are normalised the same way, so a limit cannot be dodged
with ``//``, a trailing slash, dot segments or percent-encoding: ``/v1//chat/``, ``/v1/./chat`` and
``/v1/%63hat`` all match ``/v1/chat``. Percent-decoding repeats until stable; decoding more than the
application does can only make a path match a limit, never escape one.

Patterns: ``"/health"`` (that path only), ``"/v1/*"`` (``/v1`` and everything below it), optionally behind a
method: ``"POST /v1/chat/completions"``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar
from urllib.parse import unquote

__all__ = ["PathRules", "normalize_path"]

T = TypeVar("T")

_MAX_DECODES = 4


def normalize_path(path: str) -> str:
    """Decode, collapse slashes, resolve ``.`` and ``..``, drop the trailing slash."""
    for _ in range(_MAX_DECODES):
        if "%" not in path:
            break
        decoded = unquote(path, errors="surrogateescape")
        if decoded == path:
            break
        path = decoded
    segments: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    return "/" + "/".join(segments)


class _Pattern:
    __slots__ = ("method", "path", "prefix", "text")

    def __init__(self, text: str) -> None:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"a path pattern must be a non-empty string like '/v1/*', got {text!r}")
        self.text = text
        method, _, path = text.strip().rpartition(" ")
        self.method = method.strip().upper() or None
        self.prefix = path.endswith("/*") or path == "*"
        if not path.startswith("/") and path != "*":
            raise ValueError(f"a path pattern must start with '/': {text!r}")
        self.path = normalize_path(path[:-1] if self.prefix else path)

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method != method:
            return False
        if self.prefix:
            return self.path == "/" or path == self.path or path.startswith(self.path + "/")
        return path == self.path


class PathRules(Generic[T]):
    """Ordered ``pattern -> value`` rules; the first match wins."""

    __slots__ = ("_rules",)

    def __init__(self, rules: Iterable[tuple[str, T]]) -> None:
        self._rules = [(_Pattern(pattern), value) for pattern, value in rules]

    def __bool__(self) -> bool:
        return bool(self._rules)

    def match(self, method: str, normalized_path: str) -> tuple[bool, T | None]:
        """``(True, value)`` for the first matching rule, else ``(False, None)``."""
        for pattern, value in self._rules:
            if pattern.matches(method, normalized_path):
                return True, value
        return False, None
