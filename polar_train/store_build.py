"""Building the tokenized pair store (store.py reads it), and a split as training loads it.

Building: the lines of all files are numbered one after the other and cut into ``world_size *
num_proc`` contiguous ranges; range ``k`` is streamed, validated and tokenized into
``shard-k.arrow`` by process ``k % num_proc`` of rank ``k // num_proc``. Read in name order the
shards are the one-process result row for row, whatever the split. A rank holds one batch of
rows at a time; a training rank holds per pair only the three int32 length columns (as numpy)
and reads ids from the mapped files when a micro-batch needs them.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import secrets
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from transformers import PreTrainedTokenizerBase

from polar_train.cache_entry import check_entry, discard_entry, private_folder, publish
from polar_train.cache_key import dataset_cache_key
from polar_train.config import DataSection
from polar_train.data import DataStats, OnError, SkippedRow, check_rows_read, iter_jsonl_rows
from polar_train.errors import UserError
from polar_train.packing import shared_prefix_length
from polar_train.ranked import Preference, check_preference, encode_preferences, preference_of
from polar_train.ranks import Ranks
from polar_train.store import SCHEMA, PairStore
from polar_train.tokenizer import special_token_ids

logger = logging.getLogger("polar_train")

_BATCH_ROWS = 1024  # rows a tokenizing process encodes in one batch and writes out as one record batch


@dataclass
class PairSet:
    """The pairs of one split (for training: those that fit ``data.max_tokens``), and what was left out."""

    pairs: PairStore  # read by index: one row per pair row or list
    costs: np.ndarray  # [N] int64 tokens per kept row in the configured layout
    num_pairs: np.ndarray  # [N] int32 implied pairs per kept row
    num_over_budget: int  # rows costlier than data.max_tokens (training drops them; eval runs them apart)
    skipped: list[SkippedRow]  # malformed rows left out (data.on_error=skip)
    counts: dict[str, int]  # the eval report's counts (num_dropped: pairs over data.max_length; truncations)


def load_pairs(data: DataSection, files: Sequence[str], tokenizer: PreTrainedTokenizerBase,
               tokenizer_path: str | os.PathLike[str], share_max_len: int | None, split: str, *,
               group: Ranks | None = None) -> PairSet:
    """A split's store (``data``: the config's data section). Training drops a pair costlier than
    ``data.max_tokens`` (a step packs whole pairs); eval keeps it and runs its chosen and rejected
    apart, as ``polar-train eval`` does."""
    store, stats = load_pair_store(
        list(files), tokenizer, str(tokenizer_path), max_length=data.max_length,
        max_response_length=data.max_response_length, cache_dir=data.cache_dir or None, on_error=data.on_error,
        num_proc=data.num_proc, group=group,
    )
    costs = store.lengths().costs(data.shared_prefix, share_max_len)
    fits = costs <= data.max_tokens
    over = int(len(fits) - fits.sum())
    if over:
        logger.warning("%s data: %d rows (pairs or lists) longer than data.max_tokens=%d %s", split, over,
                       data.max_tokens,
                       "dropped (a step packs whole rows: raise data.max_tokens to keep them)" if split == "train"
                       else "run chosen and rejected apart (a list: each candidate)")
    kept = np.flatnonzero(fits) if split == "train" else np.arange(len(fits))
    if not len(kept):
        raise UserError(
            ",".join(files), "no pair fits the length limits",
            f"raise data.max_tokens ({data.max_tokens}) or data.max_length ({data.max_length})",
        )
    counts = {"num_dropped": stats.num_too_long, "num_prompt_truncated": stats.num_prompt_truncated,
              "num_response_truncated": stats.num_response_truncated}
    selected = store.select(kept) if len(kept) < len(fits) else store
    return PairSet(selected, costs[kept], selected.num_pairs(), over, list(stats.skipped), counts)


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Piece:
    """One process's share of the rows: 1-based line ranges ``[first, end)`` of some files."""

    index: int  # shard number: its rows follow those of every lower number
    ranges: tuple[tuple[int, int, int], ...]  # (file index, first line, end line)


def _count_lines(path: str) -> int:
    """Lines as ``iter_jsonl_rows`` numbers them (a last line without "\\n" counts)."""
    count, last = 0, b"\n"
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                count += chunk.count(b"\n")
                last = chunk[-1:]
    except OSError:
        return 1  # reading it reports the problem with its path
    return count + (last != b"\n")


