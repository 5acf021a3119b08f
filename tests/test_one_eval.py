"""One evaluation: training's eval and ``polar-train eval`` run the same packed inference
(``evaluate.group_rewards``) and build the same report (``evaluate.build_report``) on the same
data and model, pair rows and ranked lists."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from polar_train.cli import main
from polar_train.train import run

from test_resume import WORDS, in_process_config, make_run_folder, one_thread  # noqa: F401  (one_thread: autouse)
from test_eval_report import pair_rewards

MAX_TOKENS = 40  # below the longest eval pairs: those run their chosen and rejected apart, in both


def add_ranked_lists(path: Path) -> None:
    """Four ranked lists (3 and 4 candidates, ``ranked`` and ``candidates`` + ``scores``) after the pairs."""
    rng = random.Random(4)
    with open(path, "a", encoding="utf-8") as f:
        for k in range(4):
            ref = rng.choice(WORDS)
            outs = [f"It is {ref}."] + [f"It is {rng.choice(WORDS)} {rng.choice(WORDS)}." for _ in range(2 + k % 2)]
            prompt = " ".join(rng.choice(WORDS) for _ in range(4 + 6 * k))
            row = ({"prompt": prompt, "reference": ref, "ranked": outs} if k % 2 == 0 else
                   {"prompt": prompt, "reference": ref, "candidates": outs[::-1], "scores": list(range(len(outs)))})
            f.write(json.dumps(row) + "\n")


@pytest.mark.parametrize("lists", [False, True], ids=["pairs", "pairs_and_lists"])
def test_training_eval_equals_polar_train_eval_on_the_export(tmp_path: Path, capsys, lists: bool) -> None:
    folder = make_run_folder(tmp_path)
    if lists:
        add_ranked_lists(folder / "eval.jsonl")
    cfg = in_process_config(folder, "run", "train.max_steps=2", f"data.max_tokens={MAX_TOKENS}", "data.max_length=96",
                            "data.max_response_length=8")
    run(cfg)
    out = folder / "run"
    assert "eval data: " in (out / "train.log").read_text() and "run chosen and rejected apart" in (out / "train.log").read_text()
    code = main(["eval", "--model", str(out / "hf"), "--data", str(folder / "eval.jsonl"), "--output-dir",
                 str(folder / "eval"), "--max-length", "96", "--max-response-length", "8", "--max-tokens",
                 str(MAX_TOKENS), "--device", "cpu", "--dtype", "float32", "--attention", "sdpa"])
    assert code == 0, capsys.readouterr().err
    trained = json.loads((out / "eval" / "final" / "report.json").read_text())
    evaluated = json.loads((folder / "eval" / "report.json").read_text())
    del evaluated["settings"]
    assert trained == evaluated  # every figure, bit for bit
    assert trained["num_prompt_truncated"] > 0 and trained["num_response_truncated"] > 0
    # a list of K candidates implies K(K-1)/2 pairs: 3 + 6 + 3 + 6 more
    assert trained["pairs"] == (30 if lists else 12) and trained["reward_stats"]["candidates"] == (24 + 14 if lists else 24)
    assert (trained.get("lists"), "kendall_tau" in trained) == ((16, True) if lists else (None, False))
    scored = [json.loads(line) for line in (folder / "eval" / "scored.jsonl").read_text().splitlines()]
    assert [len(r["ranked_rewards"]) for r in scored if "ranked_rewards" in r] == ([3, 4, 3, 4] if lists else [])


class TwoRanks:
    """A ``ranks.Ranks`` of two processes whose all-reduce records this rank's share."""

    def __init__(self, rank: int, shares: list[torch.Tensor]):
        self.rank, self.world_size, self.device, self.shares = rank, 2, torch.device("cpu"), shares

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self.shares.append(tensor.clone())
        return tensor


def test_pair_rewards_split_over_ranks_equal_one_process(sharp_tiny_model) -> None:
    """Each rank scores its share of the forwards and runs as many forwards as the other (ZeRO-3
    lockstep); the all-reduce then gives every rank all rewards, equal to one process's."""
    model = sharp_tiny_model(seed=3)
    pairs = [([1, 5, 6, 7, 8 + i], [1, 5, 6, 9, 4]) for i in range(5)] + [([1] + [7] * 30, [1, 3, 4])]
    chosen, rejected = pair_rewards(model, pairs, max_tokens=16)
    shares, forwards = [], []
    for rank in (0, 1):
        calls: list[int] = []
        hook = model.register_forward_hook(lambda *_: calls.append(1))
        pair_rewards(model, pairs, max_tokens=16, ranks=TwoRanks(rank, shares))
        hook.remove()
        forwards.append(len(calls))
    assert forwards[0] == forwards[1] >= 2
    both = (shares[0] + shares[1]).reshape(-1, 2)  # what the all-reduce returns on every rank
    assert torch.equal(both[:, 0], chosen) and torch.equal(both[:, 1], rejected)
