"""Key functions on the framework-neutral request view."""

from __future__ import annotations

import asyncio
import operator
import re
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from werkzeug.test import Client

from ratelimit_middleware import keys
from ratelimit_middleware.asgi import RateLimitMiddleware
from ratelimit_middleware.gate import Gate
from ratelimit_middleware.request import BodyNotLoaded, RequestView
from ratelimit_middleware.wsgi import RateLimitWSGI


def view(
    headers: dict[str, str] | None = None,
    *,
    path: str = "/v1/chat/completions",
    query: str = "",
    client: str | None = "203.0.113.7",
    body: bytes | None = None,
) -> RequestView:
    request = RequestView("POST", path, list((headers or {}).items()), query, client)
    if body is not None:
        request.load_body(body)
    return request


def test_from_header_is_case_insensitive_and_ignores_blanks() -> None:
    key = keys.from_header("X-User-ID")
    assert key(view({"x-user-id": " alice "})) == "alice"
    assert key(view({"X-USER-ID": "bob"})) == "bob"
    assert key(view({"X-User-ID": "  "})) is None
    assert key(view()) is None


def test_from_query() -> None:
    key = keys.from_query("user")
    assert key(view(query="user=carol&page=2")) == "carol"
    assert key(view(query="user=")) is None


def test_a_query_parameter_repeated_with_different_values_has_no_value() -> None:
    """Starlette and Django read the last value, werkzeug the first: neither is safe to key on."""
    key = keys.from_query("user")
    assert key(view(query="user=carol&user=dave")) is None
    assert key(view(query="user=carol&user=")) is None
    assert key(view(query="user=carol&user=carol")) == "carol"
    assert key(view(query="user=c%61rol&page=1&user=carol")) == "carol"  # one value, spelt two ways
    assert view(query="user=a&page=1&user=b").query == {"page": "1"}


def test_from_path_template_and_regex() -> None:
    assert keys.from_path("/v1/models/{model}")(view(path="/v1/models/gpt-4")) == "gpt-4"
    assert keys.from_path("/v1/models/{model}")(view(path="/v1/models/gpt-4/")) == "gpt-4"
    assert keys.from_path("/v1/models/{model}")(view(path="/v1/other")) is None
    assert keys.from_path(r"^/u/([^/]+)/")(view(path="/u/erin/x")) == "erin"
    assert keys.from_path(re.compile(r"^/t/(\w+)"))(view(path="/t/abc")) == "abc"
    with pytest.raises(ValueError, match="placeholder"):
        keys.from_path("/no/groups")


def test_from_json_body_reads_fields_and_tolerates_anything() -> None:
    key = keys.from_json_body("model")
    assert key(view(body=b'{"model": "gpt-4o"}')) == "gpt-4o"
    assert key(view(body=b'{"model": 7}')) == "7"
    assert key(view(body=b'{"model": ["x"]}')) is None
    assert key(view(body=b'{"model": true}')) is None
    assert key(view(body=b"[1, 2]")) is None
    assert key(view(body=b"not json")) is None
    assert key(view(body=b"\xff\xfe")) is None
    assert key(view(body=b"")) is None
    assert key(view(body=b"[" * 100_000)) is None  # deeply nested: no RecursionError escapes
    nested = keys.from_json_body("metadata.user_id")
    assert nested(view(body=b'{"metadata": {"user_id": "u1"}}')) == "u1"


def test_body_is_requested_only_when_needed() -> None:
    with pytest.raises(BodyNotLoaded):
        keys.from_json_body("model")(view())
    request = view()
    request.load_body(None)  # over the size cap
    assert keys.from_json_body("model")(request) is None


def test_api_key_is_hashed_never_raw() -> None:
    key = keys.api_key()
    bearer = key(view({"Authorization": "Bearer sk-secret-123"}))
    assert bearer is not None and bearer.startswith("key:") and "sk-secret" not in bearer
    assert key(view({"X-API-Key": "sk-secret-123"})) == bearer  # same key, same bucket
    assert key(view({"Authorization": "Basic abc"})) is None
    assert key(view({"Authorization": "Bearer "})) is None
    assert key(view({"X-API-Key": "other"})) != bearer
    # Any text hashes, lone surrogates too, and surrogates never collide with the text they escape.
    assert key(view({"X-API-Key": "\ud800"})) != key(view({"X-API-Key": "\udcc3\udca9"}))
    assert key(view({"X-API-Key": "\udcc3\udca9"})) != key(view({"X-API-Key": "é"}))


