"""The inference engine: load a model file once; lanes of threads read, decode and predict whole batches."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from imgpipe import defaults, threads
from imgpipe.devices import parse_device
from imgpipe.errors import ImageError
from imgpipe.model import export, jit, modelfile, oom
from imgpipe.model.preprocess import Preset, decode_image, stack
from imgpipe.records import Record, error_record, ok_record
from imgpipe.safety import ConfinedReader
from imgpipe.settings import SecuritySettings, Settings

TopK = list[tuple[str, float]]
log = logging.getLogger(__name__)


def select_device(spec: str) -> torch.device:
    """``auto`` (first GPU if any, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` (imgpipe.devices); ConfigError
    if that device is not on this host."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return torch.device(parse_device(spec).resolve(gpus))


def padded_size(rows: int) -> int:
    """The batch size a batch of ``rows`` images is padded to on a GPU: the next power of two up to 64, then the
    next multiple of 64. A few sizes, so a few cuDNN plans, whatever sizes the batches come in (the last of a
    job, adaptive batching, a split after out-of-memory); the padding rows are zeros and their outputs dropped."""
    if rows <= 64:
        return 1 << max(0, rows - 1).bit_length()
    return -(-rows // 64) * 64


# The warm-up on a GPU runs every padded size up to this many images (14 sizes), then the full batch's only.
WARM_SIZES_UP_TO = 512


def padded_sizes(largest: int) -> list[int]:
    """Every size ``padded_size`` gives a batch of 1 to ``largest`` images, smallest first: what the warm-up runs
    on a GPU, so that no batch meets a size whose cuDNN plans are still to build."""
    sizes: list[int] = []
    rows = 1
    while rows <= max(1, largest):
        size = padded_size(rows)
        sizes.append(size)
        rows = size + 1
    return sizes


def fitting_size(rows: int) -> int:
    """The largest batch size of at most ``rows`` (at least 1) that ``padded_size`` leaves as it is."""
    if rows <= 64:
        return 1 << (max(1, rows).bit_length() - 1)
    return rows // 64 * 64


class Engine:
    """A loaded model plus everything needed to turn file paths into result records.

    ``load_image`` (read + decode + preprocess, thread-safe) and ``predict`` (one batch) are the two
    halves a caller can schedule separately; ``classify`` pipelines them for a sequence of paths.

    The keyword settings default to what measured fastest on each device (scripts/gpu_configs.py compares them
    on a GPU): ``amp`` and ``channels_last`` apply on CUDA only; ``jit_optimize`` (the TorchScript executor's
    profiling and fusion) is on for the CPU, off for CUDA; ``model_thread`` (every batch on one thread of the
    engine's own; off, the calling threads run the model at once) and ``pad_batches`` (to ``padded_size``) are
    on for CUDA; ``optimize`` freezes and fuses the module for the CPU. With padding, the warm-up also runs a batch
    of every padded size up to ``warm_batch`` (the largest the caller will send), so that every real batch finds
    its plans built.
    """

    def __init__(
        self,
        module: torch.jit.ScriptModule,
        metadata: export.Metadata,
        device: torch.device,
        *,
        topk: int = 3,
        security: SecuritySettings | None = None,
        amp: bool = True,
        channels_last: bool = True,
        optimize: bool = True,
        jit_optimize: bool | None = None,
        model_thread: bool | None = None,
        pad_batches: bool | None = None,
        cpu_infer_batch: int = defaults.CPU_INFER_BATCH,
        serial_decode_bytes: int = defaults.SERIAL_DECODE_BYTES,
        warm_batch: int = defaults.MAX_BATCH,
    ) -> None:
        self.module = module
        # Small files are read and decoded by one lane at a time (defaults.SERIAL_DECODE_BYTES has the measurement).
        self.serial_decode_bytes = max(0, serial_decode_bytes)
        self._decode_turn = threading.Lock()
        # On the CPU a batch goes through the model in pieces of this many images (IMGPIPE_CPU_INFER_BATCH):
        # their activations stay in the caches (imgpipe/defaults.py has the measurement).
        self.cpu_infer_batch = max(1, cpu_infer_batch)
        self.metadata = metadata
        self.device = device
        self.topk = min(topk, len(metadata.labels))
        self.security = security or SecuritySettings()
        self.preset: Preset = metadata.preset
        self.labels = metadata.labels
        self._cuda = device.type == "cuda"
        self._amp = amp and self._cuda
        self._channels_last = channels_last and self._cuda
        # The TorchScript graph executor's optimisations (profiling runs, specialisation to the shapes seen, fusion)
        # for the calls of this engine; None: off on a GPU, on on the CPU (model/jit.py ``executor`` says why).
        self._jit_optimize = (not self._cuda) if jit_optimize is None else jit_optimize
        # Lanes (``classify``, the worker's group threads) decode in parallel. On the CPU each lane runs its batch
        # on its own cores (imgpipe/threads.py). On a GPU every batch runs on one thread of the engine's own
        # (``model_thread``, default on a GPU): device memory holds one batch's activations at a time, and the
        # per-thread caches that PyTorch builds slowly (cuDNN plans, one per shape) are built once, not once per
        # lane (imgpipe/threads.py ``OneThread`` has the measurement). ``pad_batches`` (default on a GPU) pads a
        # batch to the next of a few sizes (``padded_size``), so that the plans are for those sizes only.
        on_thread = self._cuda if model_thread is None else model_thread
        self._model_thread = threads.OneThread("imgpipe-model") if on_thread else None
        self._pad = self._cuda if pad_batches is None else pad_batches
        if self._cuda:
            self.module = self.module.to(device)
            if self._channels_last:
                self.module = self.module.to(memory_format=torch.channels_last)
        elif optimize:
            # conv + batch-norm folded and fused ops: about 1.6x on the CPU (profiled: inference is most of the
            # time of the demo model). Outputs match the file's module to float tolerance (tests/test_preprocess.py).
            self.module = self._optimized(self.module)
        # JPEG DCT scaling: decode at >= this size instead of full resolution.
        self._draft = max(1, round(self.preset.input_size / self.preset.crop_ratio))
        self._warm_up(warm_batch)

    @classmethod
    def load(
        cls,
        path: Path,
        device: str = "auto",
        *,
        topk: int = 3,
        security: SecuritySettings | None = None,
        torch_threads: int = 0,
        lanes: int = 0,
        cpu_infer_batch: int = defaults.CPU_INFER_BATCH,
        serial_decode_bytes: int = defaults.SERIAL_DECODE_BYTES,
        warm_batch: int = defaults.MAX_BATCH,
    ) -> Engine:
        """Load a model file for ``device``; sets this process's torch intra-op threads to ``torch_threads``
        (0: chosen for the device from the cores available and the ``lanes``, the threads that will run batches
        at once, as ``classify``'s; 0: its default, one per core; imgpipe/threads.py)."""
        dev = select_device(device)
        torch.set_num_threads(torch_threads or threads.torch_threads(dev.type, lanes=lanes))
        module, metadata = modelfile.load(Path(path), dev)
        return cls(
            module,
            metadata,
            dev,
            topk=topk,
            security=security,
            cpu_infer_batch=cpu_infer_batch,
            serial_decode_bytes=serial_decode_bytes,
            warm_batch=warm_batch,
        )

    @classmethod
    def from_settings(cls, settings: Settings, path: Path | None = None, device: str | None = None) -> Engine:
        """``load`` as the settings say (`classify`, `evaluate`, each worker process and its reloads): the model
        file (``path``, default IMGPIPE_MODEL), device (``device``, default IMGPIPE_DEVICE) and top-k, the security
        bounds, and the batch section: torch threads, lanes (each also runs its batches), CPU pieces, serial
        decoding of small files, and the largest batch (the warm-up's)."""
        batch = settings.batch
        return cls.load(
            path if path is not None else settings.model.resolved_path(),
            device if device is not None else settings.model.device,
            topk=settings.model.topk,
            security=settings.security,
            torch_threads=batch.torch_threads,
            lanes=batch.decode_threads,
            cpu_infer_batch=batch.cpu_infer_batch,
            serial_decode_bytes=batch.serial_decode_bytes,
            warm_batch=batch.max_batch,
        )

    @property
    def model_id(self) -> str:
        return self.metadata.model_id

    def _optimized(self, module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
        """``module`` frozen and fused, checked on one dummy batch; the module as loaded where freezing or
        fusing fails (some traced or imported graphs), so an unusual model still serves, only slower."""
        size = self.preset.input_size
        try:
            candidate = jit.optimize_for_inference(module)
            with torch.inference_mode():
                candidate(torch.zeros(2, self.preset.channels, size, size))
        except Exception as exc:  # any failure of the optimisation passes: serve the module as loaded
            reason = (str(exc).splitlines() or [exc.__class__.__name__])[0]
            log.warning("model served unoptimized (optimize_for_inference failed: %s)", reason)
            return module
        return candidate

    def _warm_up(self, batch: int) -> None:
        size = self.preset.input_size
        dummy = torch.zeros(2, self.preset.channels, size, size)
        for _ in range(2):  # the TorchScript profiling executor specialises on the first runs
            self.predict(dummy)
        if not self._pad:
            return
        # Every padded size up to the largest batch the caller sends: on a GPU the plans of each new size took
        # ~0.7 s to build on a warm thread (mobilenet_v3_small, H200, scripts/gpu_configs.py "no padding"), paid
        # by the first batch of that size otherwise: a job's last batch, a group split between processes, a
        # batch adaptive batching planned smaller (README, Benchmarks, On a GPU).
        start = time.perf_counter()
        # Past WARM_SIZES_UP_TO (multiples of 64) only the full batch: an IMGPIPE_MAX_BATCH of 4096 would otherwise
        # warm 70 sizes at start.
        sizes = padded_sizes(min(max(2, batch), WARM_SIZES_UP_TO))
        if padded_size(batch) > sizes[-1]:
            sizes.append(padded_size(batch))
        for rows in sizes:
            if rows != 2:  # run above
                self.predict(torch.zeros(rows, self.preset.channels, size, size))
        took = time.perf_counter() - start
        log.info("model warm on %s: batch sizes %s in %.1f s", self.device, ", ".join(map(str, sizes)), took)

    def fitting_batch(self, rows: int) -> int:
        """The largest batch of at most ``rows`` images this engine runs with no padding rows (``rows`` itself
        where it does not pad): what adaptive batching plans, so that a planned batch pays for no padding."""
        return fitting_size(rows) if self._pad else rows

    def reader(self) -> ConfinedReader:
        """A reader for one batch's files (confined to the allowed roots, size-bounded; imgpipe/safety.py):
        each folder walked once. Close it (``with``) when the batch is read."""
        return ConfinedReader(
            self.security.allowed_roots,
            self.security.max_file_bytes,
            allow_hardlinks=bool(self.security.allow_hardlinks),
        )

    def load_image(self, path: str, reader: ConfinedReader | None = None) -> torch.Tensor:
        """Read (confined to the allowed roots, size-bounded; with ``reader``, one of a batch), decode and
        preprocess: (C, H, W). A file of at most ``serial_decode_bytes`` is read and decoded by one thread at a
        time; the lock is let go as soon as a larger file has been read."""
        if reader is None:
            with self.reader() as own:
                return self.load_image(path, own)
        turn = self._decode_turn if self.serial_decode_bytes else None
        if turn is not None:
            turn.acquire()
        try:
            data = reader.read(path)
            if turn is not None and len(data) > self.serial_decode_bytes:
                turn.release()
                turn = None
            image = decode_image(data, self.security.max_pixels, self.preset.mode, draft_size=self._draft)
            return self.preset.to_pixels(image)
        finally:
            if turn is not None:
                turn.release()

    def predict(self, batch: torch.Tensor) -> list[TopK]:
        """(B, C, H, W) CPU batch -> top-k (label, probability) per image. uint8 pixels (``load_image``) are
        normalised here, per batch (on the GPU after the transfer); a float batch is taken as normalised.

        A CUDA out-of-memory error splits the batch in halves and retries them (model/oom.py), down to single
        images, so a batch too big for the device still gets every prediction and no message is charged."""
        if not self._cuda and batch.shape[0] > self.cpu_infer_batch:  # in pieces the caches hold
            step = self.cpu_infer_batch
            return [
                top for start in range(0, batch.shape[0], step) for top in self.predict(batch[start : start + step])
            ]
        return oom.run_split_on_oom(
            lambda rows: self._predict_rows(batch[rows[0] : rows[-1] + 1]),
            range(batch.shape[0]),
            on_split=self._log_split,
        )

    @staticmethod
    def _log_split(size: int) -> None:
        log.warning("out of memory on a batch of %d images: split in halves and retried", size)

    def _predict_rows(self, batch: torch.Tensor) -> list[TopK]:
        if self._model_thread is None:
            return self._infer(batch)
        if self._cuda:
            batch = batch.pin_memory()  # here, on the lane, while the model thread runs the batch before
        return self._model_thread.run(self._infer, batch)

    def _infer(self, batch: torch.Tensor) -> list[TopK]:
        rows = batch.shape[0]
        with torch.inference_mode(), jit.executor(optimize=self._jit_optimize):
            x = batch.to(self.device, non_blocking=True) if self._cuda else batch  # uint8: a quarter of the bytes
            x = self._normalized(x)
            padding = padded_size(rows) - rows if self._pad else 0
            if padding:
                x = torch.cat([x, x.new_zeros((padding, *x.shape[1:]))])
            if self._channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.float16) if self._amp else contextlib.nullcontext():
                logits = self.module(x)[:rows]  # (B, num_classes): the padding rows' outputs dropped
            probs = torch.softmax(logits.float(), dim=1)
            top_p, top_i = probs.topk(self.topk, dim=1)  # (B, k)
            values: list[list[float]] = top_p.cpu().tolist()
            indices: list[list[int]] = top_i.cpu().tolist()
        return [
            [(self.labels[i], p) for i, p in zip(idx, val, strict=True)]
            for idx, val in zip(indices, values, strict=True)
        ]

    def _normalized(self, batch: torch.Tensor) -> torch.Tensor:
        return self.preset.normalize(batch) if batch.dtype == torch.uint8 else batch

    def records_for(self, paths: Sequence[str], tensors: Sequence[torch.Tensor | ImageError]) -> list[Record]:
        """One record per path: errors as error records, the rest predicted as one batch."""
        good = [i for i, t in enumerate(tensors) if isinstance(t, torch.Tensor)]
        predictions = self.predict(stack([tensors[i] for i in good])) if good else []  # type: ignore[misc]
        by_index = dict(zip(good, predictions, strict=True))
        records = []
        for i, path in enumerate(paths):
            item = tensors[i]
            if isinstance(item, ImageError):
                records.append(error_record(path, item.message, self.model_id, item.reason))
            else:
                records.append(ok_record(path, by_index[i], self.model_id))
        return records

    def safe_load_image(self, path: str, reader: ConfinedReader | None = None) -> torch.Tensor | ImageError:
        """``load_image`` that returns the ImageError instead of raising it (any other failure too)."""
        try:
            return self.load_image(path, reader)
        except ImageError as exc:
            return exc
        except Exception as exc:  # a decoder bug must cost one record, not the run
            return ImageError("internal", f"unexpected error while decoding: {exc.__class__.__name__}: {exc}")

    def classify(
        self,
        paths: Iterable[str],
        batch_size: int = 64,
        lanes: int = 0,
        on_batch: Callable[[int], None] | None = None,
    ) -> Iterator[Record]:
        """Records for ``paths`` in input order.

        ``lanes`` threads (0: one per core, imgpipe/threads.py) each take a whole batch, decode it and run it
        through the model. While one lane's batch is in the model (torch releases the GIL) the others decode or
        run theirs, so every core stays busy with no hand-off between stages: on the CPU each batch runs with
        the intra-op threads ``Engine.load`` chose for that many lanes (one each when lanes = cores). One batch
        more than the lanes is in hand, so a lane never waits for the caller to take records.
        """
        lanes = lanes or threads.decode_threads()
        source = (os.path.abspath(p) for p in paths)
        pending: deque[tuple[int, Future[list[Record]]]] = deque()
        with ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="imgpipe-lane") as pool:

            def submit_next() -> None:
                batch = list(itertools.islice(source, batch_size))
                if batch:
                    pending.append((len(batch), pool.submit(self._run_batch, batch)))

            for _ in range(lanes + 1):
                submit_next()
            while pending:
                size, future = pending.popleft()
                records = future.result()
                submit_next()
                yield from records
                if on_batch is not None:
                    on_batch(size)

    def _run_batch(self, paths: Sequence[str]) -> list[Record]:
        with self.reader() as reader:
            tensors = [self.safe_load_image(p, reader) for p in paths]
        return self.records_for(paths, tensors)
