"""What every HTTP integration decides, with the I/O left to the ASGI and WSGI shells.

A ``Gate`` holds the options users pass to a middleware or decorator and answers four questions: which
limiter applies to this method and path (``None``: exempt), who and which model the request is for, what to
send once the limiter has decided, and what to do when a key function or the limiter fails. The shells read
the body when a key function needs it (``BodyNotLoaded``), call ``check`` or ``acheck``, and send.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Literal, TypedDict, overload

from .both import Both
from .checker import Checker, LimiterSpec, Reserver, as_checker, reserver_of
from .config import check_amount
from .contract import (
    HTTPResponse,
    RawResponse,
    denial_response,
    informational_headers,
    raw_denial_response,
    raw_informational_headers,
    unavailable_response,
)
from .decision import Decision, ShadowDecision
from .errors import FallbackDecision, RateLimiterUnavailable, UncheckedDecision
from .hooks import check_hook
from .keys import (
    KeyFunction,
    address_key,
    check_key,
    default_model_key,
    default_user_key,
    leading_header,
)
from .limiter import RateLimiter
from .names import string_items
from .observe import Observer, notify
from .plans import Plans
from .policy import binding
from .request import HTTP_TOKEN, RequestView
from .reservation import Reservation
from .routes import PathRules
from .shadow import Shadow
from .tokens import DEFAULT_OUTPUT_TOKENS, Meter, token_pair
from .tokens import estimate as estimate_tokens

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "DEFAULT_MAX_BODY_SIZE",
    "SHARED_DECISIONS",
    "Ask",
    "DenialHandler",
    "Estimator",
    "Gate",
    "GateOptions",
    "RouteOptions",
]

logger = logging.getLogger("ratelimit_middleware")

SHARED_DECISIONS = "ratelimit_middleware.decisions"
"""Where the outermost layer that writes rate limit headers (a middleware, or a per-route decorator outside
any) keeps the decisions they describe, in the ASGI scope or the WSGI environ: a list, the binding decision
first, then those of other units (tokens, concurrency). It writes them when the response starts. A route
limited inside it folds its own decision in instead of writing headers, or empties the list when it denies
(its 429 carries its own), so that a response carries one set of headers, for the binding limit."""

DEFAULT_MAX_BODY_SIZE = 1024 * 1024
"""Bodies are read for key functions up to 1 MiB; larger ones reach the app untouched, unread by keys."""

_MAX_KEY_LENGTH = 256  # longer identities are hashed, so that huge headers cannot bloat the limiter
_LOG_EVERY_SECONDS = 60.0


DenialHandler = Callable[[RequestView, Decision], HTTPResponse]
"""Builds the response for a denied request (replaces the default 429)."""

Estimator = Callable[[RequestView], "tuple[int, int]"]
"""``(input_tokens, output_tokens)`` a request is expected to use; may call ``request.json()``."""


def _bounded(identity: str) -> str:
    if len(identity) <= _MAX_KEY_LENGTH:
        return identity
    return "sha256:" + hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()


_NO_CONTENT = frozenset((204, 205, 304))
# Visible latin-1, with spaces and tabs inside only: servers reject line breaks and edge whitespace.
_VALUE = re.compile(r"([\x21-\x7e\x80-\xff]([\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?")
_HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade")
)  # the server's to send (PEP 3333 forbids them to applications)


def _checked_response(response: object) -> HTTPResponse:
    """A ``deny_handler``'s answer, checked before a server sees it: an ``HTTPResponse`` with a final status
    that has content (200 to 599, not 204, 205 or 304), bytes, and headers a server can send (not
    hop-by-hop ones). Its ``Content-Length`` goes: the shells write it."""
    if not isinstance(response, HTTPResponse):
        raise TypeError(f"a deny_handler must return an HTTPResponse, got {response!r}")
    status, headers, body = response
    if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
        raise ValueError(f"the deny_handler's status must be a final status from 200 to 599, got {status!r}")
    if status in _NO_CONTENT:
        raise ValueError(f"the deny_handler's status {status} cannot carry the body and length we send")
    if not isinstance(body, bytes):
        raise TypeError(f"the deny_handler's body must be bytes, got {type(body).__name__}")
    kept = []
    for header in headers:
        name, value = header
        if not (isinstance(name, str) and HTTP_TOKEN.fullmatch(name)):
            raise ValueError(f"the deny_handler's header name {name!r} is not a valid HTTP token")
        if not (isinstance(value, str) and _VALUE.fullmatch(value)):
            raise ValueError(f"the deny_handler's header {name}: {value!r} is not a valid value")
        if name.lower() in _HOP_BY_HOP:
            raise ValueError(f"the deny_handler's header {name} is the server's to send")
        if name.lower() != "content-length":
            kept.append((name, value))
    return HTTPResponse(status, kept, body)


class _Throttled:
    """Logs a failure at most once a minute per kind: one line per outage, not one per request."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, type[BaseException] | None], float] = {}

    def due(self, kind: tuple[str, type[BaseException] | None]) -> bool:
        now = time.monotonic()
        if now - self._last.get(kind, -_LOG_EVERY_SECONDS) < _LOG_EVERY_SECONDS:
            return False
        self._last[kind] = now
        return True

    def warning(self, stage: str, error: BaseException, outcome: str) -> None:
        if self.due((stage, type(error))):
            logger.warning("%s failed (%s); the request was %s", stage, error, outcome, exc_info=error)


