"""The example FastAPI app served by a real uvicorn, driven by the official openai client."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx2
import openai
import pytest
from starlette.testclient import TestClient

from ratelimit_middleware import MultiTierRateLimiter

from .servers import ROOT, uvicorn_server

APP_DIR = ROOT / "examples" / "fastapi_app"


@pytest.fixture(scope="module")
def strict_server() -> Iterator[str]:
    """1 request per hour per user and model: the second one waits too long to retry."""
    with uvicorn_server("main:app", APP_DIR, {"RATELIMIT_PER_USER_MODEL": "1/hour"}) as url:
        yield url


@pytest.fixture(scope="module")
def quick_server() -> Iterator[str]:
    """1 request per second per user and model: the SDK's retry succeeds if it honours retry-after-ms."""
    with uvicorn_server("main:app", APP_DIR, {"RATELIMIT_PER_USER_MODEL": "1/second"}) as url:
        yield url


def client(url: str, user: str, max_retries: int = 0, statuses: list[int] | None = None) -> openai.OpenAI:
    hooks = (
        {"response": [lambda response: statuses.append(response.status_code)]} if statuses is not None else {}
    )
    return openai.OpenAI(
        base_url=f"{url}/v1",
        api_key="sk-test",
        max_retries=max_retries,
        default_headers={"X-User-ID": user},
        http_client=httpx2.Client(event_hooks=hooks),
    )


def ask(sdk: openai.OpenAI) -> str:
    completion = sdk.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    return completion.choices[0].message.content or ""


def test_openai_client_gets_rate_limit_error_with_our_message(strict_server: str) -> None:
    statuses: list[int] = []
    sdk = client(strict_server, "alice", max_retries=3, statuses=statuses)
    assert "canned answer" in ask(sdk)
    with pytest.raises(openai.RateLimitError) as raised:
        ask(sdk)
    error = raised.value
    assert error.status_code == 429
    assert "per_user_model" in error.message and "1 requests per 1 hour" in error.message
    assert isinstance(error.body, dict) and error.body["code"] == "rate_limit_exceeded"
    assert error.response.headers["x-should-retry"] == "false"
    assert statuses == [200, 429]  # a wait over 60 s: the SDK does not retry despite max_retries=3


def test_openai_client_retry_honours_retry_after_ms(quick_server: str) -> None:
    statuses: list[int] = []
    sdk = client(quick_server, "bob", max_retries=1, statuses=statuses)
    ask(sdk)
    # Denied at once with retry-after-ms just under 1000. The SDK's own first back-off is at most 0.5 s, which
    # would be denied again: one retry succeeds only because it waited what retry-after-ms said.
    assert "canned answer" in ask(sdk)
    assert statuses == [200, 429, 200]


def test_streaming_through_uvicorn_with_usage(strict_server: str) -> None:
    sdk = client(strict_server, "carol")
    stream = sdk.chat.completions.create(
        model="llama-3-8b",
        messages=[{"role": "user", "content": "stream please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text.startswith("This is a canned answer")
    usage = chunks[-1].usage
    assert (
        usage is not None
        and usage.completion_tokens > 0
        and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    )


def test_models_listing_and_health_exemption(strict_server: str) -> None:
    sdk = client(strict_server, "dave")
    assert {model.id for model in sdk.models.list()} >= {"gpt-4o-mini", "llama-3-8b"}
    with httpx2.Client() as http:
        for _ in range(3):
            assert http.get(f"{strict_server}/health").status_code == 200


def test_per_model_tier_is_shared_across_users() -> None:
    import main  # type: ignore[import-not-found]  # examples/fastapi_app, put on sys.path below

    app = main.create_app(MultiTierRateLimiter(per_user_model="10/minute", per_model="2/minute"))
    http = TestClient(app)
    body = {"model": "mistral-7b", "messages": [{"role": "user", "content": "x"}]}
    codes = [
        http.post("/v1/chat/completions", json=body, headers={"X-User-ID": u}).status_code for u in "abc"
    ]
    assert codes == [200, 200, 429]


def test_an_x_model_header_cannot_move_a_request_to_another_budget() -> None:
    import main  # type: ignore[import-not-found]

    app = main.create_app(MultiTierRateLimiter(per_user_model="1/minute", per_model="100/minute"))
    http = TestClient(app)
    body = {"model": "mistral-7b", "messages": [{"role": "user", "content": "x"}]}
    codes = [
        http.post(
            "/v1/chat/completions", json=body, headers={"X-User-ID": "a", "X-Model": f"x{i}"}
        ).status_code
        for i in range(3)
    ]
    assert codes == [200, 429, 429]


@pytest.fixture(autouse=True)
def _example_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(APP_DIR))


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"model": "gpt-4o-mini"}',
        b'{"model": "nope", "messages": []}',
        b"[" * 100_000,  # nested too deeply for the parser
    ],
    ids=["not-json", "list", "no-messages", "unknown-model", "deeply-nested"],
)
def test_bad_bodies_get_4xx_not_500(body: bytes) -> None:
    import main  # type: ignore[import-not-found]

    http = TestClient(main.create_app())
    response = http.post("/v1/chat/completions", content=body, headers={"X-User-ID": "e"})
    assert 400 <= response.status_code < 500


