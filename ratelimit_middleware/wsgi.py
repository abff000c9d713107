"""``RateLimitWSGI``: a WSGI middleware, in the style of werkzeug's ``ProxyFix``.

``app.wsgi_app = RateLimitWSGI(app.wsgi_app)`` in Flask, or around any WSGI app. With no options it limits
each user on each model to 100 requests per hour, in memory, with the default key functions. The body is read
only when a key function asks for it, up to ``max_body_size``, and replayed to the app byte for byte by
replacing ``wsgi.input``. Allowed responses are passed through unbuffered, with headers added (and without the
usage chunk that ``stream_usage`` asked for, not the client).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from .checker import Checker, LimiterSpec
from .contract import HTTPResponse
from .decision import Decision
from .gate import Gate, GateOptions
from .hooks import check_callable
from .renewal import LeaseKeeper
from .request import BodyNotLoaded, RequestView, ServerHeaders
from .reservation import Reservation
from .tokens import Meter
from .usage_chunk import UsageChunkFilter

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["RateLimitWSGI"]

Environ = dict[str, Any]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

_UNPREFIXED = frozenset(("CONTENT_TYPE", "CONTENT_LENGTH"))


class EnvironHeaders(ServerHeaders):
    """The headers of a WSGI environ, read in place: ``HTTP_*`` variables, ``CONTENT_TYPE`` and
    ``CONTENT_LENGTH``.

    ``get`` reads the one variable a name maps to, as werkzeug's ``EnvironHeaders`` does: exact for an
    environ in CGI form (upper-case names, repeated headers already joined by the server, as PEP 3333 asks).
    """

    __slots__ = ("_environ",)

    def __init__(self, environ: Environ) -> None:
        self._all = None  # ServerHeaders.__init__, without the call: one per request
        self._environ = environ

    def pairs(self) -> Iterable[tuple[str, str]]:
        for name, value in self._environ.items():
            if name.startswith("HTTP_"):
                yield name[5:].replace("_", "-"), value
            elif name in _UNPREFIXED:
                yield name.replace("_", "-"), value

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        key = _VARIABLES.get(name)
        if key is None:
            key = _variable(name)
            if key is None:  # a name outside ASCII: compare it with every header
                return self.joined().get(name.lower(), default)
        value = self._environ.get(key)
        return default if value is None else value

    first = get  # the server joined repeated headers, as the app reads them (``ServerHeaders.first``)


_VARIABLES: dict[str, str] = {}
_MAX_VARIABLES = 256  # key functions ask for a handful of names


def _variable(name: str) -> str | None:
    """The environ variable of header ``name`` (``""``: none can hold it); ``None`` for non-ASCII names."""
    if not name.isascii():
        return None
    if "_" in name:  # no variable maps to it: "_" in a variable's name stands for "-"
        key = ""
    else:
        key = name.upper().replace("-", "_")
        key = key if key in _UNPREFIXED else "HTTP_" + key
    if len(_VARIABLES) < _MAX_VARIABLES:
        _VARIABLES[name] = key
    return key


def path_of(environ: Environ) -> str:
    """``PATH_INFO`` as text, as werkzeug routes it: WSGI gives its bytes as latin-1, they are UTF-8."""
    path: str = environ.get("PATH_INFO", "") or "/"
    if path.isascii():
        return path
    return path.encode("latin-1", "replace").decode("utf-8", "replace")


def request_view(environ: Environ, path: str | None = None) -> RequestView:
    """The framework-neutral view of a WSGI environ (headers read in place); ``path``: its ``path_of``."""
    return RequestView(
        environ.get("REQUEST_METHOD", "GET"),
        path_of(environ) if path is None else path,
        EnvironHeaders(environ),
        environ.get("QUERY_STRING", ""),
        environ.get("REMOTE_ADDR") or None,
    )


class _ReplayInput:
    """``wsgi.input`` that yields the bytes already read, then the rest of the original stream.

    It never reads past ``CONTENT_LENGTH`` from the original (``remaining``; ``None`` when the server marks
    the input as terminated), which could block on a raw socket.
    """

    def __init__(self, head: bytes, rest: IO[bytes], remaining: int | None) -> None:
        self._head = io.BytesIO(head)
        self._rest = rest
        self._remaining = remaining

    def _read_rest(self, size: int) -> bytes:
        if self._remaining is not None:
            size = self._remaining if size < 0 else min(size, self._remaining)
            if size == 0:
                return b""
        data = self._rest.read(size)
        if self._remaining is not None:
            self._remaining -= len(data)
        return data

    def read(self, size: int | None = -1) -> bytes:
        size = -1 if size is None else size
        data = self._head.read(size)
        if size < 0:
            return data + self._read_rest(-1)
        if len(data) < size:
            data += self._read_rest(size - len(data))
        return data

    def readline(self, size: int | None = -1) -> bytes:
        size = -1 if size is None else size
        line = self._head.readline(size)
        if line.endswith(b"\n") or (size >= 0 and len(line) >= size):
            return line
        limit = size - len(line) if size >= 0 else -1
        if self._remaining is not None:
            limit = self._remaining if limit < 0 else min(limit, self._remaining)
            if limit == 0:
                return line
        more = self._rest.readline(limit)
        if self._remaining is not None:
            self._remaining -= len(more)
        return line + more

    def readlines(self, hint: int = -1) -> list[bytes]:
        lines: list[bytes] = []
        total = 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                break
        return lines

    def __iter__(self) -> Iterable[bytes]:
        while line := self.readline():
            yield line


def _read_up_to(stream: IO[bytes], size: int) -> tuple[bytes, bool]:
    """``size`` bytes, fewer only at the end of ``stream`` (a read may return less than it was asked), and
    whether the stream read without failing: a client that goes away, or a malformed chunk, makes servers
    raise (werkzeug: ``OSError`` or ``ClientDisconnected``), and what came before is kept."""
    chunks = []
    try:
        while size > 0:
            chunk = stream.read(size)
            if not chunk:
                break
            chunks.append(chunk)
            size -= len(chunk)
    except Exception:
        return b"".join(chunks), False
    return b"".join(chunks), True


def load_body(environ: Environ, request: RequestView, limit: int) -> None:
    """Read the body into ``request`` (up to ``limit`` bytes) and make ``wsgi.input`` replay it."""
    stream: IO[bytes] = environ["wsgi.input"]
    try:
        length: int | None = int(environ.get("CONTENT_LENGTH") or "")
    except ValueError:
        length = None
    if length is None and not environ.get("wsgi.input_terminated"):
        request.load_body(b"")  # no length and no terminated stream: WSGI says there is no body to read
        return
    if length is not None and length < 0:
        request.load_body(None)
        return
    want = limit + 1 if length is None else min(length, limit + 1)
    head, whole = _read_up_to(stream, want)
    # A body over the cap, or that failed to read, is none for the key functions; the app gets what was read,
    # then meets the rest (or the stream's failure) on its own reads.
    request.load_body(head if whole and len(head) <= limit else None)
    environ["wsgi.input"] = _ReplayInput(head, stream, None if length is None else length - len(head))


def admit(
    gate: Gate, limiter: Checker, request: RequestView, load_body: Callable[[], None]
) -> Decision | Reservation | HTTPResponse | None:
    """Identify and check one request: a ``Decision`` (or a ``Reservation`` for a limiter with token or
    concurrency limits), a response to send, or ``None`` to let it through.

    ``load_body`` is called only if a key function or the token estimate needs the body. Shared by the
    middleware and the Flask decorator.
    """
    needs_body = False
    try:
        ask = gate.ask(limiter, request)
    except BodyNotLoaded:
        needs_body = True
    if needs_body:  # outside the except: a key function failing now is logged without BodyNotLoaded
        load_body()
        ask = gate.ask(limiter, request)
    return ask if ask is None or isinstance(ask, HTTPResponse) else gate.answer(ask)


class _Metered:
    """The app's response iterable, read by a ``Meter`` as the server sends it; settles once, when the body
    ends or on ``close()``, whichever comes first (a wrapper that never closes keeps no slot held).
    ``unasked``: the filter that takes out the usage chunk the middleware asked for, if any; ``withheld``: a
    ``HEAD``'s body, neither read nor sent on (an empty chunk for each, so that the app's iteration goes on
    as a server's would)."""

    def __init__(self, meter: Meter, settle: Callable[[], None], withheld: bool) -> None:
        self.body: Iterable[bytes] = ()
        self.unasked: UsageChunkFilter | None = None
        self._meter = meter
        self._settle: Callable[[], None] | None = settle
        self._withheld = withheld

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.body:
            if self._withheld:
                yield b""
                continue
            self._meter.body(chunk)
            yield chunk if self.unasked is None else self.unasked.pass_on(chunk)
        if self.unasked is not None and (rest := self.unasked.rest()):
            yield rest
        self._settled()

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            self._settled()

    def _settled(self) -> None:
        settle, self._settle = self._settle, None
        if settle is not None:
            settle()


