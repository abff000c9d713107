#!/usr/bin/env bash
# The whole test suite from a fresh clone: installs what it needs into .venv, then lint, types and tests.
# Exits non-zero on any failure, including a run that collected no tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

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
