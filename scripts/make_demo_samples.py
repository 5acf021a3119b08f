"""Write the continued pre-training demo's policy samples: ``data/demo_samples{,_eval}.jsonl``.

POLAR's pre-training task, made small (SPEC 9): several policies answer the same prompts, and
the reward model learns to tell whether a candidate was written by the same policy as the
reference. Each policy has a style of its own (terse, polite, a list, ...) and picks its
answer at random, so two samples of one policy share the style but rarely the answer, and a
sample of another policy often gives the reference's very answer: only the style tells them
apart. Chat policies answer plain prompts (sft wrapper); two "base" policies continue
``Q: ... A:`` text (``"wrapper": "pretrain"``). Prompts of the eval file are never in the
training file.

    python scripts/make_demo_samples.py          # the shipped files (seed 0)
    polar-train pretrain-pairs --samples data/demo_samples.jsonl --output runs/pretrain_demo_pairs/train.jsonl
    polar-train pretrain-pairs --samples data/demo_samples_eval.jsonl --output runs/pretrain_demo_pairs/eval.jsonl
    polar-train train configs/pretrain_demo.yaml
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

THINGS = {
    "color": ["red", "blue", "green", "yellow", "black", "white", "pink", "brown", "gray", "orange"],
    "fruit": ["apple", "pear", "plum", "grape", "lemon", "mango", "peach", "cherry", "banana", "melon"],
    "animal": ["cat", "dog", "fox", "cow", "owl", "bee", "lion", "wolf", "bear", "horse"],
    "city": ["Paris", "Tokyo", "Rome", "Madrid", "Cairo", "Lima", "Oslo", "Dublin", "Vienna", "Berlin"],
    "number": [str(n) for n in range(1, 40)],
}
QUESTIONS = ["Name one {}.", "Pick one {}.", "Say any {}.", "Give me one {}.", "Which {} do you like?", "Tell me one {}."]
# Chat policies (sft wrapper): one answer template each.
CHAT_POLICIES = {
    "terse-chat": "{}.",
    "polite-chat": "Sure! I would say {}. Anything else?",
    "list-chat": "- {}\n- that is my pick",
    "shout-chat": "{}!!! Definitely {}!!!",
}
# Base policies (pretrain wrapper) continue "Q: <question>\nA:".
BASE_POLICIES = {
    "base-plain": " {}\nQ:",
    "base-quoted": ' "{}" (answered)',
}


def policy_sample(template: str, options: list[str], rng: random.Random) -> str:
    answer = rng.choice(options)
    return template.replace("{}", answer)


def make_samples(prompts: list[tuple[str, list[str]]], rng: random.Random) -> list[dict[str, Any]]:
    """For every prompt: 1-3 samples of each policy, so that some prompts (and policies) cannot pair."""
    samples = []
    for question, options in prompts:
        for policy, template in CHAT_POLICIES.items():
            for _ in range(rng.randint(1, 3)):
                samples.append({"prompt": question, "policy": policy, "output": policy_sample(template, options, rng)})
        if rng.random() < 0.3:
            for policy, template in BASE_POLICIES.items():
                for _ in range(rng.randint(1, 3)):
                    samples.append({"prompt": f"Q: {question}\nA:", "policy": policy,
                                    "output": policy_sample(template, options, rng), "wrapper": "pretrain"})
    rng.shuffle(samples)  # sample files are rarely sorted by prompt
    return samples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent.parent / "data", help="output folder")
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    prompts = [(question.format(thing), options) for thing, options in THINGS.items() for question in QUESTIONS]
    prompts = [(f"Question {n}: {text}", options) for text, options in prompts for n in range(1, 13)]  # 360 prompts
    rng.shuffle(prompts)
    held_out = len(prompts) // 8
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("demo_samples_eval.jsonl", prompts[:held_out]), ("demo_samples.jsonl", prompts[held_out:])):
        samples = make_samples(part, rng)
        (args.out_dir / name).write_text("".join(json.dumps(s) + "\n" for s in samples), encoding="utf-8")
        print(f"{args.out_dir / name}: {len(samples)} samples of {len(part)} prompts")


if __name__ == "__main__":
    main()
