"""The pair store: streamed rows, sharded tokenization (ranks and processes) equal to one process
row for row, the cached cost columns, reading by index, and what a rank holds in memory."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from transformers import PreTrainedTokenizerBase

from polar_train.data import SkippedRow, iter_jsonl_rows, read_jsonl_rows
from polar_train.errors import UserError
from polar_train.packing import PairList, StepPlanner, pack_step, pair_cost
from polar_train.store import SCHEMA, PairStore
from polar_train.store_build import _pieces, load_pair_store, load_pairs
from polar_train.config import DataSection

from test_resume import subprocess_env

WORDS = "apple pear plum fig kiwi lime mango grape melon peach".split()


def write_pairs(path: Path, n: int, *, seed: int = 0, bad_every: int = 0, words: int = 6) -> Path:
    """``n`` lines of pairs of varied length; every ``bad_every``-th line is invalid JSON; line 5 is blank."""
    rng = np.random.default_rng(seed)
    lines = []
    for k in range(1, n + 1):
        if bad_every and k % bad_every == 0:
            lines.append('{"prompt": oops')
            continue
        if k == 5:
            lines.append("")
            continue
        pick = lambda m: " ".join(rng.choice(WORDS, size=int(rng.integers(1, m + 1))))  # noqa: E731
        same = k % 7 == 0  # identical candidates: the prefix is capped at length - 1
        chosen = pick(words)
        row = {"prompt": pick(3 * words), "reference": pick(words), "chosen": chosen, "rejected": chosen if same else pick(words),
               "wrapper": "pretrain" if k % 3 == 0 else "sft"}
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def columns(store: PairStore) -> dict[str, list]:
    return {name: store.column(name) for name in SCHEMA.names}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("store_data")
    return [str(write_pairs(folder / "a.jsonl", 41, bad_every=9)), str(write_pairs(folder / "b.jsonl", 30, seed=1, bad_every=13))]


KWARGS = dict(max_length=44, max_response_length=20, on_error="skip")  # some rows too long, some truncated


# --- streaming --------------------------------------------------------------------------------


def test_streamed_rows_are_the_rows_read_whole_and_shards_of_lines_add_up(data: list[str]) -> None:
    rows, skipped = read_jsonl_rows(data[0], ("prompt", "reference", "chosen", "rejected"), on_error="skip")
    streamed = list(iter_jsonl_rows(data[0], ("prompt", "reference", "chosen", "rejected"), on_error="skip"))
    assert [r for r in streamed if not isinstance(r, SkippedRow)] == rows
    assert [r for r in streamed if isinstance(r, SkippedRow)] == skipped and [s.source for s in skipped] == [
        f"{data[0]}:{n}" for n in (9, 18, 27, 36)]
    parts = [list(iter_jsonl_rows(data[0], ("prompt",), on_error="skip", lines=span)) for span in ((1, 9), (9, 30), (30, 99))]
    assert [r.source for part in parts for r in part] == [r.source for r in streamed]


def test_a_stream_reads_only_what_it_yields(tmp_path: Path) -> None:
    """A 64 GiB file (sparse: no disk used) yields its first row at once: nothing reads it whole."""
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:
        f.write(json.dumps({"prompt": "a", "reference": "b", "chosen": "c", "rejected": "d"}).encode() + b"\n")
        f.truncate(64 << 30)
    first = next(iter_jsonl_rows(path, ("prompt", "reference", "chosen", "rejected")))
    assert first.texts["chosen"] == "c" and first.source == f"{path}:1"


# --- sharding ---------------------------------------------------------------------------------


def test_pieces_cover_every_line_once_in_order() -> None:
    for counts, n in (([10], 3), ([4, 0, 7, 1], 5), ([3], 8)):
        pieces = _pieces(counts, n)
        assert [p.index for p in pieces] == list(range(n))
        lines = [(f, line) for p in pieces for f, first, end in p.ranges for line in range(first, end)]
        assert lines == [(f, line) for f, c in enumerate(counts) for line in range(1, c + 1)]


def test_processes_build_the_one_process_store_row_for_row(data: list[str], tiny_tokenizer: PreTrainedTokenizerBase,
                                                           tmp_path: Path) -> None:
    one, one_stats = load_pair_store(data, tiny_tokenizer, "tiny", cache_dir=str(tmp_path / "one"), **KWARGS)
    three, three_stats = load_pair_store(data, tiny_tokenizer, "tiny", cache_dir=str(tmp_path / "three"), num_proc=3, **KWARGS)
    assert columns(three) == columns(one) and len(one) == one_stats.num_pairs >= 30
    (entry,) = (tmp_path / "three").iterdir()
    assert sorted(p.name for p in entry.iterdir()) == [
        "manifest.json", "shard-00000.arrow", "shard-00001.arrow", "shard-00002.arrow", "stats.json"]
    timing = ("tokenize_seconds", "tokens_per_s")
    assert {k: v for k, v in three_stats.as_dict(None).items() if k not in timing} == {
        k: v for k, v in one_stats.as_dict(None).items() if k not in timing}
    assert one_stats.num_skipped == 6 and one_stats.num_too_long > 0 and one_stats.num_response_truncated > 0


TWO_RANKS = """\
import sys
import torch
import torch.distributed as td
from polar_train.errors import UserError
from polar_train.store_build import load_pair_store
from polar_train.tokenizer import load_tokenizer


