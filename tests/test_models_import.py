"""Models users bring: `imgpipe model import` (TorchScript, torchvision arch + state dict), `model info`/`list`,
the refusals (one line, exit 2) and the CUDA out-of-memory split (a fake OOM: no GPU here). Nothing downloads:
every model is made by the test from a fresh torchvision network."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner, Result
from PIL import Image

from imgpipe.cli import cli
from imgpipe.model import jit, modelfile
from imgpipe.model.oom import largest_batch, run_split_on_oom
from imgpipe.model.preprocess import Preset, decode_image
from tests.conftest import run_cli
from tests.images import digit_like

LABELS = ["cat", "dog", "bird"]
MEAN, STD = "0.485,0.456,0.406", "0.229,0.224,0.225"
SIZE = 32


def fresh_resnet18(classes: int = len(LABELS), seed: int = 0) -> torch.nn.Module:
    """A torchvision resnet18 with random weights and non-trivial batch-norm statistics (eval mode)."""
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(weights=None, num_classes=classes)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A TorchScript file, a state dict (.pth) of the same network, a labels file, and a few RGB photos."""
    root = tmp_path_factory.mktemp("sources")
    net = fresh_resnet18()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation: this is the user's own file
        torch.jit.save(torch.jit.script(net), str(root / "products.ts"))
    torch.save(net.state_dict(), root / "ft.pth")
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    (root / "labels4.txt").write_text("\n".join([*LABELS, "fish"]) + "\n")
    photos = root / "photos"
    photos.mkdir()
    for i in range(6):
        image = Image.merge("RGB", [digit_like(i * 3 + c, 40) for c in range(3)])
        image.save(photos / f"p{i}.png")
    return {"ts": root / "products.ts", "pth": root / "ft.pth", "labels": root / "labels.txt", "root": root}


def original_top1(net: torch.nn.Module, photos: Path, preset: Preset) -> dict[str, str]:
    """Top-1 of the original module on the serving preprocessing of each photo."""
    paths = sorted(photos.glob("*.png"))
    batch = torch.stack([preset.to_tensor(decode_image(p.read_bytes(), 10**8, preset.mode)) for p in paths])
    with torch.inference_mode():
        top = net(batch).argmax(1).tolist()
    return {str(p.absolute()): LABELS[i] for p, i in zip(paths, top, strict=True)}


