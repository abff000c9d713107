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
from ratelimit_middleware.backends.base import Storage
from ratelimit_middleware.keys import from_header
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
        (
            '[plans.pro."*"]\nper_model = "100/minute"\n[plans.free."*"]\nper_model = "1/minute"\n',
            r"default_plan: required with several plans \(pro, free\)",
        ),
        ('default_plan = 3\n[plans.free."*"]\nper_model = "1/minute"\n', r"default_plan: expected a plan"),
        ('algorithm = "leaky"\n[plans.free."*"]\nper_model = "1/minute"\n', r"algorithm: unknown 'leaky'"),
        ("plans = 3\n", r"plans: expected a table of plans and their models, got 3"),
        ('plans = ["free", "pro"]\n', r"plans: expected a table of plans .*\['free', 'pro'\]"),
        ("[plans]\n", r"plans: at least one plan"),
        ('[plans]\nfree = "20/minute"\n', r"plans\.free: expected a table of models .*got '20/minute'"),
        (
            '[plans.free."*"]\nper_user_model = 20\n',
            r"plans\.free\.\*\.per_user_model: expected a limit .*got 20",
        ),
        (
            'plan_header = "x plan:"\n[plans.free."*"]\nper_model = "1/minute"\n',
            r"plan_header: expected a header",
        ),
        ('plan_header = ""\n[plans.free."*"]\nper_model = "1/minute"\n', r"plan_header: expected a header"),
        (
            '[aliases]\n"gpt-4o-0806" = "gpt-4o"\n[plans.free."*"]\nper_model = "1/minute"\n'
            '[plans.free."gpt-4o-0806"]\nper_model = "9/minute"\n',
            r"plans\.free\.gpt-4o-0806: 'gpt-4o-0806' is an alias of 'gpt-4o'",
        ),
        (
            '[plans.free."*"]\nper_model = "1/minute"\nper_model = "2/minute"\n',
            r"line 3.*'per_model = \"2/minute\"'",
        ),
        (
            'algorithm = "gcra"\n[plans.free."*"]\nper_model = "2000000/second"\n',
            r"plans\.free\.\*: gcra cannot count 2000000 per 1 second",
        ),
        ('[plans.free."*"]\nper_model = \n', r"line 2"),
    ],
)
def test_each_mistake_fails_naming_the_field(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(PolicyError, match=named) as raised:
        Plans.load(write(tmp_path, text))
    assert "policy.toml" in str(raised.value)


def test_a_single_plan_is_the_default_without_naming_it(tmp_path: Path) -> None:
    plans = Plans.load(write(tmp_path, '[plans.everyone."*"]\nper_model = "1/minute"\n'))
    assert plans.default_plan == "everyone"


def test_a_byte_order_mark_is_no_mistake(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_bytes('\ufeff[plans.free."*"]\nper_model = "1/minute"\n'.encode())
    assert Plans.load(path).default_plan == "free"


@pytest.mark.parametrize("name", ["policy.json", "policy.txt"])
def test_a_file_of_another_kind_is_refused_naming_it(tmp_path: Path, name: str) -> None:
    with pytest.raises(PolicyError, match=r"a policy file is TOML \(\.toml\) or YAML"):
        Plans.load(write(tmp_path, "{}", name))


def test_an_upper_case_yaml_suffix_is_yaml(tmp_path: Path) -> None:
    plans = Plans.load(write(tmp_path, "plans:\n  free:\n    '*': {per_model: 1/minute}\n", "policy.YAML"))
    assert plans.default_plan == "free"


def test_yaml_mistakes_name_the_line(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"policy\.yaml \(line \d+\)"):
        Plans.load(write(tmp_path, "plans:\n  free:\n    '*': [unclosed\n", "policy.yaml"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        Plans.load(tmp_path / "nope.toml")


def test_a_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('# café\n[plans.free."*"]\nper_user_model = "1/minute"\n'.encode("latin-1"))
    with pytest.raises(PolicyError, match=r"latin1\.toml: a policy file must be UTF-8 text; byte 5 is not"):
        Plans.load(path)


def test_yaml_keys_given_twice_fail_naming_key_and_line(tmp_path: Path) -> None:
    text = "plans:\n  free:\n    '*':\n      per_user_model: 10/minute\n      per_user_model: 100000/minute\n"
    with pytest.raises(PolicyError, match=r"policy\.yaml \(line 5\): duplicate key 'per_user_model'"):
        Plans.load(write(tmp_path, text, "policy.yaml"))
    merged = "base: &base {per_user_model: 5/minute}\n"  # a merge key is no duplicate: the entry overrides
    with pytest.raises(PolicyError, match="unknown key 'base'"):
        Plans.load(
            write(
                tmp_path, merged + "plans: {free: {'*': {<<: *base, per_user_model: 1/minute}}}\n", "m.yaml"
            )
        )


@pytest.mark.parametrize(
    ("yaml", "named"),
    [
        ("plans: {1: {'*': {per_user_model: 1/minute}}}", r"plans: plan names must be strings, got 1"),
        (
            "plans: {free: {'*': {per_user_model: 1/minute}, 2024: {per_user_model: 1/minute}}}",
            r"plans\.free: model names must be strings, got 2024",
        ),
        ("plans: {free: {'*': {per_user_model: 1/minute}, 3.5: {}}}", r"plans\.free: .* got 3\.5"),
        ("plans: {free: {'*': {7: 1/minute}}}", r"plans\.free\.\*: tiers must be strings, got 7"),
        ("plans: {free: {'*': {per_user: {1: 2}}}}", r"plans\.free\.\*\.per_user: limit fields .* got 1"),
        ("aliases: {4: gpt-4}\nplans: {free: {'*': {per_user: 1/minute}}}", r"aliases: model names .* got 4"),
        ("aliases: {gpt: 4}\nplans: {free: {'*': {per_user: 1/minute}}}", r"aliases\.gpt: .* got 4"),
    ],
)
def test_yaml_keys_that_are_not_strings_fail_naming_the_field(tmp_path: Path, yaml: str, named: str) -> None:
    with pytest.raises(PolicyError, match=named):
        Plans.load(write(tmp_path, yaml + "\n", "policy.yaml"))


def test_an_unknown_plan_is_no_default() -> None:
    plans = Plans(
        {"free": {"*": {"per_user": "1/minute"}}, "pro": {"*": {"per_user": "9/minute"}}}, default_plan="free"
    )
    assert plans.limiter("pro", "gpt").policy.rules[0].limit == 9
    with pytest.raises(LookupError, match=r"unknown plan 'por'; the plans are: free, pro"):
        plans.limiter("por", "gpt")


SHARING = {
    "free": {
        "*": {"per_user": "5/minute", "per_model": "4/minute"},
        "gpt-4": {"per_user": "5/minute", "per_user_model": "3/minute"},
    },
    "pro": {"*": {"per_user": "50/minute", "per_model": "4/minute"}},
}


def test_rules_stated_alike_count_in_one_counter_on_every_storage(storage: Storage) -> None:
    plans = Plans(SHARING, default_plan="free", storage=storage)
    free, free_gpt4, pro = (plans.limiter(*key) for key in (("free", "*"), ("free", "gpt-4"), ("pro", "*")))
    # A per_user limit stated alike in every entry of a plan caps a user over all the plan's models.
    assert [free_gpt4.check("alice", "gpt-4").allowed for _ in range(3)] == [True] * 3
    assert [free.check("alice", "llama").allowed for _ in range(3)] == [True, True, False]
    assert free_gpt4.get_request_count("alice", "gpt-4", "per_user") == 5
    # A per_model limit stated alike in every plan caps the model over every plan.
    assert [free.check(f"u{n}", "mistral").allowed for n in range(2)] == [True, True]
    assert [pro.check(f"v{n}", "mistral").allowed for n in range(3)] == [True, True, False]
    # Another limit is another counter: pro's per_user of 50 has counted nothing of alice's.
    assert pro.check("alice", "qwen").allowed
    assert pro.get_request_count("alice", "qwen", "per_user") == 1
    # Resetting through one entry resets the counter every entry shares.
    free.reset("alice", "llama", tier="per_user")
    assert free_gpt4.get_request_count("alice", "gpt-4", "per_user") == 0


def test_reservations_share_counters_across_plans(storage: Storage) -> None:
    shared = {"requests": "100/minute", "tokens": "1000/minute", "max_concurrent": 1}
    plans = Plans(
        {"free": {"*": {"per_model": shared}}, "pro": {"*": {"per_model": shared, "per_user": "9/minute"}}},
        default_plan="free",
        storage=storage,
    )
    free, pro = plans.limiter("free", "gpt"), plans.limiter("pro", "gpt")
    held = free.reserve("a", "gpt", input_tokens=600)
    assert held.allowed
    assert not pro.reserve("b", "gpt", input_tokens=1).allowed  # the one slot is free's
    held.settle(100, 100)
    assert pro.get_request_count("b", "gpt", "per_model", unit="tokens") == 200
    later = pro.reserve("b", "gpt", input_tokens=800)
    assert later.allowed and later.decision.remaining == 0  # 200 + 800 of 1000 tokens
    later.cancel()
    assert free.get_request_count("a", "gpt", "per_model", unit="concurrent") == 0


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


def test_shadow_follows_the_callers_plan_not_the_entry_it_falls_back_to() -> None:
    """A plan's request for a model it does not list is limited by the default plan's entry: in shadow when
    the caller's plan is (never denied), enforced when it is not, whether or not the default plan is."""
    policy = {
        "free": {"*": {"per_user_model": "1/minute"}},
        "pro": {"gpt-4": {"per_user_model": "1/minute"}},
        "trial": {"gpt-4": {"per_user_model": "1/minute"}},
    }

    def client(shadow: str) -> TestClient:
        plan_key = from_header("x-plan")
        plans = Plans(policy, default_plan="free", plan_key=plan_key, shadow_plans=shadow)
        app = Starlette(routes=[Route("/v1/chat", echo, methods=["POST"])])
        app.add_middleware(RateLimitMiddleware, limiter=plans)
        return TestClient(app)

    free_in_shadow = client("free")
    assert [send(free_in_shadow, "pro", "llama").status_code for _ in range(2)] == [200, 429]
    assert [send(free_in_shadow, None, "llama", "v").status_code for _ in range(2)] == [200, 200]
    trial_in_shadow = client("trial")
    assert [send(trial_in_shadow, "trial", "llama").status_code for _ in range(2)] == [200, 200]
    assert [send(trial_in_shadow, None, "llama", "v").status_code for _ in range(2)] == [200, 429]


def test_an_alias_must_name_a_canonical_model() -> None:
    with pytest.raises(PolicyError, match=r"aliases\.a: 'b' is an alias itself"):
        Plans(
            {"free": {"*": {"per_user_model": "2/minute"}}}, default_plan="free", aliases={"a": "b", "b": "a"}
        )


def test_an_alias_to_itself_is_harmless() -> None:
    plans = Plans({"free": {"*": {"per_user_model": "2/minute"}}}, default_plan="free", aliases={"m": "m"})
    assert plans.canonical("m") == "m"


_TWO = {"free": {"*": {"per_user_model": "1/minute"}}, "pro": {"*": {"per_user_model": "100/minute"}}}


def test_one_shadow_plan_may_be_given_alone() -> None:
    """A str was iterated letter by letter: "'p' is not one of the plans"."""
    plans = Plans(_TWO, default_plan="free", shadow_plans="pro")
    assert plans.shadow_plans == frozenset({"pro"})
    with pytest.raises(TypeError, match=r"^shadow_plans must hold strings, got 5 in \('pro', 5\)$"):
        Plans(_TWO, default_plan="free", shadow_plans=["pro", 5])
    with pytest.raises(TypeError, match=r"^shadow_plans must be a str or a list of str, got None$"):
        Plans(_TWO, default_plan="free", shadow_plans=None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"default_plan": ["free"]}, r"^plans: default_plan must be a str, got \['free'\]$"),
        (
            {"default_plan": "free", "algorithm": ["gcra"]},
            r"^plans: algorithm must be a str, got \['gcra'\]$",
        ),
    ],
)
def test_plan_options_of_another_type_are_named(options: dict[str, Any], says: str) -> None:
    """They were looked up as they were: "unhashable type: 'list'"."""
    with pytest.raises(TypeError, match=says):
        Plans(_TWO, **options)


@pytest.mark.parametrize("method", ["check", "reserve"])
def test_plans_name_a_user_or_model_that_is_not_a_str(method: str) -> None:
    """A list for the model was looked up in the aliases: "unhashable type: 'list'"."""
    plans = Plans(_TWO, default_plan="free")
    with pytest.raises(TypeError, match=r"^model must be a str, got \['m'\]$"):
        getattr(plans, method)("u", ["m"])
    with pytest.raises(TypeError, match=r"^user must be a str, got None$"):
        getattr(plans, method)(None, "m")


def test_plans_count_a_models_requests_in_flight_together_each_against_its_own_limit() -> None:
    """INTEGRATION.md: the lower plan's max_concurrent is reached first, by anyone's requests in flight."""
    plans = Plans(
        {
            "free": {"*": {"per_model": {"max_concurrent": 1}}},
            "pro": {"*": {"per_model": {"max_concurrent": 2}}},
        },
        default_plan="free",
    )
    free, pro = plans.limiter("free", "gpt"), plans.limiter("pro", "gpt")
    held = pro.reserve("p", "gpt")
    assert held.allowed and not free.reserve("f", "gpt").allowed  # one in flight: free's limit
    assert pro.reserve("q", "gpt").allowed and not pro.reserve("r", "gpt").allowed
    held.cancel()
    assert not free.reserve("f", "gpt").allowed  # pro's second is still in flight
