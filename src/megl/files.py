"""Writing files so that a crash, a kill or a failed step loses nothing: atomic writes, a build-then-swap
staging directory, clean-up of what a killed writer left, and file names that cannot collide or escape.

- `atomic_write(path, write)`: write a temp file beside `path`, fsync it, `os.replace` it in, fsync the directory
  (without the last step the rename itself can be lost on power failure).
- `build_then_swap(out)`: build a whole output in a staging directory beside `out`; only when that succeeded do
  its entries replace those of `out`. A failure halfway leaves `out` as it was.
- `remove_stale_temps(directory)`: delete the `.*.tmp` files and staging directories a killed writer left.
- `safe_stem(name, used)`: a file-name stem from an untrusted name (an item id, an image name) that is unique
  in `used` and never a path.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

STAGING = ".staging-"  # prefix of build_then_swap's directories (and of any staging directory to clean up)


def fsync_dir(path) -> None:
    """Make a rename / create / delete inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` writes the content; readers see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")

    atomic_write(path, w)


def remove_stale_temps(directory, keep: tuple[str, ...] = ()) -> list[Path]:
    """Delete `.<name>.*.tmp` files and `.staging-*` / `.<name>.<random>` staging directories that a killed
    writer left in `directory` (not recursive); `keep` names entries still in use. Returns what was removed."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        if not p.name.startswith(".") or p.name in keep:
            continue
        if p.is_symlink() or p.is_file():
            if p.name.endswith(".tmp"):
                p.unlink()
                removed.append(p)
        elif p.is_dir() and (p.name.startswith(STAGING) or p.name.endswith(".tmp")):
            shutil.rmtree(p)
            removed.append(p)
    return removed


class Staging:
    """What `build_then_swap` yields: `path` to build in; after the swap, `previous` holds the replaced entries
    when they were kept (None when deleted or when there were none)."""

    def __init__(self, path: Path):
        self.path = path
        self.previous: Optional[Path] = None


@contextmanager
def build_then_swap(out, *, keep_previous: bool = False) -> Iterator[Staging]:
    """Build into `staging.path` (an empty directory beside `out`, same file system); when the block succeeds,
    each entry built replaces the entry of that name in `out` by rename. Entries of `out` that were not rebuilt
    stay. The replaced ones are deleted, or with `keep_previous` (they are an input of the build, say) moved to
    `staging.previous` beside `out`. When the block raises, `out` is untouched and the staging directory removed.

    A new `out` appears in one rename; an existing one is updated entry by entry, each rename atomic.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file, not a directory to build into")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Staging(Path(tempfile.mkdtemp(dir=out.parent, prefix=f"{STAGING}{out.name}.")))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging.path, ignore_errors=True)
        raise
    if not out.exists():
        os.rename(staging.path, out)
        fsync_dir(out.parent)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f"{STAGING}{out.name}.previous."))
    moved = False
    for entry in sorted(staging.path.iterdir()):
        target = out / entry.name
        if target.exists() or target.is_symlink():
            os.rename(target, old / entry.name)
            moved = True
        os.rename(entry, target)
    fsync_dir(out)
    staging.path.rmdir()
    if keep_previous and moved:
        kept = out.parent / f".{out.name}.previous-{os.getpid()}-{old.name[-8:]}"
        os.rename(old, kept)
        staging.previous = kept
    else:
        shutil.rmtree(old)
    fsync_dir(out.parent)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_stem(name: str, used: set[str], max_len: int = 80) -> str:
    """A file-name stem for the untrusted `name`: its safe characters, plus a short hash of `name` when it had
    others or when the stem is taken (ids "a b" and "a_b" get different files; "../x" never leaves the folder).
    `used` (lower-cased stems, for case-insensitive file systems) is updated."""
    stem = _UNSAFE.sub("_", name)[:max_len].lstrip(".") or "_"
    if stem != name or stem.lower() in used:
        digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()
        stem, k = f"{stem}-{digest[:8]}", 8
        while stem.lower() in used:  # the same name twice (two folders holding same.png): a longer hash, then a count
            k += 1
            stem = f"{stem.rsplit('-', 1)[0]}-{digest[:k]}" if k <= 40 else f"{stem}-{len(used)}"
    used.add(stem.lower())
    return stem


__all__ = ["Staging", "atomic_write", "build_then_swap", "fsync_dir", "remove_stale_temps", "safe_stem", "write_json"]
