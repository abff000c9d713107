"""Bad input: a clear exception naming the bad value, never a crash or a silent admission."""

from __future__ import annotations

import asyncio
import functools
import operator
import re
from collections.abc import Callable
from typing import Any

import pytest

from ratelimit_middleware import MemoryStorage, MultiTierRateLimiter, RateLimitConfig, RateLimiter, keys
from ratelimit_middleware.asgi import Message, RateLimitMiddleware, Receive, Scope, Send
from ratelimit_middleware.config import Limits
from ratelimit_middleware.keys import KeyFunction
from ratelimit_middleware.plans import Plans
from ratelimit_middleware.request import RequestView

from .redis_server import RedisServer


@pytest.mark.parametrize(
    ("user", "model", "cost", "error", "named"),
    [
        (None, "m", 1, TypeError, "user"),
        (42, "m", 1, TypeError, "42"),
        (b"alice", "m", 1, TypeError, "b'alice'"),
        ("u", None, 1, TypeError, "model"),
        ("u", ["m"], 1, TypeError, r"\['m'\]"),
        ("u", "m", -1, ValueError, "-1"),
        ("u", "m", 1.5, TypeError, "1.5"),
        ("u", "m", True, TypeError, "True"),
        ("u", "m", "3", TypeError, "'3'"),
    ],
)
def test_bad_requests_raise_naming_the_value(
    user: object, model: object, cost: object, error: type, named: str
) -> None:
    limiter = RateLimiter()
    with pytest.raises(error, match=named):
        limiter.check(user, model, cost)  # type: ignore[arg-type]
    assert len(limiter) == 0


@pytest.mark.parametrize("method", ["get_request_count", "reset"])
def test_bad_identities_rejected_everywhere(method: str) -> None:
    with pytest.raises(TypeError, match="user"):
        getattr(RateLimiter(), method)(None, "m")


def test_unknown_algorithm_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"'token_bucket'.*sliding_log"):
        RateLimiter(algorithm="token_bucket")
    with pytest.raises(ValueError, match="unknown algorithm"):
        MultiTierRateLimiter(per_model="1/hour", algorithm="")


@pytest.mark.parametrize("max_keys", [0, -5, 1.5, True, "10"])
def test_bad_max_keys(max_keys: object) -> None:
    with pytest.raises(ValueError, match="max_keys"):
        RateLimiter(max_keys=max_keys)  # type: ignore[arg-type]


def test_clock_must_be_callable() -> None:
    with pytest.raises(TypeError, match="clock"):
        RateLimiter(clock=12.0)  # type: ignore[arg-type]


