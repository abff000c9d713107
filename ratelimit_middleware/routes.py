"""Which limit applies to a request path: exempt paths and per-path (and per-method) limits.

Rules match the path exactly as the application routes it: decoded once by the server, less ASGI's
``root_path``, nothing collapsed, decoded further or resolved, since the frameworks do none of that either.
Another spelling therefore reaches no route of a rule's, or only a redirect or a 404: ``/v1/chat/`` and
``//v1/chat`` are redirected by Starlette and werkzeug, ``/v1/%2563hat`` and ``/files/%2e%2e/public/x``
reach no ``/v1/chat`` or ``/public/*`` route. None of them can borrow a rule meant for another route, a
looser one or an exemption, as a catch-all route (``/{path:path}``) would serve them. A rule that exempts
(``None``) also needs the fully normalised path (decoded until stable, ``//``, ``.`` and ``..`` resolved)
to match: ``/docs/../v1/chat``, which a proxy before the application may resolve, never gets ``/docs/*``'s
exemption. The first rule that matches applies. Write exempt paths as clients call them (both
``"/healthz"`` and ``"/healthz/"`` if both are probed).

Patterns: ``"/health"`` (that path only), ``"/v1/*"`` (``/v1`` and everything below it), optionally behind a
method: ``"POST /v1/chat/completions"``. Methods are compared in upper case, and a ``GET`` rule covers
``HEAD`` too, as the frameworks answer ``HEAD`` with the ``GET`` route.
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
    __slots__ = ("methods", "normalized", "path", "prefix", "text")

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
        path = path[:-2] if path.endswith("/*") else path.rstrip("*")
        self.path = path or "/"
        self.normalized = normalize_path(self.path)

    def covers(self, method: str) -> bool:
        return self.methods is None or method in self.methods

    @staticmethod
    def _matches(own: str, path: str, prefix: bool) -> bool:
        if prefix:
            return own == "/" or path == own or path.startswith(own + "/")
        return path == own

    def matches(self, path: str) -> bool:
        """Whether a path as routed matches."""
        return self._matches(self.path, path, self.prefix)

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
        path = path or "/"
        normalized: str | None = None
        for pattern, value in self._rules:
            if not (pattern.covers(method) and pattern.matches(path)):
                continue
            if value is not None:
                return True, value
            if normalized is None:
                normalized = normalize_path(path)
            if pattern.matches_normalized(normalized):
                return True, value
        return False, None
