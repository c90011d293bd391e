"""Bring a user's model into an imgpipe model file: a TorchScript file, or a torchvision architecture plus a
state dict. Checked for real before anything is written: a forward pass, one output per label, and the
written file computing what the original computes on fixed inputs (parity)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from imgpipe.errors import ConfigError, ModelFileError
from imgpipe.model import export, jit, modelfile
from imgpipe.model.net import AUX_PREFIXES, build_model, check_arch, fit_state_dict, head_keys, read_state_dict
from imgpipe.model.preprocess import Preset

# Parity of the written file against the original: float32 through the same kernels agrees far closer.
PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-4
CHECK_BATCH = 3  # images in the check batch: odd on purpose, so a batch size baked into the graph shows


def read_labels(path: Path) -> list[str]:
    """Labels from a text file (one per line, blank lines skipped) or JSON (a list, or a mapping of class index
    to name such as ``{"0": "cat", "1": "dog"}``). ConfigError for an empty or duplicated list."""
    if not path.is_file():
        raise ConfigError(f"labels file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        if isinstance(data, dict):
            try:
                items = sorted((int(k), v) for k, v in data.items())
            except ValueError:
                raise ConfigError(f"{path}: a JSON mapping must map class index to label") from None
            if [i for i, _ in items] != list(range(len(items))):
                raise ConfigError(f"{path}: class indices must be 0..{len(items) - 1} without gaps")
            data = [v[-1] if isinstance(v, list) else v for _, v in items]  # ImageNet style: [wnid, name]
        if not isinstance(data, list):
            raise ConfigError(f"{path}: expected a JSON list of labels or an index-to-label mapping")
        labels = [str(v) for v in data]
    else:
        labels = [line.strip() for line in text.splitlines() if line.strip()]
    if len(labels) < 2:
        raise ConfigError(f"{path}: needs at least 2 labels, found {len(labels)}")
    duplicated = sorted({label for label in labels if labels.count(label) > 1})
    if duplicated:
        raise ConfigError(f"{path}: duplicated labels {', '.join(duplicated[:5])}")
    return labels


def parse_floats(text: str, flag: str) -> tuple[float, ...]:
    """``0.485,0.456,0.406`` -> floats; ConfigError naming the flag."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated numbers like 0.485,0.456,0.406") from None


def make_preset(base: Preset | None, **given: Any) -> Preset:
    """``base`` (the weights' transforms) with the flags the user gave (non-None) on top; ConfigError when
    there is no base and a required one is missing."""
    given = {k: v for k, v in given.items() if v is not None}
    if base is None:
        missing = [f"--{k.replace('_', '-')}" for k in ("input_size", "mean", "std") if k not in given]
        if missing:
            raise ConfigError(
                f"no preprocessing is known for this model: give {', '.join(missing)} (what the model was trained with)"
            )
        n = len(given["mean"])
        base = Preset(
            input_size=int(given["input_size"]), channels=n if n in (1, 3) else 3, mean=(0.0,) * n, std=(1.0,) * n
        )
    fields = {**base.to_dict(), **given}
    if "channels" not in given and "mean" in given:
        fields["channels"] = len(fields["mean"])
    if "mean" not in given and "std" not in given and fields["channels"] != len(base.mean):
        raise ConfigError("--channels differs from the weights' preset: give --mean and --std too")
    try:
        return Preset.from_dict(fields)
    except ValueError as exc:
        raise ConfigError(f"preprocessing preset: {exc}") from None


