"""The imgpipe CNN (stacked conv + batch-norm + ReLU + max-pool blocks, then a classifier head),
plus torchvision architectures by name for bigger data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

ARCHITECTURES = ("convnet", "resnet18", "mobilenet_v3_small")


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


def build_model(arch: str, num_classes: int, in_channels: int, **config: Any) -> nn.Module:
    """Build an untrained network by name; ``config`` is the architecture's own options."""
    if arch == "convnet":
        return ConvNet(num_classes, in_channels=in_channels, **config)
    if arch in ("resnet18", "mobilenet_v3_small"):
        if in_channels != 3:
            raise ValueError(f"{arch} takes RGB input: use channels=3")
        import torchvision.models as tvm

        factory = getattr(tvm, arch)
        return factory(weights=None, num_classes=num_classes, **config)  # weights=None: never downloads
    raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHITECTURES)}")
