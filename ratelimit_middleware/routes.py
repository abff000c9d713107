"""Which limit applies to a request path: exempt paths and per-path (and per-method) limits.

Rules match the path the application routes (decoded once by the server, less ASGI's ``root_path``), with
``//`` collapsed and without its trailing slash, as are the patterns: ``/v1//chat/`` matches ``/v1/chat``.
Nothing is decoded further nor resolved, since the frameworks do not do it either: ``/v1/%2563hat`` or
``/files/%2e%2e/public/x`` reaches no ``/v1/chat`` or ``/public/*`` route, so it gets no rule of theirs, and
cannot borrow a looser one. A rule that exempts (``None``) also needs the fully normalised path (decoded
until stable, ``.`` and ``..`` resolved) to match: ``/docs/../v1/chat``, which an application or a proxy
before it may resolve, never gets ``/docs/*``'s exemption. The first rule that matches applies.

Patterns: ``"/health"`` (that path only), ``"/v1/*"`` (``/v1`` and everything below it), optionally behind a
method: ``"POST /v1/chat/completions"``. Methods are compared in upper case, and a ``GET`` rule covers
``HEAD`` too, as the frameworks answer ``HEAD`` with the ``GET`` route.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar
from urllib.parse import unquote

__all__ = ["PathRules", "normalize_path", "seen_path"]

T = TypeVar("T")

_MAX_DECODES = 4


def seen_path(path: str) -> str:
    """The path as routed, ``//`` collapsed and without its trailing slash: nothing decoded or resolved."""
    if "//" not in path and (len(path) <= 1 or path[-1] != "/"):
        return path or "/"
    return "/" + "/".join(segment for segment in path.split("/") if segment)


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
    __slots__ = ("methods", "normalized", "prefix", "seen", "text")

    def __init__(self, text: str) -> None:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"a path pattern must be a non-empty string like '/v1/*', got {text!r}")
        self.text = text
        method, _, path = text.strip().rpartition(" ")
        method = method.strip().upper()
        self.methods = None if not method else frozenset((method, "HEAD") if method == "GET" else (method,))
        self.prefix = path.endswith("/*") or path == "*"
        if not path.startswith("/") and path != "*":
            raise ValueError(f"a path pattern must start with '/': {text!r}")
        path = path[:-1] if self.prefix else path
        self.seen = seen_path(path)
        self.normalized = normalize_path(path)

    def covers(self, method: str) -> bool:
        return self.methods is None or method in self.methods

    @staticmethod
    def _matches(own: str, path: str, prefix: bool) -> bool:
        if prefix:
            return own == "/" or path == own or path.startswith(own + "/")
        return path == own

    def matches_seen(self, seen: str) -> bool:
        """Whether a path as routed (``seen_path``) matches."""
        return self._matches(self.seen, seen, self.prefix)

    def matches_normalized(self, normalized: str) -> bool:
        """Whether a fully normalised path (``normalize_path``) matches."""
        return self._matches(self.normalized, normalized, self.prefix)


class PathRules(Generic[T]):
    """Ordered ``pattern -> value`` rules (``None``: exempt); see the module for how a path matches."""

    __slots__ = ("_rules",)

    def __init__(self, rules: Iterable[tuple[str, T | None]]) -> None:
        self._rules = [(_Pattern(pattern), value) for pattern, value in rules]

    def __bool__(self) -> bool:
        return bool(self._rules)

    def match(self, method: str, path: str) -> tuple[bool, T | None]:
        """``(True, value)`` for the rule that applies to this method and path, else ``(False, None)``."""
        method = method.upper()
        seen = seen_path(path or "/")
        normalized: str | None = None
        for pattern, value in self._rules:
            if not (pattern.covers(method) and pattern.matches_seen(seen)):
                continue
            if value is not None:
                return True, value
            if normalized is None:
                normalized = normalize_path(path)
            if pattern.matches_normalized(normalized):
                return True, value
        return False, None
