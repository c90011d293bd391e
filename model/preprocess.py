"""The preprocessing preset shared by training, evaluation and serving, and bounded image decoding.

The preset's parameters are saved inside the exported model, so the three can never drift apart.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from imgpipe.errors import ImageError

try:  # libjpeg-turbo with DCT scaling, from a wheel (a dependency; Pillow decodes everything without it)
    import simplejpeg

    JPEG_DECODER = "simplejpeg"
except ImportError:  # pragma: no cover - an install without it
    JPEG_DECODER = "pillow"


@dataclass(frozen=True)
class Preset:
    """Decode mode, geometry and normalisation of the network input."""

    input_size: int = 32  # network input is (channels, input_size, input_size)
    channels: int = 1  # 1: grayscale ("L"), 3: RGB
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    crop_ratio: float = 1.0  # resize the short side to input_size / crop_ratio, then centre-crop

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if not 0 < self.crop_ratio <= 1:
            raise ValueError("crop_ratio must be in (0, 1]")

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preset:
        return cls(
            input_size=int(data["input_size"]),
            channels=int(data["channels"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            crop_ratio=float(data.get("crop_ratio", 1.0)),
        )

    def resize(self, image: Image.Image) -> Image.Image:
        """Short side to input_size / crop_ratio, then centre crop to a square of input_size.

        Done as one resample of the source region that the crop keeps (Pillow's ``box``), not a resize of the
        whole image followed by a crop: the same output pixels, with only the kept ones computed (profiled:
        resizing was a third of a 640x480 photo's preprocessing).
        """
        size = self.input_size
        short = max(1, round(size / self.crop_ratio))
        w, h = image.size
        scale = short / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        if (new_w, new_h) == (w, h):
            left, top = (w - size) // 2, (h - size) // 2
            return image if (w, h) == (size, size) else image.crop((left, top, left + size, top + size))
        sx, sy = new_w / w, new_h / h
        left, top = (new_w - size) // 2, (new_h - size) // 2
        box = (left / sx, top / sy, (left + size) / sx, (top + size) / sy)  # the kept region, source pixels
        return image.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """Decoded PIL image -> normalised float tensor (C, H, W): ``normalize`` of ``to_pixels`` (training and
        evaluation; serving keeps the pixels and normalises whole batches, with the same arithmetic)."""
        return self.normalize(self.to_pixels(image).unsqueeze(0))[0]

    def to_pixels(self, image: Image.Image) -> torch.Tensor:
        """Decoded PIL image -> resized, cropped uint8 pixels (C, H, W), not normalised.

        What the serving path keeps per image: a quarter of the float tensor's memory, and no per-image float
        arithmetic (for small images the per-image NumPy calls were a third of the decode threads' time)."""
        if image.mode != self.mode:
            image = image.convert(self.mode)
        image = self.resize(image)
        array = np.array(image, dtype=np.uint8)  # (H, W) or (H, W, C), a writable copy
        pixels = torch.from_numpy(array)
        return pixels.unsqueeze(0) if array.ndim == 2 else pixels.permute(2, 0, 1)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 pixels -> float32 ``(x / 255 - mean) / std``, as ``x * scale + shift`` in float32
        (the same two roundings for every caller), on the batch's device."""
        scale, shift = self._affine
        x = batch.to(torch.float32)
        return x.mul_(scale.to(x.device)).add_(shift.to(x.device))

    @cached_property
    def _affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        return 1.0 / (255.0 * std), -mean / std


# EXIF tag of the camera's orientation (1: upright).
ORIENTATION = 0x0112
# Single-channel integer modes holding 16-bit samples (16-bit PNG and TIFF; "I" where older Pillow used it).
# Pillow's convert("L") clips them at 255 instead of scaling: a 16-bit scan would turn almost all white.
HIGH_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit single-channel image scaled (not clipped) to 8-bit "L": 0..65535 -> 0..255, rounded."""
    array = np.asarray(image).astype(np.int64)  # (H, W)
    scaled = (np.clip(array, 0, 65535) * 255 + 32767) // 65535
    return Image.fromarray(scaled.astype(np.uint8))  # (H, W) uint8: mode "L"


def _decode_jpeg_turbo(image: Image.Image, data: bytes, mode: str, draft_size: int | None) -> Image.Image | None:
    """A plain JPEG (RGB or grayscale, upright) decoded by simplejpeg (libjpeg-turbo, DCT scaling to at least
    ``draft_size``); None where Pillow must decode it (other formats, CMYK, EXIF rotation, any decoder error,
    so that error messages stay Pillow's). Measured ~10-20% faster than Pillow on 640x480 photos."""
    if (
        not isinstance(image, JpegImagePlugin.JpegImageFile)
        or image.mode not in ("RGB", "L")
        or mode not in ("RGB", "L")
    ):
        return None
    if image.getexif().get(ORIENTATION, 1) != 1:
        return None
    side = draft_size or 0
    try:
        array = simplejpeg.decode_jpeg(
            data, colorspace="GRAY" if mode == "L" else "RGB", min_height=side, min_width=side
        )
    except ValueError:
        return None
    return Image.fromarray(array[:, :, 0] if mode == "L" else array)  # (H, W) "L" or (H, W, 3) "RGB"


def decode_image(data: bytes, max_pixels: int, mode: str = "RGB", draft_size: int | None = None) -> Image.Image:
    """Decode image bytes with Pillow, bounded: the pixel count is checked from the header before decoding.

    ``draft_size`` lets JPEGs decode at a reduced scale (DCT scaling) when the target is much smaller.
    Raises ImageError with a reason; never returns a half-decoded image.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width <= 0 or height <= 0:
                raise ImageError("decode", "cannot decode image: zero-sized image")
            if width * height > max_pixels:
                raise ImageError(
                    "too_many_pixels",
                    f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
                )
            fast = _decode_jpeg_turbo(image, data, mode, draft_size) if JPEG_DECODER == "simplejpeg" else None
            if fast is not None:
                return fast
            if draft_size is not None and isinstance(image, JpegImagePlugin.JpegImageFile):
                image.draft(mode if mode in ("L", "RGB") else "RGB", (draft_size, draft_size))
            image.load()
            if image.getexif().get(ORIENTATION, 1) != 1:  # exif_transpose copies even when nothing turns
                image = ImageOps.exif_transpose(image) or image
            if image.mode in HIGH_BIT_MODES:
                image = to_8bit(image)
            if image.mode != mode:
                image = image.convert(mode)
            return image
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("too_many_pixels", f"decompression bomb refused: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError("decode", "cannot decode image: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError("decode", f"cannot decode image: {exc}") from None


def stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """List of (C, H, W) tensors -> one (B, C, H, W) batch."""
    return torch.stack(list(tensors), dim=0)
