"""Write the demo preference data and its tiny tokenizer: ``data/demo_{train,eval}.jsonl``, ``data/tokenizer/``.

The task is the one POLAR learns, made small: does the candidate give the same answer as the
reference? Questions are short: arithmetic ("What is 7 + 5?"), facts ("What is the capital of
Peru?") and open questions ("Pick a number from 3 to 27.", "Name a fruit."), whose right
answer is whatever the reference chose, so that comparing with the reference is the only
rule that works for all of them. ``chosen`` gives the reference's answer, ``rejected`` another
one (numbers: often a near miss), both in the same response template.

Formats are mixed as real data is: prompts as strings or message lists (sometimes with a
system message), references and candidates as strings or assistant messages, ~10% rows with
``wrapper: "pretrain"`` ("Q: ...\\nA: " prompts), ``wrapper`` written out or left to its default.
No empty references (a pair with nothing to compare with cannot be judged).

Held out: every question (its exact text) is either a train or an eval question, never both.
Sequences are 35 tokens on average (max ~60) with the 600-token tokenizer (spaces are tokens of
their own). Measured with configs/demo.yaml (2 layers, hidden 96, 8 heads, AdamW 1e-3, 32 pairs
per step, 8 epochs = 1000 steps, ~1 min on 2 CPU cores): held-out accuracy 0.50 at step 0,
0.93-0.95 from step 600 on.

    python scripts/make_demo_data.py                       # the shipped files (seed 0)
    python scripts/make_demo_data.py --num-train 500 --out-dir /tmp/demo
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polar_train.data import PAIR_FIELDS, encode_pair, flatten_text, read_jsonl_pairs
from polar_train.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer, special_token_ids

VOCAB_SIZE = 600
EVAL_SHARE = 0.15  # of each kind's questions, reserved for eval

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo",
    "Peru": "Lima", "Kenya": "Nairobi", "Chile": "Santiago", "Cuba": "Havana", "Greece": "Athens",
    "Norway": "Oslo", "Poland": "Warsaw", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa",
    "Germany": "Berlin", "Russia": "Moscow", "Austria": "Vienna", "Ireland": "Dublin", "Portugal": "Lisbon",
    "Sweden": "Stockholm", "Turkey": "Ankara", "Mexico": "Mexico City", "Thailand": "Bangkok",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "old": "new", "dark": "light",
    "happy": "sad", "open": "closed", "early": "late", "hard": "soft", "high": "low", "full": "empty",
    "rich": "poor", "strong": "weak", "wet": "dry", "left": "right", "true": "false", "long": "short",
    "near": "far", "loud": "quiet",
}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Open questions: any answer is fine, the reference's choice is the one to agree with.
THINGS = {
    "color": ["red", "blue", "green", "yellow", "black", "white", "pink", "brown", "gray", "orange"],
    "fruit": ["apple", "pear", "plum", "grape", "lemon", "mango", "peach", "cherry", "banana", "melon"],
    "animal": ["cat", "dog", "fox", "cow", "owl", "bee", "lion", "wolf", "bear", "horse"],
    "city": list(CAPITALS.values()),
    "letter": list(LETTERS),
}

RESPONSE_TEMPLATES = ["{}", "{}", "The answer is {}.", "It is {}.", "{}."]
REFERENCE_TEMPLATES = ["{}", "{}", "{}", "The answer is {}."]
SYSTEM = "Be brief."

@dataclass(frozen=True)
class Question:
    """One question; a row draws its right answer from ``answers`` (one for a fact, many for an open question)."""

    kind: str
    text: str
    answers: tuple[str, ...]
    number_range: tuple[int, int] | None = None  # numeric answers: where random wrong answers come from


def question_pools() -> dict[str, list[Question]]:
    """Every question of every kind, in a fixed order."""
    def numbers(lo: int, hi: int) -> tuple[str, ...]:
        return tuple(str(n) for n in range(lo, hi + 1))

    return {
        "add": [Question("add", f"What is {a} + {b}?", (str(a + b),), (0, 40)) for a in range(1, 21) for b in range(1, 21)],
        "sub": [Question("sub", f"What is {a} - {b}?", (str(a - b),), (0, 40)) for a in range(5, 41) for b in range(a + 1)],
        "mul": [Question("mul", f"What is {a} times {b}?", (str(a * b),), (0, 81)) for a in range(2, 10) for b in range(2, 10)],
        "capital": [Question("capital", f"What is the capital of {c}?", (city,)) for c, city in CAPITALS.items()],
        "opposite": [Question("opposite", f"What is the opposite of {w}?", (o,)) for w, o in OPPOSITES.items()],
        "next_letter": [Question("next_letter", f"Which letter comes after {x}?", (y,)) for x, y in zip(LETTERS, LETTERS[1:])],
        "pick_number": [Question("pick_number", f"Pick a number from {lo} to {hi}.", numbers(lo, hi), (lo, hi))
                        for lo in range(11) for hi in range(20, 41)],
        "name_thing": [Question("name_thing", template.format(thing), tuple(options))
                       for thing, options in THINGS.items()
                       for template in ("Name a {}.", "Pick a {}.", "Say any {}.", "Give me a {}.")],
    }


# Mostly open questions: their right answer is drawn per row, so no answer can be memorised and
# the one rule that generalises is "agree with the reference". Questions with a fixed answer
# (arithmetic, facts) are a minority: a tiny model would otherwise learn their answers by
# heart (train accuracy 1.0, held-out 0.73 with the facts at 55% of the rows).
KIND_WEIGHTS = {"add": 0.05, "sub": 0.05, "mul": 0.03, "capital": 0.03, "opposite": 0.02, "next_letter": 0.02,
                "pick_number": 0.45, "name_thing": 0.35}


def split_pools(pools: dict[str, list[Question]], rng: random.Random) -> tuple[dict[str, list[Question]], dict[str, list[Question]]]:
    """Each kind's questions shuffled and cut into disjoint train and eval parts."""
    train, held_out = {}, {}
    for kind, questions in pools.items():
        questions = questions[:]
        rng.shuffle(questions)
        cut = max(3, round(EVAL_SHARE * len(questions)))
        held_out[kind], train[kind] = questions[:cut], questions[cut:]
    return train, held_out


