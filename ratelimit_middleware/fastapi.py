"""Per-route limits for FastAPI and Starlette: a decorator and a dependency.

``@limit("10/minute")`` under the route decorator limits one endpoint; the endpoint needs no ``request``
parameter (the decorator adds a hidden one to the signature FastAPI reads).
``Depends(RateLimit("10/minute"))`` does the same as a dependency, raising ``RateLimitExceeded`` (an
``HTTPException``); register ``rate_limit_exceeded_handler`` for OpenAI-shaped 429 bodies. Each decorator
or dependency has its own limiter unless you pass a shared limiter object, so same-named endpoints in
different modules never share.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from .asgi import admit, request_view
from .contract import HTTPResponse
from .gate import Gate, LimiterSpec, RouteOptions
from .reservation import Reservation

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["RateLimit", "RateLimitExceeded", "limit", "rate_limit_exceeded_handler"]

F = TypeVar("F", bound=Callable[..., Any])

_REQUEST = "_ratelimit_request"
_RESPONSE = "_ratelimit_response"


class RateLimitExceeded(HTTPException):
    """Raised by the ``RateLimit`` dependency; carries the full 429 (or 503) to send."""

    def __init__(self, response: HTTPResponse) -> None:
        detail = json.loads(response.body).get("error", {}).get("message", "") if response.body else ""
        headers = {name: value for name, value in response.headers if name.lower() != "content-type"}
        super().__init__(status_code=response.status, detail=detail, headers=headers)
        self.response = response


async def rate_limit_exceeded_handler(request: Request, exc: Exception) -> Response:
    """Exception handler that sends ``RateLimitExceeded`` as the OpenAI-shaped 429 it carries."""
    if not isinstance(exc, RateLimitExceeded):  # pragma: no cover - registered for that type only
        raise exc
    return _to_response(exc.response)


def _to_response(response: HTTPResponse) -> Response:
    return Response(response.body, status_code=response.status, headers=dict(response.headers))


async def _check(gate: Gate, request: Request) -> tuple[HTTPResponse | None, list[tuple[str, str]]]:
    """``(response to send instead of the endpoint, headers for the endpoint's response)``."""
    view = request_view(request.scope)

    async def load_body() -> None:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > gate.max_body_size:
            view.load_body(None)
            return
        body = await request.body()  # cached by Starlette: the endpoint can still read it
        view.load_body(body if len(body) <= gate.max_body_size else None)

    outcome = await admit(gate, gate.limiter, view, load_body)
    assert not isinstance(outcome, Reservation)  # Gate.for_route refuses token and concurrency limits
    if isinstance(outcome, HTTPResponse):
        return outcome, []
    if outcome is None:
        return None, []
    if not outcome.allowed:
        return gate.denied(view, outcome), []
    return None, gate.allowed_headers(outcome)


def limit(limiter: LimiterSpec, **options: Unpack[RouteOptions]) -> Callable[[F], F]:
    """Limit one endpoint: ``limiter`` is a limit string (``"10/minute;500/day"``), a config or a limiter.

    Place it below ``@app.get(...)``/``@app.post(...)``. Sync endpoints run in the thread pool, as FastAPI
    runs them.
    """
    gate = Gate.for_route(limiter, **options)

    def decorator(endpoint: F) -> F:
        signature = inspect.signature(endpoint)
        hidden = [
            inspect.Parameter(_REQUEST, inspect.Parameter.KEYWORD_ONLY, annotation=Request),
            inspect.Parameter(_RESPONSE, inspect.Parameter.KEYWORD_ONLY, annotation=Response),
        ]
        parameters = list(signature.parameters.values())
        variadic = [p for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD]
        plain = [p for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD]
        is_coroutine = inspect.iscoroutinefunction(endpoint)

        @functools.wraps(endpoint)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            request: Request = kwargs.pop(_REQUEST)
            response: Response = kwargs.pop(_RESPONSE)
            denial, headers = await _check(gate, request)
            if denial is not None:
                return _to_response(denial)
            if is_coroutine:
                result = await endpoint(*args, **kwargs)
            else:
                result = await run_in_threadpool(endpoint, *args, **kwargs)
            target = result if isinstance(result, Response) else response
            for name, value in headers:
                target.headers.append(name, value)
            return result

        wrapper.__signature__ = signature.replace(parameters=[*plain, *hidden, *variadic])  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorator


class RateLimit:
    """A FastAPI dependency: ``dependencies=[Depends(RateLimit("10/minute"))]`` or a parameter default."""

    def __init__(
        self,
        limiter: LimiterSpec,
        **options: Unpack[RouteOptions],
    ) -> None:
        self.gate = Gate.for_route(limiter, **options)

    async def __call__(self, request: Request, response: Response) -> None:
        denial, headers = await _check(self.gate, request)
        if denial is not None:
            raise RateLimitExceeded(denial)
        for name, value in headers:
            response.headers.append(name, value)
