"""Plans and policy files: loading, every kind of mistake, and routing by plan and model in a middleware."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from ratelimit_middleware.asgi import RateLimitMiddleware
from ratelimit_middleware.plans import Plans, PolicyError

from .servers import ROOT

POLICIES = sorted((ROOT / "examples" / "policies").glob("*.*"))


@pytest.mark.parametrize("path", POLICIES, ids=lambda path: path.name)
def test_every_example_policy_loads(path: Path) -> None:
    plans = Plans.load(path)
    assert plans.describe()
    assert plans.check("u", "any-model").allowed or plans.uses_reservations


def write(tmp_path: Path, text: str, name: str = "policy.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[plans.free."*"]\nper_team = "1/minute"\n', r"plans\.free\.\*: unknown tier 'per_team'"),
        ('[plans.free."*"]\nper_user_model = "lots/minute"\n', r"plans\.free\.\*\.per_user_model.*lots"),
        (
            '[plans.free."*".per_user_model]\nmax_concurrent = -3\n',
            r"plans\.free\.\*\.per_user_model\.max_concurrent.*-3",
        ),
        (
            '[plans.free."*".per_user_model]\ntokens = "1/minute"\nburst = 3\n',
            r"per_user_model: unknown key 'burst'",
        ),
        ('colour = "blue"\n[plans.free."*"]\nper_model = "1/minute"\n', r"unknown key 'colour'"),
        ('default_plan = "gold"\n[plans.free."*"]\nper_model = "1/minute"\n', r"default_plan: 'gold'"),
        ('algorithm = "leaky"\n[plans.free."*"]\nper_model = "1/minute"\n', r"algorithm: unknown 'leaky'"),
        ("plans = 3\n", r"plans: at least one plan"),
        ('[plans.free."*"]\nper_model = \n', r"line 2"),
    ],
)
def test_each_mistake_fails_naming_the_field(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(PolicyError, match=named) as raised:
        Plans.load(write(tmp_path, text))
    assert "policy.toml" in str(raised.value)


def test_yaml_mistakes_name_the_line(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"policy\.yaml \(line \d+\)"):
        Plans.load(write(tmp_path, "plans:\n  free:\n    '*': [unclosed\n", "policy.yaml"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        Plans.load(tmp_path / "nope.toml")


async def echo(request: Request) -> Response:
    return JSONResponse({"ok": True})


def routed_client() -> TestClient:
    plans = Plans(
        {
            "free": {"*": {"per_user_model": "2/minute"}},
            "pro": {"*": {"per_user_model": "5/minute"}, "llama": {"per_user_model": "1/minute"}},
        },
        default_plan="free",
        plan_key=lambda request: request.header("x-plan"),
        aliases={"llama-3-8b-instruct": "llama"},
    )
    app = Starlette(routes=[Route("/v1/chat", echo, methods=["POST"])])
    app.add_middleware(RateLimitMiddleware, limiter=plans)
    return TestClient(app)


def send(client: TestClient, plan: str | None, model: str, user: str = "u") -> Any:
    headers = {"X-User-ID": user, "X-Model": model, **({"X-Plan": plan} if plan else {})}
    return client.post("/v1/chat", headers=headers)


def test_the_plan_picks_the_limits() -> None:
    client = routed_client()
    assert [send(client, None, "gpt").status_code for _ in range(3)] == [200, 200, 429]
    assert [send(client, "pro", "gpt", "v").status_code for _ in range(6)] == [200] * 5 + [429]
    assert (
        send(client, "gold", "gpt", "w").headers["x-ratelimit-limit-requests"] == "2"
    )  # unknown: default plan


def test_per_model_entries_and_aliases() -> None:
    client = routed_client()
    assert send(client, "pro", "llama").headers["x-ratelimit-limit-requests"] == "1"
    assert send(client, "pro", "llama-3-8b-instruct").status_code == 429  # the alias shares llama's budget


def test_policy_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Plans.from_env() is None
    monkeypatch.setenv("RATELIMIT_POLICY_TOML", '[plans.all."*"]\nper_user = "1/minute"\n')
    plans = Plans.from_env()
    assert plans is not None and plans.check("u", "m").allowed and not plans.check("u", "n").allowed
    monkeypatch.setenv("RATELIMIT_POLICY_TOML", "[plans")
    with pytest.raises(PolicyError, match="RATELIMIT_POLICY_TOML"):
        Plans.from_env()
    monkeypatch.setenv("RATELIMIT_POLICY", str(POLICIES[0]))
    assert Plans.from_env() is not None


def test_a_spelling_under_a_path_rule_gets_the_plan_and_the_rule() -> None:
    plans = Plans(
        {"free": {"*": {"per_user_model": "3/minute"}}, "pro": {"*": {"per_user_model": "100/minute"}}},
        default_plan="free",
        plan_key=lambda request: request.header("x-plan"),
        aliases={"llama-3-8b-instruct": "llama"},
    )
    app = Starlette(routes=[Route("/v1/chat/{rest:path}", echo, methods=["POST"])])
    app.add_middleware(RateLimitMiddleware, limiter=plans, path_limits={"/v1/chat/x": "2/minute"})
    client = TestClient(app)

    def post(path: str, user: str, plan: str, model: str = "gpt") -> Any:
        return client.post(path, headers={"X-User-ID": user, "X-Model": model, "X-Plan": plan})

    # "/v1/chat/x/" is the plans' spelling and, tidied, the rule's: both limits apply, whichever binds.
    assert [post("/v1/chat/x/", "a", "pro").status_code for _ in range(3)] == [200, 200, 429]
    free = [post(path, "b", "free").status_code for path in ("/v1/chat/x/", "/v1/chat/x/", "/v1/chat/y")]
    assert free == [200, 200, 200] and post("/v1/chat/y", "b", "free").status_code == 429  # the plan's 3
    # A plan's aliases apply to the plan only: the path rule counts the model as named, whichever spelling.
    alias = "llama-3-8b-instruct"
    sent = [("/v1/chat/x", alias), ("/v1/chat/x/", alias), ("/v1/chat/x/", "llama"), ("/v1/chat/x", alias)]
    assert [post(path, "c", "pro", model).status_code for path, model in sent] == [200, 200, 200, 429]


def test_the_default_plan_must_cover_every_model() -> None:
    with pytest.raises(PolicyError, match=r"plans\.free: the default plan needs a '\*' entry"):
        Plans({"free": {"gpt": {"per_user_model": "2/minute"}}}, default_plan="free")


def test_shadow_plans_are_routed_per_request() -> None:
    from ratelimit_middleware.shadow import Shadow

    plans = Plans(
        {"free": {"*": {"per_user_model": "1/minute"}}, "pro": {"*": {"per_user_model": "100/minute"}}},
        default_plan="free",
        plan_key=lambda request: request.header("x-plan"),
    )
    app = Starlette(routes=[Route("/v1/chat", echo, methods=["POST"])])
    app.add_middleware(RateLimitMiddleware, limiter=Shadow(plans))
    client = TestClient(app)
    sent = [send(client, "pro", "gpt") for _ in range(2)]
    assert [response.headers["x-ratelimit-limit-requests"] for response in sent] == ["100", "100"]
    assert [send(client, None, "gpt").status_code for _ in range(2)] == [200, 200]  # shadow: never denied
