"""A small framework-neutral view of an HTTP request, for key functions.

The ASGI and WSGI middlewares, and the per-route decorators, all build a ``RequestView``; one key function
therefore works everywhere. The body is not read unless a key function asks for it: ``json()`` on a view whose
body is not loaded yet raises ``BodyNotLoaded``, which the caller catches to read the body (asynchronously in
ASGI) and run the key functions again. Bodies are read only up to a size cap; over the cap, or not JSON,
``json()`` returns ``None``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qsl

__all__ = ["BodyNotLoaded", "RequestView"]

_UNSET = object()


class BodyNotLoaded(BaseException):
    """Raised by ``RequestView.json`` when the body has not been read yet.

    A ``BaseException`` so that a key function's own ``except Exception`` cannot swallow it.
    """


class RequestView:
    """Method, path, headers, query, client address and (on demand) the JSON body of one request."""

    __slots__ = (
        "_body",
        "_headers",
        "_json",
        "_query",
        "_raw_headers",
        "client",
        "method",
        "path",
        "query_string",
    )

    def __init__(
        self,
        method: str,
        path: str,
        raw_headers: Iterable[tuple[str, str]],
        query_string: str = "",
        client: str | None = None,
    ) -> None:
        self.method = method.upper()
        self.path = path
        self.query_string = query_string
        self.client = client
        self._raw_headers = raw_headers
        self._headers: dict[str, str] | None = None
        self._query: dict[str, str] | None = None
        self._body: bytes | None = None  # None: not loaded; b"" after loading an empty or over-cap body
        self._json: object = _UNSET

    @property
    def headers(self) -> Mapping[str, str]:
        """Lower-cased header names; repeated headers joined with ``", "`` as HTTP allows."""
        if self._headers is None:
            headers: dict[str, str] = {}
            for name, value in self._raw_headers:
                name = name.lower()
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
            self._headers = headers
        return self._headers

    def header(self, name: str) -> str | None:
        """One header's value, stripped; ``None`` when absent or blank."""
        value = self.headers.get(name.lower())
        if value is None:
            return None
        value = value.strip()
        return value or None

    @property
    def query(self) -> Mapping[str, str]:
        """Query parameters (the first value of each name)."""
        if self._query is None:
            query: dict[str, str] = {}
            for name, value in parse_qsl(self.query_string, keep_blank_values=True):
                query.setdefault(name, value)
            self._query = query
        return self._query

    @property
    def body_loaded(self) -> bool:
        return self._body is not None

    def load_body(self, body: bytes | None) -> None:
        """Give the view the body that was read (``None`` when it was over the size cap)."""
        self._body = body if body is not None else b""
        self._json = _UNSET if body is not None else None

    def json(self) -> object:
        """The parsed JSON body; ``None`` when empty, over the cap or not JSON."""
        if self._body is None:
            raise BodyNotLoaded
        if self._json is _UNSET:
            try:
                self._json = json.loads(self._body) if self._body else None
            except (ValueError, UnicodeDecodeError, RecursionError):
                self._json = None
        return self._json
