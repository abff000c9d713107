"""``RateLimitMiddleware``: a pure ASGI middleware, in the style of Starlette's ``CORSMiddleware``.

``app.add_middleware(RateLimitMiddleware, limiter=..., ...)`` in FastAPI or Starlette, or
``RateLimitMiddleware(app, ...)`` around any ASGI app (Django's included). Lifespan and websocket scopes pass
through untouched; responses, streams included, are never buffered: allowed responses only get headers added
to their ``http.response.start`` (and lose the usage chunk that ``stream_usage`` asked for, not the client).
The body is read only when a key function asks for it, up to ``max_body_size``, and replayed to the app byte
for byte.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import TYPE_CHECKING, Any

from .checker import Checker, LimiterSpec
from .contract import HTTPResponse, RawResponse
from .decision import Decision
from .gate import Gate, GateOptions
from .hooks import check_callable
from .renewal import keep
from .request import BodyNotLoaded, RequestView, ServerHeaders
from .reservation import Reservation
from .tokens import Meter
from .usage_chunk import UsageChunkFilter

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["RateLimitMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ScopeHeaders(ServerHeaders):
    """The headers of an ASGI scope, read in place.

    ``get`` looks names up among the raw bytes, through a ``dict`` of them (built in C) when every name is
    lower-case ASCII and none repeats, as servers send them; otherwise through the decoded, joined mapping.
    """

    __slots__ = ("_index", "_raw")

    def __init__(self, raw: Iterable[tuple[bytes, bytes]]) -> None:
        self._all = None  # ServerHeaders.__init__, without the call
        if not isinstance(raw, (list, tuple)):
            raw = list(raw)
        self._raw = raw
        index = dict(raw)
        names = b"".join(index)
        self._index = index if len(index) == len(raw) and names.isascii() and names.islower() else None

    def pairs(self) -> Iterable[tuple[str, str]]:
        return ((name.decode("latin-1"), value.decode("latin-1")) for name, value in self._raw)

    def first(self, name: str) -> str | None:
        if self._index is None:  # a name repeats (or servers' lower case is not kept): look at every pair
            lowered = name.lower()
            return next(
                (
                    value.decode("latin-1")
                    for key, value in self._raw
                    if key.decode("latin-1").lower() == lowered
                ),
                None,
            )
        key = _HEADER_NAMES.get(name)
        if key is None:
            key = _header_name(name)
            if key is None:
                return None
        value = self._index.get(key)
        return None if value is None else value.decode("latin-1")

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        if self._index is None:
            return self.joined().get(name.lower(), default)
        value = self.first(name)  # no name repeats: the first line is the only one
        return default if value is None else value


_HEADER_NAMES: dict[str, bytes] = {}
_MAX_HEADER_NAMES = 256  # key functions ask for a handful of names


def _header_name(name: str) -> bytes | None:
    """``name`` as servers send it (lower-case latin-1 bytes); ``None`` when no header can have it."""
    try:
        key = name.lower().encode("latin-1")
    except UnicodeEncodeError:
        return None
    if len(_HEADER_NAMES) < _MAX_HEADER_NAMES:
        _HEADER_NAMES[name] = key
    return key


def route_path(scope: Scope) -> str:
    """The path the app routes: the scope's ``path`` less its ``root_path`` (a ``Mount`` or ``--root-path``),
    as Starlette's routing reads it."""
    path: str = scope["path"]
    root = scope.get("root_path")
    if not root or not path.startswith(root):
        return path
    if len(path) == len(root):
        return "/"
    return path[len(root) :] if path[len(root)] == "/" else path


def request_view(scope: Scope, path: str | None = None) -> RequestView:
    """The framework-neutral view of an ASGI HTTP scope (headers read in place); ``path``: its
    ``route_path``."""
    client = scope.get("client")
    return RequestView(
        scope["method"],
        route_path(scope) if path is None else path,
        ScopeHeaders(scope["headers"]),
        scope.get("query_string", b"").decode("latin-1"),
        client[0] if client else None,
    )


async def load_body(receive: Receive, request: RequestView, limit: int) -> Receive:
    """Read the body into ``request`` (up to ``limit`` bytes) and return a ``receive`` that replays it.

    Over the limit, or cut short by a disconnect, the view gets no body; the app still receives every message
    that was read, in order, then the rest from the original ``receive``.
    """
    messages: deque[Message] = deque()
    chunks: list[bytes] = []
    size = 0
    complete = False
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            break
        chunks.append(chunk)
        if not message.get("more_body", False):
            complete = True
            break
    request.load_body(b"".join(chunks) if complete else None)

    async def replay() -> Message:
        return messages.popleft() if messages else await receive()

    return replay


