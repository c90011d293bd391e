"""The one folder scanner: classify and enqueue find the same files, in the same order, by the documented rules."""

from __future__ import annotations

import os
from pathlib import Path

from imgpipe.model.cli import expand_paths
from imgpipe.scan import scan, scan_all


def make_tree(root: Path) -> None:
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a").mkdir()
    for name in ("z.png", "A.JPG", "notes.txt", "b/y.jpeg", "b/deep/x.png", "a/w.webp"):
        (root / name).write_bytes(b"not really an image")
    os.symlink(root / "a" / "w.webp", root / "link.png")  # a symlinked file: listed (the worker decides)
    os.symlink(root / "missing.png", root / "dangling.png")  # dangling: listed, its record says why
    os.symlink(root / "b", root / "c")  # a symlinked folder: never followed


def test_rules_files_first_in_name_order_then_folders_symlinked_folders_not_followed(tmp_path: Path) -> None:
    make_tree(tmp_path)
    found = [os.path.relpath(p, tmp_path) for p in scan(tmp_path)]
    assert found == ["A.JPG", "dangling.png", "link.png", "z.png", "a/w.webp", "b/y.jpeg", "b/deep/x.png"]


def test_classify_and_enqueue_find_the_same_files_in_the_same_order(tmp_path: Path) -> None:
    make_tree(tmp_path)
    inputs = [str(tmp_path), str(tmp_path / "b"), str(tmp_path / "notes.txt")]
    enqueued = list(scan_all(inputs))  # what `imgpipe enqueue` sends
    classified = list(expand_paths(tuple(inputs)))  # what `imgpipe classify` reads
    assert classified == enqueued
    assert enqueued[-1] == str(tmp_path / "notes.txt")  # a file named directly is taken whatever its name
    assert len(enqueued) == len(set(enqueued)) == 8  # the nested folder adds nothing twice


def test_a_folder_that_cannot_be_listed_is_reported_and_skipped(tmp_path: Path) -> None:
    make_tree(tmp_path)
    errors: list[str] = []
    found = []
    for path in scan(tmp_path, on_error=lambda p, e: errors.append(p)):
        found.append(path)
        if path.endswith("y.jpeg"):  # b/deep was listed with b; it vanishes before it is read
            (tmp_path / "b" / "deep" / "x.png").unlink()
            os.rmdir(tmp_path / "b" / "deep")
    assert errors == [str(tmp_path / "b" / "deep")]
    assert str(tmp_path / "b" / "deep" / "x.png") not in found