def test_api_key_reads_only_the_sources_it_is_given() -> None:
    both = {"Authorization": "Bearer sk-b", "X-API-Key": "sk-h"}
    header_only = keys.api_key(bearer=False)
    assert header_only(view(both)) == keys.api_key()(view({"X-API-Key": "sk-h"}))
    assert header_only(view({"Authorization": "Bearer sk-b"})) is None
    bearer_only = keys.api_key(header=None)
    assert bearer_only(view(both)) == keys.api_key()(view({"Authorization": "Bearer sk-b"}))
    assert bearer_only(view({"X-API-Key": "sk-h"})) is None
    assert keys.api_key("X-Key", bearer=False)(view({"X-Key": "k"})) == keys.api_key()(
        view({"X-API-Key": "k"})
    )


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_a_bearer_token_the_app_ignores_does_not_make_a_new_key_per_request(kind: str) -> None:
    """``api_key()`` prefers a bearer token: against an app that authenticates X-API-Key alone, a client sent
    a new bearer token each time and was a new key each time. ``bearer=False`` keys on X-API-Key only."""
    get = served(kind, keys.api_key(bearer=False))
    client = "203.0.113.7"
    assert [get("/v1/models", {"X-API-Key": "sk-real"}, client) for _ in range(3)] == [200, 200, 429]
    rotated = [
        get("/v1/models", {"X-API-Key": "sk-real", "Authorization": f"Bearer junk{i}"}, client)
        for i in range(3)
    ]
    assert rotated == [429, 429, 429]
    assert get("/v1/models", {"X-API-Key": "sk-other"}, client) == 200


def test_client_ip_ignores_forwarding_headers_by_default() -> None:
    key = keys.client_ip()
    spoofed = view({"X-Forwarded-For": "1.2.3.4", "Forwarded": "for=5.6.7.8"}, client="10.0.0.9")
    assert key(spoofed) == "ip:10.0.0.9"
    assert key(view(client=None)) is None


def test_client_ip_trusts_a_counted_number_of_proxies() -> None:
    key = keys.client_ip(trusted_proxies=1)
    assert key(view({"X-Forwarded-For": "6.6.6.6, 198.51.100.4"}, client="10.0.0.1")) == "ip:198.51.100.4"
    assert key(view({}, client="10.0.0.1")) == "ip:10.0.0.1"
    two = keys.client_ip(trusted_proxies=2)
    assert (
        two(view({"X-Forwarded-For": "6.6.6.6, 198.51.100.4, 10.0.0.2"}, client="10.0.0.1"))
        == "ip:198.51.100.4"
    )


def test_client_ip_trusts_networks_only_from_trusted_peers() -> None:
    key = keys.client_ip(trusted_proxies=["10.0.0.0/8"])
    forwarded = {"X-Forwarded-For": "6.6.6.6, 198.51.100.4, 10.1.1.1"}
    assert key(view(forwarded, client="10.0.0.1")) == "ip:198.51.100.4"
    assert key(view(forwarded, client="203.0.113.50")) == "ip:203.0.113.50"  # untrusted peer: ignored
    rfc7239 = {"Forwarded": 'for="[2001:db8::1]:4711";proto=https, for=10.2.2.2'}
    assert key(view(rfc7239, client="10.0.0.1")) == "ip:10.0.0.1"  # not the header these proxies write
    by_rfc7239 = keys.client_ip(trusted_proxies=["10.0.0.0/8"], header="Forwarded")
    assert by_rfc7239(view(rfc7239, client="10.0.0.1")) == "ip:2001:db8::/64"
    assert key(view({"X-Forwarded-For": "garbage"}, client="10.0.0.1")) is None
    with pytest.raises(ValueError, match="not-a-net"):
        keys.client_ip(trusted_proxies=["not-a-net"])
    with pytest.raises(ValueError, match="-1"):
        keys.client_ip(trusted_proxies=-1)
    with pytest.raises(ValueError, match="X-Real-IP"):
        keys.client_ip(trusted_proxies=1, header="X-Real-IP")