_BODY_FRAMING = (b"content-length", b"transfer-encoding")


def with_body(scope: Scope, body: bytes, receive: Receive) -> tuple[Scope, Receive]:
    """A copy of ``scope`` whose request body is ``body`` and its ``receive``: the body's framing is its
    Content-Length alone (a chunked request's Transfer-Encoding goes, as it no longer describes it).

    Only for a body already read whole from the server's ``receive``: after ``body``, the app's calls go on to
    it, so that the app still learns of the client's disconnect.
    """
    headers = [(name, value) for name, value in scope["headers"] if name.lower() not in _BODY_FRAMING]
    headers.append((b"content-length", str(len(body)).encode()))
    sent = False

    async def replaced() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return {**scope, "headers": headers}, replaced


_ENCODED_NAMES: dict[str, bytes] = {}
_MAX_ENCODED_NAMES = 256  # the contract sends about 20 names; a deny_handler may add a few


def _encoded_name(name: str) -> bytes:
    encoded = name.lower().encode("latin-1")
    if len(_ENCODED_NAMES) < _MAX_ENCODED_NAMES:
        _ENCODED_NAMES[name] = encoded
    return encoded


def encode_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """ASGI header pairs: names lower-cased, values in latin-1 (characters outside it replaced)."""
    names = _ENCODED_NAMES
    return [
        (names[name] if name in names else _encoded_name(name), value.encode("latin-1", "replace"))
        for name, value in headers
    ]


def with_described(scope: Scope, start: Message, described: list[Decision]) -> Message:
    """``http.response.start`` with the rate limit headers of ``described`` (none if a layer inside denied
    and emptied it); the response starts, so the scope no longer carries them (``Gate.starting_headers``)."""
    extra = Gate.starting_headers(scope, described, raw=True)
    return {**start, "headers": [*start.get("headers", ()), *extra]} if extra else start


