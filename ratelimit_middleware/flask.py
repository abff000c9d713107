"""Per-route limits for Flask views: ``@limit("10/minute")``.

A limit string gives each decorated view a limiter of its own, so two views with the same function name in
different blueprints or modules never share a limit; limiters passed in share the counters of the rules
they state alike when they share a storage (give each its own ``key_prefix`` on one Redis). The view needs
no extra parameter. Options are those of ``RateLimitWSGI`` but path rules and token metering
(``gate.RouteOptions``; others raise ``TypeError``); when a key function asks for the body, at most
``max_body_size`` + 1 bytes of it are read from Flask's request, which replays them to the view. A denial
raises ``RateLimitExceeded`` (a ``TooManyRequests``) when ``@app.errorhandler(429)`` (or one for an HTTP
exception class it is) is there to answer it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import flask
from werkzeug.exceptions import HTTPException, TooManyRequests

from .checker import LimiterSpec
from .contract import HTTPResponse
from .gate import Gate, RouteOptions
from .request import RequestView
from .wsgi import Environ, admit, load_body, request_view

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["RateLimitExceeded", "limit"]

F = TypeVar("F", bound=Callable[..., Any])


def _load_body(request: flask.Request, view: RequestView, limit: int) -> None:
    """Read the body for the key functions, at most ``limit`` + 1 bytes; the view still reads all of it.

    A body the app already read with ``get_data`` is taken from Flask's cache. Otherwise ``wsgi.load_body``
    reads ``request.stream`` (which keeps to Content-Length and ``MAX_CONTENT_LENGTH``) as a terminated input,
    and ``request.stream`` (and ``wsgi.input``) becomes its replay: the bytes read, then the rest.
    """
    length = request.content_length
    if length is not None and length > limit:
        view.load_body(None)
        return
    cached: bytes | None = getattr(request, "_cached_data", None)  # werkzeug's cache of get_data()
    if cached is not None:
        view.load_body(cached if len(cached) <= limit else None)
        return
    environ: Environ = {"wsgi.input": request.stream, "wsgi.input_terminated": True}
    load_body(environ, view, limit)
    # the view may read request.stream, request.input_stream or the environ's wsgi.input: all replay
    request.stream = request.environ["wsgi.input"] = environ["wsgi.input"]


def _respond(response: HTTPResponse) -> flask.Response:
    return flask.Response(response.body, status=response.status, headers=response.headers)


class RateLimitExceeded(TooManyRequests):
    """Raised by ``@limit`` for a denied request, as Flask apps expect of a 429: Flask sends the
    OpenAI-shaped 429 it carries (``response``), unless an error handler for 429 (or for this class) answers
    instead, whose response then gets the rate limit headers too (``Retry-After`` included)."""

    def __init__(self, response: HTTPResponse) -> None:
        super().__init__(response=_respond(response))
        self.denial = response


def _answers_429(app: flask.Flask, blueprints: Iterable[str]) -> bool:
    """Whether the app (or a blueprint of the request) has an error handler for a 429: by code, or for an
    HTTP exception class that ``RateLimitExceeded`` is; not a catch-all ``Exception`` handler, which would
    turn a denial into its own answer (often a 500)."""
    for scope in (*blueprints, None):
        handlers = app.error_handler_spec.get(scope, {})
        if handlers.get(429):
            return True
        by_class = handlers.get(None, {})
        if any(issubclass(kind, HTTPException) and kind in by_class for kind in RateLimitExceeded.__mro__):
            return True
    return False


def _denied(response: HTTPResponse) -> flask.Response:
    """``response`` for a denied request: a 429 is raised (``RateLimitExceeded``) when an error handler of
    the app answers it; otherwise, and for any other status (a 503 when the limiter is unavailable), it is
    sent as it is."""
    if response.status != 429 or not _answers_429(flask.current_app, flask.request.blueprints):
        return _respond(response)

    @flask.after_this_request
    def with_denial_headers(sent: flask.Response) -> flask.Response:
        for name, value in response.headers:  # an error handler's own response: add what it lacks
            if name.lower() not in ("content-type", "content-length") and name not in sent.headers:
                sent.headers[name] = value
        return sent

    raise RateLimitExceeded(response)


def limit(limiter: LimiterSpec, **options: Unpack[RouteOptions]) -> Callable[[F], F]:
    """Limit one Flask view; ``limiter`` is a limit string (``"10/minute;500/day"``), a config or a limiter.

    Place it below ``@app.route(...)``.
    """
    gate = Gate.for_route(limiter, **options)

    def check() -> flask.Response | None:
        """The response to send instead of the view, or ``None``. The headers of the decisions the view's
        response describes (shared with the routes limited inside, see ``Gate.verdict``) go on whatever
        response the request ends with, an error handler's for a view that raised included."""
        request = flask.request
        view = request_view(request.environ)
        outcome = admit(gate, gate.limiter, view, lambda: _load_body(request, view, gate.max_body_size))
        denial, described, _ = gate.verdict(view, outcome, request.environ)
        if denial is not None:
            return _denied(denial)
        if described:

            @flask.after_this_request
            def with_headers(response: flask.Response) -> flask.Response:
                response.headers.extend(gate.starting_headers(request.environ, described))
                return response

        return None

    def decorator(function: F) -> F:
        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def async_view(*args: Any, **kwargs: Any) -> Any:
                denial = check()
                return denial if denial is not None else await function(*args, **kwargs)

            return async_view  # type: ignore[return-value]

        @functools.wraps(function)
        def view(*args: Any, **kwargs: Any) -> Any:
            denial = check()
            return denial if denial is not None else function(*args, **kwargs)

        return view  # type: ignore[return-value]

    return decorator