def _pieces(line_counts: Sequence[int], num_pieces: int) -> list[_Piece]:
    """Cut the lines of all files, numbered one after the other, into contiguous ranges."""
    total, starts = sum(line_counts), np.cumsum([0, *line_counts]).tolist()
    pieces = []
    for k in range(num_pieces):
        lo, hi = total * k // num_pieces, total * (k + 1) // num_pieces
        ranges = tuple((f, max(lo, starts[f]) - starts[f] + 1, min(hi, starts[f + 1]) - starts[f] + 1)
                       for f in range(len(line_counts)) if max(lo, starts[f]) < min(hi, starts[f + 1]))
        pieces.append(_Piece(k, ranges))
    return pieces


def _tokenize_piece(piece: _Piece, files: Sequence[str], folder: str, tokenizer: PreTrainedTokenizerBase,
                    settings: dict[str, Any]) -> dict[str, Any]:
    """Stream, validate and tokenize one piece into ``folder/shard-<index>.arrow``.

    Returns its stats (``DataStats`` fields, rows per file) or the first bad row's error as data
    (it may run in a worker process, and a raised ``UserError`` does not survive pickling)."""
    stats = DataStats()
    rows_per_file = [0] * len(files)
    columns: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
    path = Path(folder) / f"shard-{piece.index:05d}.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
        def flush() -> None:
            if columns["source"]:
                writer.write_batch(pa.record_batch([columns[n] for n in SCHEMA.names], schema=SCHEMA))
                for values in columns.values():
                    values.clear()

        pending: list[tuple[str, Preference]] = []  # (FILE:LINE, row) read, not yet tokenized

        def tokenize_pending() -> None:
            """Encode the pending rows in one batch (two tokenizer calls) and write them out."""
            for (source, pref), encoded in zip(pending, encode_preferences(tokenizer, [p for _, p in pending],
                                                                           **settings["encode"])):
                if encoded is None:
                    stats.num_too_long += 1
                    if len(stats.too_long_sources) < DataStats.NUM_EXAMPLES:
                        stats.too_long_sources.append(source)
                    continue
                stats.count_row(pref.is_list, encoded)
                seqs = encoded.seqs
                for name, value in zip(SCHEMA.names, (seqs, encoded.better, encoded.worse, encoded.order, source,
                                                      sum(map(len, seqs)), max(map(len, seqs)), len(seqs),
                                                      shared_prefix_length(*seqs), len(encoded.better))):
                    columns[name].append(value)
            pending.clear()
            flush()

        try:
            for f, first, end in piece.ranges:
                for row in iter_jsonl_rows(files[f], ("prompt",), on_error=settings["on_error"], lines=(first, end),
                                           check=check_preference):
                    stats.num_rows += 1
                    if isinstance(row, SkippedRow):
                        stats.skipped.append(row)
                        continue
                    rows_per_file[f] += 1
                    pending.append((row.source, preference_of(row)))
                    if len(pending) >= _BATCH_ROWS:
                        tokenize_pending()
        except UserError as error:
            return {"error": [error.where, error.what, error.fix]}
        tokenize_pending()
    stats.num_pairs = stats.num_rows - len(stats.skipped) - stats.num_too_long
    stats.num_skipped = len(stats.skipped)
    return {"error": None, "stats": stats.as_dict(max_skipped=None), "rows_per_file": rows_per_file}


def _tokenize_pieces(pieces: Sequence[_Piece], files: Sequence[str], folder: Path, tokenizer: PreTrainedTokenizerBase,
                     settings: dict[str, Any]) -> list[dict[str, Any]]:
    """This rank's pieces, one process each (``data.num_proc``); results in piece order."""
    if len(pieces) == 1:
        return [_tokenize_piece(pieces[0], files, str(folder), tokenizer, settings)]
    # fork: the workers start at once with the tokenizer in memory (they use no torch, no threads)
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(len(pieces), mp_context=context) as pool:
        futures = [pool.submit(_tokenize_piece_in_worker, p, files, str(folder), tokenizer, settings) for p in pieces]
        return [f.result() for f in futures]


