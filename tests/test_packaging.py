"""The distribution as a user installs it: one top-level name, and the namespace works from anywhere.

A wheel is built from this checkout and installed (without dependencies) into a fresh virtualenv that borrows
this environment's third-party packages through a .pth file, so no download happens.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, build_wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # Third-party packages (torch, celery, ...) from this environment; imgpipe itself only from the wheel.
    Path(site, "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    yield root


def test_the_wheel_installs_one_top_level_name(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"imgpipe"}, sorted(top)
    assert "imgpipe/model/engine.py" in names and "imgpipe/worker/run.py" in names
    assert "imgpipe/model/assets/digits-cnn.pt" in names  # found with importlib.resources


def run_in(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(cwd)},
    )


def test_namespace_imports_and_no_bare_model_package(venv: Path, tmp_path: Path) -> None:
    python = str(venv / "bin" / "python")
    code = (
        "import importlib.util, imgpipe.model.engine, imgpipe.producer.enqueue, imgpipe.worker.run\n"
        "from imgpipe.settings import default_model_path\n"
        "assert default_model_path().is_file(), default_model_path()\n"
        "assert all(importlib.util.find_spec(n) is None for n in ('model', 'producer', 'worker'))\n"
        "print(imgpipe.model.engine.__file__)\n"
    )
    result = run_in(venv, tmp_path, python, "-c", code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert str(venv) in result.stdout  # the installed copy, not this checkout


@pytest.mark.parametrize("where", ["repo root", "folder holding an imgpipe/ directory"])
def test_commands_and_child_processes_work_from_any_folder(venv: Path, tmp_path: Path, where: str) -> None:
    cwd = REPO
    if where != "repo root":
        cwd = tmp_path
        (cwd / "imgpipe").mkdir()
        (cwd / "imgpipe" / "__init__.py").write_text("raise ImportError('the wrong imgpipe was imported')\n")
    result = run_in(venv, cwd, str(venv / "bin" / "imgpipe"), "classify", "--help")
    assert result.returncode == 0, result.stderr[-3000:]
    # What the worker supervisor and the bench start: imgpipe_argv() must reach the installed package too.
    # (classify --help imports imgpipe.model, which a source folder's imgpipe/ does not have.)
    code = (
        "import subprocess; from imgpipe.procs import imgpipe_argv\n"
        "print(subprocess.run(imgpipe_argv('classify', '--help'), capture_output=True).returncode)"
    )
    result = run_in(venv, cwd, str(venv / "bin" / "python"), "-P", "-c", code)
    assert result.stdout.strip().endswith("0"), result.stdout + result.stderr[-3000:]
