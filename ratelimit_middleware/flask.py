"""Per-route limits for Flask views: ``@limit("10/minute")``.

Each decorated view gets its own limiter (unless you pass a shared limiter object), so two views with the
same function name in different blueprints or modules never share a limit. The view needs no extra
parameter. Options are those of ``RateLimitWSGI``; the body is read through Flask's request (cached for the
view) when a key function asks for it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import flask

from .contract import HTTPResponse
from .gate import Gate, LimiterSpec, RouteOptions
from .request import RequestView
from .reservation import Reservation
from .wsgi import admit, request_view

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["limit"]

F = TypeVar("F", bound=Callable[..., Any])


def _load_body(request: flask.Request, view: RequestView, limit: int) -> None:
    length = request.content_length
    if length is not None and length > limit:
        view.load_body(None)
        return
    body = request.get_data(cache=True)
    view.load_body(body if len(body) <= limit else None)


def _respond(response: HTTPResponse) -> flask.Response:
    return flask.Response(response.body, status=response.status, headers=response.headers)


def limit(limiter: LimiterSpec, **options: Unpack[RouteOptions]) -> Callable[[F], F]:
    """Limit one Flask view; ``limiter`` is a limit string (``"10/minute;500/day"``), a config or a limiter.

    Place it below ``@app.route(...)``.
    """
    gate = Gate.for_route(limiter, **options)

    def check() -> tuple[flask.Response | None, list[tuple[str, str]]]:
        """``(response to send instead of the view, headers to add to the view's response)``."""
        request = flask.request
        view = request_view(request.environ)
        outcome = admit(gate, gate.limiter, view, lambda: _load_body(request, view, gate.max_body_size))
        assert not isinstance(outcome, Reservation)  # Gate.for_route refuses token and concurrency limits
        if isinstance(outcome, HTTPResponse):
            return _respond(outcome), []
        if outcome is None:
            return None, []
        if not outcome.allowed:
            return _respond(gate.denied(view, outcome)), []
        return None, gate.allowed_headers(outcome)

    def decorator(function: F) -> F:
        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def async_view(*args: Any, **kwargs: Any) -> Any:
                denial, headers = check()
                if denial is not None:
                    return denial
                response = flask.make_response(await function(*args, **kwargs))
                response.headers.extend(headers)
                return response

            return async_view  # type: ignore[return-value]

        @functools.wraps(function)
        def view(*args: Any, **kwargs: Any) -> Any:
            denial, headers = check()
            if denial is not None:
                return denial
            response = flask.make_response(function(*args, **kwargs))
            response.headers.extend(headers)
            return response

        return view  # type: ignore[return-value]

    return decorator