def test_listing_models_costs_no_tokens() -> None:
    """A GET has no body, so nothing to generate: it counts as a request, never against the token budget."""
    import main  # type: ignore[import-not-found]

    http = TestClient(main.create_app())
    for _ in range(3):
        response = http.get("/v1/models", headers={"X-User-ID": "lister"})
        assert response.status_code == 200
        assert response.headers["x-ratelimit-remaining-tokens"] == "40000"
    assert response.headers["x-ratelimit-remaining-requests"] == "17"


def test_metrics_scraped_after_traffic(strict_server: str) -> None:
    sdk = client(strict_server, "metrics-user")
    messages = [{"role": "user", "content": "count me"}]
    sdk.chat.completions.create(model="mistral-7b", messages=messages)  # type: ignore[arg-type]
    with pytest.raises(openai.RateLimitError):
        sdk.chat.completions.create(model="mistral-7b", messages=messages)  # type: ignore[arg-type]
    with httpx2.Client() as http:
        text = http.get(f"{strict_server}/metrics/").text
    labels = 'model="mistral-7b",outcome="{}",tier="per_user_model",unit="requests"'
    assert f"ratelimit_decisions_total{{{labels.format('allowed')}}} 1.0" in text
    assert f"ratelimit_decisions_total{{{labels.format('denied')}}} 1.0" in text
    assert "ratelimit_decision_seconds_count" in text


TOKEN_POLICY = """
default_plan = "free"
plan_header = "x-plan"
[plans.free."*"]
per_user_model = { requests = "100/minute", tokens = "1000/minute", max_concurrent = 2 }
[plans.pro."*"]
per_user_model = { requests = "100/minute", tokens = "100000/minute", max_concurrent = 8 }
"""


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    policy = tmp_path_factory.mktemp("policy") / "plans.toml"
    policy.write_text(TOKEN_POLICY)
    with uvicorn_server("main:app", APP_DIR, {"RATELIMIT_POLICY": str(policy)}) as url:
        yield url


def test_openai_client_gets_token_errors_from_a_policy_file(token_server: str) -> None:
    sdk = client(token_server, "tina", max_retries=2)
    messages = [{"role": "user", "content": "hello"}]
    completion = sdk.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=100)  # type: ignore[arg-type]
    assert completion.usage is not None
    with pytest.raises(openai.RateLimitError) as raised:
        sdk.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=5000)  # type: ignore[arg-type]
    error = raised.value
    assert isinstance(error.body, dict) and error.body["type"] == "tokens"
    assert "tokens per 1 minute" in error.message and "can never be allowed" in error.message
    assert error.response.headers["x-ratelimit-limit-tokens"] == "1000"


def test_the_plan_header_picks_the_budget(token_server: str) -> None:
    pro = openai.OpenAI(
        base_url=f"{token_server}/v1",
        api_key="k",
        max_retries=0,
        default_headers={"X-User-ID": "pat", "X-Plan": "pro"},
    )
    messages = [{"role": "user", "content": "hello"}]
    raw = pro.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=messages, max_tokens=5000
    )  # type: ignore[arg-type]
    assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
    streamed = list(pro.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True))  # type: ignore[arg-type]
    assert streamed and all(chunk.choices for chunk in streamed)


def test_openai_client_streams_without_the_usage_chunk_it_did_not_ask_for(token_server: str) -> None:
    """stream_usage=True asks the app for the usage chunk (choices empty) of every stream, to settle it
    exactly; it reached a client that never asked, and ``chunk.choices[0]`` raised IndexError there. The
    settlement still uses that chunk's usage: not the estimate, nor the text counted."""
    import main  # type: ignore[import-not-found]

    sdk = client(token_server, "uma")
    content = "stream without usage, please"
    stream = sdk.chat.completions.create(
        model="llama-3-8b", messages=[{"role": "user", "content": content}], stream=True, max_tokens=200
    )
    chunks = list(stream)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == main.REPLY
    assert all(chunk.usage is None for chunk in chunks)
    with httpx2.Client() as http:
        metrics = http.get(f"{token_server}/metrics/").text
    settled = re.search(r'ratelimit_tokens_settled_total\{model="llama-3-8b"\} (\S+)', metrics)
    exact = main.count_tokens(content) + main.count_tokens(main.REPLY)  # the app's own usage
    assert settled is not None and float(settled[1]) == exact


def test_default_limits_cover_requests_tokens_and_concurrency() -> None:
    import main  # type: ignore[import-not-found]

    http = TestClient(main.create_app())
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 100}
    response = http.post("/v1/chat/completions", json=body, headers={"X-User-ID": "budget"})
    assert response.status_code == 200
    assert response.headers["x-ratelimit-limit-requests"] == "20"
    assert response.headers["x-ratelimit-limit-tokens"] == "40000"
    assert response.headers["x-ratelimit-remaining-tokens"] == str(40000 - 10 - 100)
    assert '"per_user_model-concurrent";q=4;qu="concurrent-requests"' in response.headers["RateLimit-Policy"]
    too_big = http.post(
        "/v1/chat/completions", json={**body, "max_tokens": 50000}, headers={"X-User-ID": "budget"}
    )
    assert too_big.status_code == 429 and too_big.json()["error"]["type"] == "tokens"


def test_redis_on_error_picks_what_an_outage_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    import main  # type: ignore[import-not-found]

    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # nothing listens there: Redis is down
    monkeypatch.setenv("REDIS_ON_ERROR", "deny")
    http = TestClient(main.create_app(main.build_limiter()))
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    response = http.post("/v1/chat/completions", json=body, headers={"X-User-ID": "a"})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
