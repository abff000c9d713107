"""The example Flask app: RateLimitWSGI around the app, and a decorated route with its own limit."""

from __future__ import annotations

import sys

from .servers import ROOT

sys.path.insert(0, str(ROOT / "examples" / "flask_app"))

from app import create_app  # type: ignore[import-not-found]


def test_whole_app_is_limited_and_health_is_exempt() -> None:
    client = create_app(default_limit="2/minute").test_client()
    body = {"model": "gpt-4o", "messages": []}
    codes = [
        client.post("/v1/chat/completions", json=body, headers={"X-User-ID": "a"}).status_code
        for _ in range(3)
    ]
    assert codes == [200, 200, 429]
    assert all(client.get("/health").status_code == 200 for _ in range(5))


def test_decorated_route_has_its_own_tighter_limit() -> None:
    client = create_app(default_limit="100/minute", embeddings_limit="1/minute").test_client()
    first = client.post(
        "/v1/embeddings", json={"model": "text-embedding-3-small"}, headers={"X-User-ID": "a"}
    )
    assert first.status_code == 200 and first.json["model"] == "text-embedding-3-small"
    denied = client.post(
        "/v1/embeddings", json={"model": "text-embedding-3-small"}, headers={"X-User-ID": "a"}
    )
    assert denied.status_code == 429
    assert denied.json["error"]["code"] == "rate_limit_exceeded"
    assert denied.headers["RateLimit-Policy"] == '"per_user_model";q=1;w=60'


def test_metrics_endpoint_counts_the_traffic() -> None:
    client = create_app(default_limit="2/minute").test_client()
    for _ in range(3):
        client.post("/v1/chat/completions", json={"model": "gpt-4o"}, headers={"X-User-ID": "a"})
    text = client.get("/metrics").text
    labels = 'model="gpt-4o",outcome="{}",tier="per_user_model",unit="requests"'
    assert f"ratelimit_decisions_total{{{labels.format('allowed')}}} 2.0" in text
    assert f"ratelimit_decisions_total{{{labels.format('denied')}}} 1.0" in text


def test_only_served_models_are_answered_and_bad_bodies_are_400() -> None:
    """Limits count per model: a made-up model name would be a fresh budget, so it is a 404, never served."""
    client = create_app(default_limit="100/minute", embeddings_limit="1/minute").test_client()
    user = {"X-User-ID": "a"}
    assert (
        client.post("/v1/embeddings", json={"model": "text-embedding-3-small"}, headers=user).status_code
        == 200
    )
    for index in range(3):
        made_up = client.post("/v1/embeddings", json={"model": f"x{index}"}, headers=user)
        assert made_up.status_code == 404 and made_up.json["error"]["type"] == "not_found"
    for body in (b"[1, 2]", b'"text"', b"[" * 100_000 + b"]" * 100_000, b"{not json"):
        bad = client.post(
            "/v1/chat/completions", data=body, headers={**user, "Content-Type": "application/json"}
        )
        assert bad.status_code == 400, body[:20]


def test_made_up_models_are_counted_as_other_in_the_metrics() -> None:
    client = create_app(default_limit="100/minute").test_client()
    for index in range(3):
        client.post("/v1/chat/completions", json={"model": f"junk-{index}"}, headers={"X-User-ID": "a"})
    client.post("/v1/chat/completions", json={"model": "gpt-4o"}, headers={"X-User-ID": "a"})
    text = client.get("/metrics").text
    assert (
        'ratelimit_decisions_total{model="other",outcome="allowed",tier="per_user_model",unit="requests"} 3.0'
        in text
    )
    assert "junk" not in text
