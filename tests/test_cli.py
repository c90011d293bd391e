"""The imgpipe command as a user drives it: --help, demo-data, classify, evaluate, exit codes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from imgpipe.records import read_records
from tests.conftest import cli_env, run_cli
from tests.images import write_bad

COMMANDS = ["demo-data", "train", "evaluate", "classify", "bench", "cancel", "delete"]


def test_top_level_help_lists_the_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for name in COMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_has_help(name: str) -> None:
    result = run_cli(name, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage: imgpipe " + name in result.stdout


def test_demo_data_writes_the_labelled_layout(demo_data: Path) -> None:
    for split, expected in (("train", 1437), ("val", 360)):
        labels = sorted(p.name for p in (demo_data / split).iterdir())
        assert labels == [str(i) for i in range(10)]
        assert len(list((demo_data / split).rglob("*.png"))) == expected


def test_classify_reproduces_the_validation_accuracy_from_files(demo_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "labels.jsonl"
    result = run_cli("classify", str(demo_data / "val"), "-o", str(out))
    assert result.returncode == 0, result.stderr
    records = read_records(out)
    assert len(records) == 360 and all(r["status"] == "ok" for r in records)
    assert len({r["path"] for r in records}) == 360
    correct = sum(r["label"] == Path(r["path"]).parent.name for r in records)
    assert correct / 360 >= 0.985
    match = re.search(r"accuracy ([\d.]+)% on 360 images", result.stderr)
    assert match and abs(float(match.group(1)) / 100 - correct / 360) < 1e-4, result.stderr
    assert "classified 360 images (360 ok, 0 failed)" in result.stderr


def test_classify_writes_csv_to_file_and_jsonl_to_stdout(demo_data: Path, tmp_path: Path) -> None:
    files = sorted((demo_data / "val" / "7").glob("*.png"))[:3]
    csv_out = tmp_path / "labels.csv"
    result = run_cli("classify", *map(str, files), "-o", str(csv_out))
    assert result.returncode == 0, result.stderr
    assert csv_out.read_text().splitlines()[0].startswith("path,status,label,score,topk")
    assert [r["label"] for r in read_records(csv_out)] == ["7", "7", "7"]
    result = run_cli("classify", str(files[0]))
    line = json.loads(result.stdout)
    assert line["path"] == str(files[0].absolute()) and line["model"].startswith("digits-cnn@")


def test_classify_bad_files_give_error_records_and_exit_1(demo_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    bad = write_bad(folder)
    good = sorted((demo_data / "val" / "2").glob("*.png"))[:4]
    for path in good:
        (folder / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "out.jsonl"
    result = run_cli(
        "classify", str(folder), str(bad["missing"]), str(folder / good[0].name), str(folder), "-o", str(out)
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    listed = read_records(out)
    records = {r["path"]: r for r in listed}
    # Overlapping inputs still give one record per path; "folder.png" is a folder, so not an input.
    assert len(listed) == len(records) == 4 + len(bad) - 1
    assert {records[str(folder / p.name)]["label"] for p in good} == {"2"}
    for kind in ("truncated", "corrupt", "empty", "not_image", "missing"):
        assert records[str(bad[kind])]["status"] == "error", kind
    assert "failed" in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["classify", "x.png", "--model", "/nonexistent/model.pt"], {}, "model file not found"),
        (["classify", "x.png", "-o", "out.txt"], {}, "use .jsonl or .csv"),
        (["classify", "x.png"], {"IMGPIPE_MAX_BATCH": "lots"}, "IMGPIPE_MAX_BATCH='lots' is not an integer"),
        (["classify", "x.png", "--device", "tpu"], {}, "valid: auto, cpu, cuda, cuda:N"),
        (["train", "{data}", "-o", "m.pt", "--widths", "a,b"], {}, "expected comma-separated integers"),
        (["classify"], {}, "Missing argument"),
    ],
)
def test_user_mistakes_exit_2_with_one_clear_line(
    args: list[str], env: dict[str, str], message: str, tmp_path: Path
) -> None:
    args = [a.replace("{data}", str(tmp_path)) for a in args]
    result = run_cli(*args, env=cli_env(**env))
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_classify_refuses_a_pickle_as_model(tmp_path: Path) -> None:
    import pickle

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"a": 1}))
    result = run_cli("classify", "x.png", "--model", str(evil))
    assert result.returncode == 2 and "raw pickle" in result.stderr


def test_evaluate_prints_per_class_metrics_and_writes_png(default_model: Path, demo_data: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "eval"
    result = run_cli("evaluate", str(default_model), str(demo_data), "--report", str(prefix))
    assert result.returncode == 0, result.stderr
    assert re.search(r"accuracy (0\.98[5-9]|0\.99\d|1\.0000) on 360 images", result.stdout), result.stdout
    assert "precision" in result.stdout and "recall" in result.stdout
    report = json.loads((tmp_path / "eval.report.json").read_text())
    assert len(report["precision"]) == 10 and sum(map(sum, report["confusion"])) == 360
    assert (tmp_path / "eval.confusion.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--help"],
        ["enqueue", "--help"],
        ["classify", "--help"],
        ["worker", "--help"],
        ["exporter", "--help"],
        ["status", "--help"],
        ["cancel", "--help"],
        ["delete", "--help"],
        ["results", "--help"],
        ["nope"],
        ["classify"],
        ["classify", "x.png", "--topk", "0"],
        ["enqueue", "--chunk-size", "0", "x"],
    ],
    ids=lambda a: " ".join(a) or "bare",
)
def test_help_and_usage_errors_import_neither_torch_nor_celery(args: list[str]) -> None:
    code = (
        "import sys\n"
        "from imgpipe.cli import cli\n"
        "try:\n"
        f"    cli.main({args!r}, prog_name='imgpipe')\n"
        "except SystemExit as exit:\n"
        "    code = exit.code\n"
        "heavy = sorted({m.partition('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'celery', 'kombu'})\n"
        "print(code, heavy)\n"
    )
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().endswith("[]"), result.stdout + result.stderr


def test_each_command_validates_only_the_settings_it_uses(tmp_path: Path) -> None:
    # enqueue never uses IMGPIPE_MAX_BATCH: a bad value there must not stop it (it fails later, on Redis).
    bad_batch = cli_env(IMGPIPE_MAX_BATCH="abc", IMGPIPE_REDIS_URL="redis://127.0.0.1:1/0")
    result = run_cli("status", env=bad_batch, timeout=60)
    assert "IMGPIPE_MAX_BATCH" not in result.stderr
    # classify does use it: one line, exit 2, naming the variable.
    result = run_cli("classify", str(tmp_path), env=bad_batch, timeout=60)
    assert (
        result.returncode == 2 and result.stderr.strip() == "imgpipe: error: IMGPIPE_MAX_BATCH='abc' is not an integer"
    )
    # A flag overrides its variable in the same single step, and its error names the flag.
    result = run_cli("classify", str(tmp_path), "--batch-size", "0", env=cli_env(), timeout=60)
    assert result.returncode == 2 and "--batch-size" in result.stderr and "Traceback" not in result.stderr
