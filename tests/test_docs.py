"""The code in the documentation runs as written."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import urllib.request

import pytest

from .servers import ROOT, free_port, wait_until_up


def python_blocks(document: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / document).read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("block", python_blocks("README.md"))
def test_readme_python_blocks_run(block: str) -> None:
    exec(compile(block, "README.md", "exec"), {})


def test_readme_names_the_two_commands_and_ci_runs_the_test_one() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/serve.sh" in readme and "bash scripts/test.sh" in readme
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_readme_first_command_serves_the_example_api() -> None:
    port = free_port()
    process = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "serve.sh")],
        env={**os.environ, "PORT": str(port)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", process, timeout=120)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as response:
            assert "gpt-4o-mini" in response.read().decode()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
