"""DeepSpeed ZeRO-2 / ZeRO-3 with 2 processes (gloo, CPU, fp32) against the one-process run.

The same global batch (``train.pairs_per_step``) split across 2 ranks must give the one-process
loss trajectory (SPEC 5: the loss is a mean over ALL pairs of the step), its checkpoints must
convert to the trainer's own export, and a ZeRO-3 resume must be exact.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from polar_train.export import convert
from polar_train.config import load_config
from polar_train.model import VarlenMeta, load_model
from polar_train.packing import StepPlanner, best_fit_decreasing, split_across_ranks
from polar_train.store_build import load_pairs
from polar_train.tokenizer import load_tokenizer

from test_resume import assert_same_weights, make_run_folder, metric_rows, one_thread, train, train_losses  # noqa: F401

STEPS = ["train.max_steps=6", "train.save_steps=3", "train.eval_steps=3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder holding the one-process reference run and the 2-rank ZeRO-2 / ZeRO-3 runs. The
    reference tokenizes alone without a cache; the ZeRO-2 run's two ranks tokenize half the rows
    each into a shared cache (polar_train.store_build), which the ZeRO-3 run then maps."""
    folder = make_run_folder(tmp_path_factory.mktemp("dist"))
    train(folder, "output_dir=one", *STEPS)
    for stage in (2, 3):
        train(folder, f"output_dir=zero{stage}", *STEPS, "deepspeed.enabled=true", f"deepspeed.zero_stage={stage}",
              "data.cache_dir=cache", nproc=2)
    shards = sorted(p.name for p in next((folder / "cache").iterdir()).glob("shard-*"))
    assert shards == ["shard-00000.arrow", "shard-00001.arrow"]  # one shard per rank
    return folder


def test_micro_batch_counts_differ_between_ranks_before_balancing(tmp_path: Path) -> None:
    """The data and budget of these tests make ranks pack different micro-batch counts, which the
    planner then equalises (a split micro-batch or a zero-weight filler)."""
    folder = make_run_folder(tmp_path)
    cfg = load_config(folder / "cfg.yaml")
    pairs = load_pairs(cfg.data, [str(folder / "train.jsonl")], load_tokenizer(folder / "tok"), str(folder / "tok"), None, "train")
    planner = StepPlanner(pairs.costs, pairs_per_step=cfg.train.pairs_per_step, max_tokens=cfg.data.max_tokens, num_ranks=2)
    unequal = 0
    for step in range(6):
        ids = planner.step_pairs(0, step)
        shares = split_across_ranks(ids, [int(pairs.costs[i]) for i in ids], 2)
        counts = [len(best_fit_decreasing(s, [int(pairs.costs[i]) for i in s], cfg.data.max_tokens)) for s in shares]
        unequal += counts[0] != counts[1]
        planned = [len(bins) for bins in planner.plan(0, step)]
        assert planned[0] == planned[1] == max(counts)
    assert unequal >= 2


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_reproduce_the_one_process_losses(runs: Path, stage: int) -> None:
    one, two = metric_rows(runs / "one"), metric_rows(runs / f"zero{stage}")
    assert [(r["step"], r["split"]) for r in two] == [(r["step"], r["split"]) for r in one]
    assert len([r for r in two if r["split"] == "train"]) >= 5
    for a, b in zip(one, two):
        # the whole global batch on both: same pairs and tokens per step, summed over ranks
        assert (a.get("pairs"), a.get("tokens")) == (b.get("pairs"), b.get("tokens"))
        for key in ("loss", "accuracy", "chosen_reward"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], a["split"], key)
    torch.testing.assert_close(torch.tensor(train_losses(runs / f"zero{stage}")), torch.tensor(train_losses(runs / "one")),
                               rtol=1e-4, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_convert_two_rank_checkpoint_gives_the_trainers_export(runs: Path, stage: int) -> None:
    run = runs / f"zero{stage}"
    converted = convert(run / "checkpoints" / "step-6", runs / f"converted{stage}")
    assert sorted(p.name for p in converted.iterdir()) == sorted(p.name for p in (run / "hf").iterdir())
    assert_same_weights(converted, run / "hf")
    # and the rewards of the two folders, loaded the way users load them
    ids = torch.tensor([1, 5, 9, 13, 17, 4, 1, 8, 12, 4])
    pos = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3])
    meta, last = VarlenMeta.from_lengths([6, 4]), torch.tensor([5, 9])
    with torch.no_grad():
        ours = load_model(converted)(ids, pos, meta, last)
        theirs = load_model(run / "hf")(ids, pos, meta, last)
    assert torch.equal(ours, theirs)


@pytest.mark.slow
def test_zero3_two_rank_resume_is_exact(runs: Path) -> None:
    train(runs, "output_dir=zero3_resumed", *STEPS, f"train.resume={runs / 'zero3' / 'checkpoints' / 'step-3'}",
          "deepspeed.enabled=true", "deepspeed.zero_stage=3", nproc=2)
    assert metric_rows(runs / "zero3_resumed") == metric_rows(runs / "zero3")
    assert_same_weights(runs / "zero3_resumed" / "hf", runs / "zero3" / "hf")


@pytest.mark.parametrize("name, lr, stage", [("polar_7b_zero2", 2e-5, 2), ("polar_1_8b_zero2", 1e-5, 2), ("polar_7b_zero3", 2e-5, 3)])
def test_shipped_distributed_configs_load_with_the_recipe(repo_root: Path, name: str, lr: float, stage: int) -> None:
    cfg = load_config(repo_root / "configs" / f"{name}.yaml")
    assert (cfg.deepspeed.enabled, cfg.deepspeed.zero_stage, cfg.optimizer.lr) == (True, stage, lr)
    assert (cfg.optimizer.betas, cfg.optimizer.weight_decay, cfg.optimizer.grad_clip) == ([0.9, 0.95], 0.0, 1.0)
    assert (cfg.schedule.warmup_ratio, cfg.schedule.min_lr_ratio, cfg.engine.precision) == (0.03, 0.1, "bf16")
    assert not cfg.model.trust_remote_code  # POLAR's tokenizer is built from tokenizer.model: none of its code runs
    assert (cfg.data.max_length, cfg.data.max_response_length, cfg.train.pairs_per_step) == (16384, 4096, 320)
    assert cfg.data.max_tokens >= 2 * cfg.data.max_length  # any pair of two full-length sequences fits