def _first_line(exc: BaseException) -> str:
    """The informative line of an exception: TorchScript puts the interpreter's trace first and the error last."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return exc.__class__.__name__
    return (lines[-1] if "TorchScript interpreter" in lines[0] else lines[0])[:300]


def fixed_inputs(preset: Preset, batch: int = CHECK_BATCH) -> torch.Tensor:
    """(B, C, H, W) deterministic inputs in the range a normalised image takes."""
    generator = torch.Generator().manual_seed(1234)
    size = preset.input_size
    return torch.randn(batch, preset.channels, size, size, generator=generator).clamp(-2.5, 2.5)


def check_outputs(run: Callable[[torch.Tensor], Any], preset: Preset, labels: list[str], what: str) -> torch.Tensor:
    """A real forward pass on fixed inputs; the output must be (B, number of labels) logits."""
    x = fixed_inputs(preset)
    try:
        with torch.inference_mode():
            out = run(x)
    except Exception as exc:
        raise ConfigError(
            f"{what} fails on a ({CHECK_BATCH}, {preset.channels}, {preset.input_size}, {preset.input_size}) "
            f"batch: {_first_line(exc)} (check --input-size and --channels)"
        ) from None
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"{what} returns {type(out).__name__}, not one tensor of logits")
    if out.dim() != 2 or out.shape[0] != CHECK_BATCH:
        raise ConfigError(f"{what} returns shape {tuple(out.shape)}; expected (batch, classes) logits")
    if out.shape[1] != len(labels):
        raise ConfigError(f"label count mismatch: {what} has {out.shape[1]} outputs but --labels gives {len(labels)}")
    return out.float()


def write_checked(
    original: Callable[[torch.Tensor], Any],
    to_write: torch.nn.Module,
    out: Path,
    *,
    name: str,
    arch: str,
    arch_config: dict[str, Any],
    labels: list[str],
    preset: Preset,
    what: str,
    extra: dict[str, Any],
) -> export.Metadata:
    """Check ``original``, write ``to_write`` (its TorchScript form) and check the written file against it."""
    expected = check_outputs(original, preset, labels, what)
    metadata = export.export(
        to_write,
        out,
        name=name,
        arch=arch,
        arch_config=arch_config,
        labels=labels,
        preset=preset,
        val_accuracy=None,
        extra=extra,
    )
    try:
        module, _ = modelfile.load(out)
        with torch.inference_mode():
            got = module(fixed_inputs(preset))
        if not isinstance(got, torch.Tensor):
            raise ConfigError(f"the written file returns {type(got).__name__}, not one tensor of logits")
        got = got.float()
        if not torch.allclose(got, expected, atol=PARITY_ATOL, rtol=PARITY_RTOL):
            worst = float((got - expected).abs().max())
            raise ConfigError(f"parity check failed: the written file differs from {what} by up to {worst:.2e}")
    except BaseException:
        out.unlink(missing_ok=True)  # a file that fails its check is never left behind
        raise
    return metadata


def to_torchscript(net: torch.nn.Module, preset: Preset) -> torch.jit.ScriptModule:
    """Script ``net`` (keeps control flow); an architecture that cannot be scripted, or whose scripted form
    returns more than logits, is traced instead, which the parity check on another batch size then holds to
    the original."""
    net = net.eval().cpu()
    example = fixed_inputs(preset, batch=CHECK_BATCH - 1)
    try:
        scripted = jit.script(net)
        with torch.inference_mode():
            if isinstance(scripted(example), torch.Tensor):
                return scripted
    except Exception:
        pass
    # Not scriptable, or scripted it returns more than logits (GoogLeNet and Inception return a named tuple
    # of main and auxiliary outputs when scripted; in eval mode, eager and traced, the logits alone).
    return jit.trace(net, example)


def import_exported_program(
    source: Path, out: Path, *, labels: list[str], preset: Preset, name: str
) -> export.Metadata:
    """A ``torch.export`` program (``.pt2``): its module is traced to TorchScript on fixed inputs, then checked
    against the program on another batch size (a batch size baked into the program or the trace shows)."""
    try:
        program = torch.export.load(str(source))
    except Exception as exc:
        raise ModelFileError(f"{source}: not a torch.export program ({_first_line(exc)})") from None
    module = program.module()
    what = f"torch.export program {source.name}"
    check_outputs(module, preset, labels, what)
    try:
        traced = jit.trace(module, fixed_inputs(preset, batch=CHECK_BATCH - 1))
    except Exception as exc:
        raise ConfigError(f"{source}: cannot convert the program to TorchScript ({_first_line(exc)})") from None
    return write_checked(
        module,
        traced,
        out,
        name=name,
        arch="torch.export",
        arch_config={},
        labels=labels,
        preset=preset,
        what=what,
        extra={"imported_from": {"kind": "torch.export", "file": source.name}},
    )


def import_torchscript(source: Path, out: Path, *, labels: list[str], preset: Preset, name: str) -> export.Metadata:
    """Wrap an existing TorchScript file (scripted, traced or frozen) with labels and preset; a ``.pt2`` file
    is a ``torch.export`` program (import_exported_program)."""
    if not source.is_file():
        raise ConfigError(f"model file not found: {source}")
    if source.suffix == ".pt2":
        return import_exported_program(source, out, labels=labels, preset=preset, name=name)
    try:
        module = jit.load(source, {}, map_location="cpu").eval()
    except Exception as exc:
        head = source.read_bytes()[:2]
        if head[:1] == b"\x80":
            raise ModelFileError(f"{source}: a raw pickle, which imgpipe never loads (it can run code)") from None
        hint = "; a state dict needs --arch ARCH --state-dict FILE" if head == b"PK" else ""
        raise ModelFileError(f"{source}: not a TorchScript file ({_first_line(exc)}){hint}") from None
    return write_checked(
        module,
        module,
        out,
        name=name,
        arch="torchscript",
        arch_config={},
        labels=labels,
        preset=preset,
        what=f"TorchScript {source.name}",
        extra={"imported_from": {"kind": "torchscript", "file": source.name}},
    )


def import_state_dict(
    arch: str, state_path: Path, out: Path, *, labels: list[str], preset: Preset, name: str
) -> export.Metadata:
    """A torchvision architecture by name (or ``convnet``) built for ``len(labels)`` classes, the state dict
    loaded strictly: every key present, every shape equal, the head included."""
    check_arch(arch)
    if arch == "convnet":
        raise ConfigError("--arch convnet: import a file that `imgpipe train` wrote as it is; it needs no import")
    state = read_state_dict(state_path)
    net = build_model(arch, len(labels), preset.channels).eval()
    own = net.state_dict()
    resized = sorted(k for k in head_keys(arch, len(labels)) if k in state and state[k].shape != own[k].shape)
    if resized:
        outputs = int(state[resized[-1]].shape[0])
        raise ConfigError(
            f"label count mismatch: {state_path.name} has {outputs} outputs but --labels gives {len(labels)}"
        )
    fit_state_dict(
        net, {k: v for k, v in state.items() if not k.startswith(AUX_PREFIXES)}, f"{state_path.name} for {arch}"
    )
    return write_checked(
        net,
        to_torchscript(net, preset),
        out,
        name=name,
        arch=arch,
        arch_config={},
        labels=labels,
        preset=preset,
        what=f"{arch} with {state_path.name}",
        extra={"imported_from": {"kind": "state_dict", "file": state_path.name}},
    )
