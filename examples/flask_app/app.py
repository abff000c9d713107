"""The same contract in Flask: ``RateLimitWSGI`` around the whole app, and one route with its own limit.

Run it: ``flask --app examples/flask_app/app.py run``. Every request is limited per user and model (100 per
hour by default, ``RATELIMIT_DEFAULT`` to change it); ``/v1/embeddings`` also has a tighter limit of its own.
Prometheus metrics are served at ``/metrics``.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, Response, jsonify, request
from prometheus_client import make_wsgi_app
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from ratelimit_middleware.flask import limit
from ratelimit_middleware.keys import from_json_body
from ratelimit_middleware.metrics import PrometheusMetrics
from ratelimit_middleware.wsgi import RateLimitWSGI

CHAT_MODELS = ("gpt-4o", "gpt-4o-mini")
EMBEDDING_MODELS = ("text-embedding-3-small",)


def _error(status: int, message: str, kind: str) -> tuple[Response, int]:
    return jsonify({"error": {"message": message, "type": kind, "param": None, "code": None}}), status


def _requested_model(served: tuple[str, ...]) -> str | tuple[Response, int]:
    """The body's ``"model"`` if this route serves it, else the error to answer: limits count per model, so
    serving any name a client makes up would give it a fresh budget with each one."""
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # JSON nested too deep for the parser
        body = None
    if not isinstance(body, dict):
        return _error(400, "the body must be a JSON object", "invalid_request_error")
    model = body.get("model")
    if not isinstance(model, str) or model not in served:
        return _error(404, f"model {model!r} not found; this route serves {', '.join(served)}", "not_found")
    return model


def create_app(default_limit: str | None = None, embeddings_limit: str = "5/minute") -> Flask:
    """The example app; the arguments let tests pick small limits."""
    app = Flask(__name__)
    metrics = PrometheusMetrics(models=CHAT_MODELS + EMBEDDING_MODELS)  # made-up names count as "other"
    limited = RateLimitWSGI(
        app.wsgi_app,
        limiter=default_limit or os.environ.get("RATELIMIT_DEFAULT", "100/hour"),
        model_key=from_json_body("model"),  # the model served, not a header the client may set freely
        exempt_paths=["/health"],
        observers=[metrics],
    )
    app.wsgi_app = DispatcherMiddleware(limited, {"/metrics": make_wsgi_app(metrics.registry)})  # type: ignore[method-assign]

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    def chat_completions() -> Any:
        model = _requested_model(CHAT_MODELS)
        if not isinstance(model, str):
            return model
        return jsonify(
            {
                "object": "chat.completion",
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from Flask."}}],
            }
        )

    @app.post("/v1/embeddings")
    @limit(embeddings_limit, model_key=from_json_body("model"))  # the body's model, as the middleware
    def embeddings() -> Any:
        model = _requested_model(EMBEDDING_MODELS)
        if not isinstance(model, str):
            return model
        return jsonify({"object": "list", "model": model, "data": []})

    return app


app = create_app()