def test_a_bad_limit_keyword_is_named_as_passed() -> None:
    with pytest.raises(TypeError, match=r"^limit must be .* got 5$"):
        RateLimiter(limit=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^limit must be"):
        RateLimiter(limit=5, tokens="10/minute")  # type: ignore[arg-type]


def test_resetting_a_tier_without_a_limit_says_so_plainly() -> None:
    with pytest.raises(ValueError, match=r"^tier 'per_model' has no limit here; configured: per_user_model"):
        RateLimiter(5, 60).reset("u", "m", tier="per_model")
    with pytest.raises(ValueError, match=r"^tier 'per_model' has no requests limit here"):
        RateLimiter(5, 60).get_request_count("u", "m", tier="per_model")


def test_amounts_above_2_53_are_refused() -> None:
    with pytest.raises(ValueError, match=rf"max_concurrent must be >= 0 and <= 2\*\*53, got {2**53 + 1}"):
        Limits(max_concurrent=2**53 + 1)
    limiter = RateLimiter(tokens="100/minute")
    for tokens in ("input_tokens", "output_tokens"):
        with pytest.raises(ValueError, match=rf"{tokens} must be >= 0 and <= 2\*\*53"):
            limiter.reserve("u", "m", **{tokens: 2**53 + 1})
    reservation = limiter.reserve("u", "m", input_tokens=1)
    with pytest.raises(ValueError, match=r"output_tokens.*9007199254740993"):
        reservation.settle(1, 2**53 + 1)


def test_check_refuses_a_cost_above_2_53_as_reserve_does() -> None:
    limiter = RateLimiter(limit="10/minute")
    with pytest.raises(ValueError, match="cost"):
        limiter.check("u", "m", cost=2**53 + 1)


def test_a_route_refuses_the_options_of_a_middleware() -> None:
    from ratelimit_middleware.flask import limit

    with pytest.raises(TypeError, match="'exempt_paths' is an option of RateLimitMiddleware"):
        limit("5/minute", exempt_paths=["/e"])  # type: ignore[call-arg]


@pytest.mark.parametrize("option", ["shadow", "add_headers", "stream_usage"])
def test_switches_must_be_booleans(option: str) -> None:
    from ratelimit_middleware.asgi import RateLimitMiddleware

    with pytest.raises(TypeError, match=f"{option} must be True or False, got 'false'"):
        RateLimitMiddleware(lambda scope, receive, send: None, **{option: "false"})  # type: ignore[arg-type]


def _asgi_app(scope: object, receive: object, send: object) -> None:
    return None


def _wsgi_app(environ: object, start_response: object) -> list[bytes]:
    return []


async def _ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    response: list[Message] = [
        {"type": "http.response.start", "status": 200, "headers": []},
        {"type": "http.response.body", "body": b"ok"},
    ]
    for message in response:
        await send(message)


@pytest.mark.parametrize("which", ["asgi", "wsgi"])
@pytest.mark.parametrize(
    ("options", "named"),
    [
        (
            {"exempt_path": ["/health"]},
            r"RateLimit\w+ has no option 'exempt_path' \(did you mean 'exempt_paths'\?\)",
        ),
        ({"colour": "blue"}, r"has no option 'colour'; it takes add_headers, "),
        ({"path_limits": [("/v1/*", "1/minute")]}, r"path_limits must be a mapping .*\[\('/v1/\*'"),
        ({"observers": print}, r"observers must be a list of Observer instances"),
        ({"on_error": "local"}, r"got 'local' \('local' is RedisStorage's"),
        ({"default_output_tokens": -1}, r"default_output_tokens must be >= 0 and <= 2\*\*53, got -1"),
        ({"default_output_tokens": 2**53 + 1}, r"default_output_tokens must be >= 0 and <= 2\*\*53"),
        ({"default_output_tokens": "1"}, r"default_output_tokens must be an int, got '1'"),
        ({"limiter": RateLimiter}, r"limiter must be a limiter instance, got the class RateLimiter"),
        (
            {"path_limits": {"/v1/*": MultiTierRateLimiter}},
            r"path_limits\['/v1/\*'\] must be a limiter instance",
        ),
    ],
)
def test_middleware_mistakes_fail_at_construction_naming_them(
    which: str, options: dict[str, object], named: str
) -> None:
    """Before, a typo raised from an internal class (and under ``add_middleware`` only at the first request),
    and a limiter class was taken for a limiter: every request then failed open."""
    from ratelimit_middleware.asgi import RateLimitMiddleware
    from ratelimit_middleware.wsgi import RateLimitWSGI

    build = (
        (lambda: RateLimitMiddleware(_asgi_app, **options))  # type: ignore[arg-type]
        if which == "asgi"
        else (lambda: RateLimitWSGI(_wsgi_app, **options))  # type: ignore[arg-type]
    )
    with pytest.raises((TypeError, ValueError), match=named):
        build()


def test_a_route_names_an_unknown_option_as_unknown() -> None:
    from ratelimit_middleware.flask import limit

    with pytest.raises(
        TypeError, match=r"a per-route limit has no option 'user_keys' \(did you mean 'user_key'\?\)"
    ):
        limit("5/minute", user_keys=None)  # type: ignore[call-arg]


def test_shadow_refuses_a_limiter_class() -> None:
    from ratelimit_middleware.shadow import Shadow

    with pytest.raises(TypeError, match="Shadow needs a limiter instance"):
        Shadow(RateLimiter)  # type: ignore[arg-type]


def test_both_takes_limit_strings_and_refuses_what_is_no_limit() -> None:
    from ratelimit_middleware.both import Both
    from ratelimit_middleware.shadow import Shadow

    both = Both("1/minute", Shadow(RateLimiter(limit="1/minute")))
    assert [both.check("u", "m").allowed for _ in range(2)] == [True, False]
    with pytest.raises(TypeError, match=r"Both's first limit must be a limiter.*got None"):
        Both(None, "1/minute")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Both's second limit must be a limiter instance, got the class"):
        Both("1/minute", RateLimiter)  # type: ignore[arg-type]


def test_one_exempt_method_may_be_given_alone() -> None:
    from werkzeug.test import Client

    from ratelimit_middleware.wsgi import RateLimitWSGI

    def app(environ: object, start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b""]

    client = Client(RateLimitWSGI(app, "1/minute", exempt_methods="HEAD"))
    assert [client.head("/").status_code for _ in range(3)] == [200, 200, 200]
    assert [client.get("/").status_code for _ in range(2)] == [200, 429]


async def _async_key(request: object) -> str:
    return "u"


class _AsyncCallable:
    async def __call__(self, request: object) -> str:
        return "u"


@pytest.mark.parametrize("option", ["user_key", "model_key", "deny_handler", "estimator"])
@pytest.mark.parametrize("function", [_async_key, _AsyncCallable()])
def test_async_key_functions_are_refused_at_construction(option: str, function: object) -> None:
    """They were accepted, then failed on every request with a coroutine never awaited."""
    from ratelimit_middleware.asgi import RateLimitMiddleware

    with pytest.raises(TypeError, match=f"{option} must be a plain function, not async"):
        RateLimitMiddleware(_asgi_app, **{option: function})  # type: ignore[arg-type]


@pytest.mark.parametrize("plan_key", [_async_key, "x-plan"])
def test_plans_refuse_a_plan_key_that_is_not_a_plain_function(plan_key: object) -> None:
    """An async lookup named no plan (every client on the default plan); a header name raised on every
    request, which on_error="allow" let through unlimited."""
    from ratelimit_middleware.plans import Plans

    with pytest.raises(TypeError, match="plan_key must be"):
        Plans({"free": {"*": {"per_user": "1/minute"}}}, default_plan="free", plan_key=plan_key)  # type: ignore[arg-type]


@pytest.mark.parametrize("option", ["estimator", "usage", "request_body"])
def test_grpc_interceptors_refuse_async_hooks(option: str) -> None:
    """An async estimator failed every call at the estimate, which on_error="allow" let through unlimited."""
    from ratelimit_middleware.grpc import AsyncRateLimitInterceptor, RateLimitInterceptor

    for interceptor in (RateLimitInterceptor, AsyncRateLimitInterceptor):
        with pytest.raises(TypeError, match=f"{option} must be a plain function, not async"):
            interceptor("1/minute", **{option: _async_key})  # type: ignore[arg-type]


_PLANS = {"free": {"*": {"per_user": "10/minute"}}}


@pytest.mark.parametrize(
    "build",
    [
        lambda s: RateLimiter(storage=s),
        lambda s: MultiTierRateLimiter(per_user="1/minute", storage=s),
        lambda s: Plans(_PLANS, default_plan="free", storage=s),
    ],
    ids=["RateLimiter", "MultiTierRateLimiter", "Plans"],
)
@pytest.mark.parametrize(
    ("storage", "says"),
    [
        (
            "redis://localhost:6379",
            r"got 'redis://localhost:6379': for a Redis URL, pass RedisStorage\(url\)",
        ),
        ("x", "storage must be a storage such as MemoryStorage"),
        (RateLimiter(), "storage must be a storage such as MemoryStorage"),
        (MemoryStorage, "storage must be a storage instance, got the class MemoryStorage: call it"),
    ],
)
def test_a_storage_that_is_not_one_is_named(build: Any, storage: object, says: str) -> None:
    """A str raised AttributeError 'bind' from inside, the class a TypeError about bind()'s arguments."""
    with pytest.raises(TypeError, match=says):
        build(storage)


def _exempting(which: str, option: str, value: object) -> object:
    from ratelimit_middleware.asgi import RateLimitMiddleware
    from ratelimit_middleware.grpc import RateLimitInterceptor
    from ratelimit_middleware.wsgi import RateLimitWSGI

    if which == "asgi":
        return RateLimitMiddleware(_asgi_app, **{option: value})  # type: ignore[arg-type]
    if which == "wsgi":
        return RateLimitWSGI(_wsgi_app, **{option: value})  # type: ignore[arg-type]
    return RateLimitInterceptor("1/minute", **{option: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("which", "option"),
    [
        ("asgi", "exempt_paths"),
        ("asgi", "exempt_methods"),
        ("wsgi", "exempt_paths"),
        ("wsgi", "exempt_methods"),
        ("grpc", "exempt_methods"),  # full method patterns: what the HTTP middlewares call exempt_paths
    ],
)
@pytest.mark.parametrize(
    ("value", "says"),
    [
        (b"/health", r"must be a str or a list of str, got b'/health'"),
        (None, r"must be a str or a list of str, got None"),
        (["/health", 5], r"must hold strings, got 5 in \('/health', 5\)"),
    ],
)
def test_exempt_lists_name_a_value_that_is_not_strings(
    which: str, option: str, value: object, says: str
) -> None:
    """bytes were iterated byte by byte ("...got 47"), None was "'NoneType' object is not iterable" and a
    number in exempt_methods an AttributeError 'upper'."""
    with pytest.raises(TypeError, match=f"^{option} {says}$"):
        _exempting(which, option, value)


@pytest.mark.parametrize("method", ["get_request_count", "reset"])
@pytest.mark.parametrize("tier", [["per_user_model"], 5])
def test_a_tier_that_is_not_a_name_is_named(method: str, tier: object) -> None:
    """A list was looked up as it was: "unhashable type: 'list'"."""
    says = r"^tier must be a tier name \(per_user_model, .*\) or None, got " + re.escape(repr(tier))
    with pytest.raises(TypeError, match=says + "$"):
        getattr(RateLimiter(limit="5/minute"), method)("u", "m", tier=tier)


@pytest.mark.parametrize("spec", ["10/minute", RateLimitConfig(10, 60)])
def test_a_limit_given_as_max_requests_hints_limit(spec: object) -> None:
    """It said "max_requests must be an int" only: RateLimiter("10/minute") reads naturally."""
    says = f"max_requests must be an int, got {spec!r}: for a limit, pass limit={spec!r}"
    with pytest.raises(TypeError, match=re.escape(says) + "$"):
        RateLimiter(spec)  # type: ignore[arg-type]


def test_a_redis_limiter_hints_limit_too(redis_server: RedisServer) -> None:
    from ratelimit_middleware import RedisRateLimiter

    with pytest.raises(TypeError, match=re.escape("for a limit, pass limit='10/minute'")):
        RedisRateLimiter(redis_server.url, "10/minute")  # type: ignore[arg-type]


def _integrations() -> dict[str, Callable[..., object]]:
    """Every integration that takes key functions, by name: each builds one with a 1/minute limit and the
    given options."""
    from ratelimit_middleware import fastapi, flask
    from ratelimit_middleware.asgi import RateLimitMiddleware
    from ratelimit_middleware.grpc import AsyncRateLimitInterceptor, RateLimitInterceptor
    from ratelimit_middleware.wsgi import RateLimitWSGI

    return {
        "asgi": lambda **options: RateLimitMiddleware(_asgi_app, "1/minute", **options),
        "wsgi": lambda **options: RateLimitWSGI(_wsgi_app, "1/minute", **options),
        "flask": lambda **options: flask.limit("1/minute", **options),
        "fastapi": lambda **options: fastapi.limit("1/minute", **options),
        "fastapi-dependency": lambda **options: fastapi.RateLimit("1/minute", **options),
        "grpc": lambda **options: RateLimitInterceptor("1/minute", **options),
        "grpc-aio": lambda **options: AsyncRateLimitInterceptor("1/minute", **options),
    }


_INTEGRATIONS = ["asgi", "wsgi", "flask", "fastapi", "fastapi-dependency", "grpc", "grpc-aio"]


@pytest.mark.parametrize("integration", _INTEGRATIONS)
@pytest.mark.parametrize(
    ("option", "factory", "hint"),
    [
        ("user_key", keys.client_ip, r"keys\.client_ip\(\)"),
        ("user_key", keys.api_key, r"keys\.api_key\(\)"),
        ("user_key", keys.from_header, r"keys\.from_header\(\.\.\.\)"),
        ("user_key", keys.default_user_key, r"keys\.default_user_key\(\)"),
        ("model_key", keys.default_model_key, r"keys\.default_model_key\(\)"),
        ("model_key", keys.from_json_body, r"keys\.from_json_body\(\.\.\.\)"),
        ("model_key", keys.from_path, r"keys\.from_path\(\.\.\.\)"),
        ("model_key", keys.from_query, r"keys\.from_query\(\.\.\.\)"),
        ("model_key", keys.constant, r"keys\.constant\(\.\.\.\)"),
        ("user_key", keys.first_of, r"keys\.first_of\(\.\.\.\)"),
    ],
)
def test_a_key_function_builder_passed_uncalled_is_refused(
    integration: str, option: str, factory: object, hint: str
) -> None:
    """It was accepted; each request then called it with the request view, which failed (or answered a
    function, not a str), and on_error="allow" let every request through unlimited."""
    with pytest.raises(TypeError, match=rf"^{option} got keys\.\w+ uncalled: .* so pass {hint}$"):
        _integrations()[integration](**{option: factory})


def _no_request() -> str:
    return "alice"


def _two_requests(request: object, other: object) -> str:
    return "alice"


@pytest.mark.parametrize("integration", _INTEGRATIONS)
@pytest.mark.parametrize("option", ["user_key", "model_key"])
@pytest.mark.parametrize(("function", "why"), [(_no_request, "too many"), (_two_requests, "missing")])
def test_a_key_function_that_cannot_take_the_request_is_refused(
    integration: str, option: str, function: object, why: str
) -> None:
    """Same: it failed on every request, which on_error="allow" let through unlimited."""
    with pytest.raises(
        TypeError, match=rf"^{option} is called as {option}\(request\), which .* cannot take: {why}"
    ):
        _integrations()[integration](**{option: function})


def _request_and_more(request: RequestView, *more: object, prefix: str = "u:") -> str:
    return prefix + (request.header("x-user-id") or "")


class _KeyObject:
    def __call__(self, request: RequestView) -> str:
        return "team"


def _with_teams(key: Callable[[RequestView, dict[str, str]], str]) -> KeyFunction:
    """A decorator that supplies an argument, keeping the function's name (``functools.wraps``)."""

    @functools.wraps(key)
    def wrapper(request: RequestView) -> str:
        return key(request, {"alice": "team-a"})

    return wrapper


@_with_teams
def _team_key(request: RequestView, teams: dict[str, str]) -> str:
    return teams.get(request.header("x-user-id") or "", "nobody")


@pytest.mark.parametrize(
    "user_key",
    [
        keys.client_ip(),
        keys.first_of(keys.from_header("x-user-id"), keys.api_key()),
        _request_and_more,
        _KeyObject(),
        functools.partial(_two_requests, "fixed"),
        operator.attrgetter("path"),  # a builtin without a signature: taken as it is
        _team_key,  # called as the wrapper, not as the function it wraps (which takes two arguments)
    ],
)
def test_key_functions_that_take_the_request_still_limit(user_key: KeyFunction) -> None:
    from .asgi_helpers import call, http_scope, status_of

    app = RateLimitMiddleware(_ok_app, "1/minute", user_key=user_key)
    scope = http_scope(headers=[("x-user-id", "alice")])
    assert [status_of(asyncio.run(call(app, dict(scope)))) for _ in range(2)] == [200, 429]


def test_plans_refuse_a_plan_key_builder_passed_uncalled() -> None:
    from ratelimit_middleware.plans import Plans

    with pytest.raises(
        TypeError, match=r"^plan_key got keys\.from_header uncalled: .* keys\.from_header\(\.\.\.\)$"
    ):
        Plans({"free": {"*": {"per_user": "1/minute"}}}, default_plan="free", plan_key=keys.from_header)


@pytest.mark.parametrize(
    ("build", "error", "named"),
    [
        (lambda: keys.constant(4), TypeError, r"^constant's value must be a str, got 4$"),
        (lambda: keys.constant(""), ValueError, r"^constant's value must not be empty$"),
        (
            lambda: keys.first_of("x-user-id"),
            TypeError,
            r"^first_of's argument 1 must be callable, got 'x-user-id'$",
        ),
        (lambda: keys.first_of(None), TypeError, r"^first_of's argument 1 must be a key function, got None$"),
        (
            lambda: keys.first_of(keys.from_header("x-user-id"), keys.client_ip),
            TypeError,
            r"^first_of's argument 2 got keys\.client_ip uncalled: .* keys\.client_ip\(\)$",
        ),
        (
            lambda: keys.first_of(keys.from_header("x-user-id"), _no_request),
            TypeError,
            r"^first_of's argument 2 is called as first_of's argument 2\(request\)",
        ),
    ],
)
def test_constant_and_first_of_check_their_arguments(
    build: Callable[[], object], error: type[Exception], named: str
) -> None:
    """``model_key=constant(4)`` and ``user_key=first_of("x-user-id")`` were accepted, then every request
    failed (a model that is not a str; a str called), and on_error="allow" let it through unlimited."""
    with pytest.raises(error, match=named):
        build()


def test_the_checked_constant_and_first_of_limit_through_the_middleware() -> None:
    from .asgi_helpers import call, http_scope, status_of

    app = RateLimitMiddleware(
        _ok_app,
        "1/minute",
        user_key=keys.first_of(keys.from_header("x-user-id")),
        model_key=keys.constant("gpt-4o"),
    )
    scope = http_scope(headers=[("x-user-id", "alice")])
    assert [status_of(asyncio.run(call(app, dict(scope)))) for _ in range(2)] == [200, 429]
    assert app.gate.limiter.get_request_count("alice", "gpt-4o") == 1


@pytest.mark.parametrize(
    ("option", "function", "call"),
    [
        ("deny_handler", _no_request, r"deny_handler\(request, decision\)"),
        ("estimator", _two_requests, r"estimator\(request\)"),
    ],
)
def test_other_hooks_that_cannot_take_their_arguments_are_refused(
    option: str, function: object, call: str
) -> None:
    """An estimator that failed on every request let it through unlimited (on_error="allow"); a
    deny_handler that failed on every denial answered the default 429 in its place."""
    with pytest.raises(TypeError, match=rf"^{option} is called as {call}, which"):
        RateLimitMiddleware(_asgi_app, **{option: function})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("option", "call"),
    [
        ("estimator", r"estimator\(method, metadata\)"),
        ("usage", r"usage\(method, response\)"),
        ("request_body", r"request_body\(message\)"),
    ],
)
def test_grpc_hooks_that_cannot_take_their_arguments_are_refused(option: str, call: str) -> None:
    from ratelimit_middleware.grpc import AsyncRateLimitInterceptor, RateLimitInterceptor

    for interceptor in (RateLimitInterceptor, AsyncRateLimitInterceptor):
        with pytest.raises(TypeError, match=rf"^{option} is called as {call}, which"):
            interceptor("1/minute", **{option: _no_request})  # type: ignore[arg-type]


def test_a_middleware_refuses_an_app_it_cannot_call() -> None:
    """``RateLimitMiddleware(None)`` was accepted and failed at the first request; an app of the other kind
    (WSGI under the ASGI middleware, or the reverse) failed every request."""
    import flask
    from fastapi import FastAPI

    from ratelimit_middleware.wsgi import RateLimitWSGI

    for middleware in (RateLimitMiddleware, RateLimitWSGI):
        with pytest.raises(TypeError, match=r"^app must be callable, got None$"):
            middleware(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^app is called as app\(scope, receive, send\), which <Flask 'x'>"):
        RateLimitMiddleware(flask.Flask("x"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^app is called as app\(environ, start_response\), which <fastapi"):
        RateLimitWSGI(FastAPI())  # type: ignore[arg-type]


def test_a_middleware_takes_an_app_of_its_kind() -> None:
    import flask
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from ratelimit_middleware.wsgi import RateLimitWSGI

    asgi = FastAPI()
    asgi.get("/")(lambda: "ok")
    with TestClient(RateLimitMiddleware(asgi, "1/minute")) as client:
        assert [client.get("/").status_code for _ in range(2)] == [200, 429]
    wsgi = flask.Flask("x")
    wsgi.get("/")(lambda: "ok")
    wsgi.wsgi_app = RateLimitWSGI(wsgi.wsgi_app, "1/minute")  # type: ignore[method-assign]
    assert [wsgi.test_client().get("/").status_code for _ in range(2)] == [200, 429]
