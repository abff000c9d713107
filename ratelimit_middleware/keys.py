"""Key functions: who is calling, and which model they ask for.

A key function takes a ``RequestView`` and returns a string, or ``None`` when it cannot tell (then the next
function of a ``first_of`` is tried). The same functions serve the ASGI and WSGI middlewares and the
decorators. They may run twice for one request (when one needs the body, all run again once it is read), so
keep them free of side effects. The defaults:

- user: the ``X-User-ID`` header, else the API key (``Authorization: Bearer`` or ``X-API-Key``, hashed), else
  the client address;
- model: the ``X-Model`` header, else the JSON body's ``"model"`` field, else ``"default"``.

API keys are never used raw: ``api_key()`` returns ``"key:"`` and a SHA-256 digest (its first 128 bits),
and ``client_ip()`` returns ``"ip:<address>"`` (of IPv6, its /64), so these two never collide. Headers such
as ``X-User-ID`` are taken as the client sends them: a client can name any user (or ``ip:...``), so let a
gateway set them, or key on the credential your app authenticates, and on it alone (``api_key(bearer=False)``
for an app that reads ``X-API-Key``): the default also reads a bearer token, which such an app ignores.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import ipaddress
import re
import weakref
from collections.abc import Callable, Iterable

from .hooks import check_hook
from .request import HTTP_TOKEN, RequestView

__all__ = [
    "KeyFunction",
    "api_key",
    "client_ip",
    "constant",
    "default_model_key",
    "default_user_key",
    "first_of",
    "from_header",
    "from_json_body",
    "from_path",
    "from_query",
]

KeyFunction = Callable[[RequestView], "str | None"]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _header_name(name: object, argument: str) -> str:
    """``name``, lower-cased, if it is a header name (one a request can carry): else an error naming
    ``argument``."""
    if not isinstance(name, str):
        raise TypeError(f"{argument} must be a header name (str), got {name!r}")
    if not HTTP_TOKEN.fullmatch(name):
        raise ValueError(f"{argument} must be a header name such as 'x-user-id', got {name!r}")
    return name.lower()


def _non_empty(value: object, argument: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{argument} must be a str, got {value!r}")
    if not value:
        raise ValueError(f"{argument} must not be empty")
    return value


_LEADING: weakref.WeakKeyDictionary[KeyFunction, tuple[str, KeyFunction | None]] = weakref.WeakKeyDictionary()
"""What ``leading_header`` answers, for the key functions built by ``from_header`` and ``first_of``."""


def leading_header(function: KeyFunction) -> tuple[str, KeyFunction | None] | None:
    """``(header, rest)`` when ``function`` is ``from_header(header)``, or a ``first_of`` that starts with
    one: it answers ``request.header(header)`` when that is not ``None``, else ``rest(request)`` (``rest``
    ``None``: ``None``). ``None`` for any other key function.

    The gate reads that header itself (``Gate.identify``): the default keys then cost one call each on a
    request that carries their header, instead of three.
    """
    try:
        return _LEADING.get(function)
    except TypeError:  # a callable that cannot be weakly referenced (an attrgetter) or hashed: not ours
        return None


def from_header(name: str) -> KeyFunction:
    """The value of header ``name`` (case-insensitive), if present and not blank."""
    lowered = _header_name(name, "from_header's name")

    def key(request: RequestView) -> str | None:
        return request.header(lowered)

    _LEADING[key] = (lowered, None)
    return key


def from_query(name: str) -> KeyFunction:
    """The value of query parameter ``name``, if present and not blank; ``None`` if it is sent several times
    with different values (``?key=a&key=b``), since the app may read either (see ``RequestView.query``)."""
    _non_empty(name, "from_query's name")

    def key(request: RequestView) -> str | None:
        value = request.query.get(name, "").strip()
        return value or None

    return key


def from_path(pattern: str | re.Pattern[str]) -> KeyFunction:
    """A part of the path: a template such as ``"/v1/models/{model}"`` or a regex with one group.

    A template's ``{name}`` matches one path segment; with several placeholders the first is returned.
    """
    if isinstance(pattern, re.Pattern):
        regex = pattern
    elif not isinstance(pattern, str):
        raise TypeError(f"from_path needs a template or a regex (str or re.Pattern), got {pattern!r}")
    elif "{" in pattern:
        parts = re.split(r"\{(\w+)\}", pattern)
        names = parts[1::2]
        twice = next((name for name in names if names.count(name) > 1), None)
        if twice is not None:
            raise ValueError(f"from_path: the placeholder {{{twice}}} appears twice in {pattern!r}")
        regex = re.compile(
            "".join(re.escape(part) if i % 2 == 0 else f"(?P<{part}>[^/]+)" for i, part in enumerate(parts))
            + "/?$"
        )
    else:
        try:
            regex = re.compile(pattern)
        except re.error as error:
            raise ValueError(f"from_path: {pattern!r} is not a valid regex: {error}") from None
    if regex.groups < 1:
        raise ValueError(
            f"from_path needs a template with a {{placeholder}} or a regex with a group: {pattern!r}"
        )

    def key(request: RequestView) -> str | None:
        match = regex.match(request.path)
        return (match.group(1) or None) if match else None

    return key


def from_json_body(field: str) -> KeyFunction:
    """A field of the JSON body (``"model"``; dotted for nested objects: ``"metadata.user_id"``).

    Strings and numbers count; other values, bodies that are not JSON objects and bodies over the size cap
    give ``None``. Asking for it makes the middleware read the body (up to its ``max_body_size``).
    """
    path = _non_empty(field, "from_json_body's field").split(".")

    def key(request: RequestView) -> str | None:
        value: object = request.json()
        for part in path:
            if not isinstance(value, dict):
                return None
            value = value.get(part)
        if isinstance(value, str):
            return value.strip() or None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return None

    return key


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def api_key(header: str | None = "x-api-key", *, bearer: bool = True) -> KeyFunction:
    """``"key:"`` and the first 128 bits of the SHA-256 (hex) of the client's API key: the bearer token of
    ``Authorization``, else the ``header`` (``X-API-Key``).

    Key on the credential your app authenticates, and on it alone: a source the app ignores is one a client
    can fill with a new value per request, and a new key each time. ``bearer=False`` reads the ``header``
    only (an app that authenticates ``X-API-Key``); ``header=None`` the bearer token only.
    """
    if not isinstance(bearer, bool):
        raise TypeError(f"api_key's bearer must be True or False, got {bearer!r}")
    lowered = None if header is None else _header_name(header, "api_key's header")
    if lowered is None and not bearer:
        raise ValueError(
            "api_key(header=None, bearer=False) reads no credential: keep the header or the bearer"
        )

    def secret(request: RequestView) -> str | None:
        if bearer:
            authorization = request.header("authorization")
            if authorization:
                scheme, _, token = authorization.partition(" ")
                if scheme.lower() == "bearer" and token.strip():
                    return token.strip()
        return request.header(lowered) if lowered is not None else None

    def key(request: RequestView) -> str | None:
        value = secret(request)
        return "key:" + _digest(value) if value else None

    return key


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _networks(trusted: Iterable[str]) -> tuple[_Network, ...]:
    """The trusted networks; one written in IPv4-mapped form (``::ffff:10.0.0.0/104``) as the IPv4 network it
    is, since addresses are compared in that form (see ``_parse_ip``)."""
    networks: list[_Network] = []
    for entry in trusted:
        if not isinstance(entry, str):  # ip_network reads an int or bytes as one address
            raise TypeError(f"trusted_proxies: {entry!r} is not an IP address or network (a str)")
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ValueError(f"trusted_proxies: {entry!r} is not an IP address or network") from None
        if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
            mapped = network.network_address.ipv4_mapped
            assert mapped is not None  # inside ::ffff:0:0/96
            network = ipaddress.IPv4Network((mapped, network.prefixlen - 96))
        networks.append(network)
    return tuple(networks)


def _parse_ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    value = value.strip().strip('"')
    if value.startswith("["):  # [v6]:port, as Forwarded allows
        value = value[1 : value.find("]")] if "]" in value else value
    elif value.count(":") == 1:  # v4:port
        value = value.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    # A dual-stack server reports an IPv4 peer as ::ffff:a.b.c.d: the IPv4 address it is, for networks too.
    return (address.ipv4_mapped or address) if isinstance(address, ipaddress.IPv6Address) else address


_LONGEST_ADDRESS = 100
"""More than any written address: ``"[v6%zone]:port"`` with quotes is about 70 characters. Longer text is
no address, and is kept out of the cache below."""


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
"""RFC 6052's well-known prefix: a translator (NAT64, SIIT) writes an IPv4 address ``a.b.c.d`` as
``64:ff9b::a.b.c.d``."""

_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")
"""RFC 8215's local-use prefix for translators, of which a network takes a prefix of 32 to 96 bits: where
the IPv4 address sits depends on that length (RFC 6052, 2.2), but the address is one per IPv4 address
whatever it is."""


def address_key(address: str, ipv6_prefix: int = 64) -> str | None:
    """``"ip:<address>"`` of one client address as a server or a proxy writes it (``None`` if it is none):
    IPv4 as it is, an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``) as that IPv4 address, other IPv6 ones
    as their network of ``ipv6_prefix`` bits (``"ip:2001:db8:1:2::/64"``; at 128 the address itself), since
    one host usually holds a whole /64 and may send each request from a new address of it.

    Translated addresses are IPv4 clients, each of its own, whom a /64 would lump together: one of the
    well-known NAT64 prefix (``64:ff9b::a.b.c.d``) is the IPv4 address it embeds, one of the local-use
    prefix (``64:ff9b:1::/48``) the whole address (one per IPv4 address, wherever its prefix length puts it).
    A link-local address (``fe80::/10``) is the whole address too: every host of a link is in one /64.

    ``client_ip`` keys with it, and so does the gate for a user key with no answer."""
    return _address_key(address, ipv6_prefix) if len(address) <= _LONGEST_ADDRESS else None


@functools.lru_cache(maxsize=4096)
def _address_key(address: str, ipv6_prefix: int) -> str | None:
    """``address_key``, remembered: parsing costs microseconds, on every request keyed by address."""
    parsed = _parse_ip(address)
    if isinstance(parsed, ipaddress.IPv6Address) and parsed in _NAT64:
        return f"ip:{ipaddress.IPv4Address(int(parsed) & 0xFFFFFFFF)}"
    if (
        isinstance(parsed, ipaddress.IPv6Address)
        and ipv6_prefix < 128
        and not parsed.is_link_local  # every host of a link is in fe80::/64
        and parsed not in _LOCAL_NAT64
    ):
        shift = 128 - ipv6_prefix
        return f"ip:{ipaddress.IPv6Address(int(parsed) >> shift << shift)}/{ipv6_prefix}"
    return f"ip:{parsed}" if parsed is not None else None


_FORWARDING_HEADERS = ("x-forwarded-for", "forwarded")


def _forwarded_for(request: RequestView, header: str) -> list[str]:
    """The addresses proxies appended to ``header``, oldest first, all its lines (a proxy may add its own)."""
    value = request.headers.get(header)
    if not value or not value.strip():
        return []
    if header == "x-forwarded-for":
        return value.split(",")
    found = []
    for element in value.split(","):  # one element per hop: "" for a hop that gave no for=
        pairs = (pair.strip().partition("=") for pair in element.split(";"))
        found.append(next((address for name, _, address in pairs if name.lower() == "for"), ""))
    return found


def client_ip(
    trusted_proxies: int | str | Iterable[str] = 0, header: str = "X-Forwarded-For", ipv6_prefix: int = 64
) -> KeyFunction:
    """``"ip:<address>"`` of the client; of an IPv6 client, its network of ``ipv6_prefix`` bits (1 to 128: a
    /64 by default, what one host usually holds; see ``address_key``).

    Forwarding headers are honoured only behind trusted proxies, as werkzeug's ProxyFix does:
    ``trusted_proxies=N`` trusts the last N hops (the peer and the N - 1 before it); a list of networks trusts
    every hop from those networks, starting at the direct peer. Only ``header`` is read, the one your proxies
    write: ``X-Forwarded-For`` (the default) or ``Forwarded`` (RFC 7239). A proxy passes the other one on
    as the client sent it, so reading it would let a client choose its own key.
    """
    if (
        isinstance(trusted_proxies, bool)
        or (isinstance(trusted_proxies, int) and trusted_proxies < 0)
        or not isinstance(trusted_proxies, (int, Iterable))
    ):
        raise ValueError(
            f"trusted_proxies must be a count >= 0 or a list of networks, got {trusted_proxies!r}"
        )
    if not isinstance(header, str) or header.lower() not in _FORWARDING_HEADERS:
        raise ValueError(f"header must be 'X-Forwarded-For' or 'Forwarded', got {header!r}")
    if isinstance(ipv6_prefix, bool) or not isinstance(ipv6_prefix, int):
        raise TypeError(f"ipv6_prefix must be a prefix length (int), got {ipv6_prefix!r}")
    if not 1 <= ipv6_prefix <= 128:
        raise ValueError(f"ipv6_prefix must be from 1 to 128, got {ipv6_prefix!r}")
    header = header.lower()
    if isinstance(trusted_proxies, str):  # one network
        trusted_proxies = [trusted_proxies]
    count = trusted_proxies if isinstance(trusted_proxies, int) else None
    networks = () if isinstance(trusted_proxies, int) else _networks(trusted_proxies)

    def trusted(address: str | None) -> bool:
        parsed = _parse_ip(address) if address else None
        return parsed is not None and any(parsed in network for network in networks)

    def key(request: RequestView) -> str | None:
        address = request.client
        if count:
            hops = _forwarded_for(request, header)
            if len(hops) >= count:
                address = hops[-count]
        elif networks and trusted(address):
            for hop in reversed(_forwarded_for(request, header)):
                address = hop
                if not trusted(hop):
                    break
        return address_key(address, ipv6_prefix) if address else None

    return key


def constant(value: str) -> KeyFunction:
    """Always ``value``: e.g. one model name for an app that serves one model."""
    _non_empty(value, "constant's value")

    def key(request: RequestView) -> str | None:
        return value

    return key


def first_of(*functions: KeyFunction) -> KeyFunction:
    """The first answer that is not ``None``."""
    if not functions:
        raise ValueError("first_of needs at least one key function")
    for index, function in enumerate(functions, 1):
        if function is None:  # an option may be None (the default), an argument here may not
            raise TypeError(f"first_of's argument {index} must be a key function, got None")
        check_key(function, f"first_of's argument {index}")

    def key(request: RequestView) -> str | None:
        for function in functions:
            value = function(request)
            if value is not None:
                return value
        return None

    leading = leading_header(functions[0])
    if leading is not None:
        header, rest = leading
        after = functions[1:] if rest is None else (rest, *functions[1:])
        _LEADING[key] = (header, (first_of(*after) if len(after) > 1 else after[0]) if after else None)
    return key


def default_user_key() -> KeyFunction:
    """``X-User-ID``, else the hashed API key, else the client address (no proxies trusted)."""
    return first_of(from_header("x-user-id"), api_key(), client_ip())


def default_model_key() -> KeyFunction:
    """``X-Model``, else the JSON body's ``"model"``, else ``"default"``."""
    return first_of(from_header("x-model"), from_json_body("model"), constant("default"))


_FACTORIES = (
    from_header,
    from_query,
    from_path,
    from_json_body,
    api_key,
    client_ip,
    constant,
    first_of,
    default_user_key,
    default_model_key,
)


def check_key(function: object, name: str) -> None:
    """Fail unless ``function`` is ``None`` or a key function: a plain callable taking one request view, not
    one of the builders above passed uncalled (``user_key=client_ip`` for ``client_ip()``), which every
    request would call with the view and fail. ``name`` names the option."""
    for factory in _FACTORIES:
        if function is factory:
            parameters = inspect.signature(factory).parameters.values()
            needs = any(parameter.default is parameter.empty for parameter in parameters)
            call = f"keys.{factory.__name__}({'...' if needs else ''})"
            raise TypeError(
                f"{name} got keys.{factory.__name__} uncalled: it builds key functions, so pass {call}"
            )
    check_hook(function, name, ("request",))
