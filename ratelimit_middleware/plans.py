"""Plans: limits that depend on who is calling (free, pro...) and on the model, from code or a policy file.

A plan maps model names (``"*"`` for every other model) to tiers, and each tier to its limits: a request
limit string or a table of ``requests``, ``tokens``, ``input_tokens``, ``output_tokens`` and
``max_concurrent``. ``Plans`` builds one limiter per (plan, model entry), all on one storage, and picks the
limiter of a request from its plan (``plan_key``, a key function: a header, or a lookup of the user) and its
model, after mapping model ``aliases`` to their canonical names. Pass it to a middleware as the limiter.

A counter is named by its rule (tier, unit, limit, window), not by plan or entry: a rule stated alike in
several entries or plans counts in one counter (their limiters share one storage, which names counters so).
So ``per_user = "100/hour"`` in every entry of a plan caps a user over all its models, and
``per_model = "600/minute"`` in every plan caps the model over all plans; another limit is another counter,
but for ``max_concurrent``: the requests in flight are one count, which each plan compares with its own limit.

``Plans.load(path)`` reads TOML (``.toml``) or YAML (``.yaml``/``.yml``, needs PyYAML); ``Plans.from_env()``
reads ``RATELIMIT_POLICY`` (a path) or ``RATELIMIT_POLICY_TOML`` (the policy itself). Plans listed in
``shadow_plans`` (one name, or a list) are evaluated and recorded but never deny (``Shadow``): a new plan's
limits roll out safely. Their clients' requests are in shadow whichever entry limits them (a model the plan
does not list falls back to the default plan's), and other plans' are enforced, the default plan's entries
included. Every mistake fails at start-up with a ``PolicyError`` naming the file, and the field
(``plans.free.*.per_user_model.tokens``) or the line; an argument of another type given in code (a list for
``default_plan``) is a ``TypeError`` naming it.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .algorithms import ALGORITHMS
from .backends.base import Storage
from .backends.memory import MemoryStorage
from .config import Limits, RateLimitConfig, TierSpec
from .decision import Decision
from .keys import KeyFunction, check_key, from_header
from .limiter import MultiTierRateLimiter, check_request
from .names import string_items
from .request import HTTP_TOKEN, RequestView
from .reservation import Reservation
from .shadow import Shadow

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["Plans", "PolicyError"]

_TIERS = ("per_user_model", "per_model", "per_user", "global")
_LIMIT_FIELDS = ("requests", "tokens", "input_tokens", "output_tokens", "max_concurrent")
_TOP_FIELDS = ("algorithm", "default_plan", "plan_header", "aliases", "shadow_plans", "plans")
ANY_MODEL = "*"


class PolicyError(ValueError):
    """A policy that cannot be used; the message names the source and the field or line."""


def _names(table: Mapping[Any, Any], where: str, what: str) -> None:
    """Fail unless every key of ``table`` is a str (YAML reads ``2024:`` or ``3.5:`` as numbers, which no
    request's plan or model would ever match)."""
    for key in table:
        if not isinstance(key, str):
            raise PolicyError(f"{where}: {what} must be strings, got {key!r} (quote it)")


def _limits(value: object, where: str) -> Limits | str:
    if isinstance(value, str):
        try:
            RateLimitConfig.parse(value)
        except ValueError as error:
            raise PolicyError(f"{where}: {error}") from None
        return value
    if not isinstance(value, Mapping):
        raise PolicyError(
            f"{where}: expected a limit string like '20/minute' or a table of {', '.join(_LIMIT_FIELDS)}, "
            f"got {value!r}"
        )
    _names(value, where, "limit fields")
    unknown = sorted(set(value) - set(_LIMIT_FIELDS))
    if unknown:
        raise PolicyError(f"{where}: unknown key {unknown[0]!r}; expected {', '.join(_LIMIT_FIELDS)}")
    for field, item in value.items():
        try:
            Limits(**{field: item})
        except (TypeError, ValueError) as error:
            raise PolicyError(f"{where}.{field}: {error}") from None
    try:
        return Limits(**value)
    except (TypeError, ValueError) as error:
        raise PolicyError(f"{where}: {error}") from None


_MODELS_TABLE = "expected a table of models ('*' for any model) and their tiers"


def _check_plans(plans: object, source: str) -> Mapping[str, Any]:
    """``plans``, if it is a table of at least one plan."""
    if not isinstance(plans, Mapping):
        raise PolicyError(f"{source}: plans: expected a table of plans and their models, got {plans!r}")
    if not plans:
        raise PolicyError(f"{source}: plans: at least one plan is needed")
    return plans


def _entries(plans: Mapping[str, Any], source: str) -> Iterator[tuple[tuple[str, str], object]]:
    """``((plan, model), tiers)`` for each model entry of each plan."""
    for plan, models in plans.items():
        if not isinstance(models, Mapping) or not models:
            raise PolicyError(f"{source}: plans.{plan}: {_MODELS_TABLE}, got {models!r}")
        _names(models, f"{source}: plans.{plan}", "model names")
        for model, tiers in models.items():
            yield (plan, model), tiers


def _tiers(tiers: object, source: str, key: tuple[str, str]) -> list[tuple[str, TierSpec | None]]:
    """The spec of each tier (``None`` when unset) of one model entry, in the order of ``_TIERS``."""
    where = f"{source}: plans.{key[0]}.{key[1]}"
    if not isinstance(tiers, Mapping) or not tiers:
        raise PolicyError(f"{where}: expected a table of tiers ({', '.join(_TIERS)})")
    _names(tiers, where, "tiers")
    unknown = sorted(set(tiers) - set(_TIERS))
    if unknown:
        raise PolicyError(f"{where}: unknown tier {unknown[0]!r}; expected {', '.join(_TIERS)}")
    return [(tier, _limits(tiers[tier], f"{where}.{tier}") if tier in tiers else None) for tier in _TIERS]


def _limiter(
    tiers: list[tuple[str, TierSpec | None]],
    algorithm: str,
    storage: Storage,
    source: str,
    key: tuple[str, str],
) -> MultiTierRateLimiter:
    """The limiter of one model entry (its specs in the order of ``MultiTierRateLimiter``'s tiers); a limit
    its algorithm cannot count (finer than gcra's float time) fails naming the entry."""
    try:
        return MultiTierRateLimiter(*(spec for _, spec in tiers), algorithm=algorithm, storage=storage)
    except ValueError as error:
        raise PolicyError(f"{source}: plans.{key[0]}.{key[1]}: {error}") from None


class Plans:
    """Per-plan, per-model limiters behind one ``check``/``reserve`` interface for the middlewares."""

    def __init__(
        self,
        plans: Mapping[str, Mapping[str, Mapping[str, Any]]],
        *,
        default_plan: str,
        plan_key: KeyFunction | None = None,
        aliases: Mapping[str, str] | None = None,
        algorithm: str = "sliding_log",
        storage: Storage | None = None,
        shadow_plans: Iterable[str] = (),
        source: str = "plans",
    ) -> None:
        if not isinstance(algorithm, str):  # a list would fail the look-up as "unhashable type"
            raise TypeError(f"{source}: algorithm must be a str, got {algorithm!r}")
        if algorithm not in ALGORITHMS:
            raise PolicyError(
                f"{source}: algorithm: unknown {algorithm!r}; choose one of {', '.join(ALGORITHMS)}"
            )
        _check_plans(plans, source)
        _names(plans, f"{source}: plans", "plan names")
        if not isinstance(default_plan, str):
            raise TypeError(f"{source}: default_plan must be a str, got {default_plan!r}")
        if default_plan not in plans:
            raise PolicyError(
                f"{source}: default_plan: {default_plan!r} is not one of the plans ({', '.join(plans)})"
            )
        if not isinstance(plans[default_plan], Mapping) or not plans[default_plan]:
            raise PolicyError(f"{source}: plans.{default_plan}: {_MODELS_TABLE}, got {plans[default_plan]!r}")
        if ANY_MODEL not in plans[default_plan]:
            raise PolicyError(
                f"{source}: plans.{default_plan}: the default plan needs a '*' entry, the limits of every "
                "model no plan lists (else a client could name such a model and go unlimited)"
            )
        shadow_plans = frozenset(string_items(shadow_plans, "shadow_plans"))  # one name, not its letters
        unknown_shadow = sorted(shadow_plans - set(plans))
        if unknown_shadow:
            raise PolicyError(f"{source}: shadow_plans: {unknown_shadow[0]!r} is not one of the plans")
        aliases = {} if aliases is None else aliases
        if not isinstance(aliases, Mapping):
            raise PolicyError(f"{source}: aliases: expected a table of model name = canonical model name")
        _names(aliases, f"{source}: aliases", "model names")
        for alias, model in aliases.items():
            if not isinstance(model, str):
                raise PolicyError(
                    f"{source}: aliases.{alias}: expected a canonical model name, got {model!r}"
                )
            if model != alias and model in aliases:  # aliases map once: a chain or cycle would mislead
                raise PolicyError(
                    f"{source}: aliases.{alias}: {model!r} is an alias itself; name the canonical model"
                )
        self.default_plan = default_plan
        check_key(plan_key, "plan_key")
        self.plan_key = plan_key
        self.aliases = dict(aliases)
        entries = {key: _tiers(models, source, key) for key, models in _entries(plans, source)}
        for plan, model in entries:
            canonical = self.aliases.get(model, model)
            if canonical != model:  # requests for it are looked up as the canonical model: never used
                raise PolicyError(
                    f"{source}: plans.{plan}.{model}: {model!r} is an alias of {canonical!r}, which requests "
                    f"for it are limited as; give the entry the canonical name {canonical!r}"
                )
        if storage is None:  # one for every entry: a rule stated alike counts in one counter
            storage = MemoryStorage()
        self._limiters = {
            key: _limiter(tiers, algorithm, storage, source, key) for key, tiers in entries.items()
        }
        self._plans = dict.fromkeys(plans)  # the plan names, in order
        self.uses_reservations = any(limiter.uses_reservations for limiter in self._limiters.values())
        self.shadow_plans = shadow_plans
        # A shadow plan's request may fall back to another plan's entry, and an enforced plan's to a shadow
        # plan's: the caller's plan says which, so every entry has its shadow form when any plan is in shadow.
        self._shadows = {key: Shadow(limiter) for key, limiter in self._limiters.items() if shadow_plans}

    # -- choosing ---------------------------------------------------------------------------------------

    def canonical(self, model: str) -> str:
        """``model`` after ``aliases``."""
        return self.aliases.get(model, model)

    def plan_of(self, request: RequestView) -> str:
        """The request's plan: ``plan_key``'s answer when it names a plan, else ``default_plan``."""
        plan = self.plan_key(request) if self.plan_key is not None else None
        return plan if plan is not None and plan in self._plans else self.default_plan

    def route(self, request: RequestView, model: str) -> tuple[Shadow | MultiTierRateLimiter, str]:
        """The limiter of a request (its plan's entry for the model, or the entry it falls back to; in shadow
        when the request's plan is one of ``shadow_plans``) and its canonical model."""
        model = self.canonical(model)
        plan = self.plan_of(request)
        key = self._key(plan, model)
        return (self._shadows[key] if plan in self.shadow_plans else self._limiters[key]), model

    def limiter(self, plan: str, model: str) -> MultiTierRateLimiter:
        """The limiter of ``plan`` for ``model``: its own entry, else the plan's ``"*"``, else the default
        plan's. An unknown ``plan`` is a ``LookupError`` (naming the plans): a typo must not pick other
        limits."""
        if plan not in self._plans:
            raise LookupError(f"unknown plan {plan!r}; the plans are: {', '.join(self._plans)}")
        return self._limiters[self._key(plan, model)]

    def _key(self, plan: str, model: str) -> tuple[str, str]:
        for key in (
            (plan, model),
            (plan, ANY_MODEL),
            (self.default_plan, model),
            (self.default_plan, ANY_MODEL),
        ):
            if key in self._limiters:
                return key
        raise LookupError(
            f"no limits for model {model!r} in plan {plan!r} or the default plan; add a '*' entry"
        )

    def describe(self) -> list[str]:
        """One line per plan, model and tier: what ``ratelimit-middleware check`` prints."""
        lines = []
        for (plan, model), limiter in self._limiters.items():
            for rule in limiter.policy.all_rules:
                window = "in flight" if rule.unit == "concurrent" else f"per {rule.seconds:g} s"
                lines.append(f"{plan:<12} {model:<20} {rule.tier:<16} {rule.limit:>10} {rule.unit} {window}")
        return lines

    # -- loading ----------------------------------------------------------------------------------------

    @classmethod
    def from_mapping(
        cls,
        data: Mapping[str, Any],
        *,
        source: str = "policy",
        plan_key: KeyFunction | None = None,
        storage: Storage | None = None,
    ) -> Plans:
        """Plans from a parsed policy (the structure of a policy file)."""
        if not isinstance(data, Mapping):
            raise PolicyError(f"{source}: expected a table at the top")
        unknown = sorted(set(data) - set(_TOP_FIELDS))
        if unknown:
            raise PolicyError(f"{source}: unknown key {unknown[0]!r}; expected {', '.join(_TOP_FIELDS)}")
        plans = _check_plans(data.get("plans"), source)
        header = data.get("plan_header")
        if header is not None and (not isinstance(header, str) or not HTTP_TOKEN.fullmatch(header)):
            raise PolicyError(
                f"{source}: plan_header: expected a header name such as 'x-plan', got {header!r}"
            )
        if "default_plan" in data:
            default_plan = data["default_plan"]
            if not isinstance(default_plan, str):
                raise PolicyError(f"{source}: default_plan: expected a plan name, got {default_plan!r}")
        elif len(plans) == 1:
            default_plan = next(iter(plans))  # its name is checked with the others'
        else:  # the first plan by default would hand a generous plan listed first to every client
            raise PolicyError(
                f"{source}: default_plan: required with several plans ({', '.join(map(str, plans))}): name "
                "the plan of clients whose plan key gives none or an unknown plan"
            )
        shadow_plans = data.get("shadow_plans", [])
        names = isinstance(shadow_plans, (str, list)) and all(isinstance(plan, str) for plan in shadow_plans)
        if not names:
            raise PolicyError(
                f"{source}: shadow_plans: expected a plan name or a list of them, got {shadow_plans!r}"
            )
        return cls(
            plans,
            default_plan=default_plan,
            plan_key=plan_key or (from_header(header) if header else None),
            aliases=data.get("aliases"),
            algorithm=str(data.get("algorithm", "sliding_log")),
            storage=storage,
            shadow_plans=shadow_plans,
            source=source,
        )

    @classmethod
    def load(
        cls, path: str | Path, *, plan_key: KeyFunction | None = None, storage: Storage | None = None
    ) -> Plans:
        """Plans from a TOML or YAML policy file."""
        path = Path(path)
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as error:
            raise PolicyError(f"{path}: cannot read the policy file: {error.strerror}") from None
        except UnicodeDecodeError as error:
            raise PolicyError(
                f"{path}: a policy file must be UTF-8 text; byte {error.start} is not ({error.reason})"
            ) from None
        text = text.removeprefix("\ufeff")  # a byte order mark some editors write
        suffix = path.suffix.lower()
        if suffix in (".yaml", ".yml"):
            data = _parse_yaml(text, str(path))
        elif suffix == ".toml":
            data = _parse_toml(text, str(path))
        else:
            raise PolicyError(f"{path}: a policy file is TOML (.toml) or YAML (.yaml, .yml), not {suffix!r}")
        return cls.from_mapping(data, source=str(path), plan_key=plan_key, storage=storage)

    @classmethod
    def from_env(cls, *, plan_key: KeyFunction | None = None, storage: Storage | None = None) -> Plans | None:
        """Plans from ``RATELIMIT_POLICY`` (a path) or ``RATELIMIT_POLICY_TOML`` (TOML text); else None."""
        if os.environ.get("RATELIMIT_POLICY"):
            return cls.load(os.environ["RATELIMIT_POLICY"], plan_key=plan_key, storage=storage)
        text = os.environ.get("RATELIMIT_POLICY_TOML")
        if not text:
            return None
        data = _parse_toml(text, "RATELIMIT_POLICY_TOML")
        return cls.from_mapping(data, source="RATELIMIT_POLICY_TOML", plan_key=plan_key, storage=storage)

    # -- the limiter interface the middlewares use ------------------------------------------------------

    def _routed(self, user: str, model: str) -> tuple[MultiTierRateLimiter, str]:
        """Without a request (core use): the default plan, the model after aliases."""
        check_request(user, model, 0)
        canonical = self.canonical(model)
        return self.limiter(self.default_plan, canonical), canonical

    def check(self, user: str, model: str, cost: int = 1) -> Decision:
        limiter, model = self._routed(user, model)
        return limiter.check(user, model, cost)

    async def acheck(self, user: str, model: str, cost: int = 1) -> Decision:
        limiter, model = self._routed(user, model)
        return await limiter.acheck(user, model, cost)

    def reserve(self, user: str, model: str, *, input_tokens: int = 0, output_tokens: int = 0) -> Reservation:
        limiter, model = self._routed(user, model)
        return limiter.reserve(user, model, input_tokens=input_tokens, output_tokens=output_tokens)

    async def areserve(
        self, user: str, model: str, *, input_tokens: int = 0, output_tokens: int = 0
    ) -> Reservation:
        limiter, model = self._routed(user, model)
        return await limiter.areserve(user, model, input_tokens=input_tokens, output_tokens=output_tokens)


def _parse_toml(text: str, source: str) -> Any:
    """The TOML of a policy; an error quotes its line (tomllib's message gives only its number: a key given
    twice is "Cannot overwrite a value")."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        found = re.search(r"at line (\d+)", str(error))
        lines = text.splitlines()
        number = int(found.group(1)) if found else 0
        quoted = f": {lines[number - 1].strip()!r}" if 0 < number <= len(lines) else ""
        raise PolicyError(f"{source}: {error}{quoted}") from None


def _parse_yaml(text: str, source: str) -> Any:
    try:
        import yaml
    except ImportError:
        raise PolicyError(f"{source}: YAML policies need PyYAML: pip install pyyaml") from None

    class Loader(yaml.SafeLoader):
        """The safe loader, failing on a key given twice in one mapping (else the last would win)."""

        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
            seen: set[object] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                except TypeError:  # unhashable: the base class says so
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep)

    try:
        return yaml.load(text, Loader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise PolicyError(f"{source}{line}: {getattr(error, 'problem', None) or error}") from None
