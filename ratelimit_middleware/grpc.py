"""gRPC server interceptors: the HTTP middlewares' limits, keys and contract for ``grpc`` and ``grpc.aio``.

``grpc.server(executor, interceptors=[RateLimitInterceptor(limiter)])`` or
``grpc.aio.server(interceptors=[AsyncRateLimitInterceptor(limiter)])``. Key functions see each call as a
``RequestView``: method ``POST``, path the full method name (``/llm.Generator/Complete``), headers the text
metadata (``-bin`` entries left out), client the peer's IP address. The request message is not read unless
``request_body`` turns it into a JSON body for them. By default the user is the ``x-user-id`` metadata, else
the hashed API key (``authorization: Bearer ...``), else the peer address; the model is ``x-model``, else
``"default"``.

A denied call ends with ``RESOURCE_EXHAUSTED``, the HTTP 429's message (naming the limit and the wait), and
trailing metadata: ``retry-after-ms``, ``retry-after`` (whole seconds), ``x-should-retry``, the rate limit
entries (``x-ratelimit-*``, ``ratelimit-policy``, ``ratelimit``), ``grpc-retry-pushback-ms`` (which clients
with a gRPC retry policy for ``RESOURCE_EXHAUSTED`` wait before retrying; ``-1``, never, when
``x-should-retry`` is false) and, with ``grpcio-status`` installed, a ``google.rpc.RetryInfo`` detail in
``grpc-status-details-bin``. Allowed calls carry the rate limit entries in their trailing metadata (a handler
that sets trailing metadata itself replaces them). A key function or limiter that raises never fails the call:
``on_error="allow"`` lets it through, ``"deny"`` ends it with ``UNAVAILABLE`` and ``retry-after-ms``; either
way it is logged once a minute.

A limiter with token or concurrency limits has each call reserved before the handler runs. A unary response
settles when the handler returns (refunded if it raises); a response stream settles when it ends, fails
(refunded) or the RPC terminates (the client cancelled), holding the concurrency slot until then.
``estimator(method, metadata) -> (input, output)`` estimates the tokens (default none) and
``usage(method, response) -> (input, output) | None`` reads the real usage from the responses (for a stream,
the last answer wins); without one, the estimate is charged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast
from urllib.parse import unquote

try:
    import grpc
    import grpc.aio
except ModuleNotFoundError as error:
    raise ImportError(
        "ratelimit_middleware.grpc needs grpcio: pip install 'ratelimit-middleware[grpc]'"
    ) from error

from ratelimit_middleware.checker import Checker, LimiterSpec, as_checker, reserver_of
from ratelimit_middleware.contract import HTTPResponse
from ratelimit_middleware.decision import Decision
from ratelimit_middleware.gate import Ask, Gate, routed
from ratelimit_middleware.hooks import check_hook
from ratelimit_middleware.keys import KeyFunction, from_header
from ratelimit_middleware.names import string_items
from ratelimit_middleware.observe import Observer
from ratelimit_middleware.renewal import LeaseKeeper, Stop, keep
from ratelimit_middleware.request import RequestView
from ratelimit_middleware.reservation import Reservation
from ratelimit_middleware.tokens import token_pair

try:
    from google.protobuf import any_pb2, duration_pb2
    from google.rpc import error_details_pb2, status_pb2
    from grpc_status import rpc_status
except ImportError:  # grpcio-status is optional: denials then carry the retry metadata only
    _RICH_STATUS = False
else:
    _RICH_STATUS = True

__all__ = [
    "AsyncRateLimitInterceptor",
    "RateLimitInterceptor",
    "RequestBody",
    "TokenEstimator",
    "UsageReader",
    "peer_address",
    "request_view",
]

Metadata = tuple[tuple[str, "str | bytes"], ...]
TokenEstimator = Callable[[str, Mapping[str, str]], "tuple[int, int]"]
"""``(input_tokens, output_tokens)`` a call is expected to use, from its method name and text metadata."""
UsageReader = Callable[[str, Any], "tuple[int, int] | None"]
"""The real ``(input_tokens, output_tokens)`` a response message reports, or ``None``."""
RequestBody = Callable[[Any], "bytes | str | None"]
"""The request message as JSON, for key functions such as ``keys.from_json_body("model")``."""


def _json_body(body: object) -> bytes | None:
    """What ``request_body`` answered, as the bytes of a JSON body."""
    if isinstance(body, str):
        return body.encode()
    if body is None or isinstance(body, bytes):
        return body
    raise TypeError(f"request_body must return JSON text (str or bytes) or None, got {type(body).__name__}")


_CODES = {429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}
_HTTP_ONLY = frozenset({"content-type", "content-length", "access-control-expose-headers"})
_NO_MESSAGE: Any = object()  # what request-streaming calls give ``request_body``: nothing
_METHOD_NAMES = {
    (False, False): "unary_unary",
    (False, True): "unary_stream",
    (True, False): "stream_unary",
    (True, True): "stream_stream",
}
_HANDLER_FACTORIES = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def peer_address(peer: str | None) -> str | None:
    """The IP address of a gRPC peer (``ipv4:10.0.0.1:5000``, ``ipv6:[::1]:5000``); ``None`` for others (a
    Unix socket, ``unix:``): a caller without a user key then counts as anonymous, which the log says."""
    if peer is not None and not isinstance(peer, str):
        raise TypeError(f"peer must be a str (grpc's context.peer()) or None, got {peer!r}")
    if not peer:
        return None
    scheme, _, rest = peer.partition(":")
    if scheme not in ("ipv4", "ipv6"):
        return None
    rest = unquote(rest)
    if rest.startswith("["):
        return rest[1 : rest.find("]")] if "]" in rest else rest[1:]
    return rest.rpartition(":")[0] if scheme == "ipv4" and ":" in rest else rest


def request_view(
    method: str, metadata: Iterable[tuple[str, str | bytes]] | None, peer: str | None = None
) -> RequestView:
    """What key functions see of a call: ``POST`` to the full method name, the text metadata as headers.

    No body is loaded: ``request.json()`` gives ``None`` (see ``request_body``), never ``BodyNotLoaded``.
    """
    if not isinstance(method, str):
        raise TypeError(f"method must be the full method name (a str), got {method!r}")
    try:
        headers = [
            (key, value)
            for key, value in metadata or ()
            if isinstance(value, str) and not key.endswith("-bin")
        ]
    except (AttributeError, TypeError, ValueError):  # not pairs, or a key that is no str
        raise TypeError(
            f"metadata must be (key, value) pairs of str keys, or None, got {metadata!r}"
        ) from None
    view = RequestView("POST", method, headers, "", peer_address(peer))
    view.load_body(None)
    return view


def _retry_details(code: grpc.StatusCode, message: str, retry_ms: int) -> Metadata:
    """The ``grpc-status-details-bin`` entry: a ``google.rpc.Status`` with a ``RetryInfo`` detail."""
    delay = duration_pb2.Duration(seconds=retry_ms // 1000, nanos=retry_ms % 1000 * 1_000_000)
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    return tuple(rpc_status.to_status(status).trailing_metadata)


def _metadata(headers: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """HTTP contract headers as gRPC metadata: lower-cased, without those only HTTP needs."""
    return tuple((name.lower(), value) for name, value in headers if name.lower() not in _HTTP_ONLY)


@dataclass(frozen=True)
class _Refusal:
    """How a call ends instead of reaching its handler."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: Metadata


