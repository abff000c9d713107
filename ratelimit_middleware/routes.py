"""Which limit applies to a request path: exempt paths and per-path (and per-method) limits.

Rules match the path as the application routes it: decoded once by the server, less ASGI's ``root_path``,
nothing decoded further or resolved, since the frameworks do neither. Some apps route a path alike with or
without its trailing slash or doubled slashes (Flask with ``strict_slashes = False``, a catch-all route),
others redirect or answer 404: so a path is also matched with ``//`` collapsed and its trailing slash
dropped, and when the two spellings fall under different rules, both limits apply (the
middleware checks each: ``PathRules.match_all``). Either way no spelling can dodge a rule or borrow a looser
one.

A rule that exempts (``None``) also needs the fully normalised path (decoded until stable, ``//``, ``.``
and ``..`` resolved) to match: ``/docs/../v1/chat``, which a proxy before the application may resolve,
never gets ``/docs/*``'s exemption; and a request is exempt only if every spelling is. Write exempt paths
as clients call them (``"/healthz"`` and ``"/healthz/"`` if probes use both). The first rule that matches a
spelling applies to it.

Patterns: ``"/health"`` (that path only), ``"/v1/*"`` (``/v1`` and everything below it), optionally behind
one method: ``"POST /v1/chat/completions"``. Methods are compared in upper case, and a ``GET`` rule covers
``HEAD`` too, as the frameworks answer ``HEAD`` with the ``GET`` route. A pattern that could never match is
refused: several methods (``"GET|POST /x"``: a rule per method) or paths, or a query (``"/x?model=a"``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar
from urllib.parse import unquote

from .request import HTTP_TOKEN

__all__ = ["PathRules", "normalize_path"]

T = TypeVar("T")

_MAX_DECODES = 4


def _tidy(path: str) -> str:
    """``path`` with ``//`` collapsed and without its trailing slash."""
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
    __slots__ = ("methods", "normalized", "path", "prefix", "text", "tidy")

    def __init__(self, text: str) -> None:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"a path pattern must be a non-empty string like '/v1/*', got {text!r}")
        self.text = text
        *before, path = text.split()
        if len(before) > 1 or any(word.startswith("/") for word in before):
            raise ValueError(f"a path pattern is one path, optionally behind a method: {text!r}")
        method = before[0].upper() if before else ""
        if method and (not HTTP_TOKEN.fullmatch(method) or "|" in method):
            raise ValueError(
                f"a path pattern's method must be one HTTP method, such as 'POST /v1/chat' (a rule per "
                f"method): {text!r}"
            )
        self.methods = None if not method else frozenset((method, "HEAD") if method == "GET" else (method,))
        if not path.startswith("/") and path != "*":
            raise ValueError(f"a path pattern must start with '/': {text!r}")
        if "?" in path:
            raise ValueError(f"a path pattern matches the path, never the query: no '?' in {text!r}")
        self.prefix = path.endswith("/*") or path == "*"
        if self.prefix:
            path = path[:-2] if path.endswith("/*") else ""  # "*": everything
        if "*" in path:
            raise ValueError(f"'*' may only end a path pattern, as in '/v1/*': {text!r}")
        self.path = path or "/"
        self.tidy = _tidy(self.path)
        self.normalized = normalize_path(self.path)

    def covers(self, method: str) -> bool:
        return self.methods is None or method in self.methods

    def matches(self, path: str, form: str) -> bool:
        """Whether ``path`` matches the pattern's ``form`` (``path``, ``tidy`` or ``normalized``)."""
        own: str = getattr(self, form)
        if self.prefix:
            return own == "/" or path == own or path.startswith(own + "/")
        return path == own


class PathRules(Generic[T]):
    """Ordered ``pattern -> value`` rules (``None``: exempt); see the module for how a path matches."""

    __slots__ = ("_rules", "_untidy")

    def __init__(self, rules: Iterable[tuple[str, T | None]]) -> None:
        self._rules = [(_Pattern(pattern), value) for pattern, value in rules]
        self._untidy = any(pattern.tidy != pattern.path for pattern, _ in self._rules)

    def match_all(self, method: str, path: str) -> list[tuple[bool, T | None]]:
        """``match`` for each spelling of the path: as given, and tidied (when that can match otherwise)."""
        path = path or "/"
        tidy = _tidy(path) if "//" in path or (len(path) > 1 and path[-1] == "/") else path
        first = self.match(method, path)
        if tidy == path and not self._untidy:
            return [first]
        return [first, self.match(method, tidy, tidy=True)]

    def __bool__(self) -> bool:
        return bool(self._rules)

    def match(self, method: str, path: str, tidy: bool = False) -> tuple[bool, T | None]:
        """``(True, value)`` for the first rule that matches this method and spelling of a path (``tidy``: the
        tidied one, matched against the patterns tidied), else ``(False, None)``."""
        method = method.upper()
        path = path or "/"
        form = "tidy" if tidy else "path"
        normalized: str | None = None
        for pattern, value in self._rules:
            if not (pattern.covers(method) and pattern.matches(path, form)):
                continue
            if value is not None:
                return True, value
            if normalized is None:
                normalized = normalize_path(path)
            if pattern.matches(normalized, "normalized"):
                return True, value
        return False, None
