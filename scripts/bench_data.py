"""Data-path benchmark: tokenization speed and what `train` costs up to its first step on a cache hit.

For each size (pairs of the POLAR-like length mix, ``scripts/make_length_mix.py``):

1. tokenize into a fresh cache with ``polar-train data`` and 1, 2, ... processes
   (``data.num_proc``): the ``tokens_per_s`` it reports;
2. ``polar-train train`` on that cache (a hit) with a tiny fresh model, no eval,
   ``train.max_steps=1``: peak RSS of the process (``os.wait4``'s rusage, the kernel's high-water
   mark) and the seconds from launch to the first ``metrics.jsonl`` row (the first step).

Then the slope of peak RSS against dataset tokens between the smallest and largest size (bytes
per token: what each rank pays per token of data). Every command runs in its own subprocess.

``--replicate K ...`` adds sizes of K copies of the largest tokenized file whose caches are
assembled from its tokenized shards (the same rows K times, ``FILE:LINE`` renumbered: what
tokenizing the copies would write) instead of tokenizing again: for machines where tokenizing
the largest size would take too long. Step 2 cannot tell the difference; step 1 is not run.

    python scripts/bench_data.py --sizes 5000 20000 80000 --json /tmp/bench_data.json
    python scripts/bench_data.py --sizes 5000 20000 --replicate 2 4 --reuse   # 40k and 80k assembled
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CONFIG = """\
seed: 0
model:
  attention: sdpa
  fresh: {{tokenizer: {tokenizer}, hidden_size: 32, num_layers: 2, num_heads: 4, num_kv_heads: 2, intermediate_size: 64}}
data:
  train_files: [{data}]
  eval_files: []
  max_length: 16384
  max_response_length: 4096
  max_tokens: 16384
  cache_dir: {cache}
train: {{pairs_per_step: 4, max_steps: 1, log_steps: 1, precision: fp32, save_steps: 0}}
"""


def polar_train(code: Path, *args: str) -> list[str]:
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(code)!r}); from polar_train.cli import entry; entry()", *args]


def env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def make_data(work: Path, num_pairs: int, scale: float, tokenizer: str) -> Path:
    path = work / f"mix-{num_pairs}-{scale}.jsonl"
    if not path.is_file():
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_length_mix.py"), "--tokenizer", tokenizer,
                        "--num-pairs", str(num_pairs), "--scale", str(scale), "--out", str(path)], check=True, env=env())
    return path


def tokenize(code: Path, config: Path, num_proc: int | None) -> dict:
    """``polar-train data`` into the config's (fresh) cache; its train report."""
    extra = [f"data.num_proc={num_proc}"] if num_proc is not None else []
    proc = subprocess.run(polar_train(code, "data", str(config), *extra), capture_output=True, text=True, env=env())
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout)["train"]


def replicate(code: Path, data: Path, cache: Path, copies: int, work: Path, tokenizer: str) -> tuple[Path, Path]:
    """``copies`` x ``data`` as one file, and its cache assembled from ``data``'s tokenized shards."""
    sys.path.insert(0, str(code))
    import pyarrow as pa

    from polar_train.cache_key import dataset_cache_key

    big = work / f"{data.stem}-x{copies}.jsonl"
    text = data.read_bytes()
    assert text.endswith(b"\n"), "each copy must start on a new line"
    big.write_bytes(text * copies)
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    key = dataset_cache_key([str(big)], tokenizer, max_length=16384, max_response_length=4096, on_error="raise")
    big_cache = work / f"cache-{big.stem}"
    shutil.rmtree(big_cache, ignore_errors=True)
    (big_cache / key).mkdir(parents=True)
    shards, num_lines = sorted(entry.glob("shard-*.arrow")), text.count(b"\n")
    for c in range(copies):
        for s, shard in enumerate(shards):
            table = pa.ipc.open_file(pa.memory_map(str(shard))).read_all()
            sources = [f"{big}:{int(src.rsplit(':', 1)[1]) + c * num_lines}" for src in table.column("source").to_pylist()]
            table = table.set_column(table.schema.get_field_index("source"), "source", pa.array(sources, pa.string()))
            with pa.OSFile(str(big_cache / key / f"shard-{c * len(shards) + s:05d}.arrow"), "wb") as sink:
                with pa.ipc.new_file(sink, table.schema) as writer:
                    writer.write_table(table, max_chunksize=1024)
    stats = json.loads((entry / "stats.json").read_text())
    for name in ("num_rows", "num_pairs", "num_tokens", "num_too_long", "num_prompt_truncated", "num_response_truncated"):
        stats[name] *= copies
    stats["too_long_sources"] = [f"{big}:{src.rsplit(':', 1)[1]}" for src in stats["too_long_sources"]]
    (big_cache / key / "stats.json").write_text(json.dumps(stats))
    return big, big_cache


