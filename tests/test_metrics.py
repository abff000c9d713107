"""Observers, Prometheus metrics, audit events and shadow mode, through the real middlewares."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from ratelimit_middleware import Limits, MultiTierRateLimiter, RateLimiter
from ratelimit_middleware.asgi import RateLimitMiddleware
from ratelimit_middleware.metrics import PrometheusMetrics
from ratelimit_middleware.observe import Event, EventHook, Observer
from ratelimit_middleware.request import RequestView
from ratelimit_middleware.wsgi import RateLimitWSGI


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


async def completion(request: Request) -> Response:
    return JSONResponse({"usage": {"prompt_tokens": 5, "completion_tokens": 15}})


def picky_user(request: RequestView) -> str | None:
    if request.header("x-break"):
        raise LookupError("user directory unreachable")
    return request.header("x-user-id")


def client(limiter: Any, **options: Any) -> TestClient:
    app = Starlette(
        routes=[Route("/hello", hello), Route("/v1/chat/completions", completion, methods=["POST"])]
    )
    app.add_middleware(RateLimitMiddleware, limiter=limiter, user_key=picky_user, **options)
    return TestClient(app)


def sample(metrics: PrometheusMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_scraped_counters_equal_the_scripted_mix() -> None:
    metrics = PrometheusMetrics()
    http = client(RateLimiter(limit="3/minute"), observers=[metrics])
    statuses = [http.get("/hello", headers={"X-User-ID": "u", "X-Model": "m"}).status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    for _ in range(2):  # key function failures, let through by on_error="allow"
        assert http.get("/hello", headers={"X-Break": "1"}).status_code == 200
    allowed = {"outcome": "allowed", "tier": "per_user_model", "unit": "requests", "model": "m"}
    assert sample(metrics, "ratelimit_decisions_total", **allowed) == 3
    assert sample(metrics, "ratelimit_decisions_total", **{**allowed, "outcome": "denied"}) == 2
    assert sample(metrics, "ratelimit_failures_total", stage="key_function", outcome="allowed") == 2
    assert sample(metrics, "ratelimit_decision_seconds_count") == 5
    text = generate_latest(metrics.registry).decode()
    assert (
        'ratelimit_decisions_total{model="m",outcome="denied",tier="per_user_model",unit="requests"} 2.0'
        in text
    )


class Broken:
    def check(self, user: str, model: str, cost: int = 1) -> Any:
        raise ConnectionError("storage down")

    async def acheck(self, user: str, model: str, cost: int = 1) -> Any:
        raise ConnectionError("storage down")


def test_backend_failures_are_counted_with_their_outcome() -> None:
    metrics = PrometheusMetrics()
    assert client(Broken(), observers=[metrics], on_error="deny").get("/hello").status_code == 503
    assert client(Broken(), observers=[metrics]).get("/hello").status_code == 200
    assert sample(metrics, "ratelimit_failures_total", stage="limiter", outcome="denied") == 1
    assert sample(metrics, "ratelimit_failures_total", stage="limiter", outcome="allowed") == 1


def test_label_sets_stay_bounded_with_10000_users() -> None:
    metrics = PrometheusMetrics(max_models=5)
    limiter = RateLimiter(limit="1000/minute")
    for index in range(10_000):
        metrics.decision(
            limiter.check(f"user-{index}", f"model-{index % 50}"),
            f"user-{index}",
            f"model-{index % 50}",
            1e-6,
            False,
        )
    models = {
        sample.labels["model"]
        for metric in metrics.registry.collect()
        for sample in metric.samples
        if "model" in sample.labels
    }
    assert len(models) == 6 and "other" in models
    assert all(
        "user" not in sample.labels for metric in metrics.registry.collect() for sample in metric.samples
    )


def test_models_given_up_front_are_the_only_model_labels() -> None:
    """Clients choose model names: with ``models``, junk names never take the slot of a real one."""
    metrics = PrometheusMetrics(models=["gpt-4o", "llama-3"], max_models=1)
    limiter = RateLimiter(limit="1000/minute")
    for model in [*(f"junk-{index}" for index in range(200)), "llama-3", "gpt-4o"]:
        metrics.decision(limiter.check("u", model), "u", model, 1e-6, False)
    labelled = {labels["model"]: value for labels, value in decision_counts(metrics)}
    assert labelled == {"other": 200, "llama-3": 1, "gpt-4o": 1}
    with pytest.raises(TypeError, match="not one string"):
        PrometheusMetrics(models="gpt-4o")


def test_a_registry_that_is_not_one_is_named() -> None:
    """prometheus_client raised AttributeError 'register' from inside."""
    with pytest.raises(
        TypeError, match=r"^registry must be a prometheus_client CollectorRegistry or None, got 'x'$"
    ):
        PrometheusMetrics(registry="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"got <class 'prometheus_client\.registry\.CollectorRegistry'>"):
        PrometheusMetrics(registry=CollectorRegistry)  # type: ignore[arg-type]
    registry = CollectorRegistry()
    assert PrometheusMetrics(registry=registry).registry is registry


def test_a_model_name_with_a_lone_surrogate_keeps_the_metrics_readable() -> None:
    """A JSON body can name the model "\\ud800": as a raw label it made every later scrape raise."""
    metrics = PrometheusMetrics()
    limiter = RateLimiter(limit="1000/minute")
    for model in ("\ud800", "\ud800x"):
        metrics.decision(limiter.check("u", model), "u", model, 1e-6, False)
    text = generate_latest(metrics.registry).decode()
    assert 'model="\\\\ud800"' in text and 'model="\\\\ud800x"' in text


def decision_counts(metrics: PrometheusMetrics) -> list[tuple[dict[str, str], float]]:
    return [
        (sample.labels, sample.value)
        for metric in metrics.registry.collect()
        for sample in metric.samples
        if sample.name == "ratelimit_decisions_total"
    ]


def test_tokens_reserved_and_settled() -> None:
    metrics = PrometheusMetrics()
    http = client(MultiTierRateLimiter(per_user_model=Limits(tokens="10000/minute")), observers=[metrics])
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 90}
    assert http.post("/v1/chat/completions", json=body, headers={"X-User-ID": "u"}).status_code == 200
    assert sample(metrics, "ratelimit_tokens_reserved_total", model="m") == 100
    assert sample(metrics, "ratelimit_tokens_settled_total", model="m") == 20


def test_event_hook_sees_denials_and_failures() -> None:
    events: list[Event] = []
    http = client(RateLimiter(limit="1/minute"), observers=[EventHook(events.append)])
    http.get("/hello", headers={"X-User-ID": "u"})
    http.get("/hello", headers={"X-User-ID": "u"})
    http.get("/hello", headers={"X-Break": "1"})
    assert [event.kind for event in events] == ["denied", "failure"]
    assert events[0].user == "u" and events[0].decision is not None and not events[0].decision.allowed
    assert isinstance(events[1].error, LookupError) and events[1].outcome == "allowed"


def test_shadow_mode_records_and_adds_headers_but_never_denies() -> None:
    metrics = PrometheusMetrics()
    http = client(RateLimiter(limit="1/minute"), observers=[metrics], shadow=True)
    responses = [http.get("/hello", headers={"X-User-ID": "u", "X-Model": "m"}) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert responses[2].headers["x-ratelimit-remaining-requests"] == "0"
    assert "retry-after" not in responses[2].headers
    shadowed = {"outcome": "shadow_denied", "tier": "per_user_model", "unit": "requests", "model": "m"}
    assert sample(metrics, "ratelimit_decisions_total", **shadowed) == 2


def test_shadow_mode_for_token_limits_and_in_wsgi() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b"{}"]

    from werkzeug.test import Client

    limiter = MultiTierRateLimiter(per_user_model=Limits(tokens="100/minute"))
    http = Client(RateLimitWSGI(app, limiter, shadow=True))
    body = {"messages": [], "max_tokens": 500}  # can never fit: recorded, let through
    response = http.post("/", json=body, headers={"X-User-ID": "u"})
    assert response.status_code == 200 and response.headers["x-ratelimit-limit-tokens"] == "100"


def test_a_failing_observer_never_breaks_a_request() -> None:
    class Faulty(Observer):
        def decision(self, *args: Any) -> None:
            raise RuntimeError("observer bug")

    assert (
        client(RateLimiter(), observers=[Faulty()]).get("/hello", headers={"X-User-ID": "u"}).status_code
        == 200
    )


def test_storage_outages_are_counted_by_policy() -> None:
    from ratelimit_middleware import RedisStorage

    from .servers import free_port

    dead = f"redis://127.0.0.1:{free_port()}"  # nothing listens there
    metrics = PrometheusMetrics()
    for on_error, expected in (("allow", 200), ("local", 200), ("deny", 503)):
        limiter = RateLimiter(limit="5/minute", storage=RedisStorage(dead, on_error=on_error))  # type: ignore[arg-type]
        http = client(limiter, observers=[metrics])
        assert [http.get("/hello", headers={"X-User-ID": "u"}).status_code for _ in range(2)] == [
            expected
        ] * 2
    assert sample(metrics, "ratelimit_fallbacks_total", policy="allow") == 2
    assert sample(metrics, "ratelimit_fallbacks_total", policy="local") == 2
    assert sample(metrics, "ratelimit_failures_total", stage="limiter", outcome="denied") == 2


def test_one_policy_in_shadow_while_the_others_are_enforced() -> None:
    from ratelimit_middleware.shadow import Shadow

    metrics = PrometheusMetrics()
    app = Starlette(
        routes=[Route("/hello", hello), Route("/v1/chat/completions", completion, methods=["POST"])]
    )
    trial = Shadow(RateLimiter(limit="1/minute"))
    app.add_middleware(
        RateLimitMiddleware, limiter="1/minute", path_limits={"/hello": trial}, observers=[metrics]
    )
    http = TestClient(app)
    send = {"headers": {"X-User-ID": "u", "X-Model": "m"}}
    shadowed = [http.get("/hello", **send) for _ in range(3)]  # type: ignore[arg-type]
    assert [r.status_code for r in shadowed] == [200, 200, 200]
    assert shadowed[2].headers["x-ratelimit-remaining-requests"] == "0"
    enforced = [http.post("/v1/chat/completions", json={}, **send).status_code for _ in range(2)]  # type: ignore[arg-type]
    assert enforced == [200, 429]
    labels = {"tier": "per_user_model", "unit": "requests", "model": "m"}
    assert sample(metrics, "ratelimit_decisions_total", outcome="shadow_denied", **labels) == 2
    assert sample(metrics, "ratelimit_decisions_total", outcome="denied", **labels) == 1


def test_a_path_keeps_its_enforced_limit_while_a_new_one_is_shadowed_beside_it() -> None:
    from ratelimit_middleware.both import Both
    from ratelimit_middleware.shadow import Shadow

    metrics = PrometheusMetrics()
    trial = Both(RateLimiter(limit="3/minute"), Shadow(RateLimiter(limit="1/minute")))
    http = client("100/minute", path_limits={"/hello": trial}, observers=[metrics])
    send = {"headers": {"X-User-ID": "u", "X-Model": "m"}}
    assert [http.get("/hello", **send).status_code for _ in range(4)] == [200, 200, 200, 429]  # type: ignore[arg-type]
    labels = {"tier": "per_user_model", "unit": "requests", "model": "m"}
    # The third request is the enforced limit's last (0 left, as the trial's): still a shadow denial.
    assert sample(metrics, "ratelimit_decisions_total", outcome="shadow_denied", **labels) == 2
    assert sample(metrics, "ratelimit_decisions_total", outcome="denied", **labels) == 1


def test_shadow_token_limits_charge_nothing_when_they_would_deny() -> None:
    from ratelimit_middleware.shadow import Shadow

    inner = MultiTierRateLimiter(per_user_model=Limits(tokens="100/minute", max_concurrent=1))
    http = client(Shadow(inner))
    body = {"model": "m", "messages": [], "max_tokens": 90}  # after the first (settled to 20), 20 + 90 > 100
    assert [
        http.post("/v1/chat/completions", json=body, headers={"X-User-ID": "u"}).status_code for _ in range(3)
    ] == [200] * 3
    assert inner.get_request_count("u", "m", unit="tokens") == 20  # the first one, settled to its real usage
    assert inner.get_request_count("u", "m", unit="concurrent") == 0


def test_shadow_plans_from_a_policy_file(tmp_path: Any) -> None:
    from ratelimit_middleware.plans import Plans, PolicyError

    policy = tmp_path / "policy.toml"
    policy.write_text(
        'default_plan = "free"\nshadow_plans = ["trial"]\nplan_header = "x-plan"\n'
        '[plans.free."*"]\nper_user_model = "1/minute"\n[plans.trial."*"]\nper_user_model = "1/minute"\n'
    )
    http = client(Plans.load(policy))
    trial = [http.get("/hello", headers={"X-User-ID": "u", "X-Plan": "trial"}).status_code for _ in range(2)]
    # Another user: the two plans' limits are alike, so they count in one counter (as on Redis).
    free = [http.get("/hello", headers={"X-User-ID": "v"}).status_code for _ in range(2)]
    assert trial == [200, 200] and free == [200, 429]
    policy.write_text('shadow_plans = ["gold"]\n[plans.free."*"]\nper_user_model = "1/minute"\n')
    import pytest

    with pytest.raises(PolicyError, match="shadow_plans: 'gold'"):
        Plans.load(policy)
    policy.write_text('shadow_plans = "free"\n[plans.free."*"]\nper_user_model = "1/minute"\n')
    assert Plans.load(policy).shadow_plans == frozenset({"free"})  # one name, as Plans(shadow_plans=) takes
    policy.write_text('shadow_plans = ["free", 1]\n[plans.free."*"]\nper_user_model = "1/minute"\n')
    with pytest.raises(PolicyError, match=r"shadow_plans: expected a plan name or a list of them, got \['fr"):
        Plans.load(policy)
