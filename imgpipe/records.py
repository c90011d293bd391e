"""The result record (one per input path) and its JSONL/CSV writers.

A record's ``path`` is the path's escaped text form (imgpipe/paths.py): valid UTF-8 whatever the name's bytes,
so JSONL and CSV can always be written, and lossless.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from imgpipe.errors import ConfigError
from imgpipe.paths import path_text

Record = dict[str, Any]

FORMATS = ("jsonl", "csv")
CSV_FIELDS = ("path", "status", "label", "score", "topk", "error", "reason", "model")


def ok_record(path: str | bytes, topk: Sequence[tuple[str, float]], model: str) -> Record:
    """A classified image: best label, its probability, and the top-k list."""
    label, score = topk[0]
    return {
        "path": path_text(path),
        "status": "ok",
        "label": label,
        "score": round(float(score), 6),
        "topk": [[name, round(float(p), 6)] for name, p in topk],
        "model": model,
    }


def error_record(path: str | bytes, error: str, model: str, reason: str | None = None) -> Record:
    """An input that could not be classified, with the reason in words (and a bounded reason code)."""
    record: Record = {"path": path_text(path), "status": "error", "error": error, "model": model}
    if reason is not None:
        record["reason"] = reason
    return record


def format_for(path: str | Path | None, explicit: str | None = None) -> str:
    """Output format: an explicit choice, else the file's extension, else JSONL (stdout)."""
    if explicit is not None:
        if explicit not in FORMATS:
            raise ConfigError(f"unknown format {explicit!r}; valid: {', '.join(FORMATS)}")
        return explicit
    if path is None or str(path) == "-":
        return "jsonl"
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix in ("jsonl", "ndjson", "json"):
        return "jsonl"
    if suffix in ("csv",):
        return "csv"
    raise ConfigError(f"cannot tell the format of {str(path)!r} from its extension; use .jsonl or .csv")


class RecordWriter:
    """Writes records one at a time as JSONL lines or CSV rows (header first)."""

    def __init__(self, stream: IO[str], fmt: str) -> None:
        self.stream = stream
        self.fmt = format_for(None, fmt)
        self._csv: csv.DictWriter[str] | None = None
        if self.fmt == "csv":
            self._csv = csv.DictWriter(stream, fieldnames=CSV_FIELDS, extrasaction="ignore")
            self._csv.writeheader()

    def write(self, record: Record) -> None:
        if self._csv is not None:
            row = dict(record)
            if "topk" in row:
                row["topk"] = json.dumps(row["topk"])
            self._csv.writerow(row)
        else:
            self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")

    def write_all(self, records: Iterable[Record]) -> int:
        count = 0
        for record in records:
            self.write(record)
            count += 1
        return count


def read_records(path: str | Path) -> list[Record]:
    """Read a JSONL or CSV file written by RecordWriter back into records."""
    fmt = format_for(path)
    with open(path, encoding="utf-8", newline="") as fh:
        if fmt == "jsonl":
            return [json.loads(line) for line in fh if line.strip()]
        rows = []
        for row in csv.DictReader(fh):
            record: Record = {k: v for k, v in row.items() if v not in ("", None)}
            if "score" in record:
                record["score"] = float(record["score"])
            if "topk" in record:
                record["topk"] = json.loads(record["topk"])
            rows.append(record)
        return rows
