"""The two workloads of `imgpipe bench`: the demo digits (tiny PNGs, the bundled CNN) and generated 640x480 photo
JPEGs with a randomly initialised 3-channel 224 px mobilenet_v3_small exported as an imgpipe model file."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

WORKLOADS = ("digits", "photos")
PHOTO_SIZE = (640, 480)


@dataclass(frozen=True)
class Workload:
    name: str
    images: Path  # a folder of exactly ``count`` image files (distinct paths, for the queue variants)
    count: int
    model: Path
    what: str


def link_images(sources: list[Path], out: Path, count: int) -> list[str]:
    """``count`` distinct files in ``out``, copies cycling over ``sources``: a job records each path once. Copies,
    not hard links: workers refuse files with other hard links unless IMGPIPE_ALLOW_HARDLINKS is set, and the
    bench measures what users run."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        source = sources[index % len(sources)]
        target = out / f"{index:06d}{source.suffix.lower()}"
        shutil.copyfile(source, target)
        paths.append(str(target))
    return paths


def write_photos(out: Path, count: int, size: tuple[int, int] = PHOTO_SIZE, seed: int = 0) -> list[Path]:
    """``count`` photo-like JPEGs (smooth random colour fields plus fine noise, quality 90)."""
    import numpy as np
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        small = (rng.random((size[1] // 16, size[0] // 16, 3)) * 255).astype(np.uint8)  # (H/16, W/16, 3)
        field = np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BILINEAR), dtype=np.int16)
        noise = rng.integers(-12, 13, field.shape, dtype=np.int16)  # texture, so the JPEG is photo-sized
        path = out / f"photo{i:04d}.jpg"
        Image.fromarray(np.clip(field + noise, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def photos_model(path: Path, seed: int = 0) -> Path:
    """A randomly initialised mobilenet_v3_small (10 classes, RGB 224 px, ImageNet normalisation, crop 0.875)
    exported as an imgpipe model file: the cost of a real photo classifier, with no weights to download."""
    import torch

    from imgpipe.model.export import export
    from imgpipe.model.net import build_model
    from imgpipe.model.preprocess import Preset

    torch.manual_seed(seed)
    net = build_model("mobilenet_v3_small", 10, 3)
    preset = Preset(input_size=224, channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_ratio=0.875)
    labels = [f"class{i}" for i in range(10)]
    export(
        net,
        path,
        name="bench-mobilenet",
        arch="mobilenet_v3_small",
        arch_config={},
        labels=labels,
        preset=preset,
        val_accuracy=None,
    )
    return path


def prepare(name: str, tmp: Path, count: int, data: Path | None, model: Path) -> Workload:
    """The images and model of workload ``name`` under ``tmp``: ``count`` files in one folder."""
    folder = tmp / name / "images"
    if name == "digits":
        from imgpipe.scan import scan

        if data is None:
            from imgpipe.model.data import write_demo_dataset

            write_demo_dataset(tmp / name / "demo")
            data = tmp / name / "demo"
        sources = sorted(Path(p) for p in scan(data))
        link_images(sources, folder, count)
        return Workload(name, folder, count, model, f"{count} demo digit PNGs ({len(sources)} distinct, 8x8)")
    sources = write_photos(tmp / name / "sources", min(count, 100))
    link_images(sources, folder, count)
    model_path = photos_model(tmp / name / "mobilenet_v3_small.pt")
    return Workload(
        name,
        folder,
        count,
        model_path,
        f"{count} JPEGs {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} ({len(sources)} distinct), random mobilenet_v3_small 224 px",
    )
