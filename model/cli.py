"""CLI commands of the model side: demo-data, train, evaluate and classify (the embedded default)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from imgpipe.errors import ConfigError
from imgpipe.output import output_file
from imgpipe.records import RecordWriter, format_for
from imgpipe.scan import no_images_message, scan
from imgpipe.settings import Settings, honours, setting_option

# What the in-process commands read (and so validate): never Redis, producer or worker settings.
ENGINE_SECTIONS = ("model", "batch", "security")


def load_engine(settings: Settings) -> Any:
    """The engine for ``settings.model`` (IMGPIPE_MODEL or the bundled one), with the security settings."""
    from imgpipe import heap
    from imgpipe.model.engine import Engine

    engine = Engine.from_settings(settings)
    heap.settle()  # torch and the model out of the collector's reach (imgpipe/heap.py)
    return engine


def expand_paths(inputs: tuple[str, ...]) -> Iterator[str]:
    """Files as given (whatever their extension); folders scanned by the one scanner (imgpipe.scan), so that
    classify finds exactly the files enqueue would.

    Each absolute path comes out once, even when folders overlap or a file is also named directly, so that
    every input path yields exactly one record.
    """
    seen: set[str] = set()
    for item in inputs:
        path = Path(item)
        found = scan(path) if path.is_dir() else iter([str(path.absolute())])
        for name in found:  # a missing file still gets its one (error) record
            if name not in seen:
                seen.add(name)
                yield name


@click.command("demo-data")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--val-fraction", default=0.2, show_default=True, help="Share of each class held out for val/.")
@click.option("--seed", default=0, show_default=True, help="Seed of the stratified split.")
def demo_data(out: Path, val_fraction: float, seed: int) -> None:
    """Write the offline demo dataset into OUT/train/<digit>/ and OUT/val/<digit>/.

    The data are the 1,797 real handwritten digits (8x8 scans from UCI) that scikit-learn ships inside
    its package: nothing is downloaded.
    """
    from imgpipe.model.data import write_demo_dataset

    if not 0 < val_fraction < 1:
        raise ConfigError("--val-fraction must be between 0 and 1")
    counts = write_demo_dataset(out, val_fraction=val_fraction, seed=seed)
    click.echo(f"wrote {counts['train']} training and {counts['val']} validation images to {out}/", err=True)


@click.command()
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Model file to write (TorchScript with metadata). A report is written next to it.",
)
@click.option(
    "--arch",
    default="convnet",
    show_default=True,
    help="convnet (imgpipe's small CNN) or any torchvision classification model: resnet18, mobilenet_v3_small, "
    "efficientnet_b0, vit_b_16, ...",
)
@click.option(
    "--weights",
    default=None,
    help="Fine-tune from pretrained weights: a torchvision name (IMAGENET1K_V1, DEFAULT; downloaded and cached "
    "as torchvision does) or a local state-dict file (.pth/.pt/.safetensors). The head is resized to the labels "
    "and the preset comes from the weights' transforms.",
)
@click.option(
    "--freeze-backbone/--no-freeze-backbone",
    default=False,
    show_default=True,
    help="With --weights: train only the classifier head; the backbone (and its batch-norm statistics) stays "
    "as loaded.",
)
@click.option(
    "--widths",
    default="32,64,128",
    show_default=True,
    help="convnet: channels of each conv block (one max-pool per block).",
)
@click.option("--convs-per-block", default=2, show_default=True, help="convnet: conv layers per block.")
@click.option(
    "--input-size",
    type=click.IntRange(min=8),
    default=None,
    help="Network input is SIZE x SIZE.  [default: the weights' crop size with --weights, else 32]",
)
@click.option(
    "--channels",
    type=click.Choice(["auto", "1", "3"]),
    default="auto",
    show_default=True,
    help="1 grayscale, 3 RGB; auto looks at the training images.",
)
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(min=1), help="Passes over DATA/train.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="Images per step.")
@click.option("--lr", default=3e-3, show_default=True, help="Peak learning rate (one-cycle schedule, AdamW).")
@click.option("--hflip/--no-hflip", default=False, show_default=True, help="Random horizontal flips.")
@click.option("--seed", default=0, show_default=True, help="Seed of initialisation, shuffling and augmentation.")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads while training, fixed so that a run reproduces.  [default: min(4, CPUs)]",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--name", default=None, help="Model name in records (default: the output file's stem).")
def train(
    data: Path,
    out: Path,
    arch: str,
    weights: str | None,
    freeze_backbone: bool,
    widths: str,
    convs_per_block: int,
    input_size: int | None,
    channels: str,
    epochs: int,
    batch_size: int,
    lr: float,
    hflip: bool,
    seed: int,
    threads: int | None,
    device: str,
    name: str | None,
) -> None:
    """Train a network on DATA/train/<label>/ and DATA/val/<label>/ (torchvision ImageFolder layout), from
    scratch or fine-tuned from --weights.

    Keeps the epoch with the best validation accuracy and writes MODEL plus MODEL-stem.report.json,
    .confusion.png and .curves.png next to it. On the CPU a run is deterministic: the same command on the
    same machine and torch build writes a model with the same id.
    """
    from imgpipe.model.net import check_arch
    from imgpipe.model.train import Augment, TrainConfig
    from imgpipe.model.train import train as run_training

    check_arch(arch)
    if freeze_backbone and not weights:
        raise ConfigError("--freeze-backbone needs --weights (a pretrained backbone to keep)")

    try:
        width_tuple = tuple(int(w) for w in widths.split(","))
    except ValueError:
        raise ConfigError(f"--widths {widths!r}: expected comma-separated integers like 32,64,128") from None
    config = TrainConfig(
        arch=arch,
        widths=width_tuple,
        convs_per_block=convs_per_block,
        input_size=input_size,
        channels=None if channels == "auto" else int(channels),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        augment=Augment(hflip=hflip),
        weights=weights,
        freeze_backbone=freeze_backbone,
        threads=threads,
    )
    result = run_training(data, out, config, name=name, progress=sys.stderr.isatty())
    click.echo(result.evaluation.summary(), err=True)
    click.echo(f"best epoch {result.best_epoch}/{epochs}: val accuracy {result.evaluation.accuracy:.4f}", err=True)
    click.echo(f"model {result.metadata.model_id} written to {out}", err=True)
    for path in result.files[1:]:
        click.echo(f"report: {path}", err=True)


@honours(*ENGINE_SECTIONS, exclude=("MODEL", "MAX_WAIT_MS"))
@click.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "-o",
    "--report",
    "prefix",
    type=click.Path(path_type=Path),
    default=None,
    help="Where the report goes: PREFIX.report.json and PREFIX.confusion.png; an existing folder gets "
    "MODEL-stem.eval.* inside it.  [default: MODEL-stem.eval.* next to MODEL]",
)
@setting_option("DEVICE")
@setting_option("MAX_BATCH", "--batch-size", type=click.IntRange(min=1))
@setting_option("DECODE_THREADS", type=click.IntRange(min=1))
def evaluate(model_path: Path, data: Path, prefix: Path | None, **overrides: Any) -> None:
    """Evaluate MODEL on DATA/<label>/ images (or DATA/val/<label>/) through the serving path.

    Prints accuracy and per-class precision/recall on stdout, writes a JSON report and a confusion-matrix
    PNG next to MODEL (or where -o says) and names both files on stderr.
    """
    import torch

    from imgpipe.model.data import find_classes
    from imgpipe.model.evaluate import confusion_stats, write_report

    settings = Settings.from_env(sections=ENGINE_SECTIONS, overrides={**overrides, "model": model_path})
    prefix = _report_prefix(prefix, model_path)
    engine = load_engine(settings)
    root = (
        data / "val" if (data / "val").is_dir() and not set(engine.labels) & {p.name for p in data.iterdir()} else data
    )
    classes = find_classes(root)
    unknown = sorted(set(classes) - set(engine.labels))
    if unknown:
        raise ConfigError(f"{root} has folders that are not labels of the model: {', '.join(unknown)}")
    index = {label: i for i, label in enumerate(engine.labels)}
    paths = [p for c in classes for p in scan(root / c)]
    targets, predictions, failed = [], [], 0
    for record in engine.classify(paths, batch_size=settings.batch.max_batch, lanes=settings.batch.decode_threads):
        if record["status"] != "ok":
            failed += 1
            continue
        targets.append(index[Path(record["path"]).parent.name])
        predictions.append(index[record["label"]])
    result = confusion_stats(torch.tensor(targets), torch.tensor(predictions), list(engine.labels))
    files = write_report(result, prefix, {"model": engine.model_id, "data": str(root), "failed": failed})
    click.echo(f"model {engine.model_id} on {root}", err=True)
    click.echo(result.summary())
    if failed:
        click.echo(f"{failed} image(s) could not be read and were left out", err=True)
    for path in files:
        click.echo(f"report: {path}", err=True)


@honours(*ENGINE_SECTIONS, exclude=("MAX_WAIT_MS",))  # a worker's setting: batches here are always full
@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write records to FILE (.jsonl or .csv); stdout when omitted.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "csv"]),
    default=None,
    help="Record format.  [default: from the output file's extension; JSONL on stdout]",
)
@setting_option("MODEL", type=click.Path(path_type=Path))
@setting_option("DEVICE")
@setting_option("MAX_BATCH", "--batch-size", type=click.IntRange(min=1))
@setting_option("DECODE_THREADS", type=click.IntRange(min=1))
@setting_option("TOPK", type=click.IntRange(min=1))
@click.option(
    "--progress/--no-progress", default=None, help="Progress bar on stderr.  [default: when stderr is a terminal]"
)
def classify(
    paths: tuple[str, ...], output: Path | None, fmt: str | None, progress: bool | None, **overrides: Any
) -> None:
    """Classify image files and folders in-process (no Redis): the embedded default.

    Folders are scanned recursively for image files (a folder with none is refused: exit 2). One record per
    input: label, score and top-k, or the error that stopped it. A summary goes to stderr; exit code 1 if
    any image failed. Without IMGPIPE_MODEL/--model it uses the bundled demo model, which knows only the
    ten handwritten digits: train your own with `imgpipe train` for photos.
    """
    from tqdm import tqdm

    settings = Settings.from_env(sections=ENGINE_SECTIONS, overrides=overrides)
    fmt = format_for(output, fmt)
    inputs = list(expand_paths(paths))
    if not inputs:
        raise ConfigError(no_images_message(paths))
    engine = load_engine(settings)
    batch = settings.batch.max_batch
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=len(inputs), unit="img", desc="classify", disable=not show, file=sys.stderr)
    stats = Summary(engine.labels)
    start = time.perf_counter()
    with bar, output_file(output) as stream:
        writer = RecordWriter(stream, fmt)
        for record in engine.classify(
            inputs, batch_size=batch, lanes=settings.batch.decode_threads, on_batch=bar.update
        ):
            writer.write(record)
            stats.add(record)
    elapsed = time.perf_counter() - start
    click.echo(stats.line(elapsed, engine.model_id, engine.device, output), err=True)
    if stats.failed:
        sys.exit(1)


class Summary:
    """Counts for the closing line of `classify`: totals, rate, accuracy where the folder names the label."""

    def __init__(self, labels: tuple[str, ...]) -> None:
        self.labels = set(labels)
        self.ok = self.failed = self.known = self.correct = 0

    def add(self, record: dict[str, Any]) -> None:
        if record["status"] != "ok":
            self.failed += 1
            return
        self.ok += 1
        truth = Path(record["path"]).parent.name
        if truth in self.labels:
            self.known += 1
            self.correct += record["label"] == truth

    def line(self, elapsed: float, model: str, device: Any, output: Path | None) -> str:
        total = self.ok + self.failed
        text = (
            f"classified {total} images ({self.ok} ok, {self.failed} failed) in {elapsed:.2f}s, "
            f"{total / max(elapsed, 1e-9):.0f} images/s on {device} with {model}"
        )
        if self.known:
            text += f"; accuracy {self.correct / self.known:.2%} on {self.known} images whose folder names their label"
        if output:
            text += f"; records in {output}"
        return text


def _report_prefix(given: Path | None, model_path: Path) -> Path:
    """Where `evaluate` writes its report: ``-o`` as given (an existing folder gets MODEL-stem.eval inside),
    else next to the model file; ConfigError up front when that folder is missing or not writable."""
    import os

    name = model_path.stem + ".eval"
    prefix = given if given is not None else model_path.parent / name
    if given is not None and given.is_dir():
        prefix = given / name
    folder = prefix.parent
    if not folder.is_dir():
        raise ConfigError(f"cannot write the report to {prefix}.*: no such folder ({folder})")
    if not os.access(folder, os.W_OK):
        hint = "" if given is not None else "; choose where with -o/--report"
        raise ConfigError(f"cannot write the report to {prefix}.*: {folder} is not writable{hint}")
    return prefix


@click.group("model")
def model_group() -> None:
    """Bring your own model and see what a model file holds.

    \b
    imgpipe model import products.ts --labels labels.txt --input-size 224 \\
        --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 -o models/products.pt
    imgpipe model import --arch resnet50 --state-dict ft.pth --labels labels.txt -o models/products.pt
    imgpipe model info models/products.pt
    imgpipe model list models/
    """


@model_group.command("import")
@click.argument("source", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--arch",
    default=None,
    help="With --state-dict: the torchvision classification architecture (resnet50, efficientnet_b0, ...).",
)
@click.option(
    "--state-dict",
    "state_dict",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Weights for --arch: .pth/.pt (read with weights_only=True) or .safetensors.",
)
@click.option(
    "--labels",
    "labels_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Class names in output order: a text file (one per line) or JSON (a list, or index -> name).",
)
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="imgpipe model file to write.",
)
@click.option("--name", default=None, help="Model name in records (default: the output file's stem).")
@click.option(
    "--input-size",
    type=click.IntRange(min=1),
    default=None,
    help="Network input is SIZE x SIZE.  [default with --arch: the torchvision weights' crop size]",
)
@click.option(
    "--crop-ratio",
    type=click.FloatRange(min=0, max=1, min_open=True),
    default=None,
    help="Resize the short side to SIZE / RATIO, then centre-crop SIZE (0.875: 256 -> 224).  [default with "
    "--arch: the weights' own; else 1]",
)
@click.option("--channels", type=click.Choice(["1", "3"]), default=None, help="1 grayscale, 3 RGB.  [default: 3]")
@click.option(
    "--mean", default=None, help="Per-channel mean, e.g. 0.485,0.456,0.406.  [default with --arch: the weights']"
)
@click.option(
    "--std", default=None, help="Per-channel std, e.g. 0.229,0.224,0.225.  [default with --arch: the weights']"
)
def model_import(
    source: Path | None,
    arch: str | None,
    state_dict: Path | None,
    labels_path: Path,
    out: Path,
    name: str | None,
    input_size: int | None,
    crop_ratio: float | None,
    channels: str | None,
    mean: str | None,
    std: str | None,
) -> None:
    """Write an imgpipe model file from SOURCE (a TorchScript file, or a torch.export program .pt2) or from
    --arch plus --state-dict.

    Labels and the preprocessing preset go into the file. Before writing, the model runs a forward pass,
    its output width must equal the number of labels, and the written file must compute what the original
    computes on fixed inputs; nothing is written when a check fails.
    """
    from imgpipe.model import importer
    from imgpipe.model.net import preset_from_weights

    if (source is None) == (arch is None):
        raise ConfigError("give either a TorchScript SOURCE file or --arch with --state-dict, not both or neither")
    if arch is not None and state_dict is None:
        raise ConfigError("--arch needs --state-dict FILE (the weights to import)")
    if source is not None and state_dict is not None:
        raise ConfigError("--state-dict goes with --arch, not with a TorchScript SOURCE")
    labels = importer.read_labels(labels_path)
    base = None
    if arch is not None and arch != "convnet":
        from imgpipe.model.net import check_arch

        check_arch(arch)
        try:
            base = preset_from_weights(arch, None)
        except ConfigError:
            base = None  # an architecture without torchvision weights: the flags say it all
    preset = importer.make_preset(
        base,
        input_size=input_size,
        crop_ratio=crop_ratio,
        channels=int(channels) if channels else None,
        mean=importer.parse_floats(mean, "--mean") if mean else None,
        std=importer.parse_floats(std, "--std") if std else None,
    )
    model_name = name or out.stem
    if source is not None:
        metadata = importer.import_torchscript(source, out, labels=labels, preset=preset, name=model_name)
    else:
        assert arch is not None and state_dict is not None
        metadata = importer.import_state_dict(arch, state_dict, out, labels=labels, preset=preset, name=model_name)
    click.echo(
        f"model {metadata.model_id} written to {out} (forward pass, {len(labels)} outputs, parity: ok)", err=True
    )


@model_group.command("info")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of the table.")
def model_info(model_path: Path, as_json: bool) -> None:
    """What MODEL holds: id, name, arch, labels, preset, accuracy, sha256, torch version.

    The file is loaded as `worker` and `classify` load it (sha256 verified); one that is not an imgpipe model
    file is refused with one line and exit 2.
    """
    import json

    from imgpipe.model import modelfile
    from imgpipe.model.info import describe, render

    _, metadata = modelfile.load(model_path)
    info = describe(model_path, metadata)
    click.echo(json.dumps(info, indent=2) if as_json else render(info))


@model_group.command("list")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="A JSON list instead of the table.")
def model_list(folder: Path, as_json: bool) -> None:
    """Every model file under FOLDER (.pt, .pts, .ts, .torchscript), one line each; files that are not imgpipe
    models are listed with the reason. Metadata and sha256 are checked without loading the networks."""
    import json

    from imgpipe.model.info import list_folder, render_list

    rows = list_folder(folder)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif rows:
        click.echo(render_list(rows))
    else:
        click.echo(f"no model files under {folder}", err=True)
