"""Training faults: non-finite steps, SIGTERM, a failed save, a rank that dies."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import polar_train.train as train_module
from polar_train import checkpoint
from polar_train.checkpoint import COMPLETE, complete_checkpoints
from polar_train.cli import main as cli_main
from polar_train.engine.torch import TorchEngine
from polar_train.errors import UserError
from polar_train.files import size_text
from polar_train.model import ModelConfig
from polar_train.model.hf import expected_shapes
from polar_train.loss import pair_losses
from polar_train.rundir import LOCK_FILE, hold_output_dir

from test_resume import (  # noqa: F401
    assert_same_weights, make_run_folder, metric_rows, one_thread, start_training, train, train_losses, wait_for,
)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run_folder(tmp_path_factory.mktemp("faults"))


def last_train_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if '"train"' in line]
    return max(steps, default=0)


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc: no procps needed)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ...
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


def nan_losses_on(bad_steps: set[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Training losses (not eval ones) become NaN on the given 1-based optimizer steps."""
    done = {"steps": 0}
    step = TorchEngine.step

    def counting_step(self):
        done["steps"] += 1
        return step(self)

    def losses(*args, **kwargs):
        out = pair_losses(*args, **kwargs)
        return out * float("nan") if torch.is_grad_enabled() and done["steps"] + 1 in bad_steps else out

    monkeypatch.setattr(TorchEngine, "step", counting_step)
    monkeypatch.setattr(train_module, "pair_losses", losses)


