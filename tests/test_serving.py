"""Serving several models: split-on-OOM in inference, reload without a restart, per-model queues (docs/models.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from imgpipe.model.engine import Engine
from imgpipe.settings import BatchSettings, SecuritySettings
from imgpipe.worker.batcher import Batcher
from tests.images import write_good


class FakeOOMModule(torch.nn.Module):
    """A fake of a GPU that fits only ``fits`` images (no GPU here): the real module below, but a batch above
    ``fits`` raises torch.cuda.OutOfMemoryError, as CUDA does."""

    def __init__(self, inner: torch.nn.Module, fits: int) -> None:
        super().__init__()
        self.inner = inner
        self.fits = fits
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.fits:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (fake: {x.shape[0]} > {self.fits} images)")
        return self.inner(x)


@pytest.mark.timeout(120)
def test_fake_cuda_oom_splits_the_batch_and_charges_no_message(tmp_path: Path, default_model: Path) -> None:
    engine = Engine.load(default_model, "cpu", security=SecuritySettings(allowed_roots=(tmp_path,)))
    good = [str(p) for p in write_good(tmp_path / "good", 13)]
    expected = engine.records_for(good, [engine.load_image(p) for p in good])
    fake = FakeOOMModule(engine.module, fits=3)
    engine.module = fake  # type: ignore[assignment]
    batcher = Batcher(engine, BatchSettings(max_batch=64, max_wait_ms=500, decode_threads=2)).start()
    try:
        futures = [batcher.submit(good[i : i + 5], source=f"m{i}") for i in range(0, 13, 5)]
        # A batch that failed would set its exception on every future: that is what charges a message.
        assert all(f.exception(timeout=60) is None for group in futures for f in group)
        records = [f.result() for group in futures for f in group]
    finally:
        batcher.close()
    assert max(fake.sizes) > 3, "the batch should have met the fake OOM"
    assert all(r["status"] == "ok" for r in records) and [r["path"] for r in records] == good
    for got, want in zip(records, expected, strict=True):  # same labels as the unsplit batch
        assert got["label"] == want["label"]
    # A single image that does not fit is a real failure: it re-raises (and is then charged as before).
    fake.fits = 0
    with pytest.raises(torch.cuda.OutOfMemoryError):
        engine.predict(engine.load_image(good[0]).unsqueeze(0))