def _tokenize_piece_in_worker(*args: Any) -> dict[str, Any]:
    """``_tokenize_piece`` in one of ``data.num_proc`` processes: its batch calls stay on one thread
    (the processes already share the cores). Set before the worker's first batch call."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return _tokenize_piece(*args)


def _merge(results: Sequence[dict[str, Any]], files: Sequence[str]) -> DataStats:
    """The stats of all pieces in order, or the first piece's error (the first bad row of the files)."""
    for result in results:
        if result["error"] is not None:
            raise UserError(*result["error"])
    parts = [DataStats.from_dict(r["stats"]) for r in results]
    stats = DataStats(skipped=[s for p in parts for s in p.skipped],
                      too_long_sources=[s for p in parts for s in p.too_long_sources])
    for name in ("num_rows", "num_pairs", "num_tokens", "num_too_long", "num_prompt_truncated",
                 "num_response_truncated",
                 "num_skipped", *DataStats.LIST_COUNTS):
        setattr(stats, name, sum(getattr(p, name) for p in parts))
    for f, name in enumerate(files):  # read_jsonl_rows' "no rows" checks, file by file
        first_skipped = [s for s in stats.skipped if s.source.rsplit(":", 1)[0] == name][:1]
        skipped_here = sum(1 for s in stats.skipped if s.source.rsplit(":", 1)[0] == name)
        check_rows_read(name, sum(r["rows_per_file"][f] for r in results), first_skipped, skipped_here)
    return stats


def _shared_folder(cache_root: Path, key: str, group: Ranks) -> Path | None:
    """A temporary folder every rank sees, named by rank 0 (None on every rank if one cannot see it)."""
    token = torch.tensor([secrets.randbits(62) if group.rank == 0 else 0], dtype=torch.int64, device=group.device)
    folder = cache_root / f".{key}.tmp-{int(group.all_reduce_sum(token).item()):016x}"
    if group.rank == 0:
        try:
            folder.mkdir(parents=True)
        except OSError as error:
            logger.warning("data: cannot create %s (%s)", folder, error)
    _sync(group)  # rank 0 has created it (or failed)
    if not _every_rank(group, folder.is_dir()):
        logger.warning("data: data.cache_dir %s is not a folder every rank can write: each rank tokenizes all the data",
                       cache_root)
        return None
    return folder


def _every_rank(group: Ranks, flag: bool) -> bool:
    """True on every rank if ``flag`` is True on every rank (one small all-reduce)."""
    return group.all_reduce_sum(torch.tensor([float(flag)], device=group.device)).item() == group.world_size


def _sync(group: Ranks) -> None:
    group.all_reduce_sum(torch.zeros(1, device=group.device))  # a barrier through the one collective we need


