"""The Kubernetes manifests: well formed, consistent with each other and with what the example app reads."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

from ratelimit_middleware.plans import Plans

from .servers import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MANIFESTS = ROOT / "examples" / "kubernetes"


def documents() -> list[dict[str, Any]]:
    found = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            assert isinstance(document, dict) and {"apiVersion", "kind", "metadata"} <= set(document), path
            found.append(document)
    return found


def named(kind: str, name: str) -> dict[str, Any]:
    return next(d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name)


def test_the_api_runs_several_replicas_with_probes_on_the_exempt_health_path() -> None:
    deployment = named("Deployment", "llm-api")
    assert deployment["spec"]["replicas"] >= 2
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    main = (ROOT / "examples" / "fastapi_app" / "main.py").read_text()
    assert '"/health"' in main and "exempt_paths" in main


def test_every_env_variable_set_is_one_the_app_reads() -> None:
    container = named("Deployment", "llm-api")["spec"]["template"]["spec"]["containers"][0]
    names = {variable["name"] for variable in container["env"]}
    sources = [ROOT / "examples" / "fastapi_app" / "main.py", ROOT / "ratelimit_middleware" / "plans.py"]
    pattern = re.compile(r"environ(?:\.get\(|\[)\s*\"(\w+)\"")
    read = {name for path in sources for name in pattern.findall(path.read_text())}
    assert names <= read, f"set but never read: {sorted(names - read)}"


def test_the_redis_url_points_at_the_redis_service() -> None:
    container = named("Deployment", "llm-api")["spec"]["template"]["spec"]["containers"][0]
    url = next(v["value"] for v in container["env"] if v["name"] == "REDIS_URL")
    service = named("Service", "ratelimit-redis")
    host, port = re.match(r"redis://([\w-]+):(\d+)", url).groups()  # type: ignore[union-attr]
    assert host == service["metadata"]["name"] and int(port) == service["spec"]["ports"][0]["port"]
    redis = named("Deployment", "ratelimit-redis")
    assert service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()


def test_the_redis_never_evicts_the_limiters_keys() -> None:
    """Every limiter key has a TTL: volatile-ttl evicted live counters first under memory pressure."""
    args = named("Deployment", "ratelimit-redis")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"


def test_the_policy_is_mounted_where_the_app_looks_and_is_valid() -> None:
    deployment = named("Deployment", "llm-api")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    path = Path(next(v["value"] for v in container["env"] if v["name"] == "RATELIMIT_POLICY"))
    mount = next(m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    config_map = named("ConfigMap", volume["configMap"]["name"])
    policy = config_map["data"][path.name]
    plans = Plans.from_mapping(tomllib.loads(policy), source="configmap")
    assert plans.describe()
