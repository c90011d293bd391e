"""Read a model file back: refuse anything that is not ours (pickle, state dict, truncated, edited), then load it.

Writing one, and the model id's definition, is model/export.py.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

from imgpipe.errors import ModelFileError
from imgpipe.model import jit
from imgpipe.model.export import METADATA_FILE, Metadata, model_sha256, weights_sha256


def _describe_non_torchscript(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head[:1] == b"\x80":  # pickle protocol 2+ opcode
        return "it is a raw pickle, which imgpipe never loads (it can run code)"
    if head[:2] == b"PK":
        return "it is a damaged or truncated zip archive"
    return "it is not a TorchScript archive"


def read_metadata(path: Path, verify: bool = True) -> Metadata:
    """The metadata of a model file without loading its network (no torch.jit, so cheap for `model list`).

    ``verify`` recomputes the sha256 from the archive (metadata version 2), which reads every entry: a
    truncated, damaged or edited file is refused. Raises ModelFileError for anything that is not ours.
    """
    source = str(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {source}")
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{source}: {_describe_non_torchscript(path)}; make one with `imgpipe model import`")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if not any("/code/" in n for n in names):
                raise ModelFileError(
                    f"{source}: a zip archive without TorchScript code (a torch.save state dict?); "
                    "import it with `imgpipe model import --arch ARCH --state-dict FILE`"
                )
            meta_name = next((n for n in names if n.endswith("/extra/" + METADATA_FILE)), None)
            if meta_name is None:
                raise ModelFileError(
                    f"{source}: TorchScript file without imgpipe metadata ({METADATA_FILE}); "
                    "import it with `imgpipe model import`"
                )
            metadata = Metadata.from_json(archive.read(meta_name).decode(), source)
            if verify and metadata.version >= 2:
                actual = model_sha256(archive, metadata.labels, metadata.preset)
                if actual != metadata.sha256:
                    raise ModelFileError(
                        f"{source}: sha256 {actual[:12]} does not match metadata {metadata.sha256[:12]} "
                        "(the file was changed after export)"
                    )
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{source}: damaged or truncated model file ({exc})") from None
    return metadata


def load(path: Path, device: torch.device | str = "cpu") -> tuple[torch.jit.ScriptModule, Metadata]:
    """Load a model file and check it: TorchScript, imgpipe metadata present, sha256 matches its content.

    Anything else (a pickle, a ``torch.save`` state dict, a truncated file) is refused with ModelFileError.
    """
    source = str(path)
    metadata = read_metadata(path)
    extra: dict[str, Any] = {METADATA_FILE: ""}
    try:
        module = jit.load(path, extra, map_location=device)
    except Exception as exc:
        raise ModelFileError(f"{source}: cannot load TorchScript: {str(exc).splitlines()[0]}") from None
    if metadata.version == 1:  # files written before the sha256 covered graph, labels and preset
        actual = weights_sha256(module)
        if actual != metadata.sha256:
            raise ModelFileError(
                f"{source}: weights sha256 {actual[:12]} does not match metadata {metadata.sha256[:12]}"
            )
    return module.eval(), metadata
