"""Compare polar-train's InternLM2 tokenizer (built from tokenizer.model, no remote code) with the folder's own code.

Run it under transformers 4.x, where the folder's ``InternLM2TokenizerFast`` (its
``tokenization_internlm2_fast.py``, loaded with ``trust_remote_code=True``) is the reference POLAR's
ids were made with: every text is encoded by both (with BOS) and decoded by both (skipping special
tokens), and any difference is printed. The texts: the fixture's ``expected.json`` texts, edge cases
(empty, whitespace runs, literal special tokens, unknown and astral characters) and ``--num-random``
random strings of the model's own pieces, bytes and punctuation. Under transformers 5 the folder's
code does not reproduce its 4.x ids (the script says so and compares with ``expected.json`` only).

    python scripts/check_internlm2_tokenizer.py ../shared/fixtures/internlm2-real-tokenizer --num-random 3000
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

EDGE_CASES = [
    "", " ", "  ", "\n", "\n\n\t ", "a  b   c", " leading", "trailing ", "<s>", "</s>", "<unk>", "a<s>b</s>c",
    "[UNUSED_TOKEN_130]", "x[UNUSED_TOKEN_130]", "<|reward|><|reward|>", "[UNUSED_TOKEN_5] and [UNUSED_TOKEN_146]",
    "<|im_start|>user\nhi<|im_end|>", "emoji 😀🤖 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\u200b\u00a0\ufeff zero-width", "é vs e\u0301",
    "中文，标点。「引号」", "日本語のテキスト", "한국어 텍스트", "مرحبا بالعالم", "\x00\x01\x7f control", "▁ literal metaspace",
]


def random_texts(tokenizer, count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pieces = [tokenizer.convert_ids_to_tokens(i) for i in range(3, len(tokenizer))]
    extra = [" ", "  ", "\n", "\t", ".", ",", "<s>", "<|reward|>", "[UNUSED_TOKEN_130]", "😀", "\u00e9", "ÿ"]
    texts = []
    for _ in range(count):
        parts = [rng.choice(extra) if rng.random() < 0.15 else rng.choice(pieces) for _ in range(rng.randint(1, 40))]
        texts.append("".join(parts).replace("▁", " ") if rng.random() < 0.9 else "".join(parts))
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a POLAR tokenizer folder (tokenizer.model, tokenizer_config.json, tokenization_*.py)")
    parser.add_argument("--num-random", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import transformers
    from transformers import AutoTokenizer

    from polar_train.internlm2_tokenizer import build_internlm2_tokenizer

    ours = build_internlm2_tokenizer(args.folder)
    expected = json.loads((Path(args.folder) / "expected.json").read_text()) if (Path(args.folder) / "expected.json").is_file() else None
    bad = 0
    if expected is not None:
        bad += sum(ours.encode(c["text"]) != c["input_ids"] for c in expected["cases"])
        print(f"expected.json: {len(expected['cases']) - bad} of {len(expected['cases'])} id lists equal")
    if int(transformers.__version__.split(".")[0]) >= 5:
        print(f"transformers {transformers.__version__}: the folder's code is not the reference here; compared with expected.json only")
        sys.exit(1 if bad else 0)
    reference = AutoTokenizer.from_pretrained(args.folder, trust_remote_code=True)
    texts = [*(c["text"] for c in (expected or {"cases": []})["cases"]), *EDGE_CASES, *random_texts(ours, args.num_random, args.seed)]
    tokens = 0
    for text in texts:
        a, b = ours.encode(text), reference.encode(text)
        tokens += len(b)
        da, db = ours.decode(a, skip_special_tokens=True), reference.decode(b, skip_special_tokens=True)
        if a != b or da != db:
            bad += 1
            if bad <= 10:
                print(f"DIFFERENT on {text!r}:\n  ours      {a}\n  reference {b}\n  decoded {da!r} / {db!r}")
    print(f"transformers {transformers.__version__}, reference {type(reference).__name__}: {len(texts) - bad} of "
          f"{len(texts)} texts ({tokens} tokens) encode and decode the same")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
