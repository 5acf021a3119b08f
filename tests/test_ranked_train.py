"""Training on ranked lists end to end: 2-rank ZeRO-2 reproduces one process, the list
metrics reach the eval report, and ``loss.kind=listwise`` trains."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from test_resume import WORDS, make_run_folder, metric_rows, one_thread, train, train_losses  # noqa: F401

STEPS = ["train.max_steps=4", "train.eval_steps=2", "train.pairs_per_step=6"]


def write_lists(folder: Path) -> None:
    """Replace the run folder's data with a mix of pair rows and ranked lists of 3 to 5 candidates."""
    rng = random.Random(3)
    for name, n in (("train", 36), ("eval", 8)):
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for k in range(n):
                ref = rng.choice(WORDS)
                prompt = " ".join(rng.choice(WORDS) for _ in range(rng.choice([2, 6, 20])))
                outs = [f"It is {ref}."] + [f"It is {rng.choice(WORDS)} {rng.choice(WORDS)}." for _ in range(4)]
                kind = k % 3
                if kind == 0:
                    row = {"prompt": prompt, "reference": ref, "chosen": outs[0], "rejected": outs[1]}
                elif kind == 1:
                    row = {"prompt": prompt, "reference": ref, "ranked": outs[: rng.choice([3, 4, 5])]}
                else:
                    row = {"prompt": prompt, "candidates": [ref, *outs[:3]], "scores": [9, 5, 2, 2]}
                f.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_run_folder(tmp_path_factory.mktemp("lists"))
    write_lists(folder)
    train(folder, "output_dir=one", *STEPS)
    train(folder, "output_dir=zero2", *STEPS, "deepspeed.enabled=true", "deepspeed.zero_stage=2", "data.cache_dir=cache",
          nproc=2)
    return folder


@pytest.mark.slow
def test_two_rank_zero2_with_lists_reproduces_one_process(runs: Path) -> None:
    one, two = metric_rows(runs / "one"), metric_rows(runs / "zero2")
    assert [(r["step"], r["split"]) for r in two] == [(r["step"], r["split"]) for r in one]
    for a, b in zip(one, two):
        assert (a.get("pairs"), a.get("tokens")) == (b.get("pairs"), b.get("tokens"))
        for key in ("loss", "accuracy", "chosen_reward"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], a["split"], key)
    torch.testing.assert_close(torch.tensor(train_losses(runs / "zero2")), torch.tensor(train_losses(runs / "one")),
                               rtol=1e-4, atol=0)
    # 6 rows a step, but the loss is a mean over every pair they imply
    assert all(r["pairs"] > 6 for r in one if r["split"] == "train")


@pytest.mark.slow
def test_the_eval_report_has_the_list_figures(runs: Path) -> None:
    report = json.loads((runs / "one" / "eval" / "final" / "report.json").read_text())
    assert report["lists"] == 8 and report["pairs"] > 8
    assert 0.0 <= report["top1_accuracy"] <= 1.0 and -1.0 <= report["kendall_tau"] <= 1.0
    # the export carries the reward statistics of every eval candidate (each once) for --normalize
    stats = json.loads((runs / "one" / "hf" / "reward_stats.json").read_text())
    assert stats == report["reward_stats"] and stats["candidates"] >= 8 * 2
    assert "reward_stats.json" in (runs / "one" / "hf" / "README.md").read_text()


@pytest.mark.slow
def test_listwise_trains_on_lists(runs: Path) -> None:
    train(runs, "output_dir=listwise", *STEPS, "loss.kind=listwise")
    losses = train_losses(runs / "listwise")
    assert len(losses) == 4 and all(0.0 < x < 10.0 for x in losses)
    assert losses != train_losses(runs / "one")