def test_non_finite_steps_are_skipped_then_stop_the_run(run_folder: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(run_folder)
    nan_losses_on({2}, monkeypatch)  # one bad step: skipped, counted, training goes on
    assert cli_main(["train", "cfg.yaml", "output_dir=one_bad"]) == 0
    rows = {r["step"]: r for r in metric_rows(run_folder / "one_bad") if r["split"] == "train"}
    assert rows[2]["grad_norm"] != rows[2]["grad_norm"] and all(rows[s]["grad_norm"] == rows[s]["grad_norm"] for s in (1, 3, 4, 5, 6))
    assert "step 2: non-finite loss or gradient norm, update skipped (1 in a row)" in (run_folder / "one_bad" / "train.log").read_text()

    nan_losses_on({3, 4, 5, 6}, monkeypatch)
    assert cli_main(["train", "cfg.yaml", "output_dir=all_bad", "train.max_bad_steps=3"]) == 1
    err = capsys.readouterr().err
    assert "polar-train: error: step 5: 3 steps in a row had a non-finite loss or gradient norm" in err
    assert "Traceback" not in err
    assert not (run_folder / "all_bad" / "hf").exists()


def disk_full_on(monkeypatch: pytest.MonkeyPatch, name: str, calls: int) -> None:
    """safetensors' ``save_file`` fails as it does on a full disk on its ``calls``-th file named
    ``name*`` (a partial file written first); every other call writes."""
    import safetensors.torch

    save_file, seen = safetensors.torch.save_file, {"n": 0}

    def full(tensors, filename: str, metadata=None) -> None:
        if Path(filename).name.startswith(name):
            seen["n"] += 1
            if seen["n"] == calls:
                Path(filename).write_bytes(b"partial")
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("fails", ["state", "COMPLETE"])
def test_a_failed_save_keeps_the_previous_checkpoint(fails: str, run_folder: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(run_folder)
    out = run_folder / f"full_disk_{fails}"
    if fails == "state":  # the tiny model's state is one shard: one per save
        disk_full_on(monkeypatch, "state-", 2)
    else:  # renamed into place, then COMPLETE cannot be written
        write_text, seen = checkpoint.write_text, {"n": 0}

        def full(path, text):
            seen["n"] += Path(path).name == COMPLETE
            if seen["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return write_text(path, text)

        monkeypatch.setattr(checkpoint, "write_text", full)
    assert cli_main(["train", "cfg.yaml", f"output_dir={out.name}", "train.save_steps=2"]) == 1
    err = capsys.readouterr().err
    root = f"{out.name}/checkpoints"
    needed = size_text(folder_bytes(out / "checkpoints" / "step-2"))
    assert re.fullmatch(
        rf"polar-train: error: {root}/step-4: checkpoint could not be written: No space left on device; it needs "
        rf"about {needed}, [0-9.]+ (bytes|KB|MB|GB) are free under {root} \(free disk space or fix permissions under {root}, "
        rf"lower checkpoint.save_total_limit, or set another output_dir; {root}/step-2 is intact and "
        r"checkpoint.resume=auto continues from it\)", err.splitlines()[-1]), err
    assert "Traceback" not in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]  # no partial folder left
    assert (out / "checkpoints" / "step-2" / COMPLETE).exists()

    monkeypatch.undo()  # the disk has space again: resume
    monkeypatch.chdir(run_folder)
    assert cli_main(["train", "cfg.yaml", f"output_dir={out.name}", "train.save_steps=2"]) == 0
    if fails == "state":
        assert cli_main(["train", "cfg.yaml", "output_dir=clean", "train.save_steps=2"]) == 0
        assert metric_rows(out) == metric_rows(run_folder / "clean")
    assert [s for s, _ in complete_checkpoints(out)] == [4, 6]


def test_a_full_disk_at_the_export_names_the_folder_and_the_convert_command(run_folder: Path, monkeypatch,
                                                                            capsys) -> None:
    monkeypatch.chdir(run_folder)
    disk_full_on(monkeypatch, "model-", 1)
    assert cli_main(["train", "cfg.yaml", "output_dir=full_export", "train.save_steps=3"]) == 1
    err = capsys.readouterr().err
    # fp32, 2 layers of width 32, vocab 300 (embedding 300 x 32, v_head 32 + 1 ...): what the export writes
    needed = size_text(4 * sum(math.prod(s) for s in expected_shapes(
        ModelConfig.from_file(run_folder / "full_export" / "checkpoints" / "step-6" / "model_files" / "config.json")).values()))
    assert re.fullmatch(
        rf"polar-train: error: full_export/hf: the export could not be written: No space left on device; it needs about "
        rf"{needed}, [0-9.]+ (bytes|KB|MB|GB) are free under full_export \(free disk space or fix permissions, then write it from "
        r"the last checkpoint: polar-train convert full_export/checkpoints/step-6 full_export/hf\)", err.splitlines()[-1]), err
    assert "Traceback" not in err
    assert sorted(p.name for p in (run_folder / "full_export").iterdir() if p.name.startswith((".hf", "hf"))) == []
    monkeypatch.undo()
    monkeypatch.chdir(run_folder)
    assert cli_main(["convert", "full_export/checkpoints/step-6", "full_export/hf"]) == 0


@pytest.mark.slow
def test_a_real_full_disk_ends_in_one_line_and_the_run_resumes(run_folder: Path, tmp_path: Path, monkeypatch,
                                                               capsys) -> None:
    """On a 1.2 MB tmpfs three checkpoints of the tiny model (375 KB each) fit, the fourth does not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        monkeypatch.chdir(run_folder)
        steps = [f"output_dir={disk / 'out'}", "checkpoint.save_steps=1", "checkpoint.save_total_limit=10"]
        assert cli_main(["train", "cfg.yaml", *steps]) == 1
        err = capsys.readouterr().err
        root = disk / "out" / "checkpoints"
        assert [s for s, _ in complete_checkpoints(disk / "out")] == [1, 2, 3]
        assert sorted(p.name for p in root.iterdir()) == ["step-1", "step-2", "step-3"]  # no partial folder
        assert re.fullmatch(
            rf"polar-train: error: {root}/step-4: checkpoint could not be written: No space left on device; it needs "
            rf"about {size_text(folder_bytes(root / 'step-3'))}, [0-9.]+ (bytes|KB|MB|GB) are free under {root} \(.*; "
            rf"{root}/step-3 is intact and checkpoint.resume=auto continues from it\)", err[err.index("polar-train:"):-1])
        assert "Traceback" not in err

        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)  # space again: resume
        assert cli_main(["train", "cfg.yaml", *steps]) == 0
        assert cli_main(["train", "cfg.yaml", "output_dir=roomy"]) == 0
        assert metric_rows(disk / "out") == metric_rows(run_folder / "roomy")
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_resumes_exactly(run_folder: Path) -> None:
    steps = ["train.max_steps=40"]
    proc = start_training(run_folder, "output_dir=stopped", *steps)
    try:
        wait_for(lambda: last_train_step(run_folder / "stopped") >= 2, timeout=120, proc=proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (run_folder / "proc.log").read_text()
    assert "SIGTERM: finishing this step" in log
    assert "resume with:\n  polar-train train cfg.yaml output_dir=stopped train.max_steps=40 checkpoint.resume=auto" in log
    stopped_at = last_train_step(run_folder / "stopped")
    assert 2 <= stopped_at < 40 and not (run_folder / "stopped" / "hf").exists()
    assert [s for s, _ in complete_checkpoints(run_folder / "stopped")] == [stopped_at]

    train(run_folder, "output_dir=stopped", *steps, "train.resume=auto")
    train(run_folder, "output_dir=uninterrupted", *steps)
    assert train_losses(run_folder / "stopped") == train_losses(run_folder / "uninterrupted")
    assert_same_weights(run_folder / "stopped" / "hf", run_folder / "uninterrupted" / "hf")


@pytest.mark.slow
def test_a_dead_rank_ends_the_job_instead_of_hanging(run_folder: Path) -> None:
    proc = start_training(run_folder, "output_dir=dead_rank", "train.max_steps=100000", "data.eval_files=[]",
                          "deepspeed.enabled=true", nproc=2, log_name="dead_rank.log")
    try:
        wait_for(lambda: last_train_step(run_folder / "dead_rank") >= 2, timeout=180, proc=proc)
        workers = child_pids(proc.pid)  # torchrun's two workers
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        killed = time.monotonic()
        code = proc.wait(120)
        elapsed = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code != 0
    assert elapsed < 120


# --- one run per output folder ----------------------------------------------------------------


def test_a_held_output_dir_refuses_a_second_holder_and_is_free_after(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with hold_output_dir(out):
        holder = (out / LOCK_FILE).read_text()
        assert holder == f"pid {os.getpid()} on host {socket.gethostname()}\n"
        with pytest.raises(UserError, match=rf"output_dir is in use by another run \(pid {os.getpid()} on host "):
            with hold_output_dir(out):
                pass
    with hold_output_dir(out):  # released on exit
        pass


@pytest.mark.slow
def test_second_run_on_a_folder_in_use_refuses_and_a_sigkill_leaves_no_stale_lock(run_folder: Path, capsys) -> None:
    proc = start_training(run_folder, "output_dir=busy", "train.max_steps=500")
    lock = run_folder / "busy" / LOCK_FILE
    try:
        wait_for(lambda: lock.exists() and f"pid {proc.pid} " in lock.read_text(), timeout=120, proc=proc)
        code = cli_main(["train", str(run_folder / "cfg.yaml"), f"output_dir={run_folder / 'busy'}", "train.max_steps=500",
                         f"model.fresh.tokenizer={run_folder / 'tok'}", f"data.train_files={run_folder / 'train.jsonl'}",
                         f"data.eval_files={run_folder / 'eval.jsonl'}"])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        assert (f"polar-train: error: {run_folder / 'busy'}: output_dir is in use by another run "
                f"(pid {proc.pid} on host {socket.gethostname()}) (wait for that run to end or stop it") in err
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    with hold_output_dir(run_folder / "busy"):  # the killed run's lock went with it
        assert f"pid {os.getpid()} " in lock.read_text()
