"""Train a network (from scratch or fine-tuned from pretrained weights) on an ImageFolder-layout directory
(DATA/train, DATA/val) and export the best epoch.

On the CPU training is deterministic: seeded generators, deterministic algorithms and a fixed thread count, so
the same command on one machine with one torch build writes a model with the same sha256 (other CPUs or torch
builds may round differently; that is not promised).
"""

from __future__ import annotations

import copy
import math
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from imgpipe.errors import ConfigError
from imgpipe.model import export
from imgpipe.model.data import FolderDataset, find_classes, iter_images
from imgpipe.model.engine import select_device
from imgpipe.model.evaluate import Evaluation, evaluate, save_curves_png, write_report
from imgpipe.model.importer import to_torchscript
from imgpipe.model.net import build_model, fit_state_dict, head_keys, preset_from_weights, pretrained_state
from imgpipe.model.preprocess import Preset


@dataclass(frozen=True)
class Augment:
    """Random affine per image, applied to whole batches on the training device."""

    rotate_deg: float = 10.0
    translate: float = 0.1  # fraction of the image size
    scale: float = 0.1  # zoom in [1 - scale, 1 + scale]
    hflip: bool = False  # off by default: mirrored digits or text are other classes


@dataclass(frozen=True)
class TrainConfig:
    arch: str = "convnet"
    widths: tuple[int, ...] = (32, 64, 128)
    convs_per_block: int = 2
    dropout: float = 0.2
    input_size: int | None = None  # None: the pretrained weights' crop size, else 32
    channels: int | None = None  # None: 1 if every sampled training image is grayscale, else 3
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    label_smoothing: float = 0.05
    seed: int = 0
    device: str = "auto"
    augment: Augment = field(default_factory=Augment)
    weights: str | None = None  # torchvision weights name (IMAGENET1K_V1, DEFAULT) or a state-dict file
    freeze_backbone: bool = False  # train only the head (needs weights); batch-norm statistics stay as loaded
    threads: int | None = None  # CPU threads while training; None: min(4, CPUs). Fixed so runs reproduce.

    def arch_config(self) -> dict[str, Any]:
        if self.arch == "convnet":
            return {"widths": list(self.widths), "convs_per_block": self.convs_per_block, "dropout": self.dropout}
        return {}


@dataclass
class TrainResult:
    metadata: export.Metadata
    evaluation: Evaluation
    best_epoch: int
    history: dict[str, list[float]]
    files: list[Path]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker init: numpy and random seeded from the worker's torch seed (itself from the loader's
    seeded generator), as the PyTorch reproducibility notes recommend."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


@contextmanager
def deterministic(device: torch.device, threads: int) -> Iterator[None]:
    """Deterministic algorithms and a fixed thread count for the duration of training on the CPU; restored after.

    On CUDA some kernels used here (grid_sample's backward) have no deterministic version: GPU runs are
    seeded but not bit-reproducible.
    """
    if device.type != "cpu":
        yield
        return
    was_deterministic, was_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(was_threads)


def freeze_backbone(net: nn.Module, head: set[str]) -> list[nn.Parameter]:
    """Parameters outside ``head`` stop learning; returns the head's parameters (what the optimizer gets)."""
    trainable = []
    for key, param in net.named_parameters():
        param.requires_grad_(key in head)
        if key in head:
            trainable.append(param)
    return trainable


def hold_frozen_statistics(net: nn.Module) -> None:
    """Batch-norm layers with no trainable parameter run in eval mode, so a frozen backbone stays bit-identical
    (train mode would update their running statistics)."""
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in module.parameters()
        ):
            module.eval()


def random_affine(images: torch.Tensor, aug: Augment, generator: torch.Generator) -> torch.Tensor:
    """(B, C, H, W) -> the same batch, each image rotated, shifted, zoomed (and flipped) at random."""
    b = images.shape[0]
    dev = images.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return (torch.rand(b, generator=generator) * (high - low) + low).to(dev)

    angle = uniform(-aug.rotate_deg, aug.rotate_deg) * math.pi / 180
    zoom = uniform(1 - aug.scale, 1 + aug.scale)
    tx, ty = uniform(-aug.translate, aug.translate) * 2, uniform(-aug.translate, aug.translate) * 2
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    flip = torch.where(torch.rand(b, generator=generator).to(dev) < 0.5, -1.0, 1.0) if aug.hflip else 1.0
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)  # (B,2,3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="border", align_corners=False)


def detect_channels(train_dir: Path, sample: int = 32) -> int:
    """1 when every sampled image is grayscale, else 3."""
    from PIL import Image

    for i, path in enumerate(iter_images(train_dir)):
        if i >= sample:
            break
        with Image.open(path) as image:
            if image.mode not in ("L", "1", "I;16", "I"):
                return 3
    return 1


