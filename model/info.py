"""What a model file holds, for `imgpipe model info` and `imgpipe model list`: one dict per file, and the
human renderings of it."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from imgpipe.errors import ModelFileError
from imgpipe.model import export, modelfile

MODEL_SUFFIXES = (".pt", ".pts", ".ts", ".torchscript")


def describe(path: Path, metadata: export.Metadata) -> dict[str, Any]:
    """The JSON form of ``model info``: every metadata field plus the file's id, size and origin."""
    extra = metadata.extra
    source = extra.get("imported_from") or (
        {"kind": "trained", "best_epoch": extra.get("best_epoch"), "epochs": extra.get("epochs")}
        if "best_epoch" in extra
        else {"kind": "unknown"}
    )
    return {
        "file": str(path),
        "bytes": path.stat().st_size,
        "id": metadata.model_id,
        "name": metadata.name,
        "sha256": metadata.sha256,
        "arch": metadata.arch,
        "arch_config": metadata.arch_config,
        "labels": list(metadata.labels),
        "preset": metadata.preset.to_dict(),
        "val_accuracy": metadata.val_accuracy,
        "torch_version": metadata.torch_version,
        "created": metadata.created,
        "metadata_version": metadata.version,
        "source": source,
        **({"weights": extra["weights"]} if extra.get("weights") else {}),
    }


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _labels(labels: list[str], shown: int = 8) -> str:
    head = ", ".join(labels[:shown])
    return f"{len(labels)}: {head}" + (f", ... ({len(labels) - shown} more)" if len(labels) > shown else "")


def _preset(p: dict[str, Any]) -> str:
    numbers = lambda values: ",".join(f"{v:g}" for v in values)  # noqa: E731
    mode = "RGB" if p["channels"] == 3 else "grayscale"
    crop = f", resize {round(p['input_size'] / p['crop_ratio'])} then centre crop" if p["crop_ratio"] < 1 else ""
    return f"{p['input_size']}x{p['input_size']} {mode}{crop}, mean {numbers(p['mean'])}, std {numbers(p['std'])}"


def _source(s: dict[str, Any]) -> str:
    if s.get("kind") == "trained":
        return f"trained by imgpipe (best epoch {s.get('best_epoch')}/{s.get('epochs')})"
    if s.get("kind") in ("torchscript", "state_dict", "torch.export"):
        return f"imported from {s.get('file')} ({s['kind'].replace('_', ' ')})"
    return "unknown"


def render(info: dict[str, Any]) -> str:
    """``model info``'s table: one field per line."""
    accuracy = info["val_accuracy"]
    created = datetime.datetime.fromtimestamp(info["created"], datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    arch = info["arch"] + (f" {info['arch_config']}" if info["arch_config"] else "")
    rows = [
        ("id", info["id"]),
        ("name", info["name"]),
        ("file", f"{info['file']} ({_size(info['bytes'])})"),
        ("arch", arch),
        ("labels", _labels(info["labels"])),
        ("preset", _preset(info["preset"])),
        ("accuracy", "not measured" if accuracy is None else f"{accuracy:.4f} (validation)"),
        ("source", _source(info["source"]) + (f", from weights {info['weights']}" if info.get("weights") else "")),
        ("sha256", info["sha256"]),
        ("torch", info["torch_version"]),
        ("created", created),
        ("format", f"torchscript, metadata v{info['metadata_version']}"),
    ]
    return "\n".join(f"{key:<9} {value}" for key, value in rows)


def list_folder(folder: Path) -> list[dict[str, Any]]:
    """One entry per model-like file in ``folder`` (recursive, name order): its info, or why it is not one.

    Reads each file's metadata and verifies its sha256 without loading the network.
    """
    rows: list[dict[str, Any]] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in MODEL_SUFFIXES):
        try:
            rows.append(describe(path, modelfile.read_metadata(path)))
        except ModelFileError as exc:
            rows.append({"file": str(path), "bytes": path.stat().st_size, "error": str(exc).removeprefix(f"{path}: ")})
    return rows


def render_list(rows: list[dict[str, Any]]) -> str:
    """``model list``'s table: one line per file."""
    header = ("ID", "ARCH", "LABELS", "INPUT", "ACCURACY", "SIZE", "FILE")
    lines = [header]
    for row in rows:
        if "error" in row:
            lines.append(
                ("-", "-", "-", "-", "-", _size(row["bytes"]), f"{row['file']}  (not a model: {row['error']})")
            )
            continue
        accuracy = "-" if row["val_accuracy"] is None else f"{row['val_accuracy']:.4f}"
        size = f"{row['preset']['input_size']} {'RGB' if row['preset']['channels'] == 3 else 'gray'}"
        lines.append(
            (row["id"], row["arch"], str(len(row["labels"])), size, accuracy, _size(row["bytes"]), row["file"])
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False)) + "  " + line[-1] for line in lines
    )
