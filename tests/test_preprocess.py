"""Unit tests of the pure pieces: preset, bounded decoding, confined reading, settings, records."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from imgpipe.errors import ConfigError, ImageError
from imgpipe.model.preprocess import Preset, decode_image
from imgpipe.records import RecordWriter, error_record, format_for, ok_record, read_records
from imgpipe.safety import confine, read_bounded
from imgpipe.settings import Settings
from tests.images import write_bad, write_bomb


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def test_preset_shapes_and_normalisation() -> None:
    preset = Preset(input_size=16, channels=1, mean=(0.5,), std=(0.25,))
    white = Image.new("L", (8, 8), 255)
    tensor = preset.to_tensor(white)
    assert tensor.shape == (1, 16, 16)
    assert torch.allclose(tensor, torch.full_like(tensor, (1.0 - 0.5) / 0.25))


def test_preset_rgb_centre_crop_keeps_the_middle() -> None:
    preset = Preset(input_size=4, channels=3, mean=(0.0,) * 3, std=(1.0,) * 3)
    image = Image.new("RGB", (12, 4), (0, 0, 0))
    image.paste((255, 0, 0), (4, 0, 8, 4))  # red square in the middle third
    tensor = preset.to_tensor(image)  # short side 4 -> crop the middle 4x4
    assert tensor.shape == (3, 4, 4)
    assert torch.allclose(tensor[0], torch.ones(4, 4)) and float(tensor[1:].abs().max()) == 0.0


def test_preset_round_trips_through_dict() -> None:
    preset = Preset(input_size=24, channels=3, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), crop_ratio=0.875)
    assert Preset.from_dict(preset.to_dict()) == preset


def test_preset_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="channels"):
        Preset(channels=2, mean=(0, 0), std=(1, 1))
    with pytest.raises(ValueError, match="one value per channel"):
        Preset(channels=3, mean=(0.5,), std=(0.5,))


def test_decode_converts_mode_and_refuses_pixel_bombs(tmp_path: Path) -> None:
    rgb = decode_image(png_bytes(Image.new("L", (10, 6), 7)), max_pixels=1000, mode="RGB")
    assert rgb.mode == "RGB" and rgb.size == (10, 6)
    bomb = write_bomb(tmp_path / "bomb.png", side=2000).read_bytes()
    assert len(bomb) < 100_000
    with pytest.raises(ImageError) as info:
        decode_image(bomb, max_pixels=1_000_000)
    assert info.value.reason == "too_many_pixels"


def test_decode_jpeg_draft_mode_reduces_work() -> None:
    big = png_bytes(Image.new("RGB", (800, 800), (10, 200, 30)), fmt="JPEG")
    image = decode_image(big, max_pixels=10**7, mode="RGB", draft_size=64)
    assert max(image.size) < 800  # decoded at a DCT-reduced scale
    assert min(image.size) >= 64


@pytest.mark.parametrize(
    ("kind", "reason", "message"),
    [
        ("truncated", "decode", "cannot decode image"),
        ("corrupt", "decode", "cannot decode image"),
        ("not_image", "decode", "not a recognised image format"),
    ],
)
def test_decode_errors_name_the_problem(tmp_path: Path, kind: str, reason: str, message: str) -> None:
    data = write_bad(tmp_path)[kind].read_bytes()
    with pytest.raises(ImageError) as info:
        decode_image(data, max_pixels=10**7)
    assert info.value.reason == reason and message in info.value.message


def test_read_bounded_refuses_empty_directories_and_big_files(tmp_path: Path) -> None:
    bad = write_bad(tmp_path)
    for kind, reason in (("empty", "empty"), ("directory", "not_regular"), ("missing", "not_found")):
        with pytest.raises(ImageError) as info:
            read_bounded(bad[kind], max_bytes=1000)
        assert info.value.reason == reason, kind
    big = tmp_path / "big.png"
    big.write_bytes(b"x" * 2000)
    with pytest.raises(ImageError) as info:
        read_bounded(big, max_bytes=1000)
    assert info.value.reason == "too_large"


def test_read_bounded_refuses_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageError) as info:
        read_bounded(fifo, max_bytes=1000)  # must not block waiting for a writer
    assert info.value.reason == "not_regular"


def test_confine_refuses_symlinks_and_dotdot_out_of_roots(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"outside")
    (root / "link.png").symlink_to(secret)
    inside = root / "ok.png"
    inside.write_bytes(b"inside")
    assert confine(str(inside), (root.resolve(),)) == inside.resolve()
    for path in (root / "link.png", root / ".." / "secret.png"):
        with pytest.raises(ImageError) as info:
            confine(str(path), (root.resolve(),))
        assert info.value.reason == "not_allowed"
    with pytest.raises(ImageError, match="absolute"):
        confine("relative.png", (root.resolve(),))
    assert confine(str(secret), ()) == secret.resolve()  # no roots: unrestricted (embedded classify)


def test_settings_from_env_parses_and_rejects(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "IMGPIPE_REDIS_URL": "rediss://:secret@localhost:6380/2",
            "IMGPIPE_MAX_BATCH": "8",
            "IMGPIPE_ALLOWED_ROOTS": f"{tmp_path}:{tmp_path}",
            "IMGPIPE_METRICS_PORT": "9100",
        }
    )
    assert settings.redis.url.startswith("rediss://") and settings.batch.max_batch == 8
    assert settings.security.allowed_roots == (tmp_path.resolve(), tmp_path.resolve())
    assert settings.metrics.port == 9100 and settings.metrics.bind == "0.0.0.0"
    assert Settings.from_env({}).model.device == "auto"
    with pytest.raises(ConfigError, match="IMGPIPE_MAX_BATCH='many' is not an integer"):
        Settings.from_env({"IMGPIPE_MAX_BATCH": "many"})
    with pytest.raises(ConfigError, match="must be >= 1"):
        Settings.from_env({"IMGPIPE_MAX_BATCH": "0"})
    with pytest.raises(ConfigError, match="is not a directory"):
        Settings.from_env({"IMGPIPE_ALLOWED_ROOTS": str(tmp_path / "nope")})
    # A 0-or-1 setting takes nothing else (a typo such as 2 or "yes" is not read as on).
    assert Settings.from_env({"IMGPIPE_PINNED_ONLY": "1"}).worker.pinned_only == 1
    assert Settings.from_env({}, overrides={"pinned_only": "1"}).worker.pinned_only == 1
    for wrong in ("2", "yes", "-1"):
        with pytest.raises(ConfigError, match=f"IMGPIPE_RELOAD='{wrong}' must be 0 or 1"):
            Settings.from_env({"IMGPIPE_RELOAD": wrong})


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_records_round_trip_through_both_formats(tmp_path: Path, suffix: str) -> None:
    records = [
        ok_record("/a/b.png", [("7", 0.9), ("1", 0.05)], "m@abc"),
        error_record("/a/c.png", "cannot decode image: truncated, with, commas", "m@abc", "decode"),
    ]
    out = tmp_path / f"r.{suffix}"
    with open(out, "w", newline="") as fh:
        RecordWriter(fh, format_for(out)).write_all(records)
    back = read_records(out)
    assert back == records
    with pytest.raises(ConfigError, match=r"\.jsonl or \.csv"):
        format_for(tmp_path / "r.txt")


def _as_16bit_png(source: Path, target: Path) -> None:
    """The same picture as a 16-bit grayscale PNG: each 8-bit value v stored as v * 257 (0..255 -> 0..65535)."""
    import numpy as np

    eight = np.asarray(Image.open(source).convert("L"), dtype=np.uint16)
    sixteen = Image.fromarray(eight * 257)
    assert sixteen.mode == "I;16"
    sixteen.save(target)


def test_16bit_images_are_scaled_not_clipped() -> None:
    import numpy as np

    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # 0..65535 in 256 steps
    image = decode_image(png_bytes(Image.fromarray(ramp)), max_pixels=1000, mode="L")
    assert image.mode == "L"
    assert np.array_equal(np.asarray(image).ravel(), np.arange(256))  # clipping would give 0, then 255 everywhere
    rgb = decode_image(png_bytes(Image.fromarray(ramp)), max_pixels=1000, mode="RGB")
    assert rgb.mode == "RGB" and np.asarray(rgb)[0, 5].tolist() == [5, 5, 5]


def test_demo_digits_saved_as_16bit_png_keep_the_accuracy_of_the_8bit_ones(
    demo_data: Path, default_model: Path, tmp_path: Path
) -> None:
    from imgpipe.model.engine import Engine
    from imgpipe.scan import scan

    val = demo_data / "val"
    originals = sorted(scan(val))
    copies = []
    for path in originals:
        target = tmp_path / Path(path).relative_to(val)
        target.parent.mkdir(parents=True, exist_ok=True)
        _as_16bit_png(Path(path), target)
        copies.append(str(target))
    engine = Engine.load(default_model, "cpu")

    def accuracy(paths: list[str], root: Path) -> tuple[float, list[str]]:
        records = list(engine.classify(paths, batch_size=64, lanes=2))
        labels = [str(r.get("label")) for r in records]
        truth = [Path(p).relative_to(root).parts[0] for p in paths]
        assert all(r["status"] == "ok" for r in records)
        return sum(a == b for a, b in zip(labels, truth, strict=True)) / len(paths), labels

    eight_bit, eight_labels = accuracy(originals, val)
    sixteen_bit, sixteen_labels = accuracy(copies, tmp_path)
    assert eight_bit > 0.9
    assert sixteen_bit == eight_bit and sixteen_labels == eight_labels  # same pixels after scaling: same labels


def test_jpegs_decode_through_simplejpeg_like_pillow_and_fall_back_for_rotation_and_damage() -> None:
    import numpy as np

    from imgpipe.model import preprocess

    assert preprocess.JPEG_DECODER == "simplejpeg"  # a dependency: installed from its wheel
    rng = np.random.default_rng(0)
    small = Image.fromarray((rng.random((30, 40, 3)) * 255).astype(np.uint8)).resize((640, 480))
    data = png_bytes(small, "JPEG")
    fast = decode_image(data, max_pixels=10**6, mode="RGB", draft_size=100)  # DCT scaling: 1/4 still >= 100
    assert fast.size == (160, 120)
    preprocess.JPEG_DECODER = "pillow"
    try:
        slow = decode_image(data, max_pixels=10**6, mode="RGB", draft_size=100)
    finally:
        preprocess.JPEG_DECODER = "simplejpeg"
    assert slow.size == fast.size
    assert np.abs(np.asarray(fast, dtype=float) - np.asarray(slow, dtype=float)).mean() < 2.0
    gray = decode_image(data, max_pixels=10**6, mode="L", draft_size=100)
    assert gray.mode == "L" and gray.size == (160, 120)

    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: Pillow decodes and turns it upright
    buf = io.BytesIO()
    small.save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue(), max_pixels=10**6, mode="RGB").size == (480, 640)
    with pytest.raises(ImageError, match="cannot decode image"):
        decode_image(data[: len(data) // 2], max_pixels=10**6, mode="RGB")  # truncated: Pillow's error
    with pytest.raises(ImageError) as refused:
        decode_image(data, max_pixels=1000, mode="RGB")  # bounds checked from the header first
    assert refused.value.reason == "too_many_pixels"


def test_the_optimized_cpu_engine_matches_the_model_file_module(default_model: Path) -> None:
    from imgpipe.model import modelfile
    from imgpipe.model.engine import Engine

    engine = Engine.load(default_model, "cpu")
    plain, _ = modelfile.load(default_model, "cpu")
    batch = torch.randn(8, engine.preset.channels, engine.preset.input_size, engine.preset.input_size)
    with torch.inference_mode():
        expected = torch.softmax(plain(batch), dim=1).topk(engine.topk, dim=1)
    got = engine.predict(batch)
    assert [[engine.labels[i] for i in row] for row in expected.indices.tolist()] == [
        [lab for lab, _ in r] for r in got
    ]
    assert torch.allclose(torch.tensor([[p for _, p in r] for r in got]), expected.values, atol=1e-4)