def test_a_dual_stack_server_s_mapped_addresses_are_the_ipv4_ones() -> None:
    """A server listening on ``::`` reports IPv4 peers as ``::ffff:a.b.c.d``: a trusted IPv4 proxy is still
    trusted, and a client is one IPv4 address however it is written."""
    key = keys.client_ip(trusted_proxies=["10.0.0.0/8"])
    forwarded = {"X-Forwarded-For": "::ffff:198.51.100.4"}
    assert key(view(forwarded, client="::ffff:10.0.0.5")) == "ip:198.51.100.4"
    assert key(view({}, client="::ffff:203.0.113.9")) == "ip:203.0.113.9"
    written_mapped = keys.client_ip(trusted_proxies=["::ffff:10.0.0.0/104"])  # as the server reported it
    assert written_mapped(view(forwarded, client="::ffff:10.0.0.5")) == "ip:198.51.100.4"
    assert written_mapped(view(forwarded, client="10.0.0.5")) == "ip:198.51.100.4"


def test_an_ipv6_client_is_its_network_of_ipv6_prefix_bits() -> None:
    key = keys.client_ip()
    assert key(view(client="2001:db8:1:2:a:b:c:d")) == "ip:2001:db8:1:2::/64"
    assert key(view(client="2001:db8:1:2::1")) == key(view(client="2001:db8:1:2:ffff::9"))
    assert key(view(client="2001:db8:1:3::1")) == "ip:2001:db8:1:3::/64"
    assert key(view(client="::ffff:203.0.113.9")) == "ip:203.0.113.9"  # IPv4, whatever the prefix
    assert keys.client_ip(ipv6_prefix=128)(view(client="2001:db8::1")) == "ip:2001:db8::1"
    assert keys.client_ip(ipv6_prefix=48)(view(client="2001:db8:1:2::1")) == "ip:2001:db8:1::/48"
    assert keys.client_ip(ipv6_prefix=1)(view(client="ffff::1")) == "ip:8000::/1"
    behind = keys.client_ip(trusted_proxies=1)
    assert (
        behind(view({"X-Forwarded-For": "[2001:db8:1:2::7]:443"}, client="10.0.0.1"))
        == "ip:2001:db8:1:2::/64"
    )
    assert key(view(client="not an address")) is None
    assert key(view(client="1" * 10_000)) is None  # no address, and never remembered


def test_a_nat64_client_is_the_ipv4_address_it_embeds() -> None:
    """Behind a translator (SIIT, NAT64), every IPv4 client reaches an IPv6 server from an address of the
    translator's prefix: keyed on the /64, they all shared one bucket. In RFC 6052's well-known prefix
    ``64:ff9b::/96`` the client is its embedded IPv4 address (as an IPv4-mapped one is); in the local-use
    ``64:ff9b:1::/48`` (RFC 8215), whose prefix length decides where the IPv4 address sits, the full
    address, which is one per IPv4 address whatever that length."""
    for key in (keys.client_ip(), keys.client_ip(ipv6_prefix=128), keys.client_ip(ipv6_prefix=32)):
        assert key(view(client="64:ff9b::203.0.113.9")) == "ip:203.0.113.9"
        assert key(view(client="64:ff9b::cb00:710a")) == "ip:203.0.113.10"
        assert key(view(client="64:ff9b:1::cb00:7109")) == "ip:64:ff9b:1::cb00:7109"  # a /96 prefix
        assert key(view(client="64:ff9b:1:cb00:71:900::")) == "ip:64:ff9b:1:cb00:71:900::"  # a /48 prefix
        assert key(view(client="64:ff9b:1:cb00:71:a00::")) == "ip:64:ff9b:1:cb00:71:a00::"
    assert keys.address_key("[64:ff9b::203.0.113.9]:443") == "ip:203.0.113.9"
    behind = keys.client_ip(trusted_proxies=["64:ff9b::203.0.113.5"])  # a proxy as it arrives
    assert behind(view({"X-Forwarded-For": "64:ff9b::198.51.100.4"}, client="64:ff9b::cb00:7105")) == (
        "ip:198.51.100.4"
    )
    # Outside the two prefixes, IPv6 as any other.
    assert keys.address_key("64:ff9b::1:cb00:7109") == "ip:64:ff9b::/64"
    assert keys.address_key("64:ff9b:2::cb00:7109") == "ip:64:ff9b:2::/64"


