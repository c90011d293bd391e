"""Training from scratch reproduces the shipped model's accuracy bar (short schedule)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from imgpipe.model import export
from imgpipe.model.train import Augment, TrainConfig, random_affine, train

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
    _, metadata = export.load(out)
    assert metadata.val_accuracy == round(result.evaluation.accuracy, 6)
    assert metadata.labels == tuple(str(i) for i in range(10))
    assert metadata.preset.channels == 1 and metadata.preset.input_size == 16


def test_shipped_model_metadata(default_model: Path) -> None:
    _, metadata = export.load(default_model)
    assert metadata.name == "digits-cnn" and metadata.val_accuracy is not None
    assert metadata.val_accuracy >= ACCURACY_BAR
    assert default_model.stat().st_size < 5_000_000
