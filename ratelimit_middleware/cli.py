"""The ``ratelimit-middleware`` command: check a policy, serve the example API, inspect or reset a user.

- ``check POLICY``: load a policy file and print its limits (exit 2 on a mistake, naming it);
- ``serve [--policy FILE] [--redis-url URL]``: run the example API (``examples/fastapi_app``) with uvicorn;
- ``inspect USER MODEL --policy FILE --redis-url URL``: what each limit counts for that user and model now;
- ``reset USER MODEL --policy FILE --redis-url URL``: forget that user's keys.

``inspect`` and ``reset`` wait for Redis up to ``--timeout`` seconds (default 2): a one-off command opens a
new connection, which takes several round trips before its one call, more than the servers' 0.1 s allow
on a slow link.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .plans import Plans, PolicyError

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_FAILURE = 1
CLI_TIMEOUT = 2.0
"""Seconds ``inspect`` and ``reset`` wait for Redis by default."""


def _plans(args: argparse.Namespace) -> Plans:
    storage = None
    if getattr(args, "redis_url", None):
        from .backends.redis import RedisStorage

        storage = RedisStorage(args.redis_url, key_prefix=args.key_prefix, timeout=args.timeout)
    return Plans.load(args.policy, storage=storage)


def _check(args: argparse.Namespace) -> int:
    plans = _plans(args)
    print(f"default plan: {plans.default_plan}")
    if plans.shadow_plans:
        print(f"shadow plans (recorded, never denying): {', '.join(sorted(plans.shadow_plans))}")
    for alias, model in plans.aliases.items():
        print(f"alias: {alias} -> {model}")
    print(f"{'plan':<12} {'model':<20} {'tier':<16} {'limit':>10} unit and window")
    for line in plans.describe():
        print(line)
    return 0


def _port(text: str) -> int:
    """A TCP port for argparse: 0 to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, got {port}")
    return port


def _identity(text: str) -> str:
    """A user or model for argparse: not blank (the middlewares never key on one)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be blank")
    return text


def _inspect(args: argparse.Namespace) -> int:
    plans = _plans(args)
    limiter = plans.limiter(args.plan or plans.default_plan, plans.canonical(args.model))
    model = plans.canonical(args.model)
    for rule, used in limiter.counts(args.user, model):
        window = "in flight" if rule.unit == "concurrent" else f"per {rule.seconds:g} s"
        print(f"{rule.tier:<16} {rule.unit:<14} {used:>10} / {rule.limit} {window}")
    return 0


def _reset(args: argparse.Namespace) -> int:
    plans = _plans(args)
    limiter = plans.limiter(args.plan or plans.default_plan, plans.canonical(args.model))
    limiter.reset(args.user, plans.canonical(args.model), tier=args.tier)
    print(f"reset {args.user} on {plans.canonical(args.model)}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    app_dir = Path(args.app_dir)
    if not (app_dir / "main.py").is_file():
        print(
            f"error: no example app at {app_dir}/main.py (run from the repository, or pass --app-dir)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.policy:
        Plans.load(args.policy)  # fail here, with the message, rather than in the server
        os.environ["RATELIMIT_POLICY"] = str(Path(args.policy).resolve())
    if args.redis_url:
        os.environ["REDIS_URL"] = args.redis_url
    import uvicorn

    uvicorn.run("main:app", app_dir=str(app_dir), host=args.host, port=args.port)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ratelimit-middleware",
        description="Rate limiting for AI inference APIs: policies, the example API, Redis state.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser("check", help="load a policy file and print its limits")
    check.add_argument("policy", help="a TOML or YAML policy file")
    check.set_defaults(run=_check)

    serve = commands.add_parser("serve", help="run the example API")
    serve.add_argument("--policy", help="a policy file (default: limits from the environment)")
    serve.add_argument(
        "--redis-url",
        help="keep limiter state in this Redis (redis+cluster://node:port for a cluster; default: in memory)",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_port, default=8000)
    serve.add_argument("--app-dir", default="examples/fastapi_app", help="where the example app's main.py is")
    serve.set_defaults(run=_serve)

    for name, run, text in (
        ("inspect", _inspect, "print what each limit counts for a user"),
        ("reset", _reset, "forget a user's keys"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("user", type=_identity)
        command.add_argument("model", type=_identity)
        command.add_argument("--policy", required=True, help="the policy file the servers use")
        command.add_argument(
            "--redis-url",
            required=True,
            help="the Redis the servers use (redis+cluster://... for a cluster)",
        )
        command.add_argument("--key-prefix", default="ratelimit", help="the servers' key prefix")
        command.add_argument(
            "--timeout",
            type=float,
            default=CLI_TIMEOUT,
            help=f"seconds to wait for Redis, connecting included (default {CLI_TIMEOUT:g})",
        )
        command.add_argument("--plan", help="the plan (default: the policy's default plan)")
        if name == "reset":
            command.add_argument("--tier", help="only this tier (default: the tiers keyed by the user)")
        command.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except PolicyError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (LookupError, ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as error:  # a storage that cannot be reached, above all
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_FAILURE
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