def _refusal(response: HTTPResponse) -> _Refusal:
    """The gRPC twin of a 429 or 503: its status, its message, its headers as trailing metadata."""
    code = _CODES.get(response.status, grpc.StatusCode.RESOURCE_EXHAUSTED)
    try:
        details = str(json.loads(response.body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        details = response.body.decode("utf-8", "replace")
    metadata: Metadata = _metadata(response.headers)
    entries = dict(metadata)
    retry_ms = entries.get("retry-after-ms")
    if isinstance(retry_ms, str) and retry_ms.isdigit():
        # gRPC's own retry policy (gRFC A6) waits what this says, and never retries on a negative value
        should_retry = entries.get("x-should-retry") != "false"
        metadata += (("grpc-retry-pushback-ms", retry_ms if should_retry else "-1"),)
        if _RICH_STATUS and should_retry:  # a RetryInfo says when to retry: none for a call not to retry
            metadata += _retry_details(code, details, int(retry_ms))
    return _Refusal(code, details, metadata)


class _Hold:
    """One call's reservation, settled exactly once: when its handler ends, or when the RPC terminates."""

    def __init__(
        self, gate: Gate, reservation: Reservation, method: str, usage: UsageReader | None, renewing: Stop
    ) -> None:
        self._gate = gate
        self._reservation = reservation
        self._renewing = renewing  # stops renewing the concurrency leases
        self._method = method
        self._usage = usage
        self._actual: tuple[int, int] | None = None
        self._failed = False
        self._open = True
        self._busy = False  # a response stream's handler is producing its next response
        self._ended = False  # the RPC terminated (cancelled, deadline, done)
        self._lock = threading.Lock()  # the sync server may end a call from two threads at once

    def observe(self, response: object) -> None:
        """Read the usage a response reports (the last report wins)."""
        if self._usage is None:
            return
        try:
            actual = self._usage(self._method, response)
            if actual is not None:
                self._actual = token_pair(actual, "the usage function")
        except Exception as error:
            self._gate.failed_after("the usage function", error)

    def claim(self, failed: bool) -> bool:
        """True for the first caller only, who must then ``settle`` or ``asettle``."""
        with self._lock:
            if not self._open:
                return False
            self._open = False
            self._failed = failed
        self._renewing()
        return True

    def _settlement(self) -> tuple[int, int] | None:
        """The tokens to charge: the usage read, else the estimate; ``None`` (refund) when the call failed."""
        return None if self._failed else self._actual or self._reservation.reserved

    def settle(self) -> None:
        actual = self._settlement()
        try:
            if actual is None:
                self._reservation.cancel()
            else:
                self._reservation.settle(*actual)
        except Exception as error:
            self._gate.failed_after("settling the reservation", error)
        else:
            self._gate.settled(self._reservation, actual)

    async def asettle(self) -> None:
        actual = self._settlement()
        try:
            if actual is None:
                await self._reservation.acancel()
            else:
                await self._reservation.asettle(*actual)
        except Exception as error:
            self._gate.failed_after("settling the reservation", error)
        else:
            self._gate.settled(self._reservation, actual)

    def running(self, busy: bool) -> bool:
        """Mark a response stream's handler as producing its next response (``busy``) or done with it; done,
        whether the RPC ended meanwhile (the stream then stops: nobody reads it)."""
        with self._lock:
            self._busy = busy
            return self._ended and not busy

    def ended(self) -> None:
        """The RPC terminated (grpc's callback, on its own thread): release, unless the handler is producing
        a response, whose return to the stream then releases (its slot is in use until then)."""
        with self._lock:
            self._ended = True
            if self._busy:
                return
        self.release(failed=False)

    def release(self, failed: bool) -> None:
        """Settle (or refund when the handler ``failed``) unless done already; frees the concurrency slot."""
        if self.claim(failed):
            self.settle()

    async def arelease(self, failed: bool) -> None:
        """``release`` for event loops."""
        if self.claim(failed):
            await self.asettle()


@dataclass(frozen=True)
class _Admission:
    """A call that may proceed: the metadata to send with it, and its reservation if one was taken."""

    metadata: tuple[tuple[str, str], ...] = ()
    hold: _Hold | None = None


_PASS = _Admission()


@dataclass(frozen=True)
class _Ask:
    """An identified call, ready for the limiter."""

    view: RequestView
    question: Ask


def _method_rules(
    exempt_methods: Iterable[str], method_limits: Mapping[str, LimiterSpec | None] | None
) -> tuple[tuple[str, ...], dict[str, Checker | None]]:
    """The gate's path rules for ``exempt_methods`` and ``method_limits``, checked under those names (the
    gate's own errors would name its HTTP options). A pattern is a full method name, no HTTP method: calls
    are matched as POST, so a GET rule would never apply."""
    exempt = string_items(exempt_methods, "exempt_methods")
    if method_limits is not None and not isinstance(method_limits, Mapping):
        raise TypeError(
            "method_limits must be a mapping of method pattern to limiter (or None to exempt), got "
            f"{method_limits!r}"
        )
    limits = {
        pattern: None if spec is None else as_checker(spec, f"method_limits[{pattern!r}]")
        for pattern, spec in (method_limits or {}).items()
    }
    for pattern in (*exempt, *limits):
        if not isinstance(pattern, str) or not pattern.startswith("/") or len(pattern.split()) != 1:
            raise ValueError(
                "a gRPC method pattern is a full method name, '/pkg.Service/Method' or '/pkg.Service/*', "
                f"without an HTTP method: {pattern!r}"
            )
    return exempt, limits


class _Core:
    """What both interceptors decide; they only do the gRPC I/O (and call the limiter, sync or async)."""

    def __init__(
        self,
        limiter: LimiterSpec | None,
        *,
        user_key: KeyFunction | None,
        model_key: KeyFunction | None,
        exempt_methods: Iterable[str],
        method_limits: Mapping[str, LimiterSpec | None] | None,
        on_error: Literal["allow", "deny"],
        add_metadata: bool,
        estimator: TokenEstimator | None,
        usage: UsageReader | None,
        request_body: RequestBody | None,
        observers: Iterable[Observer],
        shadow: bool,
    ) -> None:
        check_hook(estimator, "estimator", ("method", "metadata"))
        check_hook(usage, "usage", ("method", "response"))
        check_hook(request_body, "request_body", ("message",))
        if not isinstance(add_metadata, bool):  # named here: the gate would call it add_headers
            raise TypeError(f"add_metadata must be True or False, got {add_metadata!r}")
        exempt, limits = _method_rules(exempt_methods, method_limits)
        self.gate = Gate(
            limiter,
            user_key=user_key,
            model_key=model_key or from_header("x-model"),  # then "default"
            exempt_paths=exempt,
            path_limits=limits,
            exempt_methods=(),
            on_error=on_error,
            add_headers=add_metadata,
            observers=observers,
            shadow=shadow,
        )
        self.gate.check_token_options(estimator=estimator is not None, usage=usage is not None)
        self.estimator = estimator
        self.usage = usage
        self.request_body = request_body
        self.leases = LeaseKeeper()  # renews the concurrency leases of the sync server's calls

    def limiter_for(self, method: str) -> Checker | None:
        """The limiter for this full method name, or ``None`` when it is exempt."""
        return self.gate.limiter_for("POST", method)

    def failed(self, stage: str, error: Exception) -> _Admission | _Refusal:
        response = self.gate.failed(stage, error)
        return _PASS if response is None else _refusal(response)

    def ask(
        self, limiter: Checker, details: grpc.HandlerCallDetails, peer: str | None, message: object
    ) -> _Ask | _Admission | _Refusal:
        """Identify a call (and estimate its tokens), or say what to do when that fails."""
        method = details.method
        view = request_view(method, details.invocation_metadata, peer)
        stage = "the key function"
        try:
            if self.request_body is not None and message is not _NO_MESSAGE:
                stage = "request_body"
                view.load_body(_json_body(self.request_body(message)))
                stage = "the key function"
            user, model = self.gate.identify(view)
            limiter, model = routed(limiter, view, model)
            reserver = reserver_of(limiter)
            tokens = (0, 0)
            if reserver is not None and self.estimator is not None:
                stage = "the estimator"
                tokens = token_pair(self.estimator(method, view.headers), stage)
        except Exception as error:
            return self.failed(stage, error)
        return _Ask(view, (limiter, reserver, user, model, tokens))

    def judge(
        self,
        ask: _Ask,
        outcome: Decision | Reservation | HTTPResponse | None,
        renew: Callable[[Reservation], Stop],
    ) -> _Admission | _Refusal:
        """What the gate's answer means for the call; ``renew`` keeps an allowed reservation's leases."""
        if outcome is None:  # the limiter failed, on_error="allow"
            return _PASS
        if isinstance(outcome, HTTPResponse):
            return _refusal(outcome)
        if isinstance(outcome, Reservation):
            if not self.gate.passes(outcome.decision):
                return _refusal(self.gate.reservation_denied(ask.view, outcome))
            hold = None
            if outcome.allowed:
                hold = _Hold(self.gate, outcome, ask.view.path, self.usage, renew(outcome))
            return _Admission(_metadata(self.gate.allowed_headers(outcome)), hold)
        if not self.gate.passes(outcome):
            return _refusal(self.gate.denied(ask.view, outcome))
        return _Admission(_metadata(self.gate.allowed_headers(outcome)))

    def admit(
        self, limiter: Checker, details: grpc.HandlerCallDetails, peer: str | None, message: object
    ) -> _Admission | _Refusal:
        """Identify and check one call; ``aadmit`` is its asynchronous twin."""
        ask = self.ask(limiter, details, peer, message)
        if not isinstance(ask, _Ask):
            return ask
        return self.judge(ask, self.gate.answer(ask.question), self.leases.keep)

    async def aadmit(
        self, limiter: Checker, details: grpc.HandlerCallDetails, peer: str | None, message: object
    ) -> _Admission | _Refusal:
        """``admit`` for event loops."""
        ask = self.ask(limiter, details, peer, message)
        if not isinstance(ask, _Ask):
            return ask
        return self.judge(ask, await self.gate.aanswer(ask.question), keep)


def _behavior(handler: grpc.RpcMethodHandler[Any, Any]) -> tuple[str, Callable[..., Any]]:
    name = _METHOD_NAMES[(bool(handler.request_streaming), bool(handler.response_streaming))]
    behavior = getattr(handler, name)
    if not callable(behavior):
        raise TypeError(f"{handler!r} has no {name} behavior")
    return name, behavior


def _rebuild(
    handler: grpc.RpcMethodHandler[Any, Any], name: str, behavior: Callable[..., Any]
) -> grpc.RpcMethodHandler[Any, Any]:
    return _HANDLER_FACTORIES[name](
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


# -- grpc (threads) ------------------------------------------------------------------------------------


def _held(responses: Iterator[Any], hold: _Hold) -> Iterator[Any]:
    """A response stream passed on as it comes; its end settles the reservation (refunded if it failed), as
    does the end of the RPC once the handler is out of the response it was producing."""
    failed = False
    try:
        while True:
            hold.running(True)
            try:
                response = next(responses)
            except StopIteration:
                break
            finally:
                over = hold.running(False)
            hold.observe(response)
            if over:
                return
            yield response
    except Exception:
        failed = True
        raise
    finally:
        try:
            close = getattr(responses, "close", None)
            if close is not None:
                close()  # a stream cut short (the client went away) stops the handler's generator too
        finally:
            hold.release(failed)


def _sync_handler(
    core: _Core,
    limiter: Checker,
    details: grpc.HandlerCallDetails,
    handler: grpc.RpcMethodHandler[Any, Any],
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` behind the limiter, for the thread-based server (and sync handlers on an aio server)."""
    name, inner = _behavior(handler)

    def admit(request: Any, context: grpc.ServicerContext) -> _Admission | None:
        message = _NO_MESSAGE if handler.request_streaming else request
        outcome = core.admit(limiter, details, context.peer(), message)
        if isinstance(outcome, _Refusal):
            context.set_trailing_metadata(outcome.trailing_metadata)
            context.abort(outcome.code, outcome.details)
            return None  # reached only on the aio server's bridge for sync handlers, whose abort() returns
        if outcome.metadata:
            context.set_trailing_metadata(outcome.metadata)
        if outcome.hold is not None and handler.response_streaming:
            # A stream the client leaves is never resumed: the end of the RPC releases. A unary handler
            # releases when it returns, and not before, however soon the RPC ends (a deadline, a cancel).
            context.add_callback(outcome.hold.ended)
        return outcome

    def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        # A generator: the aio server calls a sync stream's function on its event loop and only iterates it
        # in its thread pool, so the limiter (and abort(), which waits on that loop) must run in the first
        # next(), off the loop.
        admission = admit(request, context)
        if admission is None:
            return
        if admission.hold is None:
            yield from inner(request, context)
            return
        try:
            responses = iter(inner(request, context))
        except Exception:
            admission.hold.release(failed=True)
            raise
        yield from _held(responses, admission.hold)

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        admission = admit(request, context)
        if admission is None:
            return None
        if admission.hold is None:
            return inner(request, context)
        try:
            response = inner(request, context)
        except Exception:
            admission.hold.release(failed=True)
            raise
        admission.hold.observe(response)
        admission.hold.release(failed=False)
        return response

    return _rebuild(handler, name, stream if handler.response_streaming else unary)


class _Interceptor:
    """The options of both interceptors (see ``RateLimitInterceptor``)."""

    def __init__(
        self,
        limiter: LimiterSpec | None = None,
        *,
        user_key: KeyFunction | None = None,
        model_key: KeyFunction | None = None,
        exempt_methods: Iterable[str] = (),
        method_limits: Mapping[str, LimiterSpec | None] | None = None,
        on_error: Literal["allow", "deny"] = "allow",
        add_metadata: bool = True,
        estimator: TokenEstimator | None = None,
        usage: UsageReader | None = None,
        request_body: RequestBody | None = None,
        observers: Iterable[Observer] = (),
        shadow: bool = False,
    ) -> None:
        self.core = _Core(
            limiter,
            user_key=user_key,
            model_key=model_key,
            exempt_methods=exempt_methods,
            method_limits=method_limits,
            on_error=on_error,
            add_metadata=add_metadata,
            estimator=estimator,
            usage=usage,
            request_body=request_body,
            observers=observers,
            shadow=shadow,
        )
        self._pending: set[concurrent.futures.Future[None]] = set()  # settlements scheduled by grpc.aio


class RateLimitInterceptor(_Interceptor, grpc.ServerInterceptor):
    """Rate limit every call of a ``grpc.server``; denied calls end with ``RESOURCE_EXHAUSTED``.

    ``limiter``: a ``RateLimiter``/``MultiTierRateLimiter`` or a limit such as ``"100/hour"`` (default 100 per
    hour per user and model, in memory). ``user_key``/``model_key``: key functions (see ``keys``) over
    ``request_view``. ``exempt_methods``: full method patterns (with no HTTP method) never limited
    (``"/grpc.health.v1.Health/*"``); ``method_limits``: ``{pattern: limiter-or-limit}``, the first match
    replacing ``limiter`` (``None`` exempts). ``on_error``: ``"allow"`` or ``"deny"`` (``UNAVAILABLE``) when a
    key function or the limiter fails. ``add_metadata``: rate limit entries in allowed calls' trailing
    metadata. ``estimator``, ``usage``: tokens for limiters with token limits (see the module).
    ``request_body``: the request message as JSON (``bytes``/``str``) for key functions, in calls with one
    request message. ``observers``, ``shadow``: as for ``RateLimitMiddleware``.
    """

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        limiter = self.core.limiter_for(handler_call_details.method)
        if handler is None or limiter is None:
            return handler
        return _sync_handler(self.core, limiter, handler_call_details, handler)


# -- grpc.aio ------------------------------------------------------------------------------------------

AioContext = grpc.aio.ServicerContext[Any, Any]


class _Writing:
    """An aio context whose ``write`` shows each message to the call's usage reader first (streams written
    with ``context.write`` settle with the usage they report, as generator streams do)."""

    def __init__(self, context: AioContext, hold: _Hold) -> None:
        self._context = context
        self._hold = hold

    async def write(self, message: Any) -> None:
        self._hold.observe(message)
        await self._context.write(message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class AsyncRateLimitInterceptor(_Interceptor, grpc.aio.ServerInterceptor):
    """``RateLimitInterceptor`` for ``grpc.aio.server``: the same options, the limiter called asynchronously.

    Async handlers (coroutines, async generators, the ``context.write`` API) are limited here; sync handlers,
    which the aio server runs in its thread pool, as ``RateLimitInterceptor`` does.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        limiter = self.core.limiter_for(handler_call_details.method)
        if handler is None or limiter is None:
            return handler
        name, inner = _behavior(handler)
        if not (inspect.iscoroutinefunction(inner) or inspect.isasyncgenfunction(inner)):
            return _sync_handler(self.core, limiter, handler_call_details, handler)
        return _rebuild(handler, name, self._behavior(limiter, handler_call_details, handler, inner))

    def _release_on_done(self, context: AioContext, hold: _Hold) -> None:
        """Settle when the RPC terminates, in case the handler did not get to (the client cancelled)."""
        loop = asyncio.get_running_loop()

        def done(_: object) -> None:
            if hold.claim(failed=False):
                future = asyncio.run_coroutine_threadsafe(hold.asettle(), loop)
                self._pending.add(future)
                future.add_done_callback(self._pending.discard)

        context.add_done_callback(cast(Any, done))  # the stubs' callback type is not a protocol

    def _behavior(
        self,
        limiter: Checker,
        details: grpc.HandlerCallDetails,
        handler: grpc.RpcMethodHandler[Any, Any],
        inner: Callable[..., Any],
    ) -> Callable[..., Any]:
        core = self.core

        async def admit(request: Any, context: AioContext) -> _Admission:
            message = _NO_MESSAGE if handler.request_streaming else request
            outcome = await core.aadmit(limiter, details, context.peer(), message)
            if isinstance(outcome, _Refusal):
                await context.abort(outcome.code, outcome.details, outcome.trailing_metadata)
            if outcome.metadata:
                context.set_trailing_metadata(outcome.metadata)
            if outcome.hold is not None:
                self._release_on_done(context, outcome.hold)
            return outcome

        if inspect.isasyncgenfunction(inner):

            async def stream(request: Any, context: AioContext) -> AsyncIterator[Any]:
                hold = (await admit(request, context)).hold
                responses = inner(request, context)
                failed = False
                try:
                    async for response in responses:
                        if hold is not None:
                            hold.observe(response)
                        yield response
                except Exception:
                    failed = True
                    raise
                finally:
                    try:
                        await responses.aclose()  # a stream cut short stops the handler's generator too
                    finally:
                        if hold is not None:
                            await hold.arelease(failed)

            return stream

        async def call(request: Any, context: AioContext) -> Any:
            """A unary response, or a stream written with ``context.write`` (``None``)."""
            admission = await admit(request, context)
            hold = admission.hold
            if hold is None:
                return await inner(request, context)
            failed = False
            try:
                if handler.response_streaming:  # each message written goes by the usage reader
                    context = cast(AioContext, _Writing(context, hold))
                response = await inner(request, context)
                if not handler.response_streaming:
                    hold.observe(response)
                return response
            except Exception:
                failed = True
                raise
            finally:
                await hold.arelease(failed)

        return call