def classify_top1(model: Path, photos: Path, out: Path) -> dict[str, str]:
    result = run_cli("classify", str(photos), "--model", str(model), "-o", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    return {r["path"]: r["label"] for r in map(json.loads, out.read_text().splitlines())}


def invoke(*args: str) -> Result:
    """The `imgpipe` command in this process (click's runner): the same parsing, errors and exit codes as the
    console script, without a torch import per call; the happy paths above run the real subprocess."""
    return CliRunner().invoke(cli, list(args), catch_exceptions=True)


def assert_one_line_error(result: Result, *fragments: str) -> None:
    stderr = result.stderr.strip()
    assert result.exit_code == 2, (stderr, result.exception)
    assert "Traceback" not in stderr and len(stderr.splitlines()) == 1, stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


def test_import_torchscript_then_classify_matches_the_original(sources: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "models" / "products-v3.pt"
    result = run_cli(
        "model", "import", str(sources["ts"]), "--labels", str(sources["labels"]), "--input-size", str(SIZE),
        "--mean", MEAN, "--std", STD, "--name", "products", "-o", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    _, metadata = modelfile.load(out)
    assert metadata.model_id in result.stderr and metadata.model_id.startswith("products@")
    assert metadata.labels == tuple(LABELS) and metadata.arch == "torchscript"
    assert metadata.preset == Preset(SIZE, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    expected = original_top1(fresh_resnet18(), sources["root"] / "photos", metadata.preset)
    assert classify_top1(out, sources["root"] / "photos", tmp_path / "r.jsonl") == expected


def test_import_arch_and_state_dict_then_classify_matches_the_original(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "products-v4.pt"
    result = run_cli(
        "model", "import", "--arch", "resnet18", "--state-dict", str(sources["pth"]),
        "--labels", str(sources["labels"]), "--input-size", str(SIZE), "-o", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    _, metadata = modelfile.load(out)
    # The preset not given on the command line comes from torchvision's resnet18 weights' transforms.
    assert metadata.preset.mean == (0.485, 0.456, 0.406) and metadata.preset.crop_ratio == pytest.approx(224 / 256)
    assert metadata.arch == "resnet18" and metadata.preset.input_size == SIZE
    expected = original_top1(fresh_resnet18(), sources["root"] / "photos", metadata.preset)
    assert classify_top1(out, sources["root"] / "photos", tmp_path / "r.jsonl") == expected


def test_import_safetensors_when_the_package_is_installed(sources: dict[str, Path], tmp_path: Path) -> None:
    from imgpipe.model.importer import import_state_dict

    safetensors_torch = pytest.importorskip("safetensors.torch")
    weights = tmp_path / "ft.safetensors"
    safetensors_torch.save_file(fresh_resnet18().state_dict(), str(weights))
    preset = Preset(SIZE, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    metadata = import_state_dict("resnet18", weights, tmp_path / "m.pt", labels=LABELS, preset=preset, name="st")
    module, _ = modelfile.load(tmp_path / "m.pt")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        assert torch.allclose(module(x), fresh_resnet18()(x), atol=1e-4)
    assert metadata.extra["imported_from"] == {"kind": "state_dict", "file": "ft.safetensors"}


def test_import_mistakes_are_one_line_errors_and_write_nothing(sources: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "never.pt"
    labels = ["--labels", str(sources["labels"]), "-o", str(out)]
    typo = invoke("model", "import", "--arch", "resnt18", "--state-dict", str(sources["pth"]), *labels)
    assert_one_line_error(typo, "unknown architecture 'resnt18'", "did you mean resnet18")
    wrong_arch = invoke("model", "import", "--arch", "resnet34", "--state-dict", str(sources["pth"]), *labels)
    assert_one_line_error(wrong_arch, "does not fit", "missing key")
    four = ["--labels", str(sources["root"] / "labels4.txt"), "-o", str(out)]
    mismatch = invoke("model", "import", "--arch", "resnet18", "--state-dict", str(sources["pth"]), *four)
    assert_one_line_error(mismatch, "label count mismatch", "3 outputs", "gives 4")
    ts_mismatch = invoke(
        "model", "import", str(sources["ts"]), *four, "--input-size", str(SIZE), "--mean", MEAN, "--std", STD
    )
    assert_one_line_error(ts_mismatch, "label count mismatch")
    no_preset = invoke("model", "import", str(sources["ts"]), *labels)
    assert_one_line_error(no_preset, "--input-size", "--mean", "--std")
    grey = invoke("model", "import", str(sources["ts"]), *labels, "--input-size", "32", "--mean", "0.5", "--std", "1")
    assert_one_line_error(grey, "fails on a (3, 1, 32, 32) batch", "channels")
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    raw_pickle = invoke("model", "import", str(evil), *labels, "--input-size", "32", "--mean", MEAN, "--std", STD)
    assert_one_line_error(raw_pickle, "raw pickle")
    state_as_ts = invoke(
        "model", "import", str(sources["pth"]), *labels, "--input-size", "32", "--mean", MEAN, "--std", STD
    )
    assert_one_line_error(state_as_ts, "not a TorchScript file", "--arch ARCH --state-dict")
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_model_info_and_list_show_what_a_file_holds(default_model: Path, tmp_path: Path) -> None:
    info = invoke("model", "info", str(default_model))
    assert info.exit_code == 0, info.stderr
    _, metadata = modelfile.load(default_model)
    for text in (metadata.model_id, "convnet", "10: 0, 1, 2", "16x16 grayscale", "1.0000 (validation)", "sha256"):
        assert text in info.stdout, info.stdout
    as_json = json.loads(invoke("model", "info", "--json", str(default_model)).stdout)
    assert as_json["id"] == metadata.model_id and as_json["labels"] == list(metadata.labels)
    assert Preset.from_dict(as_json["preset"]) == metadata.preset and as_json["torch_version"] == metadata.torch_version

    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "digits.pt").write_bytes(default_model.read_bytes())
    (folder / "evil.pt").write_bytes(pickle.dumps([1]))
    (folder / "notes.txt").write_text("not a model")
    listed = invoke("model", "list", str(folder))
    assert listed.exit_code == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:2] == ["ID", "ARCH"] and len(lines) == 3
    assert metadata.model_id in lines[1] and "digits.pt" in lines[1]
    assert "evil.pt" in lines[2] and "raw pickle" in lines[2]
    rows = json.loads(invoke("model", "list", "--json", str(folder)).stdout)
    assert [r.get("id") for r in rows] == [metadata.model_id, None] and "error" in rows[1]


def test_model_files_not_ours_are_refused_with_one_line(default_model: Path, tmp_path: Path) -> None:
    pickled = tmp_path / "evil.pt"
    pickled.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(default_model.read_bytes()[: default_model.stat().st_size // 2])
    foreign = tmp_path / "foreign.pt"
    jit.save(jit.script(torch.nn.Linear(4, 2)), foreign, {})
    state = tmp_path / "state.pt"
    torch.save(torch.nn.Linear(4, 2).state_dict(), state)
    cases = {pickled: "raw pickle", truncated: "truncated", foreign: "without imgpipe metadata", state: "state dict"}
    for path, reason in cases.items():
        for command in (("model", "info"), ("classify", "--model")):
            args = (*command, str(path)) if command[0] == "model" else ("classify", "--model", str(path), str(path))
            assert_one_line_error(invoke(*args), reason)


def test_fake_oom_splits_the_batch_and_keeps_every_result_in_order() -> None:
    """A fake CUDA out-of-memory (no GPU here): the step fails above 3 items, as a too-big batch would."""
    calls: list[int] = []
    splits: list[int] = []

    def step(items: list[int]) -> list[int]:
        calls.append(len(items))
        if len(items) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [i * 10 for i in items]

    items = list(range(10))
    assert run_split_on_oom(step, items, on_split=splits.append, release=lambda: None) == [i * 10 for i in items]
    assert max(c for c in calls if c <= 3) <= 3 and splits == [10, 5, 5]

    def always(items: list[int]) -> list[int]:
        raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        run_split_on_oom(always, [1, 2], release=lambda: None)  # one image that does not fit still fails

    def broken(items: list[int]) -> list[int]:
        raise ValueError("a bug, not memory")

    with pytest.raises(ValueError, match="a bug"):
        run_split_on_oom(broken, items)  # other errors are not retried


def test_fake_oom_largest_batch_bisects_to_the_limit() -> None:
    """A fake device that holds 37 images: the search finds exactly 37."""

    def step(n: int) -> None:
        if n > 37:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    assert largest_batch(step) == 37
    assert largest_batch(lambda n: None, limit=64) == 64


def test_import_torch_export_program_with_a_dynamic_batch(tmp_path: Path) -> None:
    """A torch.export program (.pt2) is traced to TorchScript and checked on another batch size."""
    from imgpipe.model.importer import import_torchscript
    from imgpipe.model.net import ConvNet

    torch.manual_seed(0)
    net = ConvNet(3, in_channels=3, widths=(8, 16), convs_per_block=1).eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(net, (torch.randn(2, 3, 16, 16),), dynamic_shapes={"x": {0: batch}})
    source = tmp_path / "net.pt2"
    torch.export.save(program, str(source))
    preset = Preset(16, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    metadata = import_torchscript(source, tmp_path / "m.pt", labels=LABELS, preset=preset, name="exported")
    module, loaded = modelfile.load(tmp_path / "m.pt")
    x = torch.randn(5, 3, 16, 16)
    with torch.inference_mode():
        assert torch.allclose(module(x), net(x), atol=1e-5)
    assert loaded.model_id == metadata.model_id and loaded.arch == "torch.export"

    static = torch.export.export(net, (torch.randn(2, 3, 16, 16),))  # batch size fixed at 2
    torch.export.save(static, str(tmp_path / "static.pt2"))
    result = invoke(
        "model", "import", str(tmp_path / "static.pt2"), "--labels", str(write_labels(tmp_path)),
        "--input-size", "16", "--mean", MEAN, "--std", STD, "-o", str(tmp_path / "never.pt"),
    )  # fmt: skip
    assert_one_line_error(result, "fails on a (3, 3, 16, 16) batch")
    assert not (tmp_path / "never.pt").exists()


def write_labels(folder: Path) -> Path:
    path = folder / "labels.txt"
    path.write_text("\n".join(LABELS) + "\n")
    return path


@pytest.mark.parametrize(
    "args", [["model", "--help"], ["model", "import", "--help"], ["train", "--help"]], ids=" ".join
)
def test_model_help_imports_no_torch(args: list[str]) -> None:
    code = (
        "import sys\n"
        "from imgpipe.cli import cli\n"
        "try:\n"
        f"    cli.main({args!r}, prog_name='imgpipe')\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "print(sorted({m.partition('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'celery'}))\n"
    )
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip().endswith("[]"), result.stdout + result.stderr


class TupleWhenScripted(torch.nn.Module):
    """Like GoogLeNet: scripted, it returns (logits, auxiliary); eager in eval mode, the logits alone."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3 * 8 * 8, len(LABELS))

    def forward(self, x: torch.Tensor) -> object:
        logits = self.fc(x.flatten(1))
        if torch.jit.is_scripting():
            return logits, x
        return logits


def test_a_model_that_scripts_to_more_than_logits_is_traced() -> None:
    from imgpipe.model.importer import to_torchscript

    net = TupleWhenScripted().eval()
    converted = to_torchscript(net, Preset(8, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    x = torch.randn(5, 3, 8, 8)
    with torch.inference_mode():
        out = converted(x)
        assert isinstance(out, torch.Tensor) and torch.allclose(out, net(x))
