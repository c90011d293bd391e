"""Real image files for tests: good images in several formats and every kind of bad input."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image


def digit_like(seed: int, size: int = 8) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L")


def write_good(folder: Path, count: int, start: int = 0) -> list[Path]:
    """``count`` valid images, cycling PNG, JPEG (RGB) and BMP."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        image = digit_like(i, 24)
        kind = i % 3
        if kind == 0:
            path = folder / f"img{i:05d}.png"
            image.save(path)
        elif kind == 1:
            path = folder / f"img{i:05d}.jpg"
            image.convert("RGB").save(path, quality=90)
        else:
            path = folder / f"img{i:05d}.bmp"
            image.save(path)
        paths.append(path)
    return paths


def write_bad(folder: Path) -> dict[str, Path]:
    """One file per failure mode, keyed by the reason code its record must carry."""
    folder.mkdir(parents=True, exist_ok=True)
    bad: dict[str, Path] = {}
    buf = io.BytesIO()
    digit_like(1, 64).convert("RGB").save(buf, format="JPEG", quality=95)
    jpeg = buf.getvalue()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    bad["truncated"] = folder / "truncated.jpg"
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    bad["corrupt"] = folder / "corrupt.png"
    (folder / "empty.png").write_bytes(b"")
    bad["empty"] = folder / "empty.png"
    (folder / "notes.jpg").write_text("this is a text file, not an image\n")
    bad["not_image"] = folder / "notes.jpg"
    (folder / "folder.png").mkdir(exist_ok=True)
    bad["directory"] = folder / "folder.png"
    bad["missing"] = folder / "missing.png"
    return bad


def write_bomb(path: Path, side: int = 4000) -> Path:
    """A tiny PNG whose header declares side x side pixels (a decompression bomb for small limits)."""
    Image.new("L", (side, side), 0).save(path, optimize=True)
    return path
