"""Per-route limits for FastAPI and Starlette: a decorator and a dependency.

``@limit("10/minute")`` under the route decorator limits one endpoint; a FastAPI endpoint needs no ``request``
parameter (the decorator adds a hidden one to the signature FastAPI reads), a Starlette endpoint takes its
``Request`` as usual.
``Depends(RateLimit("10/minute"))`` does the same as a dependency, raising ``RateLimitExceeded`` (an
``HTTPException``); register ``rate_limit_exceeded_handler`` for OpenAI-shaped 429 bodies. A limit string
gives each decorator or dependency a limiter of its own, so same-named endpoints in different modules never
share; limiters passed in share the counters of the rules they state alike when they share a storage (give
each its own ``key_prefix`` on one Redis).
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.websockets import WebSocket

from .asgi import admit, encode_headers, load_body, request_view
from .checker import LimiterSpec
from .contract import HTTPResponse, informational_headers
from .decision import Decision
from .gate import SHARED_DECISIONS, Gate, RouteOptions
from .request import RequestView

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["RateLimit", "RateLimitExceeded", "limit", "rate_limit_exceeded_handler"]

F = TypeVar("F", bound=Callable[..., Any])

_REQUEST = "_ratelimit_request"
_RESPONSE = "_ratelimit_response"


class RateLimitExceeded(HTTPException):
    """Raised by the ``RateLimit`` dependency; carries the full 429 (or 503) to send."""

    def __init__(self, response: HTTPResponse) -> None:
        detail = _message(response.body)
        headers = {name: value for name, value in response.headers if name.lower() != "content-type"}
        super().__init__(status_code=response.status, detail=detail, headers=headers)
        self.response = response


async def rate_limit_exceeded_handler(request: Request, exc: Exception) -> Response:
    """Exception handler that sends ``RateLimitExceeded`` as the OpenAI-shaped 429 it carries."""
    if not isinstance(exc, RateLimitExceeded):  # pragma: no cover - registered for that type only
        raise exc
    return _to_response(exc.response)


def _message(body: bytes) -> str | None:
    """The ``detail`` for a response's body: the message of an OpenAI-shaped error, else the body as text.

    ``None`` for an empty body, which ``HTTPException`` turns into the status phrase. A ``deny_handler`` may
    answer with any body (plain text, a JSON list), so nothing is assumed of its shape.
    """
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, TypeError, KeyError, RecursionError):
        message = None
    if isinstance(message, str):
        return message
    return body.decode("utf-8", "replace") or None


def _to_response(response: HTTPResponse) -> Response:
    """A Starlette response, every header kept (a ``dict`` would keep one of each name: one Set-Cookie)."""
    sent = Response(response.body, status_code=response.status)
    for name, value in response.headers:
        sent.headers.append(name, value)
    return sent


async def _load_body(request: Request, view: RequestView, limit: int) -> None:
    """Read the body for the key functions, up to the message that passes ``limit``; the endpoint still gets
    all of it.

    FastAPI reads a declared body parameter before the dependencies: its cached copy is used. An unread body
    is read by ``asgi.load_body``, and the request's ``receive`` then replays the messages read before the
    rest. A body consumed otherwise (a form) is not seen by the key functions.
    """
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        view.load_body(None)
    elif hasattr(request, "_body"):  # Starlette's cache of request.body()
        body = await request.body()
        view.load_body(body if len(body) <= limit else None)
    elif request._stream_consumed:
        view.load_body(None)
    else:
        request._receive = await load_body(request.receive, view, limit)


class _Written(list[Decision]):
    """Decisions whose headers a ``RateLimit`` dependency wrote on the response FastAPI builds from the
    endpoint's data: a limit inside it folds its decision in, then has them ``rewrite``."""

    __slots__ = ("response", "sent")

    def __init__(self, decisions: list[Decision], response: Response) -> None:
        super().__init__(decisions)
        self.response = response
        self.sent: list[tuple[bytes, bytes]] = []

    def rewrite(self) -> None:
        """Replace the header lines it wrote before, and only those."""
        lines = self.response.raw_headers
        for line in self.sent:
            lines.remove(line)
        self.sent = encode_headers(informational_headers(*self)) if self else []
        lines.extend(self.sent)


