"""Static checks: ruff (lint and format), mypy, and the import layers (import-linter), all from the `dev` extra.

mypy and import-linter read packages from the file system, where the installed layout (model/ as
imgpipe/model, ...) does not exist: they run on a copy of the tree laid out as it installs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

# Source folder -> where it installs (pyproject.toml [tool.setuptools.package-dir]).
NAMESPACE = {"imgpipe": "imgpipe", "model": "imgpipe/model", "producer": "imgpipe/producer", "worker": "imgpipe/worker"}


def _tool(name: str) -> None:
    if shutil.which(name) is None and not (Path(sys.executable).parent / name).exists():
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def installed_view(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The source tree copied into the layout it installs as: view/imgpipe/{model,producer,worker}."""
    view = tmp_path_factory.mktemp("view")
    for source, target in NAMESPACE.items():
        shutil.copytree(REPO / source, view / target, ignore=shutil.ignore_patterns("__pycache__", "*.pt", "*.png"))
    shutil.copy(REPO / "pyproject.toml", view / "pyproject.toml")
    return view


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=["check", "format"])
def test_ruff(args: list[str]) -> None:
    _tool("ruff")
    result = _run([sys.executable, "-m", "ruff", *args], REPO)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_mypy(installed_view: Path) -> None:
    _tool("mypy")
    result = _run([sys.executable, "-m", "mypy", "--cache-dir", str(installed_view / ".mypy_cache")], installed_view)
    assert result.returncode == 0, result.stdout[-4000:].replace(str(installed_view), "") + result.stderr[-2000:]


def test_import_layers(installed_view: Path) -> None:
    """Every import points down (the contracts in pyproject.toml [tool.importlinter])."""
    _tool("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(installed_view)}
    lint = Path(sys.executable).parent / "lint-imports"
    result = _run([str(lint), "pyproject.toml", "--no-cache"], installed_view, env)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout, result.stdout[-6000:]
