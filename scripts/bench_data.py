"""Data-path benchmark: tokenization speed and what `train` costs up to its first step on a cache hit.

For each size (pairs of the POLAR-like length mix, ``scripts/make_length_mix.py``):

1. tokenize into a fresh cache with ``polar-train data`` and 1, 2, ... processes
   (``data.num_proc``): the ``tokens_per_s`` it reports;
2. ``polar-train train`` on that cache (a hit) with a tiny fresh model, no eval,
   ``train.max_steps=1``: peak RSS of the process (``os.wait4``'s rusage, the kernel's high-water
   mark) and the seconds from launch to the first ``metrics.jsonl`` row (the first step).

Then the slope of peak RSS against dataset tokens between the smallest and largest size (bytes
per token: what each rank pays per token of data). Every command runs in its own subprocess.

    python scripts/bench_data.py --sizes 5000 20000 80000 --json /tmp/bench_data.json
    python scripts/bench_data.py --sizes 5000 40000 --code /work/main --procs 1   # another checkout
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


def first_step(code: Path, config: Path, out: Path) -> dict:
    """Launch ``train`` (cache hit): seconds to the first metrics row, and the peak RSS of the
    process (``os.wait4``: the rusage of this one child, ru_maxrss in KiB on Linux)."""
    start = time.perf_counter()
    stderr = out.parent / f"{out.name}.stderr"  # a file: a full pipe would stall the run
    with open(stderr, "w") as err:
        proc = subprocess.Popen(polar_train(code, "train", str(config), f"output_dir={out}"), env=env(),
                                stdout=subprocess.DEVNULL, stderr=err)
    metrics, log, seconds, to_loop = out / "metrics.jsonl", out / "train.log", None, None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if to_loop is None and log.is_file() and " train pairs, " in log.read_text():
            to_loop = time.perf_counter() - start  # data mapped, model built: the loop starts
        if seconds is None and metrics.is_file() and metrics.stat().st_size:
            seconds = time.perf_counter() - start
        if pid:
            break
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if proc.returncode:
        raise SystemExit(stderr.read_text()[-3000:])
    return {"seconds_to_loop": to_loop, "seconds_to_first_step": seconds, "cache_hit": "cache hit" in log.read_text(),
            "peak_rss_bytes": usage.ru_maxrss * 1024}


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
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for size in args.sizes:
        data = make_data(args.work, size, args.scale, args.tokenizer)
        row: dict = {"pairs": size, "tokenize_tokens_per_s": {}}
        for num_proc in args.procs if not args.procs_up_to or size <= args.procs_up_to else args.procs[:1]:
            cache = args.work / f"cache-{size}-{num_proc}"
            shutil.rmtree(cache, ignore_errors=True)
            config = args.work / f"cfg-{size}-{num_proc}.yaml"
            config.write_text(CONFIG.format(tokenizer=args.tokenizer, data=data, cache=cache))
            report = tokenize(args.code, config, num_proc if num_proc != 1 else None)  # an older checkout knows no num_proc
            row["tokenize_tokens_per_s"][num_proc] = round(report["tokens_per_s"]) if "tokens_per_s" in report else None
            row["tokens"] = report["tokens"]
            print(f"{size} pairs, {report['tokens']} tokens: {num_proc} process(es) {row['tokenize_tokens_per_s'][num_proc]} tokens/s",
                  flush=True)
        config = args.work / f"cfg-{size}-{args.procs[0]}.yaml"  # its cache is filled: a hit
        out = args.work / f"run-{size}"
        shutil.rmtree(out, ignore_errors=True)
        row.update(first_step(args.code, config, out))
        print(f"{size} pairs: train on a cache hit ({row['cache_hit']}): loop starts after {row['seconds_to_loop']:.1f} s, "
              f"first step after {row['seconds_to_first_step']:.1f} s, peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
        results.append(row)
    lo, hi = results[0], results[-1]
    slope = (hi["peak_rss_bytes"] - lo["peak_rss_bytes"]) / max(1, hi["tokens"] - lo["tokens"])
    summary = {"scale": args.scale, "code": str(args.code), "sizes": results, "rss_bytes_per_token": slope,
               "first_step_time_ratio": hi["seconds_to_first_step"] / lo["seconds_to_first_step"],
               "loop_start_time_ratio": hi["seconds_to_loop"] / lo["seconds_to_loop"]}
    print(f"peak RSS slope {lo['pairs']} -> {hi['pairs']} pairs: {slope:.2f} bytes per dataset token; time to the "
          f"loop x{summary['loop_start_time_ratio']:.2f}, to the first step x{summary['first_step_time_ratio']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
