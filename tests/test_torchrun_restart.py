"""A worker SIGKILLed under ``torchrun --max-restarts 1``: the elastic agent restarts every worker,
they resume from the latest complete checkpoint and finish with the uninterrupted run's losses.

Before ``dist.attempt_store`` the restarted workers hung: torchrun (c10d rendezvous) hands every
attempt the agent's TCPStore, whose process-group keys carry no attempt, so a restarted rank read
the dead attempt's addresses (see ``polar_train.engine.dist.attempt_store``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polar_train.checkpoint import COMPLETE
from test_resume import make_run_folder, subprocess_env, train, train_losses, wait_for

STEPS = ["train.max_steps=12", "checkpoint.save_steps=2", "deepspeed.enabled=true", "deepspeed.zero_stage=2"]


def workers_of(agent: int) -> list[int]:
    """The worker processes torchrun (pid ``agent``) started."""
    out = subprocess.run(["pgrep", "-P", str(agent)], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_run_finishes_with_the_same_losses(tmp_path: Path) -> None:
    folder = make_run_folder(tmp_path)
    train(folder, "output_dir=ref", *STEPS, nproc=2)

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "--max-restarts=1", "-m", "polar_train", "train", "cfg.yaml", "output_dir=killed", *STEPS]
    log = open(folder / "killed.log", "w")
    agent = subprocess.Popen(command, cwd=folder, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        wait_for(lambda: (folder / "killed" / "checkpoints" / "step-4" / COMPLETE).exists(), timeout=180, proc=agent)
        workers = workers_of(agent.pid)
        assert len(workers) == 2
        os.kill(workers[-1], signal.SIGKILL)
        assert agent.wait(240) == 0, (folder / "killed.log").read_text()[-4000:]
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
        log.close()
    text = (folder / "killed.log").read_text()
    assert "resumed from" in text  # the restart continued from a checkpoint, it did not start over
    killed, ref = train_losses(folder / "killed"), train_losses(folder / "ref")
    assert len(killed) == len(ref) == 12  # metrics.jsonl restored to the checkpoint, then continued
    torch.testing.assert_close(torch.tensor(killed), torch.tensor(ref), rtol=0, atol=1e-4)
    assert (folder / "killed" / "hf" / "config.json").is_file()
