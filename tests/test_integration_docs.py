"""Every Python snippet of INTEGRATION.md runs, and real requests through it behave as the text says."""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import grpc
import grpc.aio
import pytest
from starlette.testclient import TestClient
from werkzeug.test import Client

from ratelimit_middleware import RateLimiter
from ratelimit_middleware.grpc import RateLimitInterceptor

from .redis_server import RedisServer
from .servers import ROOT

SNIPPET = re.compile(r"<!-- check: ([\w-]+) -->\n```python\n(.*?)```", re.DOTALL)
TEXT = (ROOT / "INTEGRATION.md").read_text()
SNIPPETS = dict(SNIPPET.findall(TEXT))


PATIENT = "timeout=5.0"
"""What a Redis snippet's short timeout becomes in its check: on a loaded test machine a reply slower than
0.1 s is answered by the failure policy (as the text says it is), which these checks are not about."""


def run(name: str, patient: bool = False) -> dict[str, Any]:
    source = SNIPPETS[name]
    if patient:
        source, replaced = re.subn(r"timeout=0\.\d+", PATIENT, source)
        assert replaced == 1, f"INTEGRATION.md snippet {name!r} no longer sets one short timeout"
    namespace: dict[str, Any] = {"__name__": f"integration_{name.replace('-', '_')}"}
    exec(compile(source, f"INTEGRATION.md:{name}", "exec"), namespace)
    return namespace


def statuses(send: Callable[[], Any], times: int) -> list[int]:
    return [send().status_code for _ in range(times)]


def check_fastapi() -> None:
    client = TestClient(run("fastapi")["app"])

    def chat() -> Any:
        return client.post("/v1/chat/completions", json={"model": "gpt-4o"}, headers={"X-User-ID": "a"})

    assert statuses(chat, 21) == [200] * 20 + [429]
    denied = chat()
    assert denied.headers["retry-after"] and denied.json()["error"]["code"] == "rate_limit_exceeded"
    assert (
        client.post("/v1/chat/completions", json={"model": "o1"}, headers={"X-User-ID": "a"}).status_code
        == 200
    )
    assert statuses(lambda: client.get("/health"), 25) == [200] * 25


def check_starlette() -> None:
    client = TestClient(run("starlette")["app"])
    response = client.post("/v1/completions", headers={"X-User-ID": "a"})
    assert response.status_code == 200 and response.headers["x-ratelimit-limit-requests"] == "100"


def check_flask() -> None:
    client = run("flask")["app"].test_client()
    response = client.post("/v1/chat/completions", json={"model": "m"}, headers={"X-User-ID": "a"})
    assert response.status_code == 200 and response.headers["x-ratelimit-remaining-requests"] == "99"


def _django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.django_site")


def check_django_asgi() -> None:
    _django()
    client = TestClient(run("django-asgi")["application"])
    response = client.post("/v1/chat/completions", json={"model": "m"}, headers={"X-User-ID": "a"})
    assert response.status_code == 200 and response.json() == {"choices": []}
    assert response.headers["x-ratelimit-remaining-requests"] == "99"
    assert "x-ratelimit-limit-requests" not in client.get("/healthz").headers


def check_django_wsgi() -> None:
    _django()
    client = Client(run("django-wsgi")["application"])
    response = client.post("/v1/chat/completions", json={"model": "m"}, headers={"X-User-ID": "a"})
    assert response.status_code == 200 and response.headers["x-ratelimit-remaining-requests"] == "99"
    assert "x-ratelimit-limit-requests" not in client.get("/healthz").headers


def check_plain_asgi() -> None:
    client = TestClient(run("plain-asgi")["app"])
    assert statuses(lambda: client.get("/", headers={"X-User-ID": "a"}), 11) == [200] * 10 + [429]


def check_plain_wsgi() -> None:
    client = Client(run("plain-wsgi")["app"])
    assert statuses(lambda: client.get("/", headers={"X-User-ID": "a"}), 11) == [200] * 10 + [429]


