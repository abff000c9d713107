"""The example FastAPI app on Redis: two uvicorn processes behind one Redis share one limit."""

from __future__ import annotations

import httpx2

from .redis_server import RedisCluster, RedisServer
from .servers import ROOT, uvicorn_server

APP_DIR = ROOT / "examples" / "fastapi_app"
DATABASE = 3  # a Redis database of this test's own: the app uses the default key prefix


def ask(base_url: str, user: str, model: str = "gpt-4o-mini") -> httpx2.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return httpx2.post(f"{base_url}/v1/chat/completions", json=body, headers={"X-User-ID": user}, timeout=10)


def test_two_app_processes_behind_one_redis_share_one_limit(redis_server: RedisServer) -> None:
    admin = redis_server.client(db=DATABASE)
    admin.flushdb()
    env = {
        "REDIS_URL": f"{redis_server.url}/{DATABASE}",
        "REDIS_TIMEOUT": "5",  # a loaded machine must not turn a slow reply into a fail-open admission
        "RATELIMIT_PER_USER_MODEL": "4/hour",
        "RATELIMIT_PER_MODEL": "7/hour",
    }
    with (
        uvicorn_server("main:app", APP_DIR, env) as first,
        uvicorn_server("main:app", APP_DIR, env) as second,
    ):
        # Alice alternates between the two processes: together they admit her 4 requests, not 4 each.
        alice = [ask(url, "alice") for url in [first, second] * 3]
        assert [response.status_code for response in alice] == [200] * 4 + [429] * 2
        assert "per_user_model" in alice[-1].json()["error"]["message"]
        assert alice[3].headers["x-ratelimit-remaining-requests"] == "0"
        # The per-model tier is shared across users and processes: 3 more requests, then the model is full.
        bob = [ask(url, "bob") for url in [second, first] * 2]
        assert [response.status_code for response in bob] == [200] * 3 + [429]
        assert "per_model" in bob[-1].json()["error"]["message"]
        assert ask(first, "carol", model="llama-3-8b").status_code == 200  # another model: its own budget
    assert admin.dbsize() > 0  # the state lives in Redis
    admin.flushdb()
    admin.close()


def test_the_app_keeps_its_limits_in_a_redis_cluster_named_by_url(redis_cluster: RedisCluster) -> None:
    """``REDIS_URL=redis+cluster://node`` (a node's redis:// URL made a standalone limiter, which failed on
    the keys of every other node)."""
    redis_cluster.flush()
    env = {
        "REDIS_URL": f"redis+cluster://127.0.0.1:{redis_cluster.ports[2]}",
        "REDIS_TIMEOUT": "5",
        "REDIS_ON_ERROR": "deny",
        "RATELIMIT_PER_USER_MODEL": "2/hour",
        "RATELIMIT_PER_MODEL": "5/hour",
    }
    with uvicorn_server("main:app", APP_DIR, env) as url:
        codes = [ask(url, user).status_code for user in ["alice", "alice", "alice", "bob", "carol", "dave"]]
        assert codes == [200, 200, 429, 200, 200, 200]
        denied = ask(url, "erin")
        assert denied.status_code == 429 and "per_model" in denied.json()["error"]["message"]
    holders = [node.client() for node in redis_cluster.nodes]
    assert sum(1 for client in holders if client.dbsize()) >= 2  # the keys are spread over the nodes
    for client in holders:
        client.close()
    redis_cluster.flush()