def best_of(rounds: int, code: Path, config: Path, out: Path) -> dict:
    """``first_step`` ``rounds`` times: the fastest round's times, the highest peak RSS of all."""
    runs = []
    for _ in range(rounds):
        shutil.rmtree(out, ignore_errors=True)
        runs.append(first_step(code, config, out))
    best = dict(min(runs, key=lambda r: r["seconds_to_first_step"]))
    for key in ("peak_rss_bytes", "peak_rss_at_loop_bytes"):
        best[key] = max(r[key] or 0 for r in runs) or None
    best["seconds_to_first_step_all"] = [round(r["seconds_to_first_step"], 1) for r in runs]
    return best


def first_step(code: Path, config: Path, out: Path) -> dict:
    """Launch ``train`` (cache hit): seconds to the first metrics row, and the peak RSS of the
    process (``os.wait4``: the rusage of this one child, ru_maxrss in KiB on Linux)."""
    start = time.perf_counter()
    stderr = out.parent / f"{out.name}.stderr"  # a file: a full pipe would stall the run
    with open(stderr, "w") as err:
        proc = subprocess.Popen(polar_train(code, "train", str(config), f"output_dir={out}"), env=env(),
                                stdout=subprocess.DEVNULL, stderr=err)
    metrics, log, seconds, to_loop, loop_rss = out / "metrics.jsonl", out / "train.log", None, None, None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if to_loop is None and log.is_file() and " train pairs, " in log.read_text():
            to_loop = time.perf_counter() - start  # data mapped, model built: the loop starts
            loop_rss = high_water_mark(proc.pid)  # before the step's activations add their share
        if seconds is None and metrics.is_file() and metrics.stat().st_size:
            seconds = time.perf_counter() - start
        if pid:
            break
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if proc.returncode:
        raise SystemExit(stderr.read_text()[-3000:])
    return {"seconds_to_loop": to_loop, "seconds_to_first_step": seconds, "cache_hit": "cache hit" in log.read_text(),
            "peak_rss_bytes": usage.ru_maxrss * 1024, "peak_rss_at_loop_bytes": loop_rss}