def test_a_link_local_client_is_its_whole_address() -> None:
    """Every host of a link has an address of the one ``fe80::/64``: keyed on the /64, all the clients of a
    link shared one bucket. A link-local address is one host's (its zone, the server's interface, kept)."""
    assert keys.address_key("fe80::1") == "ip:fe80::1"
    assert keys.address_key("fe80::2") == "ip:fe80::2"
    assert keys.address_key("fe80::1%eth0") != keys.address_key("fe80::1%eth1")
    assert keys.client_ip()(view(client="fe80::a:b:c:d")) == "ip:fe80::a:b:c:d"


def test_a_forwarded_hop_without_for_still_counts_as_a_hop() -> None:
    """The trusted proxy wrote ``proto=https`` only: the element before it is the client's own, not its."""
    spoofed = {"Forwarded": "for=6.6.6.6, proto=https"}
    assert keys.client_ip(1, header="Forwarded")(view(spoofed, client="10.0.0.1")) is None


@pytest.mark.parametrize("trusted_proxies", [1, ["10.0.0.0/8"]])
def test_a_client_cannot_choose_its_address_with_the_header_proxies_pass_on(
    trusted_proxies: int | list[str],
) -> None:
    """A proxy that appends to X-Forwarded-For passes the client's own Forwarded header on untouched."""
    from_client = {"Forwarded": "for=1.1.1.1", "X-Forwarded-For": "203.0.113.7"}
    assert keys.client_ip(trusted_proxies)(view(from_client, client="10.0.0.1")) == "ip:203.0.113.7"
    from_client = {"X-Forwarded-For": "1.1.1.1", "Forwarded": "for=203.0.113.7"}
    by_rfc7239 = keys.client_ip(trusted_proxies, header="forwarded")
    assert by_rfc7239(view(from_client, client="10.0.0.1")) == "ip:203.0.113.7"


def test_first_of_and_constant() -> None:
    key = keys.first_of(keys.from_header("a"), keys.from_header("b"), keys.constant("z"))
    assert key(view({"b": "2"})) == "2"
    assert key(view({"a": "1", "b": "2"})) == "1"
    assert key(view()) == "z"
    with pytest.raises(ValueError, match="at least one"):
        keys.first_of()


_NAMES = ("a", "b", "x-user-id")
_KEYS = st.recursive(
    st.one_of(
        st.sampled_from(_NAMES).map(keys.from_header),
        st.sampled_from(["z", "w"]).map(keys.constant),
        st.sampled_from(["q"]).map(keys.from_query),
    ),
    lambda inner: st.lists(inner, min_size=1, max_size=3).map(lambda functions: keys.first_of(*functions)),
    max_leaves=6,
)
_HEADERS = st.dictionaries(st.sampled_from([*_NAMES, "A", "B"]), st.sampled_from(["1", " 2 ", "", " "]))


@given(_KEYS, _HEADERS, st.sampled_from(["", "q=3", "q=%20"]))
def test_a_leading_header_and_the_rest_answer_as_the_key_function_does(
    key: keys.KeyFunction, headers: dict[str, str], query: str
) -> None:
    """What ``Gate.identify`` reads in place of a ``from_header`` or a ``first_of`` that starts with one."""
    request = view(headers, query=query)
    leading = keys.leading_header(key)
    if leading is None:
        return
    header, rest = leading
    answer = request.header(header)
    if answer is None and rest is not None:
        answer = rest(request)
    assert answer == key(request)


