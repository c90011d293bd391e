"""Datasets: the offline demo dataset (scikit-learn's handwritten digits) and ImageFolder-layout loading."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgpipe import defaults
from imgpipe.errors import ConfigError, ImageError
from imgpipe.model.preprocess import Preset, decode_image
from imgpipe.safety import read_bounded
from imgpipe.scan import scan

SPLITS = ("train", "val")


def write_demo_dataset(out: Path, val_fraction: float = 0.2, seed: int = 0) -> dict[str, int]:
    """Write the UCI handwritten digits (1,797 real 8x8 scans that scikit-learn ships, no download)
    as PNG files: ``out/{train,val}/<digit>/<index>.png``, a stratified split fixed by ``seed``.

    Returns the number of images written per split.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)  # (N, 8, 8), ink bright
    labels = digits.target
    indices = np.arange(len(labels))
    train_idx, val_idx = train_test_split(indices, test_size=val_fraction, random_state=seed, stratify=labels)
    counts = {}
    for split, split_idx in zip(SPLITS, (train_idx, val_idx), strict=True):
        for i in split_idx:
            folder = out / split / str(int(labels[i]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"{int(i):04d}.png")
        counts[split] = len(split_idx)
    return counts


def iter_images(root: Path) -> Iterator[Path]:
    """Image files under ``root`` as the one scanner finds them (imgpipe.scan: recursive, name order)."""
    for path in scan(root):
        yield Path(path)


# Decoded datasets up to this size are held in memory (decoded once, not once per epoch).
CACHE_LIMIT_BYTES = 2 * 1024**3


class FolderDataset(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """An ImageFolder-layout directory (``root/<label>/*.png``) decoded with the serving preset.

    Small datasets are decoded once into memory (unless ``cache`` is False); larger ones decode per access.
    """

    def __init__(
        self,
        root: Path,
        preset: Preset,
        classes: list[str] | None = None,
        max_pixels: int = defaults.MAX_PIXELS,
        cache: bool = True,
    ) -> None:
        found = find_classes(root)
        self.root = root
        self.classes = classes or found
        unknown = sorted(set(found) - set(self.classes))
        if unknown:
            raise ConfigError(f"{root} has classes the model does not know: {', '.join(unknown)}")
        self.preset = preset
        self.max_pixels = max_pixels
        self.samples: list[tuple[Path, int]] = [
            (path, index)
            for index, name in enumerate(self.classes)
            if (root / name).is_dir()
            for path in iter_images(root / name)
        ]
        if not self.samples:
            raise ConfigError(f"no images found under {root}")
        self.targets = torch.tensor([t for _, t in self.samples], dtype=torch.int64)  # (N,)
        self._cache: torch.Tensor | None = None
        per_image = preset.channels * preset.input_size**2 * 4
        if cache and len(self.samples) * per_image <= CACHE_LIMIT_BYTES:
            self._cache = torch.stack([self._decode(i) for i in range(len(self.samples))])  # (N, C, H, W)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def cached(self) -> bool:
        return self._cache is not None

    def _decode(self, index: int) -> torch.Tensor:
        path = self.samples[index][0]
        try:
            data = read_bounded(path, defaults.MAX_FILE_BYTES)
            return self.preset.to_tensor(decode_image(data, self.max_pixels, self.preset.mode))
        except ImageError as exc:
            raise ConfigError(f"unreadable training image {path}: {exc.message}") from None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self._cache[index] if self._cache is not None else self._decode(index)
        return image, int(self.targets[index])


def find_classes(root: Path) -> list[str]:
    """Class names: the sub-folders of ``root``, sorted (torchvision ImageFolder order)."""
    if not root.is_dir():
        raise ConfigError(f"{root} is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise ConfigError(f"{root} needs one folder per class (at least 2), found {len(classes)}")
    return classes
