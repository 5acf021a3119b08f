"""What checking a tokenization cache entry costs at launch (``polar_train.cache_entry``).

Writes a synthetic entry of ``--gb`` GB (``--shards`` Arrow files whose ``seqs`` column holds
random ids below POLAR's vocabulary, 92544; the other columns are a few bytes per row and left
out), records its manifest, then times, side by side in this process on the same files:

- ``check_entry``: every file's size and xxh3-64 digest, then the id range of every shard;
- the digest alone with xxh3-64, blake2b and sha256 (what another hash would cost);
- the id-range pass alone.

The files are read through the page cache (just written: warm), which is what a launch after
the tokenizing run sees; from a cold disk the check reads the entry once at disk speed.

    python scripts/bench_cache_check.py --gb 2 --shards 4 --rounds 3
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from polar_train.cache_entry import check_entry, file_digest, id_range, write_manifest

VOCAB = 92544
SEQ = 2048  # ids per sequence, 2 sequences per row


def write_entry(folder: Path, gb: float, shards: int) -> int:
    rng = np.random.default_rng(0)
    ids_per_shard = int(gb * 1e9 / 4 / shards) // (2 * SEQ) * (2 * SEQ)
    schema = pa.schema([("seqs", pa.list_(pa.list_(pa.int32())))])
    for k in range(shards):
        values = pa.array(rng.integers(0, VOCAB, ids_per_shard, dtype=np.int32))
        inner = pa.ListArray.from_arrays(pa.array(np.arange(0, ids_per_shard + 1, SEQ, dtype=np.int32)), values)
        outer = pa.ListArray.from_arrays(pa.array(np.arange(0, len(inner) + 1, 2, dtype=np.int32)), inner)
        with pa.OSFile(str(folder / f"shard-{k:05d}.arrow"), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            writer.write_batch(pa.record_batch([outer], schema=schema))
    (folder / "stats.json").write_text("{}")
    return sum(p.stat().st_size for p in folder.iterdir())


def hashlib_digest(path: Path, name: str) -> str:
    digest = hashlib.new(name)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def best(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cache-check-") as tmp:
        folder = Path(tmp)
        nbytes = write_entry(folder, args.gb, args.shards)
        write_manifest(folder)
        assert check_entry(folder, VOCAB) is None
        shards = sorted(folder.glob("shard-*.arrow"))
        rows = {
            "check_entry (xxh3-64 + id range)": lambda: check_entry(folder, VOCAB),
            "digest xxh3-64": lambda: [file_digest(p) for p in shards],
            "digest blake2b": lambda: [hashlib_digest(p, "blake2b") for p in shards],
            "digest sha256": lambda: [hashlib_digest(p, "sha256") for p in shards],
            "id range": lambda: [id_range(p) for p in shards],
        }
        print(f"entry: {nbytes / 1e9:.2f} GB in {len(shards)} shards (best of {args.rounds})")
        print("| what | seconds | MB/s | seconds per 10 GB |\n|---|---|---|---|")
        for what, fn in rows.items():
            seconds = best(fn, args.rounds)
            print(f"| {what} | {seconds:.2f} | {nbytes / seconds / 1e6:,.0f} | {10e9 / nbytes * seconds:.1f} |")


if __name__ == "__main__":
    main()