def wrong_answer(question: Question, right: str, fact_answers: list[str], rng: random.Random) -> str:
    """A wrong answer of the same kind.

    Numbers: often a near miss (off by 1-3). Open questions: another option. Facts: the answer
    of another question of the same split, so that a held-out answer is never a *wrong* answer in
    training (the model would learn that the word itself is bad instead of comparing it).
    """
    if question.number_range is not None:
        low, high = question.number_range
        while True:
            guess = int(right) + rng.choice([-3, -2, -1, 1, 2, 3]) if rng.random() < 0.6 else rng.randint(low, high)
            if guess >= 0 and str(guess) != right:
                return str(guess)
    options = question.answers if len(question.answers) > 1 else fact_answers
    return rng.choice([o for o in options if o != right])


def make_row(question: Question, fact_answers: list[str], rng: random.Random) -> dict[str, Any]:
    """One POLAR-format pair in a randomly chosen mix of formats."""
    right = rng.choice(question.answers)
    wrong = wrong_answer(question, right, fact_answers, rng)
    if rng.random() < 0.1:  # pretrain wrapper: plain continuation, no "\n" added between parts
        return {"prompt": f"Q: {question.text}\nA: ", "reference": right, "chosen": right, "rejected": wrong, "wrapper": "pretrain"}
    template = rng.choice(RESPONSE_TEMPLATES)
    chosen, rejected = template.format(right), template.format(wrong)
    reference = rng.choice(REFERENCE_TEMPLATES).format(right)
    roll = rng.random()
    if roll < 0.55:
        prompt: Any = question.text
    elif roll < 0.85:
        prompt = [{"role": "user", "content": question.text}]
    else:
        prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question.text}]
    row: dict[str, Any] = {"prompt": prompt}
    as_messages = rng.random() < 0.3
    for name, value in (("reference", reference), ("chosen", chosen), ("rejected", rejected)):
        row[name] = [{"role": "assistant", "content": value}] if as_messages else value
    if rng.random() < 0.2:
        row["wrapper"] = "sft"
    return row


def make_rows(pool: dict[str, list[Question]], num: int, rng: random.Random, *, unique: bool) -> list[dict[str, Any]]:
    """``num`` rows; with ``unique`` no question is used twice while the pool lasts."""
    kinds, weights = list(KIND_WEIGHTS), list(KIND_WEIGHTS.values())
    fact_answers = {kind: sorted({a for q in questions for a in q.answers}) for kind, questions in pool.items()}
    remaining = {kind: list(questions) for kind, questions in pool.items()}
    rows = []
    while len(rows) < num:
        kind = rng.choices(kinds, weights)[0]
        if unique:
            if not remaining[kind]:
                remaining[kind] = list(pool[kind])
            question = remaining[kind].pop(rng.randrange(len(remaining[kind])))
        else:
            question = rng.choice(pool[kind])
        rows.append(make_row(question, fact_answers[kind], rng))
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-train", type=int, default=4000, help="training pairs")
    parser.add_argument("--num-eval", type=int, default=200, help="held-out evaluation pairs")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent.parent / "data", help="output folder")
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    train_pool, eval_pool = split_pools(question_pools(), rng)
    eval_rows = make_rows(eval_pool, args.num_eval, rng, unique=True)
    train_rows = make_rows(train_pool, args.num_train, rng, unique=False)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = args.out_dir / "demo_train.jsonl", args.out_dir / "demo_eval.jsonl"
    write_jsonl(train_path, train_rows)
    write_jsonl(eval_path, eval_rows)
    texts = [flatten_text(row[name], name) for row in train_rows + eval_rows for name in PAIR_FIELDS]
    save_tokenizer(build_tokenizer(texts, VOCAB_SIZE), args.out_dir / "tokenizer")

    # Read everything back the way training will, and report the sequence lengths.
    tokenizer = load_tokenizer(args.out_dir / "tokenizer")
    sep_id, reward_id = special_token_ids(tokenizer, None)
    for path in (train_path, eval_path):
        records, _ = read_jsonl_pairs(path)
        lengths = [len(ids) for r in records for ids in encode_pair(tokenizer, r, sep_id=sep_id, reward_id=reward_id)]
        print(f"{path}: {len(records)} pairs, sequence length mean {statistics.mean(lengths):.1f} max {max(lengths)}")
    print(f"{args.out_dir / 'tokenizer'}: vocabulary {len(tokenizer)}")


if __name__ == "__main__":
    main()