def test_only_from_header_and_first_of_one_have_a_leading_header() -> None:
    assert keys.leading_header(keys.from_header("X-User-ID")) == ("x-user-id", None)
    user = keys.leading_header(keys.default_user_key())
    assert user is not None and user[0] == "x-user-id"
    assert keys.leading_header(keys.first_of(keys.constant("z"), keys.from_header("a"))) is None
    assert keys.leading_header(keys.api_key()) is None
    assert keys.leading_header(lambda request: "mine") is None
    assert keys.leading_header(operator.attrgetter("path")) is None  # no weak reference to it
    # Nor can one lead a first_of, which must still build (it raised TypeError from the weak reference).
    assert keys.leading_header(keys.first_of(operator.attrgetter("path"), keys.from_header("a"))) is None


@given(_KEYS, _KEYS, _HEADERS, st.sampled_from(["", "q=3"]))
def test_the_gate_identifies_as_its_key_functions_answer(
    user_key: keys.KeyFunction, model_key: keys.KeyFunction, headers: dict[str, str], query: str
) -> None:
    request = view(headers, query=query)
    user, model = user_key(request), model_key(request)
    expected = (user or "ip:203.0.113.7", model or "default")
    assert Gate("10/minute", user_key=user_key, model_key=model_key).identify(request) == expected


def test_default_keys() -> None:
    user, model = keys.default_user_key(), keys.default_model_key()
    assert user(view({"X-User-ID": "alice", "Authorization": "Bearer k"})) == "alice"
    assert user(view({"Authorization": "Bearer k"})) == keys.api_key()(view({"X-API-Key": "k"}))
    assert user(view()) == "ip:203.0.113.7"
    assert model(view({"X-Model": "llama"})) == "llama"  # the body is not needed
    assert model(view(body=b'{"model": "gpt-4o"}')) == "gpt-4o"
    assert model(view(body=b"{}")) == "default"


def test_repeated_headers_are_joined_in_the_mapping_and_keys_read_the_first() -> None:
    """A key reads what the app authenticates (Starlette: the first line); the mapping joins them all."""
    request = RequestView("GET", "/", [("X-Forwarded-For", "1.1.1.1"), ("x-forwarded-for", "2.2.2.2")])
    assert request.headers["X-Forwarded-For"] == "1.1.1.1, 2.2.2.2"
    assert request.header("X-Forwarded-For") == "1.1.1.1"
    # Every line of a forwarding header counts: a proxy may add its own line rather than append.
    behind = keys.client_ip(trusted_proxies=1)
    assert (
        behind(
            RequestView(
                "GET", "/", [("x-forwarded-for", "1.1.1.1"), ("x-forwarded-for", "2.2.2.2")], "", "10.0.0.1"
            )
        )
        == "ip:2.2.2.2"
    )


@pytest.mark.parametrize("second", ["Bearer sk-other", "x0", ""])
def test_a_second_authorization_line_is_not_a_new_key(second: str) -> None:
    from ratelimit_middleware import asgi

    key = keys.api_key()
    alone = asgi.request_view({"method": "GET", "path": "/", "headers": [(b"authorization", b"Bearer sk-1")]})
    scope = {
        "method": "GET",
        "path": "/",
        "headers": [(b"authorization", b"Bearer sk-1"), (b"authorization", second.encode())],
    }
    assert key(asgi.request_view(scope)) == key(alone)
    doubled = view({"X-Model": "gpt-4"})
    assert keys.from_header("X-Model")(
        RequestView("GET", "/", [("X-Model", "gpt-4"), ("X-Model", second)])
    ) == keys.from_header("X-Model")(doubled)


@pytest.mark.parametrize(
    "pairs", [[("X-Tenant", "acme")], [("x-tenant", "acme"), ("X-TENANT", "b")], [("Other", "x")]]
)
def test_headers_read_the_same_under_asgi_and_wsgi_whatever_the_case(pairs: list[tuple[str, str]]) -> None:
    from ratelimit_middleware import asgi, wsgi

    scope = {
        "method": "GET",
        "path": "/",
        "query_string": b"",
        "headers": [(name.lower().encode(), value.encode()) for name, value in pairs],
    }
    environ: dict[str, str] = {}
    for name, value in pairs:  # a WSGI server joins repeated headers
        variable = "HTTP_" + name.upper().replace("-", "_")
        environ[variable] = f"{environ[variable]}, {value}" if variable in environ else value
    expected = RequestView("GET", "/", pairs).headers.get("x-tenant")
    for request in (asgi.request_view(scope), wsgi.request_view(environ)):
        for spelling in ("X-Tenant", "x-tenant", "X-TENANT"):
            assert request.headers.get(spelling) == expected
            assert (spelling in request.headers) is (expected is not None)


