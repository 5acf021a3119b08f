"""Resume on another launch: a checkpoint written by any engine, ZeRO stage and number of ranks
continues on any other (a job preempted on 16 GPUs comes back on 8; ZeRO-2 -> one plain process;
one process -> ZeRO-3 on 2 ranks).

Every engine writes the same name-keyed checkpoint (``checkpoint.CheckpointState`` reads it) and sets the
fp32 master weights, both AdamW moments and the AdamW step exactly; the step index is the data
position, and the pairs of a step do not depend on the number of ranks. So the run ends where the
uninterrupted one-process run ends, up to the float summation order of 2 ranks vs 1.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from polar_train.checkpoint import CheckpointState, ShardWriter, TrainerState, check_checkpoint, read_meta, save_checkpoint
from polar_train.config import to_dict
from polar_train.engine import Dist, build_engine
from polar_train.engine.protocol import STATE_KEYS
from polar_train.errors import UserError
from polar_train.model.build import ModelSource
from polar_train.packing import FILLER, StepPlanner
from polar_train.train import run

from test_resume import (  # noqa: F401  (one_thread: an autouse fixture)
    hf_weights, in_process_config, make_run_folder, metric_rows, one_thread, subprocess_env, train, train_losses,
)

STEPS = ["train.max_steps=6", "train.save_steps=3", "train.eval_steps=3"]
ZERO = ["deepspeed.enabled=true"]

# Loads a checkpoint into a DeepSpeed engine of the given ZeRO stage and saves it again at once:
# `torchrun ... probe.py CKPT OUT_DIR STAGE [CKPT OUT_DIR STAGE ...]` (one engine after another).
PROBE = """\
import sys
from pathlib import Path

from polar_train.checkpoint import load_checkpoint, save_checkpoint
from polar_train.config import load_config, to_dict
from polar_train.engine import build_engine, distributed
from polar_train.model.build import ModelSource

specs = [sys.argv[i:i + 3] for i in range(1, len(sys.argv), 3)]
configs = [load_config("cfg.yaml", [f"output_dir={out}", "deepspeed.enabled=true", f"deepspeed.zero_stage={stage}"])
           for _, out, stage in specs]
