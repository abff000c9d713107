"""Which limit applies to a request path: exempt paths and per-path (and per-method) limits.

A path is matched in three forms, and so is each pattern:

- *as given*: the path the application routes (decoded once by the server), exactly;
- *seen*: the same with ``//`` collapsed and the trailing slash dropped;
- fully *normalised*: percent-decoded until stable, ``.`` and ``..`` resolved as well.

A rule that exempts (``None``) applies only if the path as given and the normalised path both match it: an
application that routes ``/v1/files/../../health`` to its ``/v1/files/<path>`` view, or ``/health/`` to a
catch-all proxy route, does not get ``/health``'s exemption. A limiting rule applies when the seen path
matches it; failing that, the first limiting rule that matches the normalised path, so ``/v1//chat/``,
``/v1/./chat`` and ``/v1/%2563hat`` are all limited as ``/v1/chat`` is. Other spellings can therefore only
be limited more, never exempted.

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


def _plain(path: str) -> bool:
    """Whether normalising ``path`` would change nothing beyond ``seen_path``."""
    return "%" not in path and "/." not in path


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

    def matches(self, method: str, path: str, normalized: bool) -> bool:
        """Whether the seen or given (``normalized=False``) or the normalised form of a path matches."""
        if self.methods is not None and method not in self.methods:
            return False
        own = self.normalized if normalized else self.seen
        if self.prefix:
            return own == "/" or path == own or path.startswith(own + "/")
        return path == own


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
        seen = seen_path(path)
        normalized = seen if _plain(path) else normalize_path(path)
        for pattern, value in self._rules:
            if value is not None:
                if pattern.matches(method, seen, False):
                    return True, value
            elif pattern.matches(method, path, False) and pattern.matches(method, normalized, True):
                return True, value
        if normalized != seen:
            for pattern, value in self._rules:
                if value is not None and pattern.matches(method, normalized, True):
                    return True, value
        return False, None