def check_path_limits() -> None:
    client = TestClient(run("path-limits")["app"])

    def images(path: str) -> Any:
        return client.post(path, headers={"X-User-ID": "a"})

    assert statuses(lambda: images("/v1/images/generations"), 5) == [200] * 5
    assert images("/v1/images/generations/").status_code == 429  # below /v1/images/: the same rule
    assert images("/v1//images/generations").status_code == 429  # nor does another spelling


def check_fastapi_decorator() -> None:
    client = TestClient(run("fastapi-decorator")["app"])
    assert statuses(lambda: client.post("/v1/moderations", headers={"X-User-ID": "a"}), 11) == [200] * 10 + [
        429
    ]
    assert statuses(lambda: client.get("/v1/usage", headers={"X-User-ID": "a"}), 3) == [200, 200, 429]
    assert client.get("/v1/usage", headers={"X-User-ID": "a"}).json()["error"]["type"] == "requests"


def check_starlette_decorator() -> None:
    client = TestClient(run("starlette-decorator")["app"])

    def send() -> Any:
        return client.post("/v1/embeddings", headers={"X-User-ID": "a"})

    first = send()
    assert first.json() == {"data": []} and first.headers["x-ratelimit-remaining-requests"] == "4"
    assert statuses(send, 5) == [200] * 4 + [429]


def check_flask_decorator() -> None:
    client = run("flask-decorator")["app"].test_client()

    def send() -> Any:
        return client.post("/v1/embeddings", headers={"X-User-ID": "a"})

    assert statuses(send, 6) == [200] * 5 + [429]


def check_keys() -> None:
    client = TestClient(run("keys")["app"])

    def generate(model: str, team: str = "t") -> Any:
        return client.post(f"/v1/models/{model}/generate", headers={"X-Team": team})

    assert statuses(lambda: generate("llama"), 4) == [200, 200, 200, 429]
    assert generate("mistral").status_code == 200  # another model from the path: another bucket
    assert generate("llama", team="other").status_code == 200


def check_proxy() -> None:
    client = run("proxy")["app"].test_client()

    def via_proxy(client_address: str) -> Any:
        return client.get(
            "/", headers={"X-Forwarded-For": client_address}, environ_base={"REMOTE_ADDR": "10.0.0.5"}
        )

    assert statuses(lambda: via_proxy("198.51.100.1"), 3) == [200, 200, 429]
    assert via_proxy("198.51.100.2").status_code == 200  # another client behind the proxy

    def direct(forged: str) -> Any:
        return client.get(
            "/", headers={"X-Forwarded-For": forged}, environ_base={"REMOTE_ADDR": "203.0.113.9"}
        )

    assert [direct(f"1.1.1.{i}").status_code for i in range(3)] == [200, 200, 429]  # forging does not help


def check_failures() -> None:
    client = TestClient(run("failures")["app"])
    assert client.get("/").status_code == 503  # no X-Tenant: the key function raises, on_error="deny"
    assert client.get("/", headers={"X-Tenant": "t"}).status_code == 200
    denied = client.get("/", headers={"X-Tenant": "t"})
    assert denied.status_code == 429 and denied.text == "slow down"


def check_tokens() -> None:
    client = TestClient(run("tokens")["app"])

    def chat(max_tokens: int) -> Any:
        body = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens}
        return client.post("/v1/chat/completions", json=body, headers={"X-User-ID": "a"})

    first = chat(1500)
    assert first.status_code == 200 and first.headers["x-ratelimit-remaining-tokens"] == str(2000 - 2 - 1500)
    assert chat(1500).status_code == 200  # the first settled to 100 tokens: room again
    assert chat(1800).status_code == 429 and chat(1800).json()["error"]["type"] == "tokens"


def check_reserve() -> None:
    limiter = run("reserve")["limiter"]
    assert limiter.get_request_count("alice", "gpt-4o", unit="tokens") == 1180 + 240
    assert limiter.get_request_count("alice", "gpt-4o", unit="concurrent") == 0


@contextmanager
def _grpc_server(server: Any) -> Iterator[str]:
    """Start a ``grpc.server`` from a snippet on a free loopback port; yields its address."""
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None).wait(5)


