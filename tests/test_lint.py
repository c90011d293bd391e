"""ruff and mypy stay clean (both come with the `dev` extra that scripts/test.sh installs)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.parametrize("tool", [["ruff", "check", "."], ["mypy"]], ids=["ruff", "mypy"])
def test_static_checks_pass(tool: list[str]) -> None:
    if shutil.which(tool[0]) is None and not (REPO / ".venv" / "bin" / tool[0]).exists():
        pytest.fail(f"{tool[0]} is not installed: pip install -e '.[dev]'")
    result = subprocess.run([sys.executable, "-m", *tool], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