async def _check(gate: Gate, request: Request) -> tuple[HTTPResponse | None, list[Decision]]:
    """``(response to send instead of the endpoint, decisions whose headers go on its response)``; see
    ``Gate.verdict``."""
    view = request_view(request.scope)
    outcome = await admit(gate, gate.limiter, view, lambda: _load_body(request, view, gate.max_body_size))
    denial, described, _ = gate.verdict(view, outcome, request.scope)
    written = request.scope.get(SHARED_DECISIONS)
    if isinstance(written, _Written) and written is not described:  # a dependency outside wrote them
        written.rewrite()
    return denial, described


def _with_headers(error: HTTPException, extra: list[tuple[str, str]]) -> HTTPException:
    """A copy of ``error`` with ``extra`` among its headers (the endpoint may raise one shared exception
    object for every request), or ``error`` itself, untouched, when it cannot be copied.

    Copied without calling its ``__init__``, which ``copy.copy`` would call with ``args`` (empty for
    ``HTTPException(status_code=..., detail=...)``, and whatever a subclass takes): its class's ``__new__``,
    then its attributes, slots included, and its traceback and cause."""
    kind = type(error)
    try:
        raised = kind.__new__(kind, *error.args)
        raised.__dict__.update(error.__dict__)
        for klass in kind.__mro__:
            slots = getattr(klass, "__slots__", ())
            for slot in (slots,) if isinstance(slots, str) else slots:
                if slot not in ("__dict__", "__weakref__") and hasattr(error, slot):
                    setattr(raised, slot, getattr(error, slot))
    except Exception:  # an exception class of its own making: sent as it is, without our headers
        return error
    raised.headers = _merged(error.headers, extra)
    raised.__cause__, raised.__suppress_context__ = error.__cause__, True
    return raised.with_traceback(error.__traceback__)


def _merged(headers: Mapping[str, str] | None, extra: list[tuple[str, str]]) -> dict[str, str]:
    """An exception's headers with ``extra`` added; a header it has too (``Access-Control-Expose-Headers``)
    gets both values."""
    merged = dict(headers or {})
    names = {name.lower(): name for name in merged}
    for name, value in extra:
        own = names.get(name.lower())
        if own is None:
            merged[name] = value
        else:
            merged[own] = f"{merged[own]}, {value}"
    return merged


def _is_async(endpoint: Callable[..., Any]) -> bool:
    """Whether ``endpoint`` must be awaited, judged as FastAPI judges it: the callable itself, or what it
    wraps (``functools.wraps``, partials), or an object's ``__call__``. Generator endpoints, which FastAPI
    streams itself, are refused."""
    target: Any = inspect.unwrap(endpoint)
    while isinstance(target, functools.partial):
        target = inspect.unwrap(target.func)
    call = getattr(target, "__call__", None)  # noqa: B004 - the method itself, not whether it is callable
    candidates = (endpoint, target, call)
    if any(inspect.isgeneratorfunction(f) or inspect.isasyncgenfunction(f) for f in candidates):
        raise TypeError(
            f"@limit cannot wrap the generator endpoint {endpoint!r}: FastAPI streams it before a 429 could "
            "be sent; use dependencies=[Depends(RateLimit(...))] or RateLimitMiddleware there"
        )
    return any(inspect.iscoroutinefunction(f) for f in candidates)


_WEBSOCKET = (
    "@limit limits HTTP endpoints, not websocket endpoints: check a limiter in the endpoint (await "
    "limiter.acheck(user, model)) before accepting the connection"
)


def _starlette_request(args: tuple[Any, ...]) -> Request:
    """The request Starlette passes positionally: ``endpoint(request)``, or ``method(self, request)`` in an
    ``HTTPEndpoint``."""
    for arg in args:
        if isinstance(arg, Request):
            return arg
        if isinstance(arg, WebSocket):  # an unannotated Starlette websocket endpoint: seen only when called
            raise TypeError(_WEBSOCKET)
    raise TypeError("@limit decorates FastAPI endpoints and Starlette endpoints called with their Request")


def _resolved(endpoint: Callable[..., Any]) -> inspect.Signature:
    """The endpoint's signature with its annotations resolved, as FastAPI resolves them (left as text when one
    does not resolve: FastAPI then reports it)."""
    try:
        return inspect.signature(endpoint, eval_str=True)
    except Exception:
        return inspect.signature(endpoint)


