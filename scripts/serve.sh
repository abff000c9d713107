#!/usr/bin/env bash
# The main job from a fresh clone: installs what it needs into .venv, then serves the example
# OpenAI-compatible API (examples/fastapi_app) on the in-memory backend at http://127.0.0.1:8000.
# HOST and PORT override the address.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
exec uvicorn main:app --app-dir examples/fastapi_app --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}"
