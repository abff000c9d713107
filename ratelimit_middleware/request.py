"""A small framework-neutral view of an HTTP request, for key functions.

The ASGI and WSGI middlewares, and the per-route decorators, all build a ``RequestView``; one key function
therefore works everywhere. The body is not read unless a key function asks for it: ``json()`` on a view whose
body is not loaded yet raises ``BodyNotLoaded``, which the caller catches to read the body (asynchronously in
ASGI) and run the key functions again. Bodies are read only up to a size cap; over the cap, or not JSON,
``json()`` returns ``None``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from urllib.parse import parse_qsl

__all__ = ["BodyNotLoaded", "PairHeaders", "RequestView", "ServerHeaders"]

HTTP_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
"""An HTTP token (RFC 9110): what a header name or a method is made of."""

_UNSET = object()
_UNREAD = object()  # the JSON of a body over the size cap, or cut short: never read, None to key functions


def _joined(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Lower-cased names; repeated headers joined with ``", "`` as HTTP allows."""
    headers: dict[str, str] = {}
    for name, value in pairs:
        name = name.lower()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


class ServerHeaders(Mapping[str, str]):
    """A server's request headers, read in place: lower-cased names, repeated headers joined with ``", "``.

    Subclasses give every pair (``pairs``) and a ``get`` that finds one header without decoding the others,
    which is all that key functions usually ask; the whole mapping is built only when iterated.
    """

    __slots__ = ("_all",)
    read_in_place = True

    def __init__(self) -> None:
        self._all: dict[str, str] | None = None

    def pairs(self) -> Iterable[tuple[str, str]]:
        """Every header's name and value, decoded, in the server's order."""
        raise NotImplementedError

    def first(self, name: str) -> str | None:
        """Header ``name`` (lower-case); of a header sent several times, its first value, as Starlette reads
        it and so authenticates it (``get`` joins them all). Servers that join repeated headers before the
        app sees them (WSGI) give that joined value, which is also what their app reads."""
        return self.get(name)

    def joined(self) -> dict[str, str]:
        """The whole mapping, built once."""
        if self._all is None:
            self._all = _joined(self.pairs())
        return self._all

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self.joined())

    def __len__(self) -> int:
        return len(self.joined())


class PairHeaders(ServerHeaders):
    """Headers given as name and value pairs (gRPC metadata, tests, a framework's raw list)."""

    __slots__ = ("_pairs",)

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        super().__init__()
        self._pairs = list(pairs)

    def pairs(self) -> Iterable[tuple[str, str]]:
        return self._pairs

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return self.joined().get(name.lower(), default)

    def first(self, name: str) -> str | None:
        return next((value for key, value in self._pairs if key.lower() == name), None)


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
        "client",
        "method",
        "path",
        "query_string",
    )

    def __init__(
        self,
        method: str,
        path: str,
        raw_headers: Iterable[tuple[str, str]] | ServerHeaders,
        query_string: str = "",
        client: str | None = None,
    ) -> None:
        """``raw_headers``: name and value pairs, or a server's headers read in place (``ServerHeaders``)."""
        self.method = method.upper()
        self.path = path
        self.query_string = query_string
        self.client = client
        # A ServerHeaders, told by an attribute: an isinstance() of the ABC, or a cast() to tell mypy, would
        # be a call on every request.
        if getattr(raw_headers, "read_in_place", False) is True:
            self._headers: ServerHeaders = raw_headers  # type: ignore[assignment]
        else:
            self._headers = PairHeaders(raw_headers)  # type: ignore[arg-type]
        self._query: dict[str, str] | None = None
        self._body: bytes | None = None  # None: not loaded; b"" after loading an empty or over-cap body
        self._json: object = _UNSET

    @property
    def headers(self) -> Mapping[str, str]:
        """Lower-cased header names; repeated headers joined with ``", "`` as HTTP allows."""
        return self._headers

    def header(self, name: str) -> str | None:
        """One header's value, stripped; ``None`` when absent or blank. Of a header sent several times, the
        first value (``ServerHeaders.first``): what the app authenticates, so that a second ``Authorization``
        or ``X-Model`` line cannot make a new key of each request."""
        value = self._headers.first(name.lower())
        if value is None:
            return None
        value = value.strip()
        return value or None

    @property
    def query(self) -> Mapping[str, str]:
        """Query parameters, each name's value; a name sent several times with different values is left out.

        Frameworks disagree on which of them the app reads (Starlette and Django the last, werkzeug the
        first), so keying on either would let a client rotate the other one and get a new key per request.
        """
        if self._query is None:
            query: dict[str, str] = {}
            ambiguous: set[str] = set()
            for name, value in parse_qsl(self.query_string, keep_blank_values=True):
                if query.setdefault(name, value) != value:
                    ambiguous.add(name)
            for name in ambiguous:
                del query[name]
            self._query = query
        return self._query

    @property
    def body_loaded(self) -> bool:
        return self._body is not None

    def load_body(self, body: bytes | None) -> None:
        """Give the view the body that was read (``None`` when it was over the size cap or cut short)."""
        self._body = body if body is not None else b""
        self._json = _UNSET if body is not None else _UNREAD

    @property
    def body_empty(self) -> bool:
        """Whether the body was read whole and had no bytes at all (a ``GET``); not when over the cap."""
        return self._body == b"" and self._json is not _UNREAD

    def json(self) -> object:
        """The parsed JSON body; ``None`` when empty, over the cap or not JSON."""
        if self._body is None:
            raise BodyNotLoaded
        if self._json is _UNSET:
            try:
                self._json = json.loads(self._body) if self._body else None
            except (ValueError, UnicodeDecodeError, RecursionError):
                self._json = None
        return None if self._json is _UNREAD else self._json