def _header_value(headers: Iterable[tuple[str, str]], name: str) -> str:
    """A response header's value (``""`` when absent); ``name`` in lower case."""
    return next((value for key, value in headers if key.lower() == name), "")


def run_metered(
    gate: Gate,
    app: WSGIApp,
    environ: Environ,
    start_response: StartResponse,
    reservation: Reservation,
    described: list[Decision],
    leases: LeaseKeeper,
    asked_usage: bool,
) -> Iterable[bytes]:
    """Run the app for a reserved request, with the headers of ``described``, reading its usage as the
    response goes by and having ``leases`` renew its concurrency leases meanwhile; settle at the end.
    ``asked_usage``: the middleware asked for the stream's usage chunk, which the client then does not get
    (``UsageChunkFilter``). A ``HEAD``'s body, which werkzeug drops inside the app and a server must, is
    neither read nor sent on: its estimate stands, as under ASGI."""
    meter = Meter(reservation.reserved)
    stop_renewing = leases.keep(reservation)

    def settle() -> None:
        stop_renewing()
        actual = gate.settlement(meter)
        try:
            if actual is None:
                reservation.cancel()
            else:
                reservation.settle(*actual)
        except Exception as error:
            gate.failed_after("settling the reservation", error)
        else:
            gate.settled(reservation, actual)

    def start_metered(
        status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        content_type = _header_value(headers, "content-type")
        encoding = _header_value(headers, "content-encoding")
        meter.start(int(status.split(" ", 1)[0]), content_type, encoding)
        if asked_usage and UsageChunkFilter.applies(
            content_type, _header_value(headers, "content-length"), encoding
        ):
            metered.unasked = UsageChunkFilter()
        return start_response(status, with_described(environ, headers, described), exc_info)

    metered = _Metered(meter, settle, environ.get("REQUEST_METHOD") == "HEAD")
    try:
        metered.body = app(environ, start_metered)
    except BaseException:
        settle()
        raise
    return metered


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:  # a status outside the registry
        return "Unknown"


def with_described(
    environ: Environ, headers: list[tuple[str, str]], described: list[Decision]
) -> list[tuple[str, str]]:
    """The app's headers, and the rate limit headers of ``described`` (see ``Gate.starting_headers``)."""
    return [*headers, *extra] if (extra := Gate.starting_headers(environ, described)) else headers


def send_response(start_response: StartResponse, response: HTTPResponse, method: str) -> list[bytes]:
    """Start a complete response (a denial or a 503) and return its body: none to a ``HEAD``, which keeps the
    Content-Length a ``GET`` would get (as werkzeug answers it; a server must not send a body to ``HEAD``)."""
    status = f"{response.status} {_reason(response.status)}"
    start_response(status, [*response.headers, ("Content-Length", str(len(response.body)))])
    return [] if method == "HEAD" else [response.body]


def with_body(environ: Environ, body: bytes) -> None:
    """Make ``body`` the request body of ``environ``: its framing is its ``CONTENT_LENGTH`` alone (a chunked
    request's Transfer-Encoding goes, as it no longer describes it)."""
    environ["wsgi.input"], environ["CONTENT_LENGTH"] = io.BytesIO(body), str(len(body))
    environ.pop("HTTP_TRANSFER_ENCODING", None)


class RateLimitWSGI:
    """Rate limit every request of a WSGI app; answer 429 with back-off headers when denied.

    Options are those of ``RateLimitMiddleware`` (the ASGI middleware).
    """

    def __init__(
        self, app: WSGIApp, limiter: LimiterSpec | None = None, **options: Unpack[GateOptions]
    ) -> None:
        check_callable(app, "app", ("environ", "start_response"))  # an ASGI app would fail every request
        self.app = app
        self.gate = Gate.for_middleware("RateLimitWSGI", limiter, options)
        self.leases = LeaseKeeper()  # renews the concurrency leases of responses still running

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = path_of(environ)
        limiter = self.gate.limiter_for(environ.get("REQUEST_METHOD", "GET"), path)
        if limiter is None:
            return self.app(environ, start_response)
        request = request_view(environ, path)
        outcome = admit(
            self.gate, limiter, request, lambda: load_body(environ, request, self.gate.max_body_size)
        )
        response, described, metered = self.gate.verdict(request, outcome, environ)
        if response is not None:
            return send_response(start_response, response, request.method)
        if metered is not None:
            body = self.gate.usage_requesting_body(request)
            if body is not None:
                with_body(environ, body)
            return run_metered(
                self.gate,
                self.app,
                environ,
                start_response,
                metered,
                described,
                self.leases,
                body is not None,
            )
        if not described:  # no headers to add, or a layer outside adds them
            return self.app(environ, start_response)

        def start_with_headers(
            status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
        ) -> Callable[[bytes], object]:
            return start_response(status, with_described(environ, headers, described), exc_info)

        return self.app(environ, start_with_headers)
