"""The one device parser: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, checked against the GPUs a host has.

Torch-free: callers pass the number of visible GPUs (``torch.cuda.device_count()``), so the worker's
supervisor and the model's engine read the same spelling with the same errors.
"""

from __future__ import annotations

from dataclasses import dataclass

from imgpipe.errors import ConfigError

VALID = "auto, cpu, cuda, cuda:N"


@dataclass(frozen=True)
class DeviceSpec:
    """A parsed device setting: ``kind`` is auto, cpu or cuda; ``index`` is N of cuda:N (None otherwise)."""

    kind: str
    index: int | None = None

    def resolve(self, gpus: int) -> str:
        """The concrete device (``cpu`` or ``cuda:N``) on a host with ``gpus`` GPUs; ConfigError if absent."""
        if self.kind == "cpu" or (self.kind == "auto" and gpus == 0):
            return "cpu"
        if gpus == 0:
            raise ConfigError(f"device {self} requested but no CUDA GPU is visible; valid here: auto, cpu")
        index = self.index or 0
        if index >= gpus:
            raise ConfigError(f"device {self}: this host has {gpus} GPU(s), cuda:0..cuda:{gpus - 1}")
        return f"cuda:{index}"

    def plan(self, gpus: int, processes: int | None) -> list[str]:
        """The device of each worker process: one process per GPU (dealt round-robin when more are asked for)
        for ``auto`` and ``cuda``; ``processes`` (default 1) on one fixed device otherwise."""
        if self.kind in ("auto", "cuda") and self.index is None and gpus > 0:
            return [f"cuda:{i % gpus}" for i in range(processes or gpus)]
        return [self.resolve(gpus)] * (processes or 1)

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


def shared_gpus(devices: list[str]) -> dict[str, int]:
    """{GPU: processes} for each GPU that more than one of ``devices`` (one per worker process) would share.

    Measured on one H200 (README, Benchmarks, On a GPU): the photos through one worker ran 1,133 img/s with one
    process and 206-234 with two sharing the GPU, while the model alone ran 1.97x in two processes: the loss is
    in the worker's pipeline on a shared GPU, not in the GPU. The worker warns when it plans that."""
    return {d: devices.count(d) for d in sorted(set(devices)) if d.startswith("cuda") and devices.count(d) > 1}


def parse_device(text: str) -> DeviceSpec:
    """Parse a device setting; ConfigError naming the valid spellings for anything else."""
    spec = text.strip().lower()
    if spec in ("auto", "cpu", "cuda"):
        return DeviceSpec(spec)
    kind, _, index = spec.partition(":")
    if kind == "cuda" and index.isdigit():
        return DeviceSpec("cuda", int(index))
    raise ConfigError(f"unknown device {text!r}; valid: {VALID}")
