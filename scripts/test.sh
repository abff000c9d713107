#!/usr/bin/env bash
# The whole test suite from a fresh clone: installs what it needs into .venv, then lint, types and tests.
# Exits non-zero on any failure, including a run that collected no tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

# The Redis tests run a real redis-server (they fail, never skip, without one): install Debian's when missing.
if ! command -v redis-server >/dev/null 2>&1; then
    echo "== installing redis-server (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server >/dev/null \
        || { echo "could not install redis-server with apt-get" >&2; exit 1; }
fi

echo "== ruff check"; ruff check .
echo "== ruff format --check"; ruff format --check .
echo "== mypy --strict"; mypy --strict ratelimit_middleware
echo "== pytest"
status=0
pytest -q -p no:cacheprovider "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: failing" >&2
fi
exit "$status"
