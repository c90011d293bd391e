"""Export a network as one TorchScript file carrying its metadata, and the model id that names it.

Reading a file back, with its checks, is model/modelfile.py.

The model id is ``name@sha256-prefix``. The sha256 covers everything that changes a prediction: the weights
and the graph (every entry of the TorchScript archive: tensors, code, constants) plus the labels and the
preprocessing preset. So a frozen TorchScript file (weights folded into constants, empty state dict) has its
own id, and a copy of a model with other labels gets a new one.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickletools
import re
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
METADATA_VERSION = 2  # 2: sha256 of archive + labels + preset; 1: sha256 of the state dict only (still read)
SUPPORTED_VERSIONS = (1, 2)
REQUIRED_KEYS = ("format", "version", "name", "arch", "labels", "preset", "sha256")


@dataclass(frozen=True)
class Metadata:
    """What the model file says about itself; enough for serving with nothing else."""

    name: str
    arch: str
    arch_config: dict[str, Any]
    labels: tuple[str, ...]
    preset: Preset
    sha256: str  # model_sha256: weights, graph, labels and preset; checked at load
    val_accuracy: float | None
    torch_version: str
    created: float
    extra: dict[str, Any]
    version: int = METADATA_VERSION

    @property
    def model_id(self) -> str:
        """``name@sha256-prefix``: what every result record names as its model."""
        return f"{self.name}@{self.sha256[:12]}"

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": jit.FORMAT,
                "version": self.version,
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
        if data["version"] not in SUPPORTED_VERSIONS:
            raise ModelFileError(
                f"{source}: metadata version {data['version']} is not supported "
                f"(valid: {', '.join(map(str, SUPPORTED_VERSIONS))}); a newer imgpipe wrote it?"
            )
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
            version=int(data["version"]),
        )


def weights_sha256(module: nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes and bytes, in order): the id of metadata version 1."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


# TorchScript numbers a class that is compiled again with another layout (``___torch_mangle_7``) from a
# process-wide counter: the same model scripted after others gets other numbers. They are names, not
# behaviour, so the hash reads them as one.
_MANGLE = re.compile(rb"___torch_mangle_\d+")
# Class-level declarations in TorchScript's generated code (``  groups : Final[int] = 1``): torch writes them in
# the order of a Python set, which changes with the interpreter's hash seed, so the hash sorts each run of them.
_DECLARATION = re.compile(rb"^  \w+ : ")
# Archive entries that do not change a prediction: our metadata, source-location debug tables (they hold the
# path of the Python file that defined the model) and the writer's own id of the archive.
_NOT_HASHED = re.compile(r"(^|/)(extra/.*|.*\.debug_pkl|\.data/serialization_id)$")


def archive_digests(archive: zipfile.ZipFile) -> list[tuple[str, str]]:
    """(entry, sha256) for every entry of a TorchScript archive that changes a prediction, in a canonical order.

    Entry names lose the archive's top folder (it is taken from the file name at save time) and the mangle
    counters. Reading every entry also finds a truncated or corrupted file (zip CRC check).
    """
    rows = []
    for info in archive.infolist():
        name = info.filename.split("/", 1)[1] if "/" in info.filename else info.filename
        if info.is_dir() or _NOT_HASHED.search(name):
            continue
        data = archive.read(info)
        if name.endswith(".pkl"):
            data = _canonical_pickle(data)
        if name.startswith("code/"):
            data = _canonical_code(_MANGLE.sub(b"___torch_mangle", data))
        rows.append((_MANGLE.sub(b"___torch_mangle", name.encode()).decode(), hashlib.sha256(data).hexdigest()))
    return sorted(rows)


def _canonical_code(source: bytes) -> bytes:
    """Generated TorchScript code with each run of class-level declarations in sorted order."""
    lines, run, out = source.split(b"\n"), [], []
    for line in lines:
        if _DECLARATION.match(line):
            run.append(line)
            continue
        out += [*sorted(run), line]
        run = []
    return b"\n".join(out + sorted(run))


_MEMO_PUT = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}


def _canonical_pickle(data: bytes) -> bytes:
    """The opcodes of a pickle with its memo bookkeeping made canonical: a module saved straight after scripting
    and the same module saved after loading memoize different objects (same tree, other bytes). Memo writes are
    dropped and each memo read names the position of the object it refers to."""
    out: list[str] = []
    memo: dict[object, int] = {}
    position = 0
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name in _MEMO_PUT:
            memo[len(memo) if opcode.name == "MEMOIZE" else arg] = position
            continue
        out.append(f"{opcode.name} {memo.get(arg) if opcode.name in _MEMO_GET else arg!r}")
        position += 1
    return _MANGLE.sub(b"___torch_mangle", "\n".join(out).encode())


def model_sha256(archive: zipfile.ZipFile, labels: tuple[str, ...] | list[str], preset: Preset) -> str:
    """sha256 of what changes a prediction: the archive's weights and graph, the labels and the preset."""
    digest = hashlib.sha256()
    for name, entry_digest in archive_digests(archive):
        digest.update(f"{name}\0{entry_digest}\n".encode())
    digest.update(json.dumps({"labels": list(labels), "preset": preset.to_dict()}, sort_keys=True).encode())
    return digest.hexdigest()


def export(
    net: nn.Module,
    path: Path,
    *,
    name: str,
    arch: str,
    arch_config: dict[str, Any],
    labels: list[str] | tuple[str, ...],
    preset: Preset,
    val_accuracy: float | None,
    extra: dict[str, Any] | None = None,
    created: float | None = None,
) -> Metadata:
    """Write ``net`` (an eager module, scripted here in eval mode on the CPU, or a ScriptModule as it is) with its
    metadata to ``path``; the file appears complete or not at all."""
    scripted = net if isinstance(net, torch.jit.ScriptModule) else jit.script(net.eval().cpu())
    scripted = scripted.eval()
    buffer = io.BytesIO()
    jit.save(scripted, buffer, {})
    with zipfile.ZipFile(buffer) as archive:
        sha = model_sha256(archive, labels, preset)
    metadata = Metadata(
        name=name,
        arch=arch,
        arch_config=arch_config,
        labels=tuple(labels),
        preset=preset,
        sha256=sha,
        val_accuracy=val_accuracy,
        torch_version=torch.__version__,
        created=time.time() if created is None else created,
        extra=extra or {},
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        jit.save(scripted, tmp, {METADATA_FILE: metadata.to_json()})
        with zipfile.ZipFile(tmp) as archive:
            written = model_sha256(archive, labels, preset)
        if written != sha:  # torch.jit.save wrote other bytes for the same module: never ship a wrong id
            raise RuntimeError(f"{path}: sha256 of the written archive {written[:12]} differs from {sha[:12]}")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return metadata