def channel_stats(dataset: FolderDataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the (unnormalised) training images."""
    n = min(len(dataset), 5000)
    batch = torch.stack([dataset[i][0] for i in range(0, len(dataset), max(1, len(dataset) // n))])  # (n, C, H, W)
    mean = batch.mean(dim=(0, 2, 3)).tolist()
    std = batch.std(dim=(0, 2, 3)).clamp(min=1e-3).tolist()
    return tuple(round(v, 4) for v in mean), tuple(round(v, 4) for v in std)


def train(data: Path, out: Path, config: TrainConfig, name: str | None = None, progress: bool = True) -> TrainResult:
    """Train, keep the epoch with the best validation accuracy, export it with metadata and a report."""
    train_dir, val_dir = data / "train", data / "val"
    for split in (train_dir, val_dir):
        if not split.is_dir():
            raise ConfigError(f"{data} must hold train/<label>/ and val/<label>/ folders; {split} is missing")
    if config.freeze_backbone and not config.weights:
        raise ConfigError("--freeze-backbone needs --weights (a backbone to keep)")
    device = select_device(config.device)
    threads = config.threads or min(4, os.cpu_count() or 1)
    with deterministic(device, threads):
        return _train(data, out, config, name, progress, device, threads)


def _train(
    data: Path, out: Path, config: TrainConfig, name: str | None, progress: bool, device: torch.device, threads: int
) -> TrainResult:
    train_dir, val_dir = data / "train", data / "val"
    seed_everything(config.seed)
    classes = find_classes(train_dir)
    channels = config.channels or detect_channels(train_dir)
    if config.arch != "convnet" and channels != 3:
        channels = 3
    pretrained, weights_name = pretrained_state(config.arch, config.weights) if config.weights else ({}, None)
    if config.weights and config.arch != "convnet":
        # Pretrained features expect the inputs they were trained on: the weights' own transforms.
        known = preset_from_weights(config.arch, weights_name)
        size = config.input_size or known.input_size
        preset = Preset(input_size=size, channels=3, mean=known.mean, std=known.std, crop_ratio=known.crop_ratio)
    else:
        size = config.input_size or 32
        raw = Preset(input_size=size, channels=channels, mean=(0.0,) * channels, std=(1.0,) * channels)
        mean, std = channel_stats(FolderDataset(train_dir, raw, classes, cache=False))  # decodes only its sample
        preset = Preset(input_size=size, channels=channels, mean=mean, std=std)
    train_set = FolderDataset(train_dir, preset, classes)
    val_set = FolderDataset(val_dir, preset, classes)

    loader_args: dict[str, Any] = {"batch_size": config.batch_size}
    if not train_set.cached:
        loader_args.update(num_workers=2, persistent_workers=True, worker_init_fn=seed_worker)
    generator = torch.Generator().manual_seed(config.seed)
    train_loader = torch.utils.data.DataLoader(
        train_set, shuffle=True, generator=generator, drop_last=False, **loader_args
    )
    val_loader = torch.utils.data.DataLoader(val_set, shuffle=False, **loader_args)

    net = build_model(config.arch, len(classes), channels, **config.arch_config())
    head = head_keys(config.arch, len(classes), **config.arch_config()) if config.weights else set()
    if config.weights:
        fit_state_dict(net, pretrained, f"--weights {config.weights}", resizable=head)
    params = freeze_backbone(net, head) if config.freeze_backbone else list(net.parameters())
    net = net.to(device)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * len(train_loader), pct_start=0.2
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    aug_gen = torch.Generator().manual_seed(config.seed + 1)

    history: dict[str, list[float]] = {"train_loss": [], "train_acc": [], "val_loss": [], "val_acc": []}
    best: tuple[float, float] = (-1.0, float("inf"))
    best_state: dict[str, torch.Tensor] = {}
    best_eval: Evaluation | None = None
    best_epoch = 0
    bar = tqdm(range(1, config.epochs + 1), desc="train", unit="epoch", disable=not progress, dynamic_ncols=True)
    for epoch in bar:
        net.train()
        if config.freeze_backbone:
            hold_frozen_statistics(net)
        seen, correct, loss_sum = 0, 0, 0.0
        for images, targets in train_loader:  # (B, C, H, W), (B,)
            images, targets = images.to(device), targets.to(device)
            images = random_affine(images, config.augment, aug_gen)
            logits = net(images)
            loss = criterion(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(targets)
            correct += int((logits.argmax(1) == targets).sum())
            loss_sum += float(loss.detach()) * len(targets)
        val = evaluate(net, val_loader, classes, device)
        history["train_loss"].append(loss_sum / seen)
        history["train_acc"].append(correct / seen)
        history["val_loss"].append(val.loss)
        history["val_acc"].append(val.accuracy)
        if (val.accuracy, -val.loss) > (best[0], -best[1]):
            best, best_epoch, best_eval = (val.accuracy, val.loss), epoch, val
            best_state = copy.deepcopy(net.state_dict())
        bar.set_postfix(
            loss=f"{loss_sum / seen:.3f}", val_acc=f"{val.accuracy:.4f}", best=f"{best[0]:.4f}@{best_epoch}"
        )
    bar.close()
    assert best_eval is not None

    net.load_state_dict(best_state)
    metadata = export.export(
        to_torchscript(net.cpu(), preset),
        out,
        name=name or out.stem,
        arch=config.arch,
        arch_config=config.arch_config(),
        labels=classes,
        preset=preset,
        val_accuracy=round(best_eval.accuracy, 6),
        extra={
            "best_epoch": best_epoch,
            "epochs": config.epochs,
            "train_images": len(train_set),
            "val_images": len(val_set),
            "seed": config.seed,
            "threads": threads,
            "weights": config.weights if weights_name is None else weights_name,
            "config": asdict(config),
        },
    )
    prefix = out.with_suffix("")
    files = write_report(best_eval, prefix, {"model": metadata.model_id, "best_epoch": best_epoch, "history": history})
    curves = prefix.with_name(prefix.name + ".curves.png")
    save_curves_png(history, curves)
    return TrainResult(metadata, best_eval, best_epoch, history, [out, *files, curves])