with distributed(configs[0].deepspeed) as dist:
    for (ckpt, out, _), cfg in zip(specs, configs):
        source = ModelSource.from_config(cfg.model, cfg.seed)
        engine = build_engine(dist, source, model=cfg.model, optimizer=cfg.optimizer, deepspeed=cfg.deepspeed,
                              engine=cfg.engine, load_weights=False)
        Path(out).mkdir(exist_ok=True)
        state = load_checkpoint(engine, dist, Path(ckpt), Path(out))
        save_checkpoint(engine, dist, Path(out), state, source, checkpoint=cfg.checkpoint, lora=cfg.model.lora,
                        config=to_dict(cfg))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted one-process run and a 2-rank ZeRO-2 run, both saving at steps 3 and 6."""
    folder = make_run_folder(tmp_path_factory.mktemp("elastic"))
    run(in_process_config(folder, "one", *STEPS))
    train(folder, "output_dir=zero2", *STEPS, *ZERO, "deepspeed.zero_stage=2", nproc=2)
    return folder


def assert_matches_one_process_run(out: Path, runs: Path) -> None:
    """The same metric rows (no step repeated or lost), losses within 1e-5 relative, final fp32
    weights within 1e-5 of the uninterrupted one-process run."""
    one = runs / "one"
    assert [(r["step"], r["split"]) for r in metric_rows(out)] == [(r["step"], r["split"]) for r in metric_rows(one)]
    torch.testing.assert_close(torch.tensor(train_losses(out)), torch.tensor(train_losses(one)), rtol=1e-5, atol=0)
    ours, theirs = hf_weights(out / "hf"), hf_weights(one / "hf")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-5, msg=name)
    assert "restoring it by parameter name" in (out / "train.log").read_text()


def assert_same_state(a: CheckpointState, b: CheckpointState) -> None:
    """Bitwise: every weight and moment, the AdamW step."""
    assert a.shapes == b.shapes
    assert (a.adam_step, a.loss_scale) == (b.adam_step, b.loss_scale)
    for name in a.shapes:
        for key in STATE_KEYS:
            assert torch.equal(a.tensor(name, key), b.tensor(name, key)), (name, key)


def portable(ckpt: Path) -> CheckpointState:
    return CheckpointState(ckpt, check_checkpoint(ckpt))


# ---------------------------------------------------------------------------------------------


def test_the_pairs_of_a_step_do_not_depend_on_the_number_of_ranks() -> None:
    """The data position is the step index: on 1, 2 or 8 ranks a step covers the same pairs."""
    costs = [(7 * i) % 50 + 4 for i in range(200)]
    planners = [StepPlanner(costs, pairs_per_step=24, max_tokens=120, num_ranks=n, seed=3) for n in (1, 2, 8)]
    assert len({p.steps_per_epoch for p in planners}) == 1
    for epoch, step in [(0, 0), (0, 5), (1, 2), (2, 8)]:
        expected = planners[0].step_pairs(epoch, step)
        for planner in planners:
            assert planner.step_pairs(epoch, step) == expected
            planned = [i for rank in planner.plan(epoch, step) for mb in rank for i in mb if i != FILLER]
            assert sorted(planned) == sorted(expected)


def test_a_checkpoint_of_another_model_is_refused_by_name(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path)
    for name, shape in (("a.weight", (4, 2)), ("b.weight", (3,))):
        writer.add(name, {key: torch.zeros(shape) for key in STATE_KEYS})
    view = CheckpointState(tmp_path, {"adam_step": 5, "loss_scale": None, "state_files": writer.close()})
    with pytest.raises(UserError, match=r"missing: c\.weight; unexpected: b\.weight; shape: a\.weight \(4, 2\) != \(2, 4\)"):
        view.check({"a.weight": torch.Size([2, 4]), "c.weight": torch.Size([3])})
    view.check({"b.weight": torch.Size([3]), "a.weight": torch.Size([4, 2])})  # the order does not matter


@pytest.mark.slow
def test_two_rank_zero2_checkpoint_continues_on_one_process(runs: Path) -> None:
    run(in_process_config(runs, "zero2_to_one", *STEPS, f"train.resume={runs / 'zero2' / 'checkpoints' / 'step-3'}"))
    assert_matches_one_process_run(runs / "zero2_to_one", runs)


@pytest.mark.slow
def test_two_rank_zero2_run_continues_on_one_process_in_the_same_output_dir(runs: Path) -> None:
    """The README promise in its plainest form: the same command, same output_dir, on another
    launch (one process, no DeepSpeed) picks up the 2-rank ZeRO-2 run's latest checkpoint."""
    out = runs / "zero2_then_one"
    shutil.copytree(runs / "zero2", out)  # the 2-rank run, as if stopped right after its step-3 checkpoint
    shutil.rmtree(out / "checkpoints" / "step-6")
    shutil.rmtree(out / "hf")
    train(runs, "output_dir=zero2_then_one", *STEPS)  # deepspeed.enabled=false; checkpoint.resume=auto (the default)
    zero2 = runs / "zero2"
    assert [(r["step"], r["split"]) for r in metric_rows(out)] == [(r["step"], r["split"]) for r in metric_rows(zero2)]
    torch.testing.assert_close(torch.tensor(train_losses(out)), torch.tensor(train_losses(zero2)), rtol=1e-4, atol=0)
    assert "restoring it by parameter name" in (out / "train.log").read_text()
    assert yaml.safe_load((out / "config.yaml").read_text())["deepspeed"]["enabled"] is False  # this launch's config


@pytest.mark.slow
def test_one_process_checkpoint_continues_on_two_ranks_zero3(runs: Path) -> None:
    train(runs, "output_dir=one_to_zero3", *STEPS, f"train.resume={runs / 'one' / 'checkpoints' / 'step-3'}",
          *ZERO, "deepspeed.zero_stage=3", nproc=2)
    assert_matches_one_process_run(runs / "one_to_zero3", runs)


@pytest.mark.slow
def test_every_engine_holds_the_checkpoint_exactly(runs: Path, tmp_path: Path) -> None:
    """Load a checkpoint into another engine and save it straight away: the saved state equals the
    loaded one bit for bit (2-rank ZeRO-2 -> 2-rank ZeRO-3, one process -> 2-rank ZeRO-2, 2-rank
    ZeRO-2 -> one process)."""
    zero2, one = runs / "zero2" / "checkpoints" / "step-3", runs / "one" / "checkpoints" / "step-3"
    (runs / "probe.py").write_text(PROBE)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "probe.py",
                           str(zero2), "probe3", "3", str(one), "probe2", "2"],
                          cwd=runs, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for source, out, stage in [(zero2, runs / "probe3", 3), (one, runs / "probe2", 2)]:
        saved = out / "checkpoints" / "step-3"
        assert (read_meta(saved)["zero_stage"], read_meta(saved)["world_size"]) == (stage, 2)
        assert_same_state(portable(saved), portable(source))

    cfg = in_process_config(runs, "unused")  # the one-process engine, in this process
    source = ModelSource.from_config(cfg.model, cfg.seed)
    engine = build_engine(Dist(), source, model=cfg.model, optimizer=cfg.optimizer, deepspeed=cfg.deepspeed,
                          engine=cfg.engine, load_weights=False)
    engine.load_named_state(portable(zero2))
    saved = save_checkpoint(engine, Dist(), tmp_path, TrainerState(step=3, total_steps=6), source,
                            checkpoint=cfg.checkpoint, lora=cfg.model.lora, config=to_dict(cfg))
    assert read_meta(saved)["engine"] == "torch"
    assert_same_state(portable(saved), portable(zero2))
