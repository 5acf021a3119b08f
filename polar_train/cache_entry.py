"""A published tokenization cache entry (``cache_dir/<key>/``, see ``polar_train.store``): written
with a manifest, checked before it is trusted, moved aside when it is not.

``manifest.json`` records, when the entry is published, every other file's size and xxh3-64
digest::

    {"format": 1, "hash": "xxh3_64", "files": {"shard-00000.arrow": {"bytes": 81920, "xxh3_64": "9f0c..."},
                                               "stats.json": {...}}}

``check_entry`` runs on every cache hit: each file is present, has its size and digest (a disk
error, a truncated or overwritten copy, a file swapped in by hand), no shard is missing or extra,
and every token id is in ``[0, vocab_size)`` of the tokenizer in use (an entry tokenized by
another tokenizer under a colliding key). xxh3 hashes at memory speed (docs/benchmarks.md: the
cost for a 10 GB cache), so the check is cheaper than reading the cache from disk once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from polar_train.data import DataStats
from polar_train.files import publish_dir, temporary_name

logger = logging.getLogger("polar_train")

MANIFEST = "manifest.json"
STATS = "stats.json"
MANIFEST_FORMAT = 1
_CHUNK = 1 << 24  # bytes hashed per read: 16 MB


@dataclass(frozen=True)
class Damage:
    """What is wrong with a cache entry: the file and how."""

    path: Path
    what: str


def file_digest(path: Path) -> str:
    """The xxh3-64 digest of a file's bytes, as 16 hex digits."""
    digest = xxhash.xxh3_64()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record every file of a finished entry folder in ``folder/manifest.json``."""
    files = {p.name: {"bytes": p.stat().st_size, "xxh3_64": file_digest(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "hash": "xxh3_64", "files": files}, indent=1))


def check_entry(folder: Path, vocab_size: int) -> Damage | None:
    """None if the entry is what was published and its ids fit the vocabulary; else the first problem."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return Damage(folder / MANIFEST, "is missing (an entry from an older polar-train, or damaged)")
    except (OSError, ValueError):
        return Damage(folder / MANIFEST, "is not a readable cache manifest")
    files = manifest.get("files") if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else None
    if not isinstance(files, dict) or not all(isinstance(r, dict) and isinstance(r.get("bytes"), int)
                                              and isinstance(r.get("xxh3_64"), str) for r in files.values()):
        return Damage(folder / MANIFEST, "is not a readable cache manifest")
    shards = sorted(p.name for p in folder.glob("shard-*.arrow"))
    extra = [name for name in shards if name not in files]
    if extra:
        return Damage(folder / extra[0], "is not one of the entry's published files")
    for name, recorded in files.items():
        path = folder / name
        try:
            size = path.stat().st_size
            if size != recorded["bytes"]:
                return Damage(path, f"holds {size} bytes, {recorded['bytes']} were published")
            if file_digest(path) != recorded["xxh3_64"]:
                return Damage(path, "does not match its recorded checksum (its bytes changed)")
        except FileNotFoundError:
            return Damage(path, "is missing")
        except OSError as error:
            return Damage(path, f"cannot be read ({error.strerror or error})")
    for name in shards:
        try:
            low, high = id_range(folder / name)
        except (pa.ArrowException, OSError) as error:
            return Damage(folder / name, f"is not a readable Arrow file ({str(error).splitlines()[0]})")
        if low < 0 or high >= vocab_size:
            return Damage(folder / name, f"holds token id {low if low < 0 else high}, outside the tokenizer's "
                          f"vocabulary of {vocab_size} (tokenized by another tokenizer)")
    return None


def id_range(shard: Path) -> tuple[int, int]:
    """(min, max) token id of a shard (0, 0 for an empty one): one vectorised pass over the mapped ids."""
    table = pa.ipc.open_file(pa.memory_map(str(shard), "r")).read_all()
    ids = pc.list_flatten(pc.list_flatten(table.column("seqs")))
    if not len(ids):
        return 0, 0
    found = pc.min_max(ids)
    return found["min"].as_py(), found["max"].as_py()


def discard_entry(final_dir: Path) -> bool:
    """Move a damaged entry aside (readers test for its ``stats.json``) and delete it; False if it
    cannot be moved (a read-only cache). Another process may have moved it first: that is fine."""
    aside = temporary_name(final_dir)
    try:
        os.rename(final_dir, aside)
    except FileNotFoundError:
        return True
    except OSError as error:
        logger.warning("data: could not remove the damaged cache entry %s: %s", final_dir, error)
        return False
    shutil.rmtree(aside, ignore_errors=True)  # mapped files stay readable to whoever maps them (POSIX)
    return True


def private_folder(final_dir: Path | None) -> Path:
    """A folder this process alone writes: next to the cache entry (the same file system for the rename), else
    a temporary one."""
    if final_dir is not None:
        folder = temporary_name(final_dir)
        try:
            folder.mkdir(parents=True)
            return folder
        except OSError as error:
            logger.warning("data: could not write the tokenization cache %s: %s", final_dir, error)
    return Path(tempfile.mkdtemp(prefix="polar-train-data-"))


def publish(folder: Path, stats: DataStats, final_dir: Path) -> None:
    """Write ``stats.json`` and the manifest into the finished folder, then rename it into place.

    Readers test for ``stats.json`` inside ``final_dir``, which exists only after the rename, so
    they never see half a cache. If another process renamed first, its copy is kept. A cache
    that cannot be written costs only time: it is logged, not raised.
    """
    try:
        for path in folder.glob("rank-*.json"):
            path.unlink()
        (folder / STATS).write_text(json.dumps(stats.as_dict(max_skipped=None), indent=1))
        write_manifest(folder)
        publish_dir(folder, final_dir, replace=False)  # fsynced: a power loss must not leave half a cache
        logger.info("data: tokenized pairs cached in %s", final_dir)
    except OSError as error:
        if not (final_dir / STATS).is_file():  # not "another process got there first"
            logger.warning("data: could not write the tokenization cache %s: %s", final_dir, error)