def load_pair_store(
    files: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    tokenizer_path: str,
    *,
    max_length: int = 16384,
    max_response_length: int = 4096,
    cache_dir: str | None = None,
    on_error: OnError = "raise",
    num_proc: int = 1,
    reward_token_id: int | None = None,
    group: Ranks | None = None,
) -> tuple[PairStore, DataStats]:
    """Read, validate and tokenize preference files into a memory-mapped ``PairStore``.

    Rows are in file order; pairs that do not fit ``max_length`` are dropped and counted. With
    ``cache_dir`` the result is kept under ``cache_dir/<key>`` (``dataset_cache_key``: file bytes,
    tokenizer files, lengths, ``on_error``, library and code versions) and a later call with the
    same key maps it without reading or tokenizing anything. Every rank of ``group`` (on a
    ``cache_dir`` they share) tokenizes its own contiguous share with ``num_proc`` processes;
    all then map the same published entry. A bad row is the same ``UserError`` on every rank.
    ``reward_token_id`` (from the model config), when given, must match the tokenizer.
    """
    files = [str(f) for f in files]
    if not files:
        raise ValueError("load_pair_store needs at least one file")
    if num_proc < 1:
        raise UserError("data.num_proc", f"must be > 0, got {num_proc}",
                        "set data.num_proc=1 or more processes per rank")
    sep_id, reward_id = special_token_ids(tokenizer, reward_token_id)
    key = dataset_cache_key(files, tokenizer_path, max_length=max_length, max_response_length=max_response_length,
                            on_error=on_error)
    final_dir = Path(cache_dir).expanduser() / key if cache_dir else None
    shared = group if group is not None and group.world_size > 1 and final_dir is not None else None
    hit = final_dir is not None and (final_dir / "stats.json").is_file()
    damage = check_entry(final_dir, len(tokenizer)) if hit else None  # never train on a changed cache
    if damage is not None:
        logger.warning("data: %s %s: rebuilding the cache entry %s", damage.path, damage.what, final_dir)
    trusted = hit and damage is None
    if shared is not None:  # every rank must take the same path (another job may publish right now)
        trusted = _every_rank(shared, trusted)
    if trusted:
        return _open_hit(final_dir)
    # readers test for stats.json: a damaged entry goes before a new one is published
    removed = discard_entry(final_dir) if hit and (shared is None or shared.rank == 0) else True
    if not (_every_rank(shared, removed) if shared is not None else removed):
        raise UserError(final_dir, "is a damaged tokenization cache entry that cannot be removed",
                        f"delete it (rm -r {final_dir}) or set another data.cache_dir, and run again")

    folder = _shared_folder(final_dir.parent, key, shared) if shared is not None else None
    if folder is None:
        shared = None
        folder = private_folder(final_dir)
    rank, world = (shared.rank, shared.world_size) if shared is not None else (0, 1)
    settings = {"on_error": on_error, "encode": dict(max_length=max_length, max_response_length=max_response_length,
                                                     sep_id=sep_id, reward_id=reward_id)}
    try:
        start = time.perf_counter()
        pieces = _pieces([_count_lines(f) for f in files], world * num_proc)[rank * num_proc : (rank + 1) * num_proc]
        if rank == 0:
            logger.info("data: tokenizing %d file(s) with %d rank(s) x %d process(es)", len(files), world, num_proc)
        results = _tokenize_pieces(pieces, files, folder, tokenizer, settings)
        timing = {"seconds": time.perf_counter() - start, "results": results}
        (folder / f"rank-{rank:05d}.json").write_text(json.dumps(timing))
        if shared is not None:
            _sync(shared)  # every rank's shards and results are written
        ranks = [json.loads((folder / f"rank-{r:05d}.json").read_text()) for r in range(world)]
        if shared is not None:
            _sync(shared)  # every rank has read them: rank 0 may now publish the folder or remove it
        stats = _merge([result for r in ranks for result in r["results"]], files)  # the same on every rank
        stats.tokenize_seconds = max(r["seconds"] for r in ranks)
        stats.tokens_per_s = stats.num_tokens / max(stats.tokenize_seconds, 1e-9)
        stats.too_long_sources = stats.too_long_sources[: DataStats.NUM_EXAMPLES]
        _log_build(stats, max_length)
        if not stats.num_pairs:
            raise UserError(
                ", ".join(files), f"no pair fits max_length={max_length}: all {stats.num_too_long} pairs are too long "
                f"(first: {stats.too_long_sources[0]})",
                f"raise data.max_length, or lower data.max_response_length (now {max_response_length}) "
                "to leave the prompt room",
            )
        if rank == 0 and final_dir is not None:
            publish(folder, stats, final_dir)
        if shared is not None:
            _sync(shared)  # published
        published = final_dir is not None and (final_dir / "stats.json").is_file()
        store = PairStore.open(final_dir if published else folder)
        if shared is not None:
            _sync(shared)  # every rank has mapped its files before the folder goes
    finally:
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)  # mapped files stay readable until unmapped (POSIX)
    return store, stats


def _open_hit(final_dir: Path) -> tuple[PairStore, DataStats]:
    store = PairStore.open(final_dir)
    stats = DataStats.from_dict(json.loads((final_dir / "stats.json").read_text()))
    stats.cache_hit = True
    logger.info("data: cache hit, tokenized pairs mapped from %s", final_dir)
    logger.info("data: %s", stats.summary())
    return store, stats


def _log_build(stats: DataStats, max_length: int) -> None:
    if stats.skipped:
        first = ", ".join(s.source for s in stats.skipped[: DataStats.NUM_EXAMPLES])
        logger.warning("data: skipped %d bad rows (on_error=skip; first: %s; %s: %s)", stats.num_skipped, first,
                       stats.skipped[0].source, stats.skipped[0].reason)
    if stats.num_identical_pairs:  # they add to the loss, nothing to the gradient
        logger.warning("data: %d pairs teach nothing: chosen and rejected encode to the same ids "
                       "(fix or remove those rows)",
                       stats.num_identical_pairs)
    if stats.num_too_long:
        logger.warning("data: dropped %d rows that do not fit max_length=%d (first: %s)", stats.num_too_long,
                       max_length,
                       ", ".join(stats.too_long_sources))
    logger.info("data: %s", stats.summary())
    logger.info("data: tokenized %d tokens in %.1f s: %.0f tokens/s", stats.num_tokens, stats.tokenize_seconds,
                stats.tokens_per_s)

