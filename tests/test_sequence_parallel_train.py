"""Training with train.sequence_parallel under torchrun (gloo, CPU, fp32) against one process.

SP=2 on 2 ranks (one data-parallel rank) and 2 data-parallel x 2 SP on 4 ranks under ZeRO-2 must
give the one-process loss trajectory (the loss is a mean over ALL pairs of the step; the
gradients of a group's cuts add up to the group's gradient, engine/sequence_parallel.py), with
the same pairs and tokens counted per step; an SP=2 checkpoint resumes on one process (SP=1) and
an SP=1 checkpoint on SP=2, continuing the same losses.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_resume import make_run_folder, metric_rows, one_thread, train, train_losses  # noqa: F401

STEPS = ["train.max_steps=6", "train.save_steps=3", "train.eval_steps=3"]
ZERO2 = ["deepspeed.enabled=true", "deepspeed.zero_stage=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-process reference, SP=2 on 2 ranks (ZeRO-2 and ZeRO-3) and 2 DP x 2 SP on 4 ranks (ZeRO-2)."""
    folder = make_run_folder(tmp_path_factory.mktemp("sp"))
    train(folder, "output_dir=one", *STEPS)
    train(folder, "output_dir=sp2", *STEPS, *ZERO2, "train.sequence_parallel=2", nproc=2)
    train(folder, "output_dir=sp2_zero3", *STEPS, "deepspeed.enabled=true", "deepspeed.zero_stage=3",
          "train.sequence_parallel=2", nproc=2)
    train(folder, "output_dir=dp2sp2", *STEPS, *ZERO2, "train.sequence_parallel=2", nproc=4, timeout=600)
    return folder


def assert_same_rows(got: Path, want: Path, rel: float) -> None:
    one, other = metric_rows(want), metric_rows(got)
    assert [(r["step"], r["split"]) for r in other] == [(r["step"], r["split"]) for r in one]
    assert len([r for r in other if r["split"] == "train"]) == 6
    for a, b in zip(one, other):
        assert (a.get("pairs"), a.get("tokens")) == (b.get("pairs"), b.get("tokens"))  # counted once per group
        for key in ("loss", "accuracy", "chosen_reward"):
            assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-6), (a["step"], a["split"], key)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sp2", "sp2_zero3", "dp2sp2"])
def test_sequence_parallel_reproduces_the_one_process_losses(runs: Path, name: str) -> None:
    assert_same_rows(runs / name, runs / "one", rel=1e-4)
    torch.testing.assert_close(torch.tensor(train_losses(runs / name)), torch.tensor(train_losses(runs / "one")),
                               rtol=1e-4, atol=0)
    log = (runs / name / "train.log").read_text(encoding="utf-8")
    groups = 2 if name == "dp2sp2" else 1
    assert f"sequence parallel: {groups} group(s) of 2 ranks" in log


@pytest.mark.slow
def test_resume_sp2_on_one_process_and_sp1_on_sp2(runs: Path) -> None:
    train(runs, "output_dir=sp2_to_1", *STEPS, f"train.resume={runs / 'sp2' / 'checkpoints' / 'step-3'}")
    assert_same_rows(runs / "sp2_to_1", runs / "sp2", rel=1e-5)
    train(runs, "output_dir=one_to_sp2", *STEPS, f"train.resume={runs / 'one' / 'checkpoints' / 'step-3'}",
          *ZERO2, "train.sequence_parallel=2", nproc=2)
    assert_same_rows(runs / "one_to_sp2", runs / "one", rel=1e-5)


@pytest.mark.slow
def test_lora_with_gradient_checkpointing_under_sp_equals_one_process(runs: Path) -> None:
    lora = ["model.lora.rank=4", "model.gradient_checkpointing=true"]
    train(runs, "output_dir=one_lora", *STEPS, *lora)
    train(runs, "output_dir=sp2_lora", *STEPS, *lora, *ZERO2, "train.sequence_parallel=2", nproc=2)
    assert_same_rows(runs / "sp2_lora", runs / "one_lora", rel=1e-4)
    assert train_losses(runs / "sp2_lora") != train_losses(runs / "one")  # the adapters trained, not the base
