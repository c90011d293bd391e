"""The peer of `imgpipe bench`: the plain PyTorch script a user would write instead of imgpipe.

A ``torch.utils.data.DataLoader`` over the image files, the model file loaded with ``torch.jit.load``, batches
under ``torch.no_grad()``, top-k written as JSON lines. It is deliberately what a competent user writes in an
afternoon, and fair to it: the same model file, the same preprocessing as imgpipe (the preset stored in the
model file: same decode mode, resize, crop and normalisation; Pillow with JPEG draft mode, as imgpipe's
decoder does), default torch threads and environment, the same batch size, and only the classification loop
timed (interpreter start, imports and model load are not counted, as for imgpipe's `inprocess` variant).

Run on its own:  python dataloader_script.py MODEL IMAGE_DIR --num-workers 2 [--device cuda] -o out.jsonl
It prints one JSON line: {"images": N, "seconds": S, "num_workers": W, "torch_threads": T}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import zipfile

import numpy as np
import torch
from PIL import Image

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def read_metadata(model_path: str) -> dict:
    """The labels and preprocessing preset imgpipe stores in its model file (a JSON extra file)."""
    with zipfile.ZipFile(model_path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("extra/imgpipe.json"))
        return json.loads(archive.read(name))


class Images(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], preset: dict) -> None:
        self.paths = paths
        self.size = preset["input_size"]
        self.mode = "L" if preset["channels"] == 1 else "RGB"
        self.short = max(1, round(self.size / preset["crop_ratio"]))
        self.mean = np.asarray(preset["mean"], dtype=np.float32)
        self.std = np.asarray(preset["std"], dtype=np.float32)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        image: Image.Image = Image.open(self.paths[index])
        image.draft(self.mode, (self.short, self.short))  # JPEG DCT scaling; no-op for other formats
        image = image.convert(self.mode)
        w, h = image.size
        scale = self.short / min(w, h)
        new_w, new_h = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=3.0)
        left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        array = np.asarray(image, dtype=np.float32) / 255.0
        if array.ndim == 2:
            array = array[:, :, None]
        array = (array - self.mean) / self.std
        return torch.from_numpy(array.transpose(2, 0, 1).copy())  # (C, H, W)


def classify(
    model_path: str, paths: list[str], out_path: str, batch_size: int, num_workers: int, device: str = "cpu"
) -> float:
    """Classify ``paths``, write one JSON line per image; returns the seconds the loop took."""
    metadata = read_metadata(model_path)
    labels = metadata["labels"]
    model = torch.jit.load(model_path, map_location=device).eval()
    loader = torch.utils.data.DataLoader(
        Images(paths, metadata["preset"]),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.startswith("cuda"),  # what the tutorials recommend for a GPU
    )
    with torch.no_grad():
        warm = next(iter(torch.utils.data.DataLoader(Images(paths[:2], metadata["preset"]), batch_size=2)))
        model(warm.to(device))
        start = time.perf_counter()
        done = 0
        with open(out_path, "w") as out:
            for batch in loader:  # (B, C, H, W)
                probs = torch.softmax(model(batch.to(device, non_blocking=True)), dim=1)
                top_p, top_i = probs.topk(min(3, len(labels)), dim=1)
                for p, i in zip(top_p.tolist(), top_i.tolist(), strict=True):
                    record = {"path": paths[done], "label": labels[i[0]], "score": p[0]}
                    out.write(
                        json.dumps({**record, "topk": [[labels[k], v] for k, v in zip(i, p, strict=True)]}) + "\n"
                    )
                    done += 1
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("-o", "--output", default=os.devnull)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    args = parser.parse_args()
    paths = sorted(
        os.path.join(folder, name)
        for folder, _, names in os.walk(args.images)
        for name in names
        if name.lower().endswith(EXTENSIONS)
    )
    seconds = classify(args.model, paths, args.output, args.batch_size, args.num_workers, args.device)
    info = {"images": len(paths), "seconds": seconds, "num_workers": args.num_workers}
    print(json.dumps({**info, "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
