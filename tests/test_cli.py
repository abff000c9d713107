"""The ratelimit-middleware command, run as a subprocess: output and exit codes, against a real Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ratelimit_middleware import RedisStorage
from ratelimit_middleware.plans import Plans

from .conftest import CONTRACT_TIMEOUT, unique_prefix
from .redis_server import RedisCluster, RedisServer
from .servers import ROOT, free_port, wait_until_up
from .stalling_proxy import StallingProxy

POLICY = ROOT / "examples" / "policies" / "plans.toml"
REQUESTS_ONLY = ROOT / "examples" / "policies" / "requests-only.yaml"


def run(*args: str, module: str = "ratelimit_middleware.cli") -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", module, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_help_lists_the_commands() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("check", "serve", "inspect", "reset"):
        assert command in result.stdout


def test_the_package_runs_as_the_command(tmp_path: Path) -> None:
    """``python -m ratelimit_middleware`` failed: the package had no ``__main__``."""
    result = run("check", str(POLICY), module="ratelimit_middleware")
    assert result.returncode == 0, result.stderr
    assert result.stdout == run("check", str(POLICY)).stdout
    missing = run("check", str(tmp_path / "missing.toml"), module="ratelimit_middleware")
    assert missing.returncode == 2 and "cannot read the policy file" in missing.stderr
    assert "usage: ratelimit-middleware" in run("--help", module="ratelimit_middleware").stdout


def test_check_prints_the_limits() -> None:
    result = run("check", str(POLICY))
    assert result.returncode == 0, result.stderr
    assert (
        "free" in result.stdout and "40000 tokens per 60 s" in result.stdout and "in flight" in result.stdout
    )


def test_check_prints_the_default_plan_aliases_and_shadow_plans(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        'default_plan = "free"\nshadow_plans = ["trial"]\n[aliases]\n"gpt-4o-0806" = "gpt-4o"\n'
        '[plans.free."*"]\nper_model = "9/minute"\n[plans.trial."*"]\nper_model = "1/minute"\n'
    )
    result = run("check", str(policy))
    assert result.returncode == 0, result.stderr
    assert (
        "default plan: free" in result.stdout
        and "shadow plans (recorded, never denying): trial" in result.stdout
    )
    assert "alias: gpt-4o-0806 -> gpt-4o" in result.stdout


def test_bad_arguments_are_refused_by_the_parser() -> None:
    port = run("serve", "--port", "99999")
    assert port.returncode == 2 and "a port is 0 to 65535, got 99999" in port.stderr
    blank = run("inspect", " ", "m", "--policy", str(POLICY), "--redis-url", "redis://127.0.0.1:1")
    assert blank.returncode == 2 and "must not be blank" in blank.stderr


def test_check_fails_naming_the_mistake(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[plans.free."*"]\nper_user_model = { requests = "often" }\n')
    result = run("check", str(bad))
    assert result.returncode == 2
    assert "plans.free.*.per_user_model.requests" in result.stderr and "often" in result.stderr
    assert run("check", str(tmp_path / "missing.toml")).returncode == 2
    assert run("frobnicate").returncode == 2


def test_inspect_and_reset_against_redis(redis_server: RedisServer) -> None:
    prefix = unique_prefix("cli")
    plans = Plans.load(
        REQUESTS_ONLY, storage=RedisStorage(redis_server.url, key_prefix=prefix, timeout=CONTRACT_TIMEOUT)
    )
    for _ in range(3):
        plans.check("alice", "gpt-4o")
    common = ["--policy", str(REQUESTS_ONLY), "--redis-url", redis_server.url, "--key-prefix", prefix]
    shown = run("inspect", "alice", "gpt-4o", *common)
    assert shown.returncode == 0, shown.stderr
    assert "per_user_model   requests                3 / 100 per 3600 s" in shown.stdout
    assert "global           requests                3 / 50000 per 3600 s" in shown.stdout
    reset = run("reset", "alice", "gpt-4o", *common)
    assert reset.returncode == 0 and "reset alice" in reset.stdout
    after = run("inspect", "alice", "gpt-4o", *common).stdout
    assert "per_user_model   requests                0 / 100" in after
    assert "global           requests                3 / 50000" in after  # shared tiers are kept


def test_inspect_shows_each_window_of_a_tier(redis_server: RedisServer, tmp_path: Path) -> None:
    policy = tmp_path / "windows.toml"
    policy.write_text('[plans.free."*"]\nper_user_model = "3/2 seconds;100/day"\n')
    prefix = unique_prefix("cli")
    # Requests made 10 s ago: out of the 2 s window now, still in the day.
    past = RedisStorage(
        redis_server.url, key_prefix=prefix, timeout=CONTRACT_TIMEOUT, clock=lambda: time.time() - 10
    )
    plans = Plans.load(policy, storage=past)
    for _ in range(3):
        plans.check("alice", "gpt-4")
    shown = run(
        "inspect",
        "alice",
        "gpt-4",
        "--policy",
        str(policy),
        "--redis-url",
        redis_server.url,
        "--key-prefix",
        prefix,
    )
    assert shown.returncode == 0, shown.stderr
    assert "per_user_model   requests                0 / 3 per 2 s" in shown.stdout
    assert "per_user_model   requests                3 / 100 per 86400 s" in shown.stdout


def test_an_unknown_plan_fails_naming_it(redis_server: RedisServer) -> None:
    common = ["--policy", str(POLICY), "--redis-url", redis_server.url, "--key-prefix", unique_prefix("cli")]
    for command in ("inspect", "reset"):
        result = run(command, "alice", "gpt-4o", *common, "--plan", "fre")
        assert result.returncode == 2 and "unknown plan 'fre'; the plans are: free, pro" in result.stderr
        assert result.stdout == ""


def test_inspect_fails_cleanly_when_redis_is_unreachable() -> None:
    dead = f"redis://127.0.0.1:{free_port()}"
    result = run("inspect", "alice", "m", "--policy", str(REQUESTS_ONLY), "--redis-url", dead)
    assert result.returncode in (1, 2) and "error" in result.stderr and "Traceback" not in result.stderr


def test_inspect_and_reset_on_a_redis_cluster(redis_cluster: RedisCluster) -> None:
    url = f"redis+cluster://127.0.0.1:{redis_cluster.ports[0]}"  # a node's redis:// URL reached one node only
    prefix = unique_prefix("cli")
    plans = Plans.load(REQUESTS_ONLY, storage=RedisStorage(url, key_prefix=prefix, timeout=CONTRACT_TIMEOUT))
    for user in ("alice", "alice", "bob"):
        plans.check(user, "gpt-4o")
    common = ["--policy", str(REQUESTS_ONLY), "--redis-url", url, "--key-prefix", prefix]
    shown = run("inspect", "alice", "gpt-4o", *common)
    assert shown.returncode == 0, shown.stderr
    assert "per_user_model   requests                2 / 100 per 3600 s" in shown.stdout
    assert "global           requests                3 / 50000 per 3600 s" in shown.stdout
    assert run("reset", "alice", "gpt-4o", *common).returncode == 0
    assert (
        "per_user_model   requests                0 / 100"
        in run("inspect", "alice", "gpt-4o", *common).stdout
    )


def test_inspect_and_reset_over_a_slow_link(redis_server: RedisServer) -> None:
    """A one-off command opens a new connection (several round trips) for its one call: ``--timeout`` gives
    it the time a slow link needs (80 ms round trips here), and a timeout too short for it fails cleanly."""
    proxy = StallingProxy(redis_server.port, delay=0.04)
    common = ["--policy", str(REQUESTS_ONLY), "--redis-url", proxy.url, "--key-prefix", unique_prefix("cli")]
    try:
        shown = run("inspect", "alice", "gpt-4o", *common, "--timeout", "3")
        assert shown.returncode == 0, shown.stderr
        assert "per_user_model   requests                0 / 100 per 3600 s" in shown.stdout
        assert run("reset", "alice", "gpt-4o", *common, "--timeout", "3").returncode == 0
        short = run("inspect", "alice", "gpt-4o", *common, "--timeout", "0.05")
        assert short.returncode == 1 and "TimeoutError" in short.stderr and "Traceback" not in short.stderr
        bad = run("inspect", "alice", "gpt-4o", *common, "--timeout", "0")
        assert bad.returncode == 2 and "timeout must be a number of seconds > 0" in bad.stderr
    finally:
        proxy.close()


def serve(*args: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "ratelimit_middleware.cli", "serve", "--port", str(port), *args],
        cwd=ROOT,
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    return process, f"http://127.0.0.1:{port}"


def test_serve_runs_the_example_api_with_a_policy() -> None:
    process, url = serve("--policy", str(POLICY))
    try:
        wait_until_up(f"{url}/health", process)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)


def test_serve_keeps_its_state_in_redis(redis_server: RedisServer) -> None:
    process, url = serve("--policy", str(REQUESTS_ONLY), "--redis-url", redis_server.url)
    try:
        wait_until_up(f"{url}/health", process)
        request = urllib.request.Request(
            f"{url}/v1/models", headers={"X-User-ID": "served-user", "X-Model": "gpt-4o"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.headers["x-ratelimit-remaining-requests"] == "99"
        client = redis_server.client()
        try:
            keys = [key.decode() for key in client.scan_iter(match="ratelimit:*served-user*")]
        finally:
            client.close()
        assert keys, "the served app kept no state in Redis"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