def _check_known(options: Mapping[str, object], known: Iterable[str], owner: str) -> None:
    """Fail on an option ``owner`` does not take, naming the nearest one it does (a typo would otherwise
    surface as an internal class's keyword error, and under ``add_middleware`` only at the first request)."""
    known = sorted(known)
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"{owner} has no option {name!r}{hint}; it takes {', '.join(known)}")


class RouteOptions(TypedDict, total=False):
    """The options of a per-route decorator (see ``Gate``)."""

    user_key: KeyFunction | None
    model_key: KeyFunction | None
    max_body_size: int
    on_error: Literal["allow", "deny"]
    add_headers: bool
    deny_handler: DenialHandler | None
    observers: Iterable[Observer]
    shadow: bool


class GateOptions(RouteOptions, total=False):
    """The options of a middleware (see ``Gate``): the route options, path rules and token metering."""

    exempt_paths: Iterable[str]
    path_limits: Mapping[str, LimiterSpec | None] | None
    exempt_methods: Iterable[str]
    estimator: Estimator | None
    default_output_tokens: int
    stream_usage: bool


def _stand_aside(carrier: MutableMapping[str, Any]) -> None:
    """A layer denies (429 or 503): an enclosing layer writes no headers on its response."""
    enclosing = carrier.get(SHARED_DECISIONS)
    if isinstance(enclosing, list):
        enclosing.clear()


def _folded(decisions: list[Decision]) -> list[Decision]:
    """The binding decision of each unit among several layers', the request one first."""
    units: dict[str, list[Decision]] = {}
    for decision in decisions:
        units.setdefault(decision.unit, []).append(decision)
    return sorted(
        (binding(same) for same in units.values()), key=lambda decision: decision.unit != "requests"
    )


def _ordered(reservation: Reservation) -> list[Decision]:
    """A reservation's decisions, requests first (they fill the generic X-RateLimit headers)."""
    return sorted(reservation.decisions.values(), key=lambda decision: decision.unit != "requests")


def _takes_include_usage(path: str) -> bool:
    """Whether ``path`` is an OpenAI-style chat completions or completions endpoint."""
    return path.rstrip("/").endswith(("/chat/completions", "/completions"))


_ROUTED = (Plans, Both, Shadow)


def routed(limiter: Checker, request: RequestView, model: str) -> tuple[Checker, str]:
    """The limiter that decides this request and the model it is asked with: for ``Plans`` (also in
    ``Shadow`` or beside a path rule), the request's plan's limiter and the model after the plan's aliases."""
    if isinstance(limiter, _ROUTED):
        return limiter.route(request, model)
    return limiter, model


Ask = tuple[Checker, "Reserver | None", str, str, "tuple[int, int]"]
"""An identified request, ready for its limiter (``Gate.answer``): ``(limiter, reserver, user, model,
tokens)``. A plain tuple: it is built for every request."""