def _own_parameter(signature: inspect.Signature, kind: type) -> str | None:
    """The name of the endpoint's parameter of type ``kind`` (``Request``, ``Response``), if it has one.

    FastAPI fills one parameter of each: the decorator then shares the endpoint's instead of adding a hidden
    one, which would take the value from the endpoint.
    """
    for parameter in signature.parameters.values():
        if isinstance(parameter.annotation, type) and issubclass(parameter.annotation, kind):
            return parameter.name
    return None


def limit(limiter: LimiterSpec, **options: Unpack[RouteOptions]) -> Callable[[F], F]:
    """Limit one endpoint: ``limiter`` is a limit string (``"10/minute;500/day"``), a config or a limiter.

    Place it below ``@app.get(...)``/``@app.post(...)``, or on a Starlette endpoint (``async def
    endpoint(request)``). The headers go on any response the endpoint returns, or on the one FastAPI builds
    from returned data. Sync endpoints run in the thread pool, as FastAPI runs them.
    """
    gate = Gate.for_route(limiter, **options)

    def decorator(endpoint: F) -> F:
        signature = inspect.signature(endpoint)
        parameters = list(signature.parameters.values())
        resolved = _resolved(endpoint)
        if _own_parameter(resolved, WebSocket) is not None:
            raise TypeError(f"{_WEBSOCKET} ({endpoint!r})")
        own_request = _own_parameter(resolved, Request)
        own_response = _own_parameter(resolved, Response)
        hidden = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind)
            for name, own, kind in ((_REQUEST, own_request, Request), (_RESPONSE, own_response, Response))
            if own is None
        ]
        request_name = own_request or _REQUEST
        response_name = own_response or _RESPONSE
        variadic = [p for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD]
        plain = [p for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD]
        is_coroutine = _is_async(endpoint)

        @functools.wraps(endpoint)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            # FastAPI passes every parameter by name; Starlette passes the request alone, positionally.
            request: Request | None = kwargs.get(request_name)
            response: Response | None = kwargs.get(response_name)
            for parameter in hidden:
                kwargs.pop(parameter.name, None)
            if request is None:
                request = _starlette_request(args)
            denial, described = await _check(gate, request)
            if denial is not None:
                return _to_response(denial)
            try:
                if is_coroutine:
                    result = await endpoint(*args, **kwargs)
                else:
                    result = await run_in_threadpool(endpoint, *args, **kwargs)
            except HTTPException as error:  # the response its handler builds carries the headers too
                extra = gate.starting_headers(request.scope, described)
                if not extra:
                    raise
                raised = _with_headers(error, extra)
                if raised is error:
                    raise
                raise raised  # noqa: B904 - the copy carries the original's cause and traceback
            if isinstance(result, Response):
                written = request.scope.get(SHARED_DECISIONS)
                if isinstance(written, _Written):  # on FastAPI's response, which this one replaces
                    described = written
                target: Response | None = result
            else:
                target = response
            for name, value in gate.starting_headers(request.scope, described):
                if target is not None:
                    target.headers.append(name, value)
            return result

        wrapper.__signature__ = signature.replace(parameters=[*plain, *hidden, *variadic])  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorator


class RateLimit:
    """A FastAPI dependency: ``dependencies=[Depends(RateLimit("10/minute"))]`` or a parameter default.

    The informational headers go on the response FastAPI builds from the data an endpoint returns. An
    endpoint that returns its own ``Response`` (``JSONResponse``, ``StreamingResponse``) gets none: FastAPI
    drops the headers dependencies set in that case. Use ``@limit`` there, which adds them to any response,
    or ``RateLimitMiddleware``, which then writes the binding limit's headers for both. On a websocket
    route (an app- or router-level dependency) it does nothing, as the middleware passes websockets.
    """

    def __init__(
        self,
        limiter: LimiterSpec,
        **options: Unpack[RouteOptions],
    ) -> None:
        self.gate = Gate.for_route(limiter, **options)

    async def __call__(self, request: HTTPConnection, response: Response) -> None:
        if not isinstance(request, Request):  # a websocket route: passed untouched, as by the middleware
            return
        denial, described = await _check(self.gate, request)
        if denial is not None:
            raise RateLimitExceeded(denial)
        if described:  # the outermost limit: written now, rewritten by the limits inside
            written = request.scope[SHARED_DECISIONS] = _Written(described, response)
            written.rewrite()
