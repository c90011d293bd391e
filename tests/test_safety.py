"""Root-confined reading (imgpipe/safety.py): one batch's reader walks each folder once and keeps the handle, with
the same answers as a walk per file: links inside the root followed, anything leading out refused."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgpipe import safety
from imgpipe.errors import ImageError
from imgpipe.safety import MAX_FOLDERS, ConfinedReader, read_confined

LIMIT = 1 << 20


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/a/b/f0..f9 (their names as content), root/top.bin, and outside/a/b/f0..f9 (other content)."""
    for base, tag in ((tmp_path / "root", b"in"), (tmp_path / "outside", b"out")):
        folder = base / "a" / "b"
        folder.mkdir(parents=True)
        for i in range(10):
            (folder / f"f{i}").write_bytes(tag + b":f%d" % i)
    (tmp_path / "root" / "top.bin").write_bytes(b"top")
    return tmp_path


@pytest.fixture
def opens(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The names imgpipe.safety passes to os.open, in order (the real call is made)."""
    seen: list[str] = []
    real = os.open

    def counting(path: str | bytes, *args: object, **kwargs: object) -> int:
        seen.append(os.fsdecode(path))
        return real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(safety.os, "open", counting)
    yield seen


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_reader_walks_a_folder_once_for_all_its_files(tree: Path, opens: list[str]) -> None:
    root = tree / "root"
    files = [root / "a" / "b" / f"f{i}" for i in range(10)]
    with ConfinedReader([root], LIMIT) as reader:
        assert [reader.read(str(f)) for f in files] == [b"in:f%d" % i for i in range(10)]
    walked = [name for name in opens if not name.startswith(("f", "/proc/self/fd/"))]
    assert walked == [str(root), "a", "b"], walked  # the root and each folder once, not once per file
    per_file = opens[len(walked) :]
    assert len(per_file) == 2 * len(files)  # pinned by name (O_PATH), then opened through /proc/self/fd

    opens.clear()
    assert [read_confined(str(f), [root], LIMIT) for f in files[:2]] == [b"in:f0", b"in:f1"]
    assert opens.count(str(root)) == 2  # one file at a time: the whole walk each time


def test_links_inside_the_root_are_followed_and_links_out_refused(tree: Path) -> None:
    root, outside = tree / "root", tree / "outside"
    (root / "rel").symlink_to("a/b")  # a folder link, relative
    (root / "abs").symlink_to(root / "a")  # a folder link, absolute, inside
    (root / "a" / "b" / "again").symlink_to("../../top.bin")  # a file link climbing inside the root
    (root / "out").symlink_to(outside / "a")  # a folder link out
    (root / "a" / "b" / "escape").symlink_to("../../../outside/a/b/f0")  # a file link out
    (root / "loop").symlink_to("loop")
    with ConfinedReader([root], LIMIT) as reader:
        assert reader.read(str(root / "rel" / "f3")) == b"in:f3"
        assert reader.read(str(root / "abs" / "b" / "f4")) == b"in:f4"
        assert reader.read(str(root / "rel" / "again")) == b"top"
        assert reader.read(str(root / "a" / "b" / ".." / "b" / "f5")) == b"in:f5"
        for path, reason in [
            (root / "out" / "b" / "f0", "not_allowed"),
            (root / "a" / "b" / "escape", "not_allowed"),
            (root / "loop" / "f0", "unreadable"),  # too many levels of symbolic links
            (root / "top.bin" / "f0", "not_found"),  # a file where a folder should be
            (root / "a" / "b" / "missing", "not_found"),
            (root / "a" / "b", "not_regular"),
            (root, "not_regular"),
            (Path(f"{root}/../outside/a/b/f0"), "not_allowed"),
        ]:
            with pytest.raises(ImageError) as caught:
                reader.read(str(path))
            assert caught.value.reason == reason, (path, caught.value)
        assert reader.read(str(root / "a" / "b" / "f6")) == b"in:f6"  # errors leave the reader usable


def test_a_folder_swapped_for_a_link_out_is_read_through_the_handle_taken_before_never_outside(tree: Path) -> None:
    root, outside = tree / "root", tree / "outside"
    with ConfinedReader([root], LIMIT) as reader:
        assert reader.read(str(root / "a" / "b" / "f0")) == b"in:f0"
        os.rename(root / "a", root / "a.aside")
        (root / "a").symlink_to(outside / "a")
        # The same batch: the folder walked before (now root/a.aside/b), never the outside one.
        assert reader.read(str(root / "a" / "b" / "f1")) == b"in:f1"
    with ConfinedReader([root], LIMIT) as reader, pytest.raises(ImageError) as caught:
        reader.read(str(root / "a" / "b" / "f1"))  # the next batch walks again: refused
    assert caught.value.reason == "not_allowed"


def test_a_reader_holds_a_bounded_number_of_handles_and_close_releases_them(tmp_path: Path) -> None:
    root = tmp_path / "root"
    folders = [root / f"d{i}" for i in range(3 * MAX_FOLDERS)]
    for folder in folders:
        folder.mkdir(parents=True)
        (folder / "x").write_bytes(folder.name.encode())
    before = open_fds()
    reader = ConfinedReader([root], LIMIT)
    for folder in folders + folders[:2]:
        assert reader.read(str(folder / "x")) == folder.name.encode()
        assert open_fds() - before <= MAX_FOLDERS + 1  # the folders kept and the root
    reader.close()
    assert open_fds() == before