def check_grpc() -> None:
    with _grpc_server(run("grpc")["server"]) as address, grpc.insecure_channel(address) as channel:
        complete = channel.unary_unary("/llm.Generator/Complete")
        alice = (("x-user-id", "alice"),)
        assert [complete(b"hi", metadata=alice) for _ in range(20)] == [b"completion for hi"] * 20
        with pytest.raises(grpc.RpcError) as denied:
            complete(b"hi", metadata=alice)
        error = cast(grpc.Call, denied.value)
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit 20 requests per 1 minute" in (error.details() or "")
        metadata = dict(error.trailing_metadata() or ())
        assert {"retry-after-ms", "retry-after", "grpc-status-details-bin"} <= metadata.keys()
        stream = channel.unary_stream("/llm.Generator/Stream")
        assert list(stream(b"", metadata=(("x-user-id", "bob"),))) == [b"Hello", b" world"]


def check_grpc_aio() -> None:
    make_server = run("grpc-aio")["make_server"]

    async def scenario() -> None:
        server = make_server()
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                complete = channel.unary_unary("/llm.Generator/Complete")
                tenant = (("x-tenant", "t1"),)
                for _ in range(2):
                    assert await complete(b'{"model": "m1"}', metadata=tenant) == b'{"text": "..."}'
                denied = complete(b'{"model": "m1"}', metadata=tenant)
                assert await denied.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert await complete(b'{"model": "m2"}', metadata=tenant)  # the model from the message
                assert await complete(b'{"model": "m1"}', metadata=(("x-tenant", "t2"),))
        finally:
            await server.stop(None)

    asyncio.run(scenario())


def check_grpc_client() -> None:
    namespace = run("grpc-client")
    server = grpc.server(
        ThreadPoolExecutor(max_workers=4), interceptors=[RateLimitInterceptor(RateLimiter(1, 0.2))]
    )
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: b"ok")
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("llm.Generator", {"Complete": handler}),)
    )
    alice = (("x-user-id", "alice"),)
    with _grpc_server(server) as address:
        with grpc.insecure_channel(address) as plain:
            complete = plain.unary_unary("/llm.Generator/Complete")
            assert complete(b"", metadata=alice) == b"ok"
            with pytest.raises(grpc.RpcError) as denied:
                complete(b"", metadata=alice)
            assert 0 < namespace["retry_delay"](denied.value) <= 0.2
        with namespace["connect"](address) as retrying:
            complete = retrying.unary_unary("/llm.Generator/Complete")
            assert [complete(b"", metadata=alice, timeout=5) for _ in range(2)] == [b"ok", b"ok"]  # retried


def check_plans() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        previous = os.getcwd()
        os.chdir(folder)  # the snippet writes policy.toml where it runs
        try:
            client = TestClient(run("plans")["app"])
        finally:
            os.chdir(previous)

    def chat(plan: str | None, model: str = "gpt-4o") -> Any:
        headers = {"X-User-ID": "a", **({"X-Plan": plan} if plan else {})}
        return client.post("/v1/chat/completions", json={"model": model, "messages": []}, headers=headers)

    assert [chat(None).status_code for _ in range(2)] == [200, 200]
    assert chat(None, "gpt-4o-2024-08-06").status_code == 429  # an alias shares the budget of gpt-4o
    pro = chat("pro")
    assert pro.status_code == 200 and pro.headers["x-ratelimit-limit-tokens"] == "200000"


def check_plan_lookup() -> None:
    from ratelimit_middleware.asgi import RateLimitMiddleware

    with tempfile.TemporaryDirectory() as folder:
        previous = os.getcwd()
        os.chdir(folder)
        try:
            Path("policy.toml").write_text(
                'default_plan = "free"\nplan_header = "x-plan"\n'
                '[plans.free."*"]\nper_user_model = "1/minute"\n'
                '[plans.pro."*"]\nper_user_model = "100/minute"\n'
            )
            plans = run("plan-lookup")["plans"]
        finally:
            os.chdir(previous)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    client = TestClient(RateLimitMiddleware(app, limiter=plans))
    # X-Plan from the client no longer picks the plan: the key function replaces the file's plan_header.
    assert statuses(lambda: client.get("/", headers={"X-Plan": "pro", "X-User-ID": "a"}), 2) == [200, 429]
    assert statuses(lambda: client.get("/", headers={"X-API-Key": "sk-pro-customer"}), 3) == [200] * 3


