"""The imgpipe CNN (stacked conv + batch-norm + ReLU + max-pool blocks, then a classifier head), every
torchvision classification architecture by name, and pretrained weights (a torchvision name or a local file)
loaded into them with the head resized to the labels."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgpipe.errors import ConfigError
from imgpipe.model.preprocess import Preset


class ConvBlock(nn.Sequential):
    """``convs`` x (3x3 conv -> batch-norm -> ReLU), then 2x2 max-pool: halves H and W."""

    def __init__(self, in_channels: int, out_channels: int, convs: int = 2) -> None:
        layers: list[nn.Module] = []
        for i in range(convs):
            layers += [
                nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.MaxPool2d(2))
        super().__init__(*layers)


class ConvNet(nn.Module):
    """Feature hierarchy: each block sees a wider receptive field at half the resolution.

    With input 32 and widths (32, 64, 128): (B, C, 32, 32) -> (B, 32, 16, 16) -> (B, 64, 8, 8)
    -> (B, 128, 4, 4) -> global average pool (B, 128) -> dropout -> linear (B, num_classes).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        widths: Sequence[int] = (32, 64, 128),
        convs_per_block: int = 2,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if not widths:
            raise ValueError("widths needs at least one block")
        blocks = []
        channels = in_channels
        for width in widths:
            blocks.append(ConvBlock(channels, width, convs_per_block))
            channels = width
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        x = self.features(x)  # (B, widths[-1], H / 2^depth, W / 2^depth)
        x = torch.flatten(self.pool(x), 1)  # (B, widths[-1])
        return self.classifier(self.dropout(x))  # (B, num_classes) logits


def architectures() -> list[str]:
    """``convnet`` plus every torchvision classification architecture (``torchvision.models.list_models``)."""
    import torchvision

    return ["convnet", *torchvision.models.list_models(module=torchvision.models)]


def check_arch(arch: str) -> None:
    """ConfigError naming close matches when ``arch`` is not an architecture imgpipe can build."""
    valid = architectures()
    if arch not in valid:
        close = difflib.get_close_matches(arch, valid, n=4, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "valid: convnet or a torchvision classification model"
        raise ConfigError(f"unknown architecture {arch!r}; {hint} (all {len(valid)}: torchvision.models.list_models())")


def build_model(arch: str, num_classes: int, in_channels: int, **config: Any) -> nn.Module:
    """Build an untrained network by name; ``config`` is the architecture's own options. Never downloads."""
    if arch == "convnet":
        return ConvNet(num_classes, in_channels=in_channels, **config)
    check_arch(arch)
    if in_channels != 3:
        raise ConfigError(f"{arch} takes RGB input: use channels=3")
    import torchvision

    # Inception-style aux heads only matter with their own loss; serving uses the main head.
    extra = {"aux_logits": False, "init_weights": True} if arch in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **{**extra, **config})


AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")


def head_keys(arch: str, num_classes: int, **config: Any) -> set[str]:
    """State-dict keys whose shape depends on the number of classes: the classifier head, found by building
    the architecture twice on the meta device (no memory, no weights) with two class counts."""
    with torch.device("meta"):
        a = build_model(arch, num_classes, 3, **config).state_dict()
        b = build_model(arch, num_classes + 1, 3, **config).state_dict()
    return {k for k in a if a[k].shape != b[k].shape}


def weights_enum(arch: str, name: str) -> Any:
    """The torchvision weights ``name`` (``IMAGENET1K_V1``, ``DEFAULT``) of ``arch``; ConfigError listing the
    valid names."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        raise ConfigError(f"{arch} has no torchvision weights; give a weights file instead") from None
    names = [*enum.__members__]
    key = name.split(".")[-1]
    if key not in enum.__members__:
        raise ConfigError(f"{arch} has no weights {name!r}; valid: {', '.join(names)}, or a local file")
    return enum[key]


def preset_from_weights(arch: str, name: str | None) -> Preset:
    """The preprocessing of torchvision's ``arch`` weights ``name`` (default: the arch's DEFAULT weights):
    crop size, resize-to-crop ratio, mean and std. Read from torchvision's tables; nothing is downloaded."""
    transforms = weights_enum(arch, name or "DEFAULT").transforms()
    crop, resize = int(transforms.crop_size[0]), int(transforms.resize_size[0])
    return Preset(
        input_size=crop,
        channels=3,
        mean=tuple(float(v) for v in transforms.mean),
        std=tuple(float(v) for v in transforms.std),
        crop_ratio=round(crop / resize, 6) if resize >= crop else 1.0,
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: ``.safetensors`` through the safetensors package, else ``torch.load`` with
    ``weights_only=True`` (tensors and plain containers; a pickle that would run code is refused).

    Checkpoints that wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``) and DDP's ``module.``
    prefix are unwrapped.
    """
    if not path.is_file():
        raise ConfigError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ConfigError(
                f"{path}: reading .safetensors needs the safetensors package: pip install safetensors"
            ) from None
        try:
            state: Any = load_file(str(path))
        except Exception as exc:
            raise ConfigError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise ConfigError(f"{path}: not a state dict torch can load safely ({first[:200]})") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state)


def fit_state_dict(
    net: nn.Module, state: Mapping[str, torch.Tensor], source: str, resizable: set[str] | None = None
) -> list[str]:
    """Copy ``state`` into ``net``; keys in ``resizable`` (the head) whose shapes differ keep ``net``'s fresh
    init. Returns the keys left fresh. ConfigError, one line, when anything else does not fit."""
    resizable = resizable or set()
    own = net.state_dict()
    missing = [k for k in own if k not in state and k not in resizable]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape and k not in resizable]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatch(es), e.g. {k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise ConfigError(f"{source} does not fit: {'; '.join(parts)}")
    fresh = [k for k in resizable if k not in state or state[k].shape != own[k].shape]
    net.load_state_dict({**own, **{k: v for k, v in state.items() if k not in fresh}})
    return sorted(fresh)


def pretrained_state(arch: str, weights: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """(state dict, torchvision weights name or None) for ``--weights``: an existing file is read as a state
    dict; anything else is a torchvision weights name, downloaded (and cached) as torchvision does."""
    path = Path(weights).expanduser()
    if path.is_file() or path.suffix in (".pth", ".pt", ".safetensors", ".bin") or "/" in weights:
        return read_state_dict(path), None
    enum = weights_enum(arch, weights)
    try:
        state = enum.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # offline, proxy, a corrupt cache entry: say so in one line
        raise ConfigError(
            f"cannot fetch torchvision weights {arch} {enum.name} from {enum.url} ({exc.__class__.__name__}: "
            f"{str(exc)[:120]}); download it elsewhere and pass the file to --weights"
        ) from None
    # Inception-style auxiliary heads are built off (build_model): their pretrained tensors are not needed.
    return {k: v for k, v in state.items() if not k.startswith(AUX_PREFIXES)}, enum.name