class Gate:
    """The decisions of an HTTP integration, independent of ASGI or WSGI."""

    def __init__(
        self,
        limiter: LimiterSpec | None = None,
        *,
        user_key: KeyFunction | None = None,
        model_key: KeyFunction | None = None,
        exempt_paths: Iterable[str] = (),
        path_limits: Mapping[str, LimiterSpec | None] | None = None,
        exempt_methods: Iterable[str] = ("OPTIONS",),
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        on_error: Literal["allow", "deny"] = "allow",
        add_headers: bool = True,
        deny_handler: DenialHandler | None = None,
        estimator: Estimator | None = None,
        default_output_tokens: int = DEFAULT_OUTPUT_TOKENS,
        stream_usage: bool = False,
        observers: Iterable[Observer] = (),
        shadow: bool = False,
    ) -> None:
        for name, flag in (("add_headers", add_headers), ("stream_usage", stream_usage), ("shadow", shadow)):
            if not isinstance(flag, bool):  # "false" from an environment variable would be true
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        if on_error not in ("allow", "deny"):
            hint = (
                " ('local' is RedisStorage's, for when Redis cannot be reached)"
                if str(on_error) == "local"
                else ""
            )
            raise ValueError(f"on_error must be 'allow' or 'deny', got {on_error!r}{hint}")
        if isinstance(max_body_size, bool) or not isinstance(max_body_size, int) or max_body_size < 0:
            raise ValueError(f"max_body_size must be an int >= 0, got {max_body_size!r}")
        check_amount(default_output_tokens, "default_output_tokens")  # as tokens.estimate takes it
        check_key(user_key, "user_key")
        check_key(model_key, "model_key")
        check_hook(deny_handler, "deny_handler", ("request", "decision"))
        check_hook(estimator, "estimator", ("request",))
        exempt_paths = string_items(exempt_paths, "exempt_paths")
        exempt_methods = string_items(exempt_methods, "exempt_methods")  # one method, not its letters
        if path_limits is not None and not isinstance(path_limits, Mapping):
            raise TypeError(
                "path_limits must be a mapping of path pattern to limiter (or None to exempt), got "
                f"{path_limits!r}"
            )
        if isinstance(observers, Observer) or not isinstance(observers, Iterable):
            raise TypeError(f"observers must be a list of Observer instances, got {observers!r}")
        self.limiter: Checker = RateLimiter() if limiter is None else as_checker(limiter)
        self.user_key = user_key or default_user_key()
        self.model_key = model_key or default_model_key()
        # The header each key reads first, read by `identify` itself (see `keys.leading_header`).
        self._user_header: str | None
        self._user_rest: KeyFunction | None
        self._model_header: str | None
        self._model_rest: KeyFunction | None
        self._user_header, self._user_rest = leading_header(self.user_key) or (None, self.user_key)
        self._model_header, self._model_rest = leading_header(self.model_key) or (None, self.model_key)
        rules = [
            *((pattern, None) for pattern in exempt_paths),
            *(
                (pattern, None if spec is None else as_checker(spec, f"path_limits[{pattern!r}]"))
                for pattern, spec in (path_limits or {}).items()
            ),
        ]
        self.routes = PathRules(rules)
        limiters = [self.limiter, *(checker for _, checker in rules if checker is not None)]
        self.reserves = any(reserver_of(checker) is not None for checker in limiters)
        """Whether any of its limits has token or concurrency limits (requests are then reserved)."""
        self._routes = bool(rules) or any(isinstance(checker, _ROUTED) for checker in limiters)
        # Whether a request's limiter may be routed (`routed`: Plans, Shadow, or Both beside a path rule):
        # with `reserves`, resolved once here, so that `ask` skips both look-ups for a plain configuration.
        self.check_token_options(
            estimator=estimator is not None,
            default_output_tokens=default_output_tokens != DEFAULT_OUTPUT_TOKENS,
            stream_usage=stream_usage,
        )
        self._by_path = bool(self.routes)
        self._pairs: dict[tuple[int, int], Both] = {}
        self.exempt_methods = frozenset(method.upper() for method in exempt_methods)
        self.max_body_size = max_body_size
        self.on_error = on_error
        self.add_headers = add_headers
        self.deny_handler = deny_handler
        self.estimator = estimator
        self.default_output_tokens = default_output_tokens
        self.stream_usage = stream_usage
        self.observers = tuple(observers)
        for observer in self.observers:
            if not isinstance(observer, Observer):
                raise TypeError(f"observers must be Observer instances, got {observer!r}")
        self.shadow = shadow
        self._log = _Throttled()

    def check_token_options(self, **given: bool) -> None:
        """Warn of the options named (when given) that only limits with tokens or requests in flight use, if
        no limit here has them: they are ignored. Not an error: an app may pass them whatever limits its
        configuration holds."""
        if not self.reserves and (names := [name for name, was_given in given.items() if was_given]):
            logger.warning(
                "%s ignored: only limits with tokens or requests in flight (Limits(tokens=..., "
                "max_concurrent=...)) use them, and no limit here has them",
                ", ".join(f"{name}=" for name in names),
            )

    def limiter_for(self, method: str, path: str) -> Checker | None:
        """The limiter for this request, or ``None`` when it is exempt."""
        if method in self.exempt_methods:
            return None
        if not self._by_path:
            return self.limiter
        found = [
            limiter if matched else self.limiter for matched, limiter in self.routes.match_all(method, path)
        ]
        limiters = [limiter for limiter in found if limiter is not None]
        if not limiters:  # every spelling exempt
            return None
        first = limiters[0]
        if all(limiter is first for limiter in limiters):
            return first
        return self._both(first, limiters[1])

    def _both(self, first: Checker, second: Checker) -> Checker:
        """The two limiters of a path whose spellings fall under two rules (see ``routes``): both apply."""
        key = (id(first), id(second))
        both = self._pairs.get(key)
        if both is None:
            both = self._pairs[key] = Both(first, second)
        return both

    def ask(self, limiter: Checker, request: RequestView) -> Ask | HTTPResponse | None:
        """What to ask of ``limiter`` (of the request's plan, for ``Plans``) for this request: an ``Ask``, or
        what ``failed`` answers when a key function or the token estimate raises.

        Raises ``BodyNotLoaded`` when a key function or the estimate needs the body first: the shell reads
        it and asks again.
        """
        try:
            user, model = self.identify(request)
            if self._routes:
                limiter, model = routed(limiter, request, model)
        except Exception as error:
            return self.failed("the key function", error)
        reserver = reserver_of(limiter) if self.reserves else None
        if reserver is None:
            return limiter, None, user, model, (0, 0)
        try:
            return limiter, reserver, user, model, self.estimate(request)
        except Exception as error:
            return self.failed("the token estimate", error)

    def answer(self, ask: Ask) -> Decision | Reservation | HTTPResponse | None:
        """The limiter's answer to ``ask``: a decision, or a reservation of the expected tokens (input,
        output) from a limiter with token or concurrency limits; reported to the observers, or what
        ``failed`` says if the limiter raised."""
        limiter, reserver, user, model, tokens = ask
        started = time.perf_counter() if self.observers else 0.0
        try:
            if reserver is None:
                outcome: Decision | Reservation = limiter.check(user, model)
            else:
                outcome = reserver.reserve(user, model, input_tokens=tokens[0], output_tokens=tokens[1])
        except Exception as error:
            return self.failed("the limiter", error)
        if self.observers:
            self.observed(outcome, user, model, started)
        return outcome

    async def aanswer(self, ask: Ask) -> Decision | Reservation | HTTPResponse | None:
        """``answer`` for event loops."""
        limiter, reserver, user, model, tokens = ask
        started = time.perf_counter() if self.observers else 0.0
        try:
            if reserver is None:
                outcome: Decision | Reservation = await limiter.acheck(user, model)
            else:
                outcome = await reserver.areserve(
                    user, model, input_tokens=tokens[0], output_tokens=tokens[1]
                )
        except Exception as error:
            return self.failed("the limiter", error)
        if self.observers:
            self.observed(outcome, user, model, started)
        return outcome

    def identify(self, request: RequestView) -> tuple[str, str]:
        """``(user, model)``; raises ``BodyNotLoaded`` when a key function needs the body first.

        A user key function with no answer (``None`` or ``""``) falls back to the client address, keyed as
        ``client_ip()`` keys it (IPv6 on its /64; a client that is no IP address as it is), without one to
        ``_anonymous``.
        """
        user = None if self._user_header is None else request.header(self._user_header)
        if user is None and self._user_rest is not None:
            user = self._user_rest(request)
        if user is None or user == "":  # "" would be one bucket for every such client
            client = request.client
            user = (address_key(client) or f"ip:{client}") if client else self._anonymous()
        model = None if self._model_header is None else request.header(self._model_header)
        if model is None and self._model_rest is not None:
            model = self._model_rest(request)
        model = model or "default"
        if not isinstance(user, str) or not isinstance(model, str):
            raise TypeError(f"key functions must return str or None, got user={user!r}, model={model!r}")
        if len(user) > _MAX_KEY_LENGTH or len(model) > _MAX_KEY_LENGTH:
            return _bounded(user), _bounded(model)
        return user, model

    def _anonymous(self) -> str:
        """The user of a request with no user key and no client address (a server on a Unix socket): one
        bucket for all of them, which the log says once a minute."""
        if self._log.due(("anonymous", None)):
            logger.warning(
                "a request had no user key and no client address: it counts in the one 'anonymous' bucket; "
                "behind a proxy, set user_key=client_ip(trusted_proxies=...)"
            )
        return "anonymous"

    @classmethod
    def for_middleware(cls, owner: str, limiter: LimiterSpec | None, options: GateOptions) -> Gate:
        """The gate of middleware ``owner`` (its class name, which an unknown option's error names)."""
        _check_known(options, GateOptions.__annotations__, owner)
        return cls(limiter, **options)

    @classmethod
    def for_route(cls, limiter: LimiterSpec, **options: Unpack[RouteOptions]) -> Gate:
        """A gate for one route (the decorators): nothing exempt, and request limits only.

        Token and concurrency limits follow the response to its end, which only the middlewares see; path
        rules and token metering are the middlewares' too.
        """
        middleware_only = sorted(
            set(options) & (set(GateOptions.__annotations__) - set(RouteOptions.__annotations__))
        )
        if middleware_only:
            raise TypeError(
                f"{middleware_only[0]!r} is an option of RateLimitMiddleware and RateLimitWSGI, not of a "
                f"route; a route takes {', '.join(RouteOptions.__annotations__)}"
            )
        _check_known(options, RouteOptions.__annotations__, "a per-route limit")
        gate = cls(limiter, exempt_methods=(), **options)
        if reserver_of(gate.limiter) is not None:
            raise TypeError(
                "token and concurrency limits need RateLimitMiddleware or RateLimitWSGI, which follow the "
                "response to its end; a per-route decorator takes request limits only"
            )
        return gate

    def estimate(self, request: RequestView) -> tuple[int, int]:
        """The tokens a request is expected to use; raises ``BodyNotLoaded`` until the body is read.

        A request without a body (``GET /v1/models``) asks for nothing to be generated: ``(0, 0)``, it counts
        as a request only. A body that is not JSON, or over ``max_body_size``, keeps the default output,
        except on the endpoints that generate nothing (embeddings, moderations, token counts: see
        ``tokens.estimate``).
        """
        if self.estimator is not None:
            return token_pair(self.estimator(request), "the estimator")
        body = request.json()
        if body is None and request.body_empty:
            return 0, 0
        return estimate_tokens(body, self.default_output_tokens, request.path)

    def usage_requesting_body(self, request: RequestView) -> bytes | None:
        """With ``stream_usage``: the body of a streaming request that did not ask for usage, asking for it.

        OpenAI-compatible servers then end the stream with a usage chunk (``stream_options.include_usage``),
        which settles the reservation exactly. A client's ``"include_usage": false`` is overridden too: it
        kept the chunk away, so that the stream paid only for the text the meter counts. The client gets no
        chunk it did not ask for (``usage_chunk.UsageChunkFilter``). Only on the endpoints that take that
        option (chat completions, completions): others (Anthropic's messages, OpenAI's responses) would
        refuse the body. ``None``: leave the body as it is.
        """
        if not self.stream_usage or not request.body_loaded or not _takes_include_usage(request.path):
            return None
        body = request.json()
        if not isinstance(body, dict) or body.get("stream") is not True:
            return None
        options = body.get("stream_options")
        if options is None:
            options = {}
        if not isinstance(options, dict) or options.get("include_usage") is True:
            return None
        return json.dumps({**body, "stream_options": {**options, "include_usage": True}}).encode()

    def informs(self, decision: Decision) -> bool:
        """Whether an allowed response gets the informational headers: not when ``add_headers`` is off, nor
        for a decision made without the limit (they would describe a count nobody made)."""
        return self.add_headers and not isinstance(decision, UncheckedDecision)

    def allowed_headers(self, outcome: Decision | Reservation) -> list[tuple[str, str]]:
        """The headers of an allowed response: those of its decisions, the request one first (see
        ``informs``)."""
        decisions = _ordered(outcome) if isinstance(outcome, Reservation) else [outcome]
        return informational_headers(*decisions) if self.informs(decisions[0]) else []

    @overload
    def verdict(
        self,
        request: RequestView,
        outcome: Decision | Reservation | HTTPResponse | None,
        carrier: MutableMapping[str, Any],
        raw: Literal[False] = False,
    ) -> tuple[HTTPResponse | None, list[Decision], Reservation | None]: ...

    @overload
    def verdict(
        self,
        request: RequestView,
        outcome: Decision | Reservation | HTTPResponse | None,
        carrier: MutableMapping[str, Any],
        raw: Literal[True],
    ) -> tuple[HTTPResponse | RawResponse | None, list[Decision], Reservation | None]: ...

    def verdict(
        self,
        request: RequestView,
        outcome: Decision | Reservation | HTTPResponse | None,
        carrier: MutableMapping[str, Any],
        raw: bool = False,
    ) -> tuple[HTTPResponse | RawResponse | None, list[Decision], Reservation | None]:
        """What a layer (middleware or route) does once ``admit`` answered: ``(response to send instead of
        the app, decisions whose headers this layer writes on the app's response, reservation to meter while
        the app runs)``. ``carrier``: the ASGI scope or WSGI environ, where layers share ``SHARED_DECISIONS``;
        ``raw``: the default 429 in ASGI bytes.

        A denying layer (429 or 503) empties an enclosing layer's decisions, so that its response carries its
        own headers only; an allowing one inside another folds its decisions in and writes none itself. The
        layer that publishes decisions calls ``starting_headers`` when the response starts.
        """
        if outcome is None:  # on_error="allow": through, described by the layers outside
            return None, [], None
        if isinstance(outcome, HTTPResponse):  # a 503: its own headers only
            _stand_aside(carrier)
            return outcome, [], None
        metered = None
        if isinstance(outcome, Reservation):
            if not self.passes(outcome.decision):
                _stand_aside(carrier)
                return self.reservation_denied(request, outcome), [], None
            metered = outcome if outcome.allowed else None
            mine = _ordered(outcome)
        elif outcome.allowed or self.shadow:  # passes(), inline: this runs for every request
            mine = [outcome]
        else:
            _stand_aside(carrier)
            return (self.raw_denied(request, outcome) if raw else self.denied(request, outcome)), [], None
        if not self.add_headers or isinstance(mine[0], UncheckedDecision):  # `informs()`, inline
            return None, [], metered
        enclosing = carrier.get(SHARED_DECISIONS)
        if isinstance(enclosing, list):  # a layer outside writes the headers
            if enclosing:
                enclosing[:] = _folded([*enclosing, *mine])
            return None, [], metered
        carrier[SHARED_DECISIONS] = mine
        return None, mine, metered

    @overload
    @staticmethod
    def starting_headers(
        carrier: MutableMapping[str, Any], described: list[Decision], raw: Literal[False] = False
    ) -> list[tuple[str, str]]: ...

    @overload
    @staticmethod
    def starting_headers(
        carrier: MutableMapping[str, Any], described: list[Decision], raw: Literal[True]
    ) -> list[tuple[bytes, bytes]]: ...

    @staticmethod
    def starting_headers(
        carrier: MutableMapping[str, Any], described: list[Decision], raw: bool = False
    ) -> list[tuple[str, str]] | list[tuple[bytes, bytes]]:
        """The response that ``described`` describes starts: its rate limit headers (none if a layer inside
        denied); ``raw``: in ASGI bytes.

        Every layer inside has decided by then, even a WSGI one that runs as the server iterates: a scope or
        environ used again (a copy, a test harness) starts without them.
        """
        if carrier.get(SHARED_DECISIONS) is described:
            del carrier[SHARED_DECISIONS]
        if not described:
            return []
        return raw_informational_headers(*described) if raw else informational_headers(*described)

    def denied(self, request: RequestView, decision: Decision, *others: Decision) -> HTTPResponse:
        """The response for a denied request (``others``: the other units of a reservation)."""
        if self.deny_handler is not None:
            if not request.body_loaded:  # read only for key functions: the handler's request.json() is None
                request.load_body(None)
            try:
                return _checked_response(self.deny_handler(request, decision))
            except Exception as error:
                self._log.warning("the deny_handler", error, "answered with the default 429")
        return denial_response(decision, *others)

    def raw_denied(self, request: RequestView, decision: Decision) -> HTTPResponse | RawResponse:
        """``denied`` for ASGI: the default 429 written in bytes from the start, or the ``deny_handler``'s."""
        if self.deny_handler is None:
            return raw_denial_response(decision)
        return self.denied(request, decision)

    def reservation_denied(self, request: RequestView, reservation: Reservation) -> HTTPResponse:
        """The 429 for a denied reservation, naming its binding limit first."""
        decision = reservation.decision
        others = [other for other in _ordered(reservation) if other.unit != decision.unit]
        return self.denied(request, decision, *others)

    def failed(self, stage: str, error: Exception) -> HTTPResponse | None:
        """After a key function or the limiter raised: ``None`` to let the request through, else a 503.

        A limiter whose storage is down and whose own policy is to deny (``RateLimiterUnavailable``) always
        gets its 503, with the wait it asks for; it logs its outages itself.
        """
        if isinstance(error, RateLimiterUnavailable):
            notify(self.observers, "failure", stage, error, "denied")
            return unavailable_response(max(1, math.ceil(error.retry_after)))
        if self.on_error == "allow":
            notify(self.observers, "failure", stage, error, "allowed")
            self._log.warning(stage, error, "allowed (on_error='allow')")
            return None
        notify(self.observers, "failure", stage, error, "denied")
        self._log.warning(stage, error, "denied with 503 (on_error='deny')")
        return unavailable_response()

    def failed_after(self, stage: str, error: Exception) -> None:
        """After a request was served, a step that follows it (reading its usage, settling its reservation)
        raised: nothing is left to allow or deny; observers see the failure (``"unsettled"``) and the log
        says it, once a minute."""
        notify(self.observers, "failure", stage, error, "unsettled")
        self._log.warning(stage, error, "served; its reservation may keep its estimate")

    def observed(self, outcome: Decision | Reservation, user: str, model: str, started: float) -> None:
        """Report a decision (made since ``started``, a ``perf_counter`` reading) to the observers."""
        if self.observers:  # also checked by the callers on the hot path
            decision = outcome.decision if isinstance(outcome, Reservation) else outcome
            elapsed = time.perf_counter() - started
            if isinstance(decision, ShadowDecision):  # a denial that a Shadow limiter let through
                decision = decision._replace(allowed=False)
            shadowed = not decision.allowed and (self.shadow or isinstance(decision, ShadowDecision))
            notify(self.observers, "decision", decision, user, model, elapsed, shadowed)
            if isinstance(decision, FallbackDecision):
                notify(self.observers, "fallback", decision.policy, decision)

    def settlement(self, meter: Meter) -> tuple[int, int] | None:
        """``meter.settlement()``; a response in a ``Content-Encoding`` the meter cannot read (``br``,
        ``zstd``, or a corrupt gzip body) keeps its estimate (or what was read before the corruption), which
        the log says at most once a minute per encoding."""
        encoding = meter.unread_encoding
        if encoding is not None and self._log.due((f"the meter, Content-Encoding {encoding[:32]}", None)):
            logger.warning(
                "a response in Content-Encoding %r cannot be metered in full: its reservation keeps the "
                "estimate, or what was read",
                encoding,
            )
        return meter.settlement()

    def settled(self, reservation: Reservation, actual: tuple[int, int] | None) -> None:
        """Report a settled (``actual``) or cancelled (``None``) reservation to the observers."""
        if self.observers:
            notify(self.observers, "settlement", reservation.model, reservation.reserved, actual)

    def passes(self, decision: Decision) -> bool:
        """Whether the request goes on: allowed, or denied in shadow mode (recorded, never enforced)."""
        return decision.allowed or self.shadow
