"""Training: from scratch it reproduces the shipped model's accuracy bar (short schedule) and is deterministic on
the CPU; fine-tuning starts from a local weights file (never a download)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner, Result

from imgpipe.cli import cli
from imgpipe.model import modelfile
from imgpipe.model.train import Augment, TrainConfig, random_affine, train
from tests.conftest import run_cli

ACCURACY_BAR = 0.985


def test_random_affine_keeps_shape_and_identity_when_disabled() -> None:
    images = torch.rand(4, 1, 16, 16)
    gen = torch.Generator().manual_seed(0)
    same = random_affine(images, Augment(rotate_deg=0, translate=0, scale=0), gen)
    assert torch.allclose(same, images, atol=1e-5)
    moved = random_affine(images, Augment(), gen)
    assert moved.shape == images.shape and not torch.allclose(moved, images)


@pytest.mark.slow
def test_short_training_from_scratch_reaches_the_bar(tmp_path: Path, demo_data: Path) -> None:
    """The committed model/assets/digits-cnn.pt is reproducible: the same recipe, fewer epochs."""
    out = tmp_path / "digits.pt"
    config = TrainConfig(input_size=16, epochs=8, seed=0, device="cpu")
    result = train(demo_data, out, config, name="digits-cnn", progress=False)
    assert result.evaluation.accuracy >= ACCURACY_BAR, result.history["val_acc"]
    assert result.evaluation.count == 360
    for path in result.files:
        assert path.is_file() and path.stat().st_size > 0, path
    report = json.loads(out.with_suffix("").with_name("digits.report.json").read_text())
    assert report["accuracy"] == result.evaluation.accuracy and len(report["confusion"]) == 10
    assert report["best_epoch"] == result.best_epoch
    _, metadata = modelfile.load(out)
    assert metadata.val_accuracy == round(result.evaluation.accuracy, 6)
    assert metadata.labels == tuple(str(i) for i in range(10))
    assert metadata.preset.channels == 1 and metadata.preset.input_size == 16


def test_shipped_model_metadata(default_model: Path) -> None:
    _, metadata = modelfile.load(default_model)
    assert metadata.name == "digits-cnn" and metadata.val_accuracy is not None
    assert metadata.val_accuracy >= ACCURACY_BAR
    assert default_model.stat().st_size < 5_000_000


@pytest.fixture(scope="module")
def small_data(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three demo classes, 20 training and 6 validation images each: enough to start fine-tuning, quick."""
    out = tmp_path_factory.mktemp("small")
    for split, count in (("train", 20), ("val", 6)):
        for label in ("0", "1", "2"):
            folder = out / split / label
            folder.mkdir(parents=True)
            for path in sorted((demo_data / split / label).glob("*.png"))[:count]:
                shutil.copy(path, folder / path.name)
    return out


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def model_id_from(stderr: str) -> str:
    match = re.search(r"model (\S+@[0-9a-f]{12}) written", stderr)
    assert match, stderr
    return match.group(1)


def test_fine_tune_from_a_local_weights_file_keeps_a_frozen_backbone(small_data: Path, tmp_path: Path) -> None:
    """`train --weights FILE --freeze-backbone`: the file's backbone comes out bit-identical (batch-norm
    statistics included), the head is resized to the labels and trained, the preset is the weights' own."""
    torch.manual_seed(0)
    pretrained = torchvision.models.resnet18(weights=None)  # 1000 classes, as torchvision's weights are
    with torch.no_grad():
        for module in pretrained.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
    weights = tmp_path / "imagenet-like.pth"
    torch.save(pretrained.state_dict(), weights)
    out = tmp_path / "ft.pt"
    result = run_cli(
        "train", str(small_data), "-o", str(out), "--arch", "resnet18", "--weights", str(weights),
        "--freeze-backbone", "--input-size", "32", "--epochs", "1", "--batch-size", "16", "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    module, metadata = modelfile.load(out)
    assert metadata.model_id == model_id_from(result.stderr) and metadata.labels == ("0", "1", "2")
    assert metadata.arch == "resnet18" and metadata.preset.mean == (0.485, 0.456, 0.406)
    assert metadata.preset.crop_ratio == pytest.approx(224 / 256) and metadata.preset.input_size == 32
    tuned, source = module.state_dict(), pretrained.state_dict()
    backbone = [k for k in source if not k.startswith("fc.")]
    assert set(tuned) == set(source) and backbone
    changed = [k for k in backbone if not torch.equal(tuned[k], source[k])]
    assert changed == [], changed  # every backbone tensor as loaded, batch-norm statistics included
    assert tuned["fc.weight"].shape == (3, 512)
    assert out.with_name("ft.report.json").is_file() and out.with_name("ft.curves.png").is_file()


def test_fine_tune_weights_errors_name_the_choices(small_data: Path, tmp_path: Path) -> None:
    """Mistakes with --arch/--weights: one line, exit 2 (the command run in this process by click's runner)."""
    from imgpipe.errors import ConfigError
    from imgpipe.model.net import preset_from_weights, weights_enum

    with pytest.raises(ConfigError, match="valid: IMAGENET1K_V1, DEFAULT"):
        weights_enum("resnet18", "IMAGENET21K")  # refused from torchvision's table: nothing downloads
    effnet = preset_from_weights("efficientnet_b0", None)
    assert (effnet.input_size, effnet.crop_ratio, effnet.std) == (224, 224 / 256, (0.229, 0.224, 0.225))
    bad = invoke("train", str(small_data), "-o", str(tmp_path / "x.pt"), "--arch", "resnet18", "--freeze-backbone")
    assert bad.exit_code == 2 and "--freeze-backbone needs --weights" in bad.stderr, bad.stderr
    typo = invoke("train", str(small_data), "-o", str(tmp_path / "x.pt"), "--arch", "mobilenet_v3_smal")
    assert typo.exit_code == 2 and "did you mean mobilenet_v3_small" in typo.stderr, typo.stderr
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    misfit = invoke(
        "train", str(small_data), "-o", str(tmp_path / "x.pt"), "--arch", "resnet18",
        "--weights", str(tmp_path / "other.pth"), "--epochs", "1",
    )  # fmt: skip
    assert misfit.exit_code == 2 and "does not fit" in misfit.stderr and "Traceback" not in misfit.stderr


def test_training_twice_on_the_cpu_gives_the_same_model_id(small_data: Path, tmp_path: Path) -> None:
    """The README's command, on a short schedule, run twice in fresh processes (each with its own hash seed)."""
    ids = []
    for run in ("a", "b"):
        result = run_cli(
            "train", str(small_data), "-o", str(tmp_path / run / "digits.pt"), "--input-size", "16",
            "--epochs", "2", "--name", "digits-cnn", "--device", "cpu",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        ids.append(model_id_from(result.stderr))
    assert ids[0] == ids[1]
    reports = [json.loads((tmp_path / run / "digits.report.json").read_text()) for run in ("a", "b")]
    assert reports[0]["history"] == reports[1]["history"]
