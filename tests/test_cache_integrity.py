"""A tokenization cache entry is trusted only if it is what was published: a garbled, truncated or
missing shard, a changed manifest or token ids outside the tokenizer's vocabulary are logged in
one line naming the file and the entry is rebuilt; training never reads the damaged ids."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pyarrow as pa
import pytest
from transformers import PreTrainedTokenizerBase

import polar_train.store_build as store_module
from polar_train import cache_entry
from polar_train.cache_entry import MANIFEST, check_entry, write_manifest
from polar_train.errors import UserError
from polar_train.store_build import load_pair_store
from polar_train.train import run

from test_resume import in_process_config, make_run_folder, metric_rows, one_thread  # noqa: F401
from test_store import columns, write_pairs

KWARGS = dict(max_length=512, max_response_length=128, on_error="raise")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("integrity_data")
    return [str(write_pairs(folder / "a.jsonl", 200))]


def build(data: list[str], tokenizer: PreTrainedTokenizerBase, cache: Path):
    """The store of ``data`` through the cache (two shards: num_proc=2), and its entry folder."""
    store, stats = load_pair_store(data, tokenizer, "tiny", cache_dir=str(cache), num_proc=2, **KWARGS)
    (entry,) = cache.iterdir()
    return store, stats, entry


def garble(path: Path) -> None:
    """4 KB (or a quarter of a small file) overwritten in the middle, the size unchanged."""
    size = path.stat().st_size
    n = min(4096, size // 4)
    with open(path, "r+b") as f:
        f.seek(size // 2 - n // 2)
        f.write(bytes(range(256)) * (n // 256) + b"\xff" * (n % 256))


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


DAMAGES = {  # how the file is damaged -> what the one log line says about it
    "garbled": (garble, "does not match its recorded checksum (its bytes changed)"),
    "truncated": (truncate, "holds {half} bytes, {size} were published"),
    "missing": (Path.unlink, "is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_shard_is_named_and_the_entry_rebuilt(damage: str, data: list[str], tiny_tokenizer, tmp_path: Path,
                                                        caplog) -> None:
    clean, _, entry = build(data, tiny_tokenizer, tmp_path)
    expected = columns(clean)  # read now: the store maps the files damaged in place below
    shard = entry / "shard-00001.arrow"
    size = shard.stat().st_size
    assert size > 8192
    hurt, what = DAMAGES[damage]
    hurt(shard)
    with caplog.at_level(logging.INFO, logger="polar_train"):
        again, stats, rebuilt = build(data, tiny_tokenizer, tmp_path)
    what = what.format(half=size // 2, size=size)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "cache" in r.getMessage()]
    assert warnings == [f"data: {shard} {what}: rebuilding the cache entry {entry}"]
    assert not stats.cache_hit and rebuilt == entry and check_entry(entry, len(tiny_tokenizer)) is None
    assert columns(again) == expected


def test_an_intact_entry_is_a_hit_and_a_changed_manifest_or_stats_is_caught(data: list[str], tiny_tokenizer,
                                                                            tmp_path: Path) -> None:
    clean, _, entry = build(data, tiny_tokenizer, tmp_path)
    assert check_entry(entry, len(tiny_tokenizer)) is None
    again, stats, _ = build(data, tiny_tokenizer, tmp_path)
    assert stats.cache_hit and columns(again) == columns(clean)

    (entry / "stats.json").write_text('{"num_pairs": 1}')
    assert check_entry(entry, 300) == cache_entry.Damage(
        entry / "stats.json", f"holds 16 bytes, {clean_size(entry)} were published")
    (entry / MANIFEST).write_text("{")
    assert check_entry(entry, 300) == cache_entry.Damage(entry / MANIFEST, "is not a readable cache manifest")
    (entry / MANIFEST).unlink()  # an entry written before manifests existed
    assert check_entry(entry, 300) == cache_entry.Damage(
        entry / MANIFEST, "is missing (an entry from an older polar-train, or damaged)")
    (entry / "shard-00002.arrow").write_bytes(b"")
    write_manifest(entry)
    (entry / "shard-00002.arrow").unlink()
    (entry / "shard-00003.arrow").write_bytes(b"")
    assert check_entry(entry, 300) == cache_entry.Damage(entry / "shard-00003.arrow",
                                                         "is not one of the entry's published files")


def clean_size(entry: Path) -> int:
    return json.loads((entry / MANIFEST).read_text())["files"]["stats.json"]["bytes"]


def test_ids_outside_the_vocabulary_are_refused_even_with_matching_checksums(data: list[str], tiny_tokenizer,
                                                                             tmp_path: Path, caplog) -> None:
    clean, _, entry = build(data, tiny_tokenizer, tmp_path)
    expected = columns(clean)
    shard = entry / "shard-00000.arrow"
    table = pa.ipc.open_file(pa.memory_map(str(shard), "r")).read_all()
    seqs = table.column("seqs").to_pylist()
    seqs[3][0][5] = len(tiny_tokenizer) + 7  # planted: a tokenizer with a larger vocabulary under a colliding key
    planted = table.set_column(0, "seqs", pa.chunked_array([pa.array(seqs, type=table.schema.field("seqs").type)]))
    with pa.OSFile(str(tmp_path / "planted"), "wb") as sink, pa.ipc.new_file(sink, planted.schema) as writer:
        writer.write_table(planted)
    os.replace(tmp_path / "planted", shard)  # not in place: the old file is still mapped
    write_manifest(entry)  # the checksums match what is there now
    with caplog.at_level(logging.WARNING, logger="polar_train"):
        again, stats, _ = build(data, tiny_tokenizer, tmp_path)
    assert [r.getMessage() for r in caplog.records if "cache" in r.getMessage() and r.levelno >= logging.WARNING] == [
        f"data: {shard} holds token id {len(tiny_tokenizer) + 7}, outside the tokenizer's vocabulary of "
        f"{len(tiny_tokenizer)} (tokenized by another tokenizer): rebuilding the cache entry {entry}"]
    assert not stats.cache_hit and columns(again) == expected


def test_an_entry_tokenized_by_a_larger_vocabulary_under_a_colliding_key_is_rebuilt(
        data: list[str], tiny_tokenizer, demo_tokenizer, tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(store_module, "dataset_cache_key", lambda *args, **kwargs: "same-key")
    build(data, demo_tokenizer, tmp_path)  # 600 tokens
    with caplog.at_level(logging.WARNING, logger="polar_train"):
        ours, stats, entry = build(data, tiny_tokenizer, tmp_path)  # 300 tokens
    (line,) = [r.getMessage() for r in caplog.records if "cache" in r.getMessage() and r.levelno >= logging.WARNING]
    assert line.startswith(f"data: {entry}/shard-0000") and line.endswith(
        f", outside the tokenizer's vocabulary of {len(tiny_tokenizer)} (tokenized by another tokenizer): "
        f"rebuilding the cache entry {entry}")
    fresh, _ = load_pair_store(data, tiny_tokenizer, "tiny", **KWARGS)  # no cache
    assert not stats.cache_hit and columns(ours) == columns(fresh)


def test_a_damaged_entry_that_cannot_be_removed_stops_with_one_line(data: list[str], tiny_tokenizer, tmp_path: Path,
                                                                    monkeypatch) -> None:
    _, _, entry = build(data, tiny_tokenizer, tmp_path)
    garble(entry / "shard-00000.arrow")

    def read_only(src, dst):
        raise PermissionError(13, "Permission denied", str(src))

    monkeypatch.setattr(cache_entry.os, "rename", read_only)
    with pytest.raises(UserError) as error:
        build(data, tiny_tokenizer, tmp_path)
    assert str(error.value) == (f"{entry}: is a damaged tokenization cache entry that cannot be removed (delete it "
                                f"(rm -r {entry}) or set another data.cache_dir, and run again)")


def test_training_never_reads_a_garbled_cache(tmp_path: Path) -> None:
    """The losses after the shard was garbled equal the clean run's: the entry was rebuilt, not read."""
    folder = make_run_folder(tmp_path)
    cache = ["data.cache_dir=" + str(tmp_path / "cache"), "train.max_steps=3"]
    run(in_process_config(folder, "clean", *cache))
    shards = sorted((tmp_path / "cache").glob("*/shard-*.arrow"))
    assert len(shards) == 2  # the train and the eval entry
    for shard in shards:
        garble(shard)
    run(in_process_config(folder, "after", *cache))
    log = (folder / "after" / "train.log").read_text()
    assert [f"{shard} does not match its recorded checksum" in log for shard in shards] == [True, True]
    assert metric_rows(folder / "after") == metric_rows(folder / "clean")
