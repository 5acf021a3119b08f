"""Tokenization speed of ``polar-train data`` (one process), this checkout against an earlier revision.

Writes the POLAR-like length mix with the given tokenizer (``scripts/make_length_mix.py``), then
runs ``polar-train data`` on it, uncached, ``data.num_proc=1``, round after round, alternating:

- ``before``: the code of ``--before REV`` (``git archive`` into a temporary folder, imported from
  there with this checkout's environment);
- ``after, 1 thread``: this checkout with ``RAYON_NUM_THREADS=1`` (the tokenizer's batch calls on
  one core);
- ``after``: this checkout as it runs by default (the batch calls use the cores they find).

and prints the tokens/s each reports (``data: tokenized N tokens in S s``), best of the rounds,
and the ratios to ``before``.

    python scripts/bench_tokenize.py --tokenizer ../shared/fixtures/internlm2-real-tokenizer --before 44ee3ab
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = """\
seed: 0
model:
  fresh: {{tokenizer: {tokenizer}, hidden_size: 32, num_layers: 2, num_heads: 4, num_kv_heads: 2, intermediate_size: 64}}
data:
  train_files: [{data}]
  eval_files: []
  max_length: 16384
  max_response_length: 4096
  max_tokens: 16384
  cache_dir: ""
  num_proc: 1
"""
LINE = re.compile(r"data: tokenized (\d+) tokens in ([\d.]+) s: (\d+) tokens/s")


# Runs `python -m polar_train ARGS` from CODE_DIR: an editable install's import hook (a meta path
# finder, ahead of sys.path) would otherwise import this checkout's polar_train whatever PYTHONPATH says.
BOOT = """import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
sys.path.insert(0, sys.argv[1])
import polar_train
assert polar_train.__file__.startswith(sys.argv[1]), polar_train.__file__
sys.argv = ["polar_train", *sys.argv[2:]]
runpy.run_module("polar_train", run_name="__main__")
"""


def run_data(config: Path, code_dir: Path | None, threads: int | None) -> tuple[int, float]:
    env = dict(os.environ)
    if threads is not None:
        env["RAYON_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-c", BOOT, str(code_dir)] if code_dir is not None else [sys.executable, "-m", "polar_train"]
    done = subprocess.run([*command, "data", str(config)], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    found = LINE.search(done.stderr + done.stdout)
    if found is None:
        raise SystemExit(f"no 'data: tokenized' line in:\n{done.stderr[-2000:]}")
    return int(found.group(1)), float(found.group(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "fixtures" / "internlm2-real-tokenizer"))
    parser.add_argument("--before", required=True, help="git revision of the 'before' code")
    parser.add_argument("--num-pairs", type=int, default=2000)
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-tokenize-") as tmp:
        work = Path(tmp)
        data = work / "mix.jsonl"
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_length_mix.py"), "--tokenizer", args.tokenizer,
                        "--num-pairs", str(args.num_pairs), "--scale", str(args.scale), "--out", str(data)], check=True)
        config = work / "bench.yaml"
        config.write_text(CONFIG.format(tokenizer=Path(args.tokenizer).resolve(), data=data))
        before = work / "before"
        before.mkdir()
        archive = subprocess.run(["git", "archive", args.before, "polar_train"], cwd=REPO, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive.stdout, check=True)
        modes = {"before": (before, None), "after, 1 thread": (None, 1), "after": (None, None)}
        seen: dict[str, list[float]] = {name: [] for name in modes}
        tokens = set()
        for round_ in range(args.rounds):
            for name, (code_dir, threads) in modes.items():
                count, rate = run_data(config, code_dir, threads)
                tokens.add(count)
                seen[name].append(rate)
                print(f"round {round_ + 1}: {name}: {rate:,.0f} tokens/s", flush=True)
        if len(tokens) != 1:
            raise SystemExit(f"the runs tokenized different token counts: {sorted(tokens)}")
        base = max(seen["before"])
        print(f"{tokens.pop():,} tokens, {args.num_pairs} pairs (scale {args.scale}), {os.cpu_count()} cores; best of {args.rounds}:")
        for name, rates in seen.items():
            print(f"  {name}: {max(rates):,.0f} tokens/s (x{max(rates) / base:.2f}; all: "
                  f"{', '.join(f'{r:,.0f}' for r in rates)})")


if __name__ == "__main__":
    main()
