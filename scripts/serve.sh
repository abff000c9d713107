#!/usr/bin/env bash
# The main job from a fresh clone: installs what it needs into .venv, then runs the core demo.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
exec python examples/demo.py
