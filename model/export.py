"""Export a trained network as one TorchScript file carrying its metadata, and load it back with checks."""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgpipe.errors import ModelFileError
from imgpipe.model import jit
from imgpipe.model.preprocess import Preset

METADATA_FILE = "imgpipe.json"
METADATA_VERSION = 1
REQUIRED_KEYS = ("format", "version", "name", "arch", "labels", "preset", "sha256")


@dataclass(frozen=True)
class Metadata:
    """What the model file says about itself; enough for serving with nothing else."""

    name: str
    arch: str
    arch_config: dict[str, Any]
    labels: tuple[str, ...]
    preset: Preset
    sha256: str  # of the weights (state dict tensors in order), checked at load
    val_accuracy: float | None
    torch_version: str
    created: float
    extra: dict[str, Any]

    @property
    def model_id(self) -> str:
        """``name@sha256-prefix``: what every result record names as its model."""
        return f"{self.name}@{self.sha256[:12]}"

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": jit.FORMAT,
                "version": METADATA_VERSION,
                "name": self.name,
                "arch": self.arch,
                "arch_config": self.arch_config,
                "labels": list(self.labels),
                "preset": self.preset.to_dict(),
                "sha256": self.sha256,
                "val_accuracy": self.val_accuracy,
                "torch_version": self.torch_version,
                "created": self.created,
                **({"extra": self.extra} if self.extra else {}),
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str, source: str) -> Metadata:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelFileError(f"{source}: imgpipe metadata is not valid JSON ({exc})") from None
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise ModelFileError(f"{source}: imgpipe metadata lacks {', '.join(missing)}")
        if data["format"] != jit.FORMAT:
            raise ModelFileError(f"{source}: model format {data['format']!r} is not supported; valid: {jit.FORMAT}")
        if data["version"] != METADATA_VERSION:
            raise ModelFileError(f"{source}: metadata version {data['version']} is not supported")
        return cls(
            name=str(data["name"]),
            arch=str(data["arch"]),
            arch_config=dict(data.get("arch_config") or {}),
            labels=tuple(str(label) for label in data["labels"]),
            preset=Preset.from_dict(data["preset"]),
            sha256=str(data["sha256"]),
            val_accuracy=data.get("val_accuracy"),
            torch_version=str(data.get("torch_version", "")),
            created=float(data.get("created", 0.0)),
            extra=dict(data.get("extra") or {}),
        )


def weights_sha256(module: nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes and bytes, in order): identifies the weights."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def export(
    net: nn.Module,
    path: Path,
    *,
    name: str,
    arch: str,
    arch_config: dict[str, Any],
    labels: list[str],
    preset: Preset,
    val_accuracy: float | None,
    extra: dict[str, Any] | None = None,
) -> Metadata:
    """Script ``net`` (eval mode, on the CPU) and write it with its metadata to ``path``."""
    net = net.eval().cpu()
    scripted = jit.script(net)
    metadata = Metadata(
        name=name,
        arch=arch,
        arch_config=arch_config,
        labels=tuple(labels),
        preset=preset,
        sha256=weights_sha256(scripted),
        val_accuracy=val_accuracy,
        torch_version=torch.__version__,
        created=time.time(),
        extra=extra or {},
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    jit.save(scripted, tmp, {METADATA_FILE: metadata.to_json()})
    tmp.replace(path)
    return metadata


def _describe_non_torchscript(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head[:1] == b"\x80":  # pickle protocol 2+ opcode
        return "it is a raw pickle, which imgpipe never loads (it can run code)"
    return "it is not a TorchScript archive"


def load(path: Path, device: torch.device | str = "cpu") -> tuple[torch.jit.ScriptModule, Metadata]:
    """Load a model file and check it: TorchScript, imgpipe metadata present, weights match their sha256.

    Anything else (a pickle, a ``torch.save`` state dict, a truncated file) is refused with ModelFileError.
    """
    source = str(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {source}")
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{source}: {_describe_non_torchscript(path)}; export one with `imgpipe train`")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if not any("/code/" in n for n in names):
        raise ModelFileError(
            f"{source}: a zip archive without TorchScript code (a torch.save state dict?); "
            "imgpipe loads only TorchScript files it exported"
        )
    extra: dict[str, Any] = {METADATA_FILE: ""}
    try:
        module = jit.load(path, extra, map_location=device)
    except Exception as exc:
        raise ModelFileError(f"{source}: cannot load TorchScript: {str(exc).splitlines()[0]}") from None
    raw = extra[METADATA_FILE]
    if not raw:
        raise ModelFileError(f"{source}: TorchScript file without imgpipe metadata ({METADATA_FILE})")
    metadata = Metadata.from_json(raw.decode() if isinstance(raw, bytes) else raw, source)
    actual = weights_sha256(module)
    if actual != metadata.sha256:
        raise ModelFileError(f"{source}: weights sha256 {actual[:12]} does not match metadata {metadata.sha256[:12]}")
    return module.eval(), metadata
