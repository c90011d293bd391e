"""Evaluation: accuracy, per-class precision/recall, confusion matrix, and the report's PNG plots."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    loss: float
    classes: list[str]
    precision: list[float]
    recall: list[float]
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    count: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        loss = "" if math.isnan(self.loss) else f" (loss {self.loss:.4f})"
        lines = [
            f"accuracy {self.accuracy:.4f} on {self.count} images{loss}",
            f"{'class':>12} {'precision':>9} {'recall':>7}",
        ]
        for name, p, r in zip(self.classes, self.precision, self.recall, strict=True):
            lines.append(f"{name:>12} {p:9.4f} {r:7.4f}")
        return "\n".join(lines)


def confusion_stats(
    targets: torch.Tensor, predictions: torch.Tensor, classes: Sequence[str], loss: float = float("nan")
) -> Evaluation:
    """(N,) true and predicted class indices -> accuracy, precision, recall, confusion matrix."""
    k = len(classes)
    cm = torch.bincount(targets * k + predictions, minlength=k * k).reshape(k, k)  # (true, predicted)
    tp = cm.diag().double()
    precision = tp / cm.sum(0).clamp(min=1).double()
    recall = tp / cm.sum(1).clamp(min=1).double()
    return Evaluation(
        accuracy=float(tp.sum() / max(1, len(targets))),
        loss=loss,
        classes=list(classes),
        precision=[round(float(v), 6) for v in precision],
        recall=[round(float(v), 6) for v in recall],
        confusion=cm.tolist(),
        count=len(targets),
    )


def evaluate(
    net: nn.Module, loader: torch.utils.data.DataLoader[Any], classes: Sequence[str], device: torch.device
) -> Evaluation:
    """Run ``net`` over ``loader`` of (images, targets) batches without gradients."""
    net.eval()
    total_loss, targets, predictions = 0.0, [], []
    with torch.inference_mode():
        for images, target in loader:  # (B, C, H, W), (B,)
            logits = net(images.to(device))
            total_loss += float(nn.functional.cross_entropy(logits, target.to(device), reduction="sum"))
            predictions.append(logits.argmax(1).cpu())
            targets.append(target)
    t, p = torch.cat(targets), torch.cat(predictions)
    return confusion_stats(t, p, classes, loss=total_loss / max(1, len(t)))


def save_confusion_png(evaluation: Evaluation, path: Path, title: str = "Confusion matrix") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(evaluation.classes)
    size = max(4.0, 0.45 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    cm = evaluation.confusion
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), evaluation.classes, rotation=90 if k > 12 else 0)
    ax.set_yticks(range(k), evaluation.classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title} (accuracy {evaluation.accuracy:.2%})")
    peak = max(max(row) for row in cm) or 1
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if cm[i][j]:
                    ax.text(
                        j,
                        i,
                        str(cm[i][j]),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if cm[i][j] > peak / 2 else "black",
                    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_curves_png(history: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = range(1, len(history["train_loss"]) + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, history["train_loss"], label="train")
    left.plot(epochs, history["val_loss"], label="val")
    left.set_title("loss")
    right.plot(epochs, history["train_acc"], label="train")
    right.plot(epochs, history["val_acc"], label="val")
    right.set_title("accuracy")
    for ax in (left, right):
        ax.set_xlabel("epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(evaluation: Evaluation, out_prefix: Path, extra: dict[str, Any] | None = None) -> list[Path]:
    """``PREFIX.report.json`` and ``PREFIX.confusion.png``; returns the paths written."""
    report = out_prefix.with_name(out_prefix.name + ".report.json")
    confusion = out_prefix.with_name(out_prefix.name + ".confusion.png")
    report.write_text(json.dumps({**evaluation.to_dict(), **(extra or {})}, indent=2))
    save_confusion_png(evaluation, confusion)
    return [report, confusion]
