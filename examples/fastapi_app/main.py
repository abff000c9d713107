"""An OpenAI-compatible mock LLM server, limited in requests, tokens and requests in flight.

Run it (README's first command does): ``uvicorn main:app --app-dir examples/fastapi_app``. The limits come
from the environment: ``RATELIMIT_POLICY``, a policy file of plans (``examples/policies/plans.toml``), or

- ``RATELIMIT_PER_USER_MODEL`` (default ``"20/minute"``), ``RATELIMIT_TOKENS_PER_USER_MODEL``
  (``"40000/minute"``) and ``RATELIMIT_CONCURRENT_PER_USER_MODEL`` (``4``): each user on each model;
- ``RATELIMIT_PER_MODEL`` (``"600/minute"``), ``RATELIMIT_TOKENS_PER_MODEL`` (``"2000000/minute"``) and
  ``RATELIMIT_CONCURRENT_PER_MODEL`` (``64``): all users of one model together.

Tokens are reserved from the request (prompt and ``max_tokens``) and settled with the ``usage`` each
response reports, streams included.

With ``REDIS_URL`` set (``redis://host:6379/0``; ``redis+cluster://host:7000`` for a Redis Cluster, any node
of it), the limits live in that Redis and every process of the app shares them; otherwise each process
counts in memory. ``REDIS_TIMEOUT`` (seconds, default 0.1) bounds each
call to Redis; a slower reply is answered as Redis being down, by ``REDIS_ON_ERROR``: ``allow`` (the
default), ``deny`` (503) or ``local`` (each process limits alone meanwhile); the metrics count such answers.

Users are told apart by ``X-User-ID``, else their API key (``Authorization: Bearer ...``), else their address;
the model is the body's ``"model"``, the one the app serves (so an ``X-Model`` header cannot move a request
to another model's budget). ``/health`` is never limited.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import make_asgi_app

from ratelimit_middleware import Limits, MultiTierRateLimiter
from ratelimit_middleware.asgi import RateLimitMiddleware
from ratelimit_middleware.keys import from_json_body
from ratelimit_middleware.metrics import PrometheusMetrics
from ratelimit_middleware.plans import Plans

MODELS = ["gpt-4o-mini", "llama-3-8b", "mistral-7b"]
REPLY = "This is a canned answer from the mock model. Rate limits keep every GPU busy but never flooded."


def build_limiter() -> MultiTierRateLimiter | Plans:
    """The limiter the app uses, configured from the environment.

    ``RATELIMIT_POLICY`` names a policy file (TOML or YAML plans, see ``examples/policies``); without it, the
    variables listed in the module docstring set requests, tokens and concurrency. ``REDIS_URL`` puts the
    state in Redis (shared by every process), else it stays in memory.
    """
    storage = None
    if os.environ.get("REDIS_URL"):
        from ratelimit_middleware import RedisStorage  # needs the redis extra

        options: dict[str, Any] = {"on_error": os.environ.get("REDIS_ON_ERROR", "allow")}
        if os.environ.get("REDIS_TIMEOUT"):
            options["timeout"] = float(os.environ["REDIS_TIMEOUT"])
        storage = RedisStorage(os.environ["REDIS_URL"], **options)
    plans = Plans.from_env(storage=storage)
    if plans is not None:
        return plans
    environ = os.environ.get
    return MultiTierRateLimiter(
        per_user_model=Limits(
            environ("RATELIMIT_PER_USER_MODEL", "20/minute"),
            tokens=environ("RATELIMIT_TOKENS_PER_USER_MODEL", "40000/minute"),
            max_concurrent=int(environ("RATELIMIT_CONCURRENT_PER_USER_MODEL", "4")),
        ),
        per_model=Limits(
            environ("RATELIMIT_PER_MODEL", "600/minute"),
            tokens=environ("RATELIMIT_TOKENS_PER_MODEL", "2000000/minute"),
            max_concurrent=int(environ("RATELIMIT_CONCURRENT_PER_MODEL", "64")),
        ),
        storage=storage,
    )


def count_tokens(text: str) -> int:
    """A rough count, about four characters per token, as OpenAI's rule of thumb."""
    return max(1, len(text) // 4)


def _prompt_tokens(messages: list[Any]) -> int:
    text = "".join(str(message.get("content", "")) for message in messages if isinstance(message, dict))
    return count_tokens(text)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _stream(model: str, prompt: int, include_usage: bool) -> AsyncIterator[str]:
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    words = REPLY.split(" ")

    def chunk(delta: dict[str, str], finish: str | None) -> str:
        payload = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return f"data: {json.dumps(payload)}\n\n"

    yield chunk({"role": "assistant", "content": ""}, None)
    for index, word in enumerate(words):
        yield chunk({"content": word if index == 0 else " " + word}, None)
    yield chunk({}, "stop")
    if include_usage:
        usage = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": _usage(prompt, count_tokens(REPLY)),
        }
        yield f"data: {json.dumps(usage)}\n\n"
    yield "data: [DONE]\n\n"


def create_app(limiter: MultiTierRateLimiter | Plans | None = None) -> FastAPI:
    """The mock server behind the rate limit middleware, with Prometheus metrics at ``/metrics``."""
    app = FastAPI(title="Mock LLM API")
    metrics = PrometheusMetrics(models=MODELS)  # model names that clients make up count as "other"
    app.add_middleware(
        RateLimitMiddleware,
        limiter=build_limiter() if limiter is None else limiter,
        model_key=from_json_body("model"),  # the model served, not a header the client may set freely
        exempt_paths=["/health", "/metrics/*", "/docs", "/openapi.json"],  # /metrics: a Mount, also /metrics/
        observers=[metrics],
        stream_usage=True,
    )
    app.mount("/metrics", make_asgi_app(registry=metrics.registry))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": 0, "owned_by": "mock"} for name in MODELS],
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        try:
            body = await request.json()
        except (ValueError, RecursionError):  # not JSON, or nested too deeply to parse
            raise HTTPException(400, "the body must be JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            raise HTTPException(400, "'messages' must be a list")
        model = body.get("model")
        if model not in MODELS:
            raise HTTPException(404, f"model {model!r} not found")
        prompt = _prompt_tokens(body["messages"])
        if body.get("stream"):
            options = body.get("stream_options") or {}
            include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
            return StreamingResponse(_stream(model, prompt, include_usage), media_type="text/event-stream")
        return JSONResponse(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": REPLY},
                        "finish_reason": "stop",
                    }
                ],
                "usage": _usage(prompt, count_tokens(REPLY)),
            }
        )

    return app


app = create_app()