def test_from_query_takes_no_blank_value() -> None:
    assert keys.from_query("user")(view({}, query="user=%20%20")) is None
    assert keys.from_query("user")(view({}, query="user=%20ann%20")) == "ann"


def test_one_trusted_network_may_be_given_alone() -> None:
    key = keys.client_ip(trusted_proxies="10.0.0.0/8")
    assert key(view({"X-Forwarded-For": "198.51.100.4"}, client="10.0.0.5")) == "ip:198.51.100.4"


@pytest.mark.parametrize(
    ("build", "error", "named"),
    [
        (
            lambda: keys.from_header(None),
            TypeError,
            r"^from_header's name must be a header name \(str\), got None$",
        ),
        (lambda: keys.from_header(b"x-user-id"), TypeError, r"^from_header's name .* got b'x-user-id'$"),
        (lambda: keys.from_header("x user"), ValueError, r"^from_header's name .* got 'x user'$"),
        (
            lambda: keys.api_key(b"x-api-key"),
            TypeError,
            r"^api_key's header must be a header name \(str\), got b'x-api-key'$",
        ),
        (lambda: keys.api_key(bearer="no"), TypeError, r"^api_key's bearer must be True or False, got 'no'$"),
        (
            lambda: keys.api_key(None, bearer=False),
            ValueError,
            r"^api_key\(header=None, bearer=False\) reads no",
        ),
        (lambda: keys.from_json_body(None), TypeError, r"^from_json_body's field must be a str, got None$"),
        (lambda: keys.from_json_body(""), ValueError, r"^from_json_body's field must not be empty$"),
        (lambda: keys.from_query(None), TypeError, r"^from_query's name must be a str, got None$"),
        (lambda: keys.from_path("("), ValueError, r"^from_path: '\(' is not a valid regex: missing \)"),
        (
            lambda: keys.from_path("/v1/{model}/{model}"),
            ValueError,
            r"^from_path: the placeholder \{model\} appears twice in '/v1/\{model\}/\{model\}'$",
        ),
        (lambda: keys.from_path(None), TypeError, r"^from_path needs a template or a regex .* got None$"),
        (lambda: keys.client_ip(None), ValueError, r"^trusted_proxies must be a count .* got None$"),
        (lambda: keys.client_ip([5]), TypeError, r"^trusted_proxies: 5 is not an IP address or network"),
        (lambda: keys.client_ip(ipv6_prefix=0), ValueError, r"^ipv6_prefix must be from 1 to 128, got 0$"),
        (
            lambda: keys.client_ip(ipv6_prefix=129),
            ValueError,
            r"^ipv6_prefix must be from 1 to 128, got 129$",
        ),
        (lambda: keys.client_ip(ipv6_prefix="64"), TypeError, r"^ipv6_prefix must be a prefix .* got '64'$"),
        (lambda: keys.client_ip(ipv6_prefix=True), TypeError, r"^ipv6_prefix must be a prefix .* got True$"),
    ],
)
def test_key_builders_name_a_bad_argument(
    build: Callable[[], object], error: type[Exception], named: str
) -> None:
    """They raised AttributeError or re.error from inside (or, for a header name in bytes, built a key that
    never matched; for ``client_ip([5])``, trusted the address 0.0.0.5)."""
    with pytest.raises(error, match=named):
        build()


def test_the_checked_builders_key_requests_through_the_middleware() -> None:
    from .asgi_helpers import call, http_scope, status_of

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = RateLimitMiddleware(
        app,
        "1/minute",
        user_key=keys.first_of(keys.from_header("X-Team"), keys.api_key("X-Key")),
        model_key=keys.from_path("/v1/{model}/chat"),
    )
    statuses = [
        status_of(asyncio.run(call(middleware, http_scope(path, headers=[("x-key", "k")]))))
        for path in ("/v1/a/chat", "/v1/a/chat", "/v1/b/chat")
    ]
    assert statuses == [200, 429, 200]


