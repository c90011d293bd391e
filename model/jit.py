"""The one place imgpipe touches the TorchScript API, and so the one place its deprecation is handled.

torch 2.14 marks torch.jit.script/save/load/freeze deprecated (FutureWarning, "switch to torch.export").
The serving format is still TorchScript, on purpose: one self-contained file, loadable without our Python
classes, with extra files for metadata. The warning is silenced here, only for these calls and only for
that message; everything else warns as usual. A ``torch.export`` format can be added next to this module:
the model file's metadata carries ``format`` so the loader can dispatch on it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

FORMAT = "torchscript"


@contextmanager
def _deprecation_acknowledged() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.jit\.\w+` is deprecated")
        yield


def script(module: torch.nn.Module) -> torch.jit.ScriptModule:
    with _deprecation_acknowledged():
        return torch.jit.script(module)


def trace(module: torch.nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """Record ``module`` on ``example`` (for programs that cannot be scripted, such as a torch.export module).

    A torch.export module's shape guards make the tracer warn that they become constants; the importer runs
    the traced file against the original on another batch size, which is the check that matters.
    """
    with _deprecation_acknowledged(), warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        return torch.jit.trace(module, example, check_trace=False)


def freeze(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    with _deprecation_acknowledged():
        return torch.jit.freeze(module)


def optimize_for_inference(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """Frozen and fused for inference (conv + batch-norm folded, oneDNN layouts on the CPU)."""
    with _deprecation_acknowledged():
        return torch.jit.optimize_for_inference(torch.jit.freeze(module.eval()))


def executor(optimize: bool) -> contextlib.AbstractContextManager[None]:
    """Whether the graph executor optimises the TorchScript calls made on this thread (a thread-local flag).

    Optimised, the profiling executor runs a graph a few times to record shapes, then specialises and fuses it,
    again for each new set of shapes, with guards checked on every call. On the CPU the engine serves a frozen,
    oneDNN-optimised module and keeps this on. On a GPU (H200, mobilenet_v3_small, scripts/gpu_configs.py) a warm
    batch of 64 ran about as fast either way (5.5 ms on, 5.1-6.9 off), but 8 new batch sizes cost 4.9 s on; off,
    the plain interpreter dispatches op by op as eager PyTorch does, and batch sizes cost only cuDNN's plans.
    """
    return torch.jit.optimized_execution(optimize)


def save(module: torch.jit.ScriptModule, path: Path | IO[bytes], extra_files: dict[str, str]) -> None:
    """Write a TorchScript archive to a file or a binary stream."""
    with _deprecation_acknowledged():
        torch.jit.save(module, str(path) if isinstance(path, Path) else path, _extra_files=extra_files)


def load(path: Path, extra_files: dict[str, Any], map_location: torch.device | str) -> torch.jit.ScriptModule:
    """Load a TorchScript archive; ``extra_files`` maps names to fill in (values become bytes)."""
    with _deprecation_acknowledged():
        return torch.jit.load(str(path), map_location=map_location, _extra_files=extra_files)
