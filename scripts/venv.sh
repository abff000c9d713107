# Sourced by the other scripts: creates .venv on first use, installs the package with every extra the tests
# and examples need, and puts .venv/bin first on PATH. Re-runs are quick: it reinstalls only when
# pyproject.toml has changed since the last install.
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv || { echo "python3 -m venv failed" >&2; exit 1; }
fi
if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
    echo "== installing into .venv (log: .venv/pip.log)"
    if ! { .venv/bin/python -m pip install --upgrade pip \
            && .venv/bin/python -m pip install -e ".[dev,redis,fastapi,flask]"; } >.venv/pip.log 2>&1; then
        tail -n 40 .venv/pip.log >&2
        echo "pip install failed" >&2
        exit 1
    fi
    touch .venv/.installed
fi
export PATH="$PWD/.venv/bin:$PATH"