Served = Callable[[str, dict[str, str], str], int]
"""``get(url, headers, client address)``: the status of one request through a middleware."""


def served(kind: str, user_key: keys.KeyFunction) -> Served:
    """A real app under the ``kind`` ("asgi": Starlette, "wsgi": Flask) middleware, 2 requests a minute per
    user; its one route answers whoever asks."""
    if kind == "asgi":

        async def models(request: Request) -> PlainTextResponse:
            return PlainTextResponse("ok")

        asgi_app = RateLimitMiddleware(
            Starlette(routes=[Route("/v1/models", models)]), "2/minute", user_key=user_key
        )
        clients: dict[str, TestClient] = {}

        def asgi_get(url: str, headers: dict[str, str], address: str) -> int:
            client = clients.setdefault(address, TestClient(asgi_app, client=(address, 50000)))
            return client.get(url, headers=headers).status_code

        return asgi_get
    flask_app = Flask(__name__)
    flask_app.add_url_rule("/v1/models", "models", lambda: "ok")
    flask_app.wsgi_app = RateLimitWSGI(  # type: ignore[method-assign]
        flask_app.wsgi_app, "2/minute", user_key=user_key
    )
    client = Client(flask_app)

    def wsgi_get(url: str, headers: dict[str, str], address: str) -> int:
        return client.get(url, headers=headers, environ_base={"REMOTE_ADDR": address}).status_code

    return wsgi_get


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_a_repeated_query_parameter_does_not_make_a_new_key_per_request(kind: str) -> None:
    """Keyed on the first ``api_key``, a client rotated it and sent its real key last, which Starlette reads:
    every request was a new key. Now such a request counts under the client's address."""
    get = served(kind, keys.from_query("api_key"))
    client = "203.0.113.7"
    assert [get("/v1/models?api_key=REAL", {}, client) for _ in range(3)] == [200, 200, 429]
    rotated = [get(f"/v1/models?api_key=junk{i}&api_key=REAL", {}, client) for i in range(4)]
    assert rotated == [200, 200, 429, 429]
    assert get("/v1/models?api_key=REAL&api_key=REAL", {}, client) == 429  # one value: REAL's key
    assert get("/v1/models?api_key=OTHER&api_key=OTHER", {}, client) == 200


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
@pytest.mark.parametrize(
    ("name", "user_key"),
    [("client_ip", keys.client_ip()), ("the gate's fallback", keys.from_header("x-user-id"))],
)
def test_an_ipv6_client_cannot_take_a_new_address_per_request(
    kind: str, name: str, user_key: keys.KeyFunction
) -> None:
    """A host holds a whole /64: keyed on the full address, it sent each request from a new one of them and
    was never limited. ``client_ip()`` and a user key with no answer both key it on its /64 now."""
    get = served(kind, user_key)
    statuses = [get("/v1/models", {}, f"2001:db8:1:2::{i + 1:x}") for i in range(4)]
    assert statuses == [200, 200, 429, 429]
    assert get("/v1/models", {}, "2001:db8:1:3::1") == 200  # another /64, another client
    assert [get("/v1/models", {}, "203.0.113.7") for _ in range(3)] == [200, 200, 429]
    assert get("/v1/models", {}, "::ffff:203.0.113.7") == 429  # the same IPv4 client, as a dual-stack server
    assert get("/v1/models", {}, "64:ff9b::203.0.113.7") == 429  # the same, through a NAT64 translator
    assert get("/v1/models", {}, "64:ff9b::203.0.113.8") == 200  # another IPv4 client through it
    if name == "the gate's fallback":
        assert get("/v1/models", {"X-User-ID": "alice"}, "2001:db8:1:2::9") == 200


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_ipv6_prefix_128_keys_every_address_apart(kind: str) -> None:
    get = served(kind, keys.client_ip(ipv6_prefix=128))
    assert [get("/v1/models", {}, "2001:db8:1:2::1") for _ in range(3)] == [200, 200, 429]
    assert get("/v1/models", {}, "2001:db8:1:2::2") == 200
