"""Write a POLAR-like length mix: JSONL pairs whose lengths, not contents, resemble real data.

Lengths are ASSUMED, not measured from POLAR's data (it is not public at this granularity):
long-tailed log-normal draws in tokens, clipped to the recipe's limits,

    prompt      median 300, sigma 1.0, clipped to [8, 8000]
    reference   median 400, sigma 0.9, clipped to [4, 4096]
    chosen      median 400, sigma 0.9, clipped to [4, 4096]
    rejected    median 400, sigma 0.9, clipped to [4, 4096]

so a few pairs are 10-30x the median, as in chat and reasoning preference sets. With
``--ranked K`` each row is a ranked list instead: ``{"prompt", "reference", "ranked": [K
candidates]}``, each candidate drawn like ``chosen`` (SPEC 10). The text is
random tokens of the given tokenizer decoded to strings, so re-tokenising it gives lengths
close to the drawn ones. Use it for packing statistics and benchmarks (``scripts/bench.py``,
``polar-train data``), never for training.

    python scripts/make_length_mix.py --tokenizer data/tokenizer --num-pairs 2000 --out data/length_mix.jsonl
    python scripts/make_length_mix.py --ranked 4 --num-pairs 256 --scale 0.125 --out /tmp/ranked_mix.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

LENGTHS = {  # field: (median tokens, sigma, min, max)
    "prompt": (300, 1.0, 8, 8000),
    "reference": (400, 0.9, 4, 4096),
    "chosen": (400, 0.9, 4, 4096),
    "rejected": (400, 0.9, 4, 4096),
}


def draw_length(rng: random.Random, median: int, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma)))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default="data/tokenizer", help="tokenizer folder whose tokens make the text")
    parser.add_argument("--num-pairs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every median (0.25 for a quick CPU run)")
    parser.add_argument("--ranked", type=int, default=0, help="K > 0: ranked rows of K candidates instead of pairs")
    parser.add_argument("--out", default="data/length_mix.jsonl")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from polar_train.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)  # as training loads it (POLAR's real one included)
    special = set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids(t) for t in ("<|reward|>", "[UNUSED_TOKEN_130]")}
    # plain word-like tokens only: a space-led alphanumeric piece re-tokenises to itself
    words = []
    for i in range(len(tokenizer)):
        if i in special:
            continue
        text = tokenizer.decode([i])
        if text.startswith(" ") and text[1:].isalnum():
            words.append(text)
    if len(words) < 20:
        words = [tokenizer.decode([i]) for i in range(len(tokenizer)) if i not in special]
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for _ in range(args.num_pairs):
            def text(field: str) -> str:
                median, sigma, lo, hi = LENGTHS[field]
                n = draw_length(rng, max(1, int(median * args.scale)), sigma, lo, hi)
                return "".join(rng.choice(words) for _ in range(n)).strip()

            if args.ranked:
                row = {"prompt": text("prompt"), "reference": text("reference"), "ranked": [text("chosen") for _ in range(args.ranked)]}
            else:
                row = {field: text(field) for field in LENGTHS}
            f.write(json.dumps(row) + "\n")
    print(f"wrote {args.num_pairs} {f'lists of {args.ranked}' if args.ranked else 'pairs'} to {out}")


if __name__ == "__main__":
    main()