def check_cors() -> None:
    client = TestClient(run("cors")["app"])
    origin = {"Origin": "https://app.example.com", "X-User-ID": "a"}
    allowed, denied = client.get("/v1/models", headers=origin), client.get("/v1/models", headers=origin)
    assert (allowed.status_code, denied.status_code) == (200, 429)
    for response in (allowed, denied):  # a page can read both, and their rate limit headers
        assert response.headers["access-control-allow-origin"] == "https://app.example.com"
        exposed = {
            name.strip().lower() for name in response.headers["access-control-expose-headers"].split(",")
        }
        assert {"ratelimit", "x-ratelimit-remaining-requests", "x-request-id"} <= exposed
    assert "retry-after" in exposed and "retry-after-ms" in exposed


def check_metrics() -> None:
    namespace = run("metrics")
    client = TestClient(namespace["app"])
    codes = [
        client.get("/v1/models", headers={"X-User-ID": "a", "X-Model": "m"}).status_code for _ in range(3)
    ]
    assert codes == [200, 200, 200]  # shadow mode never denies
    for _ in range(3):  # scrapes, however spelled, are never counted
        assert client.get("/metrics", follow_redirects=False).status_code == 307
    text = client.get("/metrics/").text
    labels = 'model="m",outcome="shadow_denied",tier="per_user_model",unit="requests"'
    assert f"ratelimit_decisions_total{{{labels}}} 1.0" in text
    assert 'model="default"' not in text
    assert [event.kind for event in namespace["audit"]] == ["shadow_denied"]


@contextmanager
def redis_url() -> Iterator[RedisServer]:
    """A redis-server of the check's own, its URL in ``REDIS_URL`` as the snippets expect."""
    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer(Path(directory))
        server.start()
        saved = os.environ.get("REDIS_URL")
        os.environ["REDIS_URL"] = server.url
        try:
            yield server
        finally:
            if saved is None:
                del os.environ["REDIS_URL"]
            else:
                os.environ["REDIS_URL"] = saved
            server.stop()


def check_redis() -> None:
    with redis_url() as server:
        client = TestClient(run("redis", patient=True)["app"])

        def chat() -> Any:
            return client.post("/v1/chat/completions", json={"model": "m"}, headers={"X-User-ID": "a"})

        assert statuses(chat, 21) == [200] * 20 + [429]
        admin = server.client()
        assert all(key.startswith(b"myapi:") for key in admin.scan_iter())
        admin.close()
        server.kill()  # on_error="local": this process now counts alone, and still limits
        assert statuses(chat, 21) == [200] * 20 + [429]


def check_redis_clients() -> None:
    with redis_url():
        namespace = run("redis-clients")
        assert asyncio.run(namespace["handle"]("alice"))
        assert namespace["limiter"].get_request_count("alice", "gpt-4") == 2  # one count for both


def check_redis_failures() -> None:
    with redis_url() as server:
        handle = run("redis-failures", patient=True)["handle"]
        assert handle("alice") == (200, {})
        server.kill()
        status, headers = handle("alice")
        assert status == 503 and int(headers["Retry-After"]) >= 1


CHECKS = {
    name[len("check_") :].replace("_", "-"): check
    for name, check in globals().items()
    if name.startswith("check_")
}


@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_snippet(name: str) -> None:
    assert name in CHECKS, f"INTEGRATION.md snippet {name!r} has no check in this file"
    CHECKS[name]()


def test_every_python_block_is_checked() -> None:
    blocks = TEXT.count("```python")
    assert blocks == len(SNIPPETS), (
        "every ```python block of INTEGRATION.md needs a <!-- check: name --> line"
    )
    assert set(CHECKS) == set(SNIPPETS)
