"""The tokenized pair store: opened memory-mapped, read by index (built once by store_build.py,
sharded over ranks and processes, published atomically in the cache).

A cache entry ``cache_dir/<key>/`` (``dataset_cache_key``)::

    shard-00000.arrow ...   Arrow IPC files, uncompressed (memory-mapped as they are)
    stats.json              DataStats of all shards, written before the folder is renamed into place
    manifest.json           size and xxh3-64 of every file: checked on each hit (``cache_entry``); a
                            damaged entry (or ids outside the tokenizer's vocabulary) is rebuilt

One row per kept data row (a pair, or a ranked list: ``polar_train.ranked``), in file order
when the shards are read in name order::

    seqs, better, worse, order     list<list<int32>>, list<int32> x 3: ``packing.Group`` (SPEC 3, 10)
    source                         string  FILE:LINE
    total_len, longest, num_seqs, prefix_len  int64, int32 x 3: ``packing.GroupLengths`` (costs, computed once)
    num_pairs                      int32   len(better): the loss divides by their sum

Building it (and a split as training loads it): ``polar_train.store_build``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from polar_train.packing import Group, GroupLengths

SCHEMA = pa.schema([
    ("seqs", pa.list_(pa.list_(pa.int32()))), ("better", pa.list_(pa.int32())), ("worse", pa.list_(pa.int32())),
    ("order", pa.list_(pa.int32())), ("source", pa.string()), ("total_len", pa.int64()), ("longest", pa.int32()),
    ("num_seqs", pa.int32()), ("prefix_len", pa.int32()), ("num_pairs", pa.int32()),
])
_ID_COLUMNS = ("seqs", "better", "worse", "order")


# ---------------------------------------------------------------------------------------------
# Opening and reading
# ---------------------------------------------------------------------------------------------


class PairStore:
    """Rows (pairs and lists) read by index from memory-mapped Arrow files (a ``packing.PairReader``).

    ``rows`` selects and orders the table's rows (those that fit a budget); row ``i`` of the
    store is table row ``rows[i]``.
    """

    def __init__(self, table: pa.Table, rows: np.ndarray | None = None):
        self.table = table
        self.rows = np.arange(table.num_rows, dtype=np.int64) if rows is None else rows  # [N] int64
        chunks = table.column("seqs").chunks
        self._chunks = list(zip(*(table.column(name).chunks for name in _ID_COLUMNS)))
        self._starts = np.cumsum([0] + [len(c) for c in chunks])  # [chunks + 1] first table row of each chunk

    @classmethod
    def open(cls, folder: str | os.PathLike[str]) -> PairStore:
        """Map the shards of ``folder`` (nothing is read until a row is)."""
        shards = sorted(Path(folder).glob("shard-*.arrow"))
        tables = [pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all() for path in shards]
        return cls(pa.concat_tables(tables) if tables else SCHEMA.empty_table())

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, rows: np.ndarray) -> PairStore:
        """The pairs ``rows`` (indices into this store) as a new store over the same files."""
        return PairStore(self.table, self.rows[rows])

    def lengths(self) -> GroupLengths:
        """The cached length columns of these rows, as numpy (20 bytes per row)."""
        return GroupLengths(*(self.table.column(name).to_numpy()[self.rows]
                              for name in ("total_len", "longest", "num_seqs", "prefix_len")))

    def num_pairs(self) -> np.ndarray:
        """[N] int32: the implied pairs of each row (1 for a pair row)."""
        return self.table.column("num_pairs").to_numpy()[self.rows]

    def column(self, name: str) -> list[Any]:
        """A whole column as Python objects (tests and small sets only)."""
        return self.table.column(name).take(pa.array(self.rows)).to_pylist()

    def read(self, ids: Sequence[int]) -> list[Group]:
        rows = self.rows[np.asarray(ids, dtype=np.int64)]
        chunk_of = np.searchsorted(self._starts, rows, side="right") - 1
        out = []
        for row, k in zip(rows.tolist(), chunk_of.tolist()):
            local = row - int(self._starts[k])
            out.append(Group(*(column[local].as_py() for column in self._chunks[k])))
        return out

    def read_pairs(self, ids: Sequence[int]) -> list[tuple[list[int], list[int]]]:
        """Every implied pair of the rows ``ids`` as ``(chosen_ids, rejected_ids)``, row by row."""
        return [(g.seqs[b], g.seqs[w]) for g in self.read(ids) for b, w in zip(g.better, g.worse)]