def high_water_mark(pid: int) -> int | None:
    """The process's peak RSS so far (``VmHWM``, Linux), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def mib(num_bytes: int | None) -> str:
    return "?" if num_bytes is None else f"{num_bytes / 2**20:.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 80000], help="pairs per dataset")
    p.add_argument("--scale", type=float, default=0.25, help="make_length_mix.py --scale")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2],
                   help="data.num_proc values to time; the first one's cache serves the train run")
    p.add_argument("--procs-up-to", type=int, default=0, help="larger sizes tokenize with the first --procs value only")
    p.add_argument("--tokenizer", default=str(REPO / "data" / "tokenizer"))
    p.add_argument("--code", type=Path, default=REPO, help="the checkout whose polar_train runs")
    p.add_argument("--work", type=Path, default=Path("/tmp/polar-train-bench-data"))
    p.add_argument("--replicate", type=int, nargs="*", default=[], help="also K copies of the largest size, caches assembled")
    p.add_argument("--rounds", type=int, default=1, help="train runs per size: the fastest counts (a busy machine)")
    p.add_argument("--reuse", action="store_true", help="keep a filled cache of an earlier run (and its tokens/s)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for size in args.sizes:
        data = make_data(args.work, size, args.scale, args.tokenizer)
        row: dict = {"pairs": size, "tokenize_tokens_per_s": {}}
        for num_proc in args.procs if not args.procs_up_to or size <= args.procs_up_to else args.procs[:1]:
            cache = args.work / f"cache-{size}-{num_proc}"
            config = args.work / f"cfg-{size}-{num_proc}.yaml"
            config.write_text(CONFIG.format(tokenizer=args.tokenizer, data=data, cache=cache))
            entries = list(cache.glob("*/stats.json")) if args.reuse else []
            if entries:
                report = json.loads(entries[0].read_text())
            else:
                shutil.rmtree(cache, ignore_errors=True)
                report = tokenize(args.code, config, num_proc if num_proc != 1 else None)  # an older checkout knows no num_proc
                report["num_tokens"] = report["tokens"]
            row["tokenize_tokens_per_s"][num_proc] = round(report["tokens_per_s"]) if "tokens_per_s" in report else None
            row["tokens"] = report["num_tokens"]
            print(f"{size} pairs, {row['tokens']} tokens: {num_proc} process(es) {row['tokenize_tokens_per_s'][num_proc]} tokens/s",
                  flush=True)
        config = args.work / f"cfg-{size}-{args.procs[0]}.yaml"  # its cache is filled: a hit
        out = args.work / f"run-{size}"
        row.update(best_of(args.rounds, args.code, config, out))
        print(f"{size} pairs: train on a cache hit ({row['cache_hit']}): loop starts after {row['seconds_to_loop']:.1f} s, "
              f"first step after {row['seconds_to_first_step']:.1f} s, peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB "
              f"({mib(row['peak_rss_at_loop_bytes'])} MiB when the loop starts)", flush=True)
        results.append(row)
    for copies in args.replicate:
        size = args.sizes[-1]
        data, cache = replicate(args.code, args.work / f"mix-{size}-{args.scale}.jsonl",
                                args.work / f"cache-{size}-{args.procs[0]}", copies, args.work, args.tokenizer)
        config = args.work / f"cfg-{size}x{copies}.yaml"
        config.write_text(CONFIG.format(tokenizer=args.tokenizer, data=data, cache=cache))
        out = args.work / f"run-{size}x{copies}"
        row = {"pairs": size * copies, "tokens": results[len(args.sizes) - 1]["tokens"] * copies,
               "assembled_from": size, **best_of(args.rounds, args.code, config, out)}
        print(f"{row['pairs']} pairs ({copies} x {size}, cache assembled): train on a cache hit ({row['cache_hit']}): "
              f"loop starts after {row['seconds_to_loop']:.1f} s, first step after {row['seconds_to_first_step']:.1f} s, "
              f"peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB ({mib(row['peak_rss_at_loop_bytes'])} MiB when the loop starts)",
              flush=True)
        results.append(row)
    lo, hi = results[0], results[-1]
    slope = (hi["peak_rss_bytes"] - lo["peak_rss_bytes"]) / max(1, hi["tokens"] - lo["tokens"])
    if lo["peak_rss_at_loop_bytes"] and hi["peak_rss_at_loop_bytes"]:
        loop_slope = (hi["peak_rss_at_loop_bytes"] - lo["peak_rss_at_loop_bytes"]) / max(1, hi["tokens"] - lo["tokens"])
        print(f"peak RSS when the loop starts, slope: {loop_slope:.2f} bytes per dataset token")
    summary = {"scale": args.scale, "code": str(args.code), "sizes": results, "rss_bytes_per_token": slope,
               "first_step_time_ratio": hi["seconds_to_first_step"] / lo["seconds_to_first_step"],
               "loop_start_time_ratio": hi["seconds_to_loop"] / lo["seconds_to_loop"]}
    print(f"peak RSS slope {lo['pairs']} -> {hi['pairs']} pairs: {slope:.2f} bytes per dataset token; time to the "
          f"loop x{summary['loop_start_time_ratio']:.2f}, to the first step x{summary['first_step_time_ratio']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