async def send_response(send: Send, response: HTTPResponse | RawResponse) -> None:
    """Send a complete response (a denial or a 503)."""
    headers = response.headers if isinstance(response, RawResponse) else encode_headers(response.headers)
    headers.append((b"content-length", str(len(response.body)).encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


async def admit(
    gate: Gate, limiter: Checker, request: RequestView, load_body: Callable[[], Awaitable[None]]
) -> Decision | Reservation | HTTPResponse | None:
    """Identify and check one request: a ``Decision`` (or a ``Reservation`` for a limiter with token or
    concurrency limits), a response to send, or ``None`` to let it through.

    ``load_body`` is awaited only if a key function or the token estimate needs the body. Shared by the
    middleware and the Starlette/FastAPI decorators.
    """
    needs_body = False
    try:
        ask = gate.ask(limiter, request)
    except BodyNotLoaded:
        needs_body = True
    if needs_body:  # outside the except: a key function failing now is logged without BodyNotLoaded
        await load_body()
        ask = gate.ask(limiter, request)
    if ask is None or isinstance(ask, HTTPResponse):
        return ask
    if getattr(ask[0], "inline", False) is True:  # in memory: nothing to await
        return gate.answer(ask)
    return await gate.aanswer(ask)


def _header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str:
    """A response header's value (``""`` when absent); ``name`` in lower case."""
    return next((value for key, value in headers if key.lower() == name), b"").decode("latin-1")


async def run_metered(
    gate: Gate,
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    reservation: Reservation,
    described: list[Decision],
    asked_usage: bool,
) -> None:
    """Run the app for a reserved request, with the headers of ``described``, reading its usage as the
    response goes by and renewing its concurrency leases meanwhile, then settle. ``asked_usage``: the
    middleware asked for the stream's usage chunk, which the client then does not get (``UsageChunkFilter``).
    A ``HEAD``'s body (Starlette sends one, for the server to drop) is neither read nor sent on: its estimate
    stands, as under WSGI, where werkzeug drops that body inside the app.
    """
    meter = Meter(reservation.reserved)
    unasked: UsageChunkFilter | None = None
    head = scope["method"] == "HEAD"

    async def send_metered(message: Message) -> None:
        nonlocal unasked
        if message["type"] == "http.response.start":
            headers = message.get("headers", ())
            content_type = _header_value(headers, b"content-type")
            encoding = _header_value(headers, b"content-encoding")
            meter.start(int(message["status"]), content_type, encoding)
            if asked_usage and UsageChunkFilter.applies(
                content_type, _header_value(headers, b"content-length"), encoding
            ):
                unasked = UsageChunkFilter()
            message = with_described(scope, message, described)
        elif message["type"] == "http.response.body" and head:
            message = {**message, "body": b""}
        elif message["type"] == "http.response.body":
            chunk = message.get("body", b"")
            meter.body(chunk)
            if unasked is not None:
                passed = unasked.pass_on(chunk)
                if not message.get("more_body", False):
                    passed += unasked.rest()
                message = {**message, "body": passed}
        await send(message)

    stop_renewing = keep(reservation)  # the concurrency leases, while the response runs
    try:
        await app(scope, receive, send_metered)
    finally:
        stop_renewing()
        actual = gate.settlement(meter)
        try:
            if actual is None:
                await reservation.acancel()
            else:
                await reservation.asettle(*actual)
        except Exception as error:
            gate.failed_after("settling the reservation", error)
        else:
            gate.settled(reservation, actual)


class RateLimitMiddleware:
    """Rate limit every HTTP request of an ASGI app; answer 429 with back-off headers when denied.

    ``limiter``: a ``RateLimiter``/``MultiTierRateLimiter``, or a limit such as ``"100/hour"``; default 100
    per hour per user and model, in memory. ``user_key``/``model_key``: key functions (see ``keys``).
    ``exempt_paths``: patterns never limited (``"/health"``, ``"/docs/*"``); ``path_limits``: ``{pattern:
    limiter-or-limit}``, the first match replacing the default limiter (``None`` exempts). ``on_error``:
    ``"allow"`` or ``"deny"`` (503) when a key function or the limiter fails. ``add_headers``: rate limit
    headers on allowed responses. ``deny_handler(request, decision) -> HTTPResponse`` replaces the 429.
    ``exempt_methods`` (default ``("OPTIONS",)``, CORS preflights) are never limited; ``max_body_size``
    (default 1 MiB) caps what is read of a body for key functions and token estimates.

    A limiter with token or concurrency limits (``Limits``) has each request reserved: tokens estimated from
    the body by ``estimator(request) -> (input, output)`` (default: the prompt at about 4 characters per
    token plus the output cap, ``default_output_tokens`` when the request sets none; none without a body,
    no output on endpoints that generate nothing, such as embeddings: see ``tokens.estimate``),
    settled with the usage the response reports (JSON or server-sent events, gzip or deflate included),
    refunded when the app fails; the concurrency slot is held until the response ends. ``stream_usage=True``
    sets ``stream_options.include_usage`` in streaming requests (a client's ``false`` included), so that
    their streams end with the exact usage; a client that did not ask for that usage chunk does not get it.

    ``observers`` (``observe.Observer``, e.g. ``metrics.PrometheusMetrics``) see every decision, failure and
    settlement. ``shadow=True`` evaluates and records everything, adds the headers, but never denies: for
    rolling limits out safely (a denied request passes uncounted; use a separate limiter per trial policy).
    """

    def __init__(
        self, app: ASGIApp, limiter: LimiterSpec | None = None, **options: Unpack[GateOptions]
    ) -> None:
        check_callable(app, "app", ("scope", "receive", "send"))  # a WSGI app would fail every request
        self.app = app
        self.gate = Gate.for_middleware("RateLimitMiddleware", limiter, options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        limiter = self.gate.limiter_for(scope["method"], path)
        if limiter is None:
            await self.app(scope, receive, send)
            return
        request = request_view(scope, path)
        from_server = receive

        async def read_body() -> None:
            nonlocal receive
            receive = await load_body(receive, request, self.gate.max_body_size)

        outcome = await admit(self.gate, limiter, request, read_body)
        response, described, metered = self.gate.verdict(request, outcome, scope, raw=True)
        if response is not None:
            await send_response(send, response)
            return
        if metered is not None:
            body = self.gate.usage_requesting_body(request)
            if body is not None:
                scope, receive = with_body(scope, body, from_server)
            await run_metered(self.gate, self.app, scope, receive, send, metered, described, body is not None)
            return
        if not described:  # no headers to add, or a layer outside adds them
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = with_described(scope, message, described)
            await send(message)

        await self.app(scope, receive, send_with_headers)
