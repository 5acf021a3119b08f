"""Writing files so that a reader (or a crash) never sees half of one.

``write_atomically(path, write)`` lets ``write`` fill a temporary file next to ``path``, flushes
it to disk (fsync) and renames it over ``path``; the folder is fsynced too, so the rename itself
survives a power loss. The temporary name holds a random part, not only the pid: two processes
in different pid namespaces (containers of a multi-node job) may share a pid.

    write_text("runs/x/config.yaml", yaml.safe_dump(cfg))
    write_atomically(Path("plot.png"), lambda tmp: fig.savefig(tmp, format="png"))

A folder (an HF export, a checkpoint, a cache entry) is written in full under a temporary name
next to its place, then ``publish_dir(tmp, final)`` fsyncs it and renames it into place.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def temporary_name(path: str | os.PathLike[str]) -> Path:
    """A hidden name next to ``path`` that no other writer uses: ``.NAME.tmp-<pid>-<random>``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_atomically(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """``write(tmp)``, fsync ``tmp``, rename it over ``path``, fsync the folder; returns ``path``."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """``text`` as UTF-8 into ``path``, atomically (see ``write_atomically``)."""
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """``data`` into ``path``, atomically (see ``write_atomically``)."""
    return write_atomically(path, lambda tmp: tmp.write_bytes(data))


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a written file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (new names, renames) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """fsync every file and folder under ``root`` (a folder written in place before it is renamed)."""
    for folder, _, names in os.walk(root):
        for name in names:
            fsync_file(Path(folder) / name)
        fsync_dir(folder)


def publish_dir(tmp: str | os.PathLike[str], final: str | os.PathLike[str], *, replace: bool = True,
                synced: bool = False) -> Path:
    """Make the folder ``tmp`` (written in full, on ``final``'s file system) appear as ``final`` in
    one rename: fsync everything under it (skipped when ``synced``: the caller did, e.g. one rank
    per machine), rename, fsync the parent folder; returns ``final``.

    ``replace``: an existing ``final`` is renamed aside first and removed after, so a crash leaves
    the old or the new folder whole, never half of one. ``replace=False``: an existing non-empty
    ``final`` raises ``OSError`` (another writer got there first) and ``tmp`` is left to the caller.
    """
    tmp, final = Path(tmp), Path(final)
    if not synced:
        fsync_tree(tmp)
    if replace and final.exists():
        old = temporary_name(final.with_name(f"{final.name}.old"))
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(final.parent)
    return final
def save_tensors(tensors: Mapping[str, Any], path: str | os.PathLike[str], metadata: dict[str, str] | None = None,
                 ) -> None:
    """safetensors' ``save_file``, with a failed write raised as the ``OSError`` it is: safetensors
    raises ``SafetensorError("... I/O error: No space left on device (os error 28)")`` instead."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(dict(tensors), str(path), metadata=metadata)
    except SafetensorError as error:
        found = re.search(r"os error (\d+)", str(error))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def size_text(num_bytes: int) -> str:
    """A size for a message: ``1.5 MB``, ``14.2 GB`` (decimal units, as ``df -H`` prints them)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} bytes"


def space_message(folder: str | os.PathLike[str], needed: int) -> str:
    """``it needs about 1.5 MB, 0.3 MB are free under FOLDER`` (the nearest existing folder up)."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = size_text(shutil.disk_usage(probe).free)
    except OSError:
        free = "an unknown amount"
    return f"it needs about {size_text(needed)}, {free} are free under {folder}"