class Group:  # what the store needs of a process group (engine.Dist in training)
    def __init__(self):
        td.init_process_group("gloo")
        self.rank, self.world_size, self.device = td.get_rank(), td.get_world_size(), torch.device("cpu")

    def all_reduce_sum(self, tensor):
        td.all_reduce(tensor)
        return tensor


tok, cache, on_error, *files = sys.argv[1:]
group = Group()
try:
    store, stats = load_pair_store(files, load_tokenizer(tok), tok, max_length=44, max_response_length=20,
                                   cache_dir=cache, on_error=on_error, group=group)
    line = f"rank {group.rank}: {len(store)} pairs, hit {stats.cache_hit}"
except UserError as error:
    line = f"rank {group.rank}: polar-train: error: {error}"
with open(f"rank-{group.rank}.out", "w") as f:  # one file each: two processes' prints interleave
    f.write(line)
td.barrier()
td.destroy_process_group()
"""


def two_ranks(tmp_path: Path, tok: Path, cache: Path, on_error: str, files: list[str]) -> list[str]:
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
           str(tok), str(cache), on_error, *files]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [(tmp_path / f"rank-{r}.out").read_text() for r in (0, 1)]


@pytest.mark.slow
def test_two_ranks_tokenize_disjoint_halves_into_the_one_process_cache(data: list[str], tiny_tokenizer_path: Path,
                                                                      tiny_tokenizer: PreTrainedTokenizerBase,
                                                                      tmp_path: Path) -> None:
    one, _ = load_pair_store(data, tiny_tokenizer, str(tiny_tokenizer_path), cache_dir=str(tmp_path / "one"), **KWARGS)
    assert two_ranks(tmp_path, tiny_tokenizer_path, tmp_path / "two", "skip", data) == [
        f"rank 0: {len(one)} pairs, hit False", f"rank 1: {len(one)} pairs, hit False"]
    (entry,) = (tmp_path / "two").iterdir()  # the same key, nothing left behind
    assert entry.name == next((tmp_path / "one").iterdir()).name
    shards = [PairStore(pa.ipc.open_file(pa.memory_map(str(entry / f"shard-0000{k}.arrow"))).read_all()) for k in (0, 1)]
    halves = [s.column("source") for s in shards]
    assert halves[0] and halves[1] and halves[0] + halves[1] == one.column("source")  # disjoint halves, in order
    two = PairStore.open(entry)
    assert columns(two) == columns(one)  # every column, row for row
    one_stats = json.loads((next((tmp_path / "one").iterdir()) / "stats.json").read_text())
    two_stats = json.loads((entry / "stats.json").read_text())
    for stats in (one_stats, two_stats):
        del stats["tokenize_seconds"], stats["tokens_per_s"]
    assert two_stats == one_stats and len(two_stats["skipped"]) == 6
    # a bad row in rank 1's half: the same one line on both ranks, with its FILE:LINE
    clean, bad = write_pairs(tmp_path / "c.jsonl", 20), write_pairs(tmp_path / "d.jsonl", 20, bad_every=17)
    assert two_ranks(tmp_path, tiny_tokenizer_path, tmp_path / "bad", "raise", [str(clean), str(bad)]) == [
        f"rank {r}: polar-train: error: {bad}:17: invalid JSON: Expecting value at column 12 "
        "(fix or remove this line, or set data.on_error=skip)" for r in (0, 1)]
    assert not list((tmp_path / "bad").iterdir())  # no cache entry, no temporary folder


# --- the cost columns, reading by index, memory ---------------------------------------------------


def test_cost_columns_equal_pair_cost_on_every_row(data: list[str], tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    store, _ = load_pair_store(data, tiny_tokenizer, "tiny", **KWARGS)
    pairs = store.read_pairs(range(len(store)))
    lengths = store.lengths()
    assert lengths.longest.dtype == np.int32 and len(lengths.prefix) == len(pairs) == len(store)
    for share, share_max_len in ((False, None), (True, None), (True, 40)):
        assert lengths.costs(share, share_max_len).tolist() == [pair_cost(c, r, share, share_max_len) for c, r in pairs]
    assert any(c == r for c, r in pairs)  # identical candidates: the prefix keeps one token each
    assert len({int(n) > 40 for n in lengths.longest}) == 2  # share_max_len bites


def test_micro_batches_read_from_the_store_equal_those_from_lists(data: list[str], tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    store, _ = load_pair_store(data, tiny_tokenizer, "tiny", **KWARGS)
    kept = store.select(np.arange(len(store))[::2])  # a selection, as over-budget pairs leave
    plan = StepPlanner(kept.lengths().costs(True), pairs_per_step=16, max_tokens=300, num_ranks=2, seed=1).plan(0, 1)
    in_memory = PairList(kept.read(range(len(kept))))
    for rank in plan:
        for a, b in zip(pack_step(rank, kept, shared_prefix=True), pack_step(rank, in_memory, shared_prefix=True)):
            assert a.input_ids.tolist() == b.input_ids.tolist() and a.pair_ids == b.pair_ids
            assert a.meta.key_index.tolist() == b.meta.key_index.tolist()


def test_a_cache_hit_holds_no_token_ids_in_python(tmp_path: Path, tiny_tokenizer_path: Path,
                                                  tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    """What a training rank keeps after mapping a split and planning a step: a few numpy numbers
    per pair, far under 1 byte per dataset token (lists of ids would hold >= 8 bytes per token)."""
    path = write_pairs(tmp_path / "long.jsonl", 600, words=40)
    section = DataSection(max_length=4096, max_tokens=4096, cache_dir=str(tmp_path / "cache"))
    built = load_pairs(section, [str(path)], tiny_tokenizer, tiny_tokenizer_path, None, "train")
    num_tokens = int(built.pairs.lengths().costs(False).sum())
    del built
    tracemalloc.start()
    pairs = load_pairs(section, [str(path)], tiny_tokenizer, tiny_tokenizer_path, None, "train")
    planner = StepPlanner(pairs.costs, pairs_per_step=32, max_tokens=section.max_tokens, seed=0)
    planner.plan(0, 0)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert num_tokens > 100_000 and isinstance(pairs.costs, np.ndarray) and isinstance(planner.costs, np.ndarray)
    assert held < 64 * len(pairs.pairs) and held < 0.1 * num_tokens, (held, num_tokens)


def test_building_holds_one_batch_of_rows(tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    """Python memory while tokenizing does not grow with the file (the rows stream to disk)."""
    peaks = []
    for n in (1200, 4800):
        path = write_pairs(tmp_path / f"{n}.jsonl", n)
        tracemalloc.start()
        load_pair_store([str(path)], tiny_tokenizer, "tiny", cache_dir=str(tmp_path / "cache"))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.3 * peaks[0], peaks


def test_num_proc_must_be_positive(data: list[str], tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(UserError, match=r"^data\.num_proc: must be > 0, got 0"):
        load_pair_store(data, tiny_tokenizer, "tiny", num_proc=0)
