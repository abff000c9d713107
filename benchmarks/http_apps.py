"""The minimal apps that ``bench_http.py`` measures, bare and behind each rate limiter.

One Starlette app (ASGI) and one Flask app (WSGI), each with ``GET /`` returning a small JSON and
``POST /v1/chat/completions`` that reads the body (as an inference API would) and returns a small JSON. Each
is built bare or behind one limiter, chosen by a variant name:

- ASGI: ``bare``; ``bare_headers`` (a control: the bare app sending, fixed, the nine informational headers
  that our middleware adds to an allowed response); ``ours`` / ``ours_deny`` (``RateLimitMiddleware``);
  ``ours_noheaders`` (the same with ``add_headers=False``); ``slowapi`` / ``slowapi_deny``
  (``SlowAPIMiddleware``, the one slowapi's README shows); ``slowapi_asgi`` (its pure-ASGI
  ``SlowAPIASGIMiddleware``).
- WSGI: ``bare``; ``bare_headers``; ``ours`` / ``ours_deny`` / ``ours_noheaders`` (``RateLimitWSGI`` as
  ``app.wsgi_app``); ``flask_limiter`` / ``flask_limiter_deny``.

The allow variants use a limit of 10**9 per hour, never reached; the deny variants 1 per hour, so after the
first request every request of the benchmark user is denied. Every limiter keys on the ``X-User-ID`` header
and uses its default in-memory storage and default algorithm (ours: ``sliding_log``; slowapi and
flask-limiter: ``limits``' fixed window).

The servers import this module by name: ``uvicorn http_apps:make_asgi --factory --app-dir benchmarks``
and ``gunicorn --pythonpath benchmarks 'http_apps:make_wsgi()'``, with the variant in ``BENCH_VARIANT``.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

ALLOW_LIMIT = "1000000000/hour"
DENY_LIMIT = "1/hour"
USER_HEADER = "X-User-ID"

ASGI_VARIANTS = (
    "bare",
    "bare_headers",
    "ours",
    "ours_noheaders",
    "ours_deny",
    "slowapi",
    "slowapi_asgi",
    "slowapi_deny",
)
WSGI_VARIANTS = (
    "bare",
    "bare_headers",
    "ours",
    "ours_noheaders",
    "ours_deny",
    "flask_limiter",
    "flask_limiter_deny",
)

HELLO = {"object": "ping", "ok": True, "model": "gpt-4"}


def _announce() -> None:
    """In a server (``BENCH_VARIANT`` set), log where our package comes from: ``bench_http`` checks it."""
    if "BENCH_VARIANT" in os.environ:
        import ratelimit_middleware

        print(
            f"ratelimit_middleware imported from {ratelimit_middleware.__file__}", file=sys.stderr, flush=True
        )


def _limit(variant: str) -> str:
    return DENY_LIMIT if variant.endswith("_deny") else ALLOW_LIMIT


def allowed_headers() -> list[tuple[str, str]]:
    """The headers our middleware adds to an allowed response (for the ``bare_headers`` control)."""
    from ratelimit_middleware import RateLimiter
    from ratelimit_middleware.contract import informational_headers

    return informational_headers(RateLimiter(limit=ALLOW_LIMIT).check("someone", "gpt-4"))


def make_asgi(variant: str | None = None) -> Any:
    """The Starlette app for ``variant`` (default: the ``BENCH_VARIANT`` environment variable)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    variant = variant or os.environ.get("BENCH_VARIANT", "bare")
    if variant not in ASGI_VARIANTS:
        raise ValueError(f"unknown ASGI variant {variant!r}: choose from {', '.join(ASGI_VARIANTS)}")

    extra = dict(allowed_headers()) if variant == "bare_headers" else None

    async def hello(request: Request) -> JSONResponse:
        return JSONResponse(HELLO, headers=extra)

    async def chat(request: Request) -> JSONResponse:
        body = await request.body()
        return JSONResponse({"object": "chat.completion", "received": len(body)})

    app = Starlette(routes=[Route("/", hello), Route("/v1/chat/completions", chat, methods=["POST"])])

    if variant.startswith("ours"):
        from ratelimit_middleware import RateLimiter
        from ratelimit_middleware.asgi import RateLimitMiddleware

        _announce()
        app.add_middleware(
            RateLimitMiddleware,
            limiter=RateLimiter(limit=_limit(variant)),
            add_headers=variant != "ours_noheaders",
        )
    elif variant.startswith("slowapi"):
        from slowapi import Limiter, _rate_limit_exceeded_handler
        from slowapi.errors import RateLimitExceeded
        from slowapi.middleware import SlowAPIASGIMiddleware, SlowAPIMiddleware

        def user_of(request: Request) -> str:
            return request.headers.get(USER_HEADER, "anonymous")

        app.state.limiter = Limiter(key_func=user_of, default_limits=[_limit(variant)])
        app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
        app.add_middleware(SlowAPIASGIMiddleware if variant == "slowapi_asgi" else SlowAPIMiddleware)
    return app


def make_wsgi(variant: str | None = None) -> Callable[..., Any]:
    """The Flask app for ``variant`` (default: the ``BENCH_VARIANT`` environment variable)."""
    import flask

    variant = variant or os.environ.get("BENCH_VARIANT", "bare")
    if variant not in WSGI_VARIANTS:
        raise ValueError(f"unknown WSGI variant {variant!r}: choose from {', '.join(WSGI_VARIANTS)}")

    app = flask.Flask("bench")

    extra = allowed_headers() if variant == "bare_headers" else []

    @app.get("/")
    def hello() -> Any:
        return flask.jsonify(HELLO), 200, extra

    @app.post("/v1/chat/completions")
    def chat() -> Any:
        body = flask.request.get_data()
        return flask.jsonify({"object": "chat.completion", "received": len(body)})

    if variant.startswith("ours"):
        from ratelimit_middleware import RateLimiter
        from ratelimit_middleware.wsgi import RateLimitWSGI

        _announce()
        app.wsgi_app = RateLimitWSGI(  # type: ignore[method-assign]
            app.wsgi_app,
            limiter=RateLimiter(limit=_limit(variant)),
            add_headers=variant != "ours_noheaders",
        )
    elif variant.startswith("flask_limiter"):
        from flask_limiter import Limiter

        def user_of() -> str:
            return flask.request.headers.get(USER_HEADER, "anonymous")

        # flask-limiter warns (once, by logging and warnings) that memory storage is not for production.
        logging.getLogger("flask-limiter").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Limiter(user_of, app=app, default_limits=[_limit(variant)], storage_uri="memory://")
    return app
