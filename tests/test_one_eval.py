"""One evaluation: training's eval and ``polar-train eval`` run the same packed inference
(``evaluate.pair_rewards``) and report the same figures on the same data and model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from polar_train.cli import main
from polar_train.evaluate import Ranks, pair_rewards
from polar_train.train import run

from test_resume import in_process_config, make_run_folder, one_thread  # noqa: F401  (one_thread: autouse)

MAX_TOKENS = 40  # below the longest eval pairs: those run their chosen and rejected apart, in both


def test_training_eval_equals_polar_train_eval_on_the_export(tmp_path: Path, capsys) -> None:
    folder = make_run_folder(tmp_path)
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
    assert trained["pairs"] == 12 and trained["num_prompt_truncated"] > 0 and trained["num_response_truncated"] > 0


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
        pair_rewards(model, pairs, max_tokens=16, ranks=Ranks(rank, 2, lambda t: shares.append(t.clone()) or t))
        hook.remove()
        forwards.append(len(calls))
    assert forwards[0] == forwards[1] >= 2
    both = (shares[0] + shares[1]).reshape(-1, 2)  # what the all-reduce returns on every rank
    assert torch.equal(both[:, 0], chosen) and torch.equal(both[:, 1], rejected)
