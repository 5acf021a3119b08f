"""Checkpoints are data: the LR as a function of the step, resume with another length, tampered
and damaged checkpoints (one line, exit 2, no code run), DeepSpeed's internals checked.

The runs here are in-process and tiny (the one-process engine, a few steps): the whole module
takes seconds. Multi-rank save / resume is covered by test_resume_elastic.py and
test_distributed.py, which read and write the same name-keyed files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from safetensors.torch import load_file

from polar_train.checkpoint import COMPLETE, STATE_FILE, CheckpointState, ShardWriter
from polar_train.cli import main as cli_main
from polar_train.config import ScheduleSection
from polar_train.engine.schedule import lr_at
from polar_train.errors import UserError

from test_resume import in_process_config, make_run_folder, metric_rows, one_thread  # noqa: F401


@dataclass
class Schedule:  # optimizer.lr with the schedule section's fields
    lr: float
    warmup_ratio: float
    min_lr_ratio: float

    def at(self, step: int, total: int) -> float:
        return lr_at(step, total, self.lr, ScheduleSection(warmup_ratio=self.warmup_ratio, min_lr_ratio=self.min_lr_ratio))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder whose ``base`` run saved step-2 and step-4 (the one-process engine)."""
    folder = make_run_folder(tmp_path_factory.mktemp("ckpt"))
    assert train_cli(folder, "output_dir=base", "train.max_steps=4", "train.save_steps=2") == 0
    return folder


@pytest.fixture(autouse=True)
def fresh_logging() -> None:
    """Each test starts like a new process: no log handler left on an earlier test's stderr."""
    for handler in list(logging.getLogger("polar_train").handlers):
        logging.getLogger("polar_train").removeHandler(handler)


def train_cli(folder: Path, *args: str) -> int:
    """``polar-train train cfg.yaml ARGS`` in this process, in ``folder``, without the eval set."""
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        return cli_main(["train", "cfg.yaml", "data.eval_files=[]", *args])
    finally:
        os.chdir(cwd)


def copy_run(saved: Path, name: str) -> Path:
    shutil.copytree(saved / "base", saved / name)
    return saved / name


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("polar-train: error: "), err
    return err


# ---------------------------------------------------------------------------------------------
# The learning rate


@pytest.mark.parametrize("schedule, total, expected", [
    # the values torch's LambdaLR gave with polar-train 0.1's lr_lambda (printed from that version)
    (Schedule(2e-3, 0.3, 0.1), 10, [0.0006666666666666666, 0.0013333333333333333, 0.002, 0.002, 0.0019108719811121771,
                                    0.0016611408216728604, 0.001300268840560683, 0.0008997311594393172,
                                    0.0005388591783271399, 0.00028912801888782293, 0.0002]),
    (Schedule(1e-5, 0.0, 0.0), 7, [1e-05, 9.504844339512096e-06, 8.117449009293668e-06, 6.112604669781572e-06,
                                   3.887395330218429e-06, 1.8825509907063328e-06, 4.951556604879049e-07, 0.0]),
])
def test_lr_at_gives_the_values_of_the_earlier_lambda_schedule(schedule: Schedule, total: int, expected: list) -> None:
    assert [schedule.at(step, total) for step in range(total + 1)] == expected


def test_resume_with_another_max_steps_warns_and_follows_the_new_schedule(saved: Path) -> None:
    """Saved in a 4-step run at step 2, resumed as an 8-step run: steps 1-2 ran at the 4-step LRs,
    steps 3-8 run at the 8-step LRs (checked at every step), and one warning says so."""
    out = copy_run(saved, "longer")
    step2 = out / "checkpoints" / "step-2"
    assert json.loads((step2 / STATE_FILE).read_text())["total_steps"] == 4
    assert train_cli(saved, "output_dir=longer", "train.max_steps=8", "train.save_steps=2", f"train.resume={step2}") == 0

    train = [r for r in metric_rows(out) if r["split"] == "train"]
    cfg = in_process_config(saved, "longer")
    schedule = Schedule(cfg.optimizer.lr, cfg.schedule.warmup_ratio, cfg.schedule.min_lr_ratio)
    assert [r["step"] for r in train] == list(range(1, 9))
    assert [r["lr"] for r in train] == [schedule.at(s - 1, 4 if s <= 2 else 8) for s in range(1, 9)]
    assert train[2]["lr"] != schedule.at(2, 4)  # the change is real, not a no-op
    warnings = [line for line in (out / "train.log").read_text().splitlines() if "another length" in line]
    assert len(warnings) == 1, warnings
    assert (f"4 -> 8 steps (train.max_steps / train.epochs changed); the LR schedule now follows the 8-step curve: "
            f"LR at step 2 {schedule.at(2, 4):.4g} -> {schedule.at(2, 8):.4g}") in warnings[0]
    assert json.loads((out / "checkpoints" / "step-8" / STATE_FILE).read_text())["total_steps"] == 8


def test_state_shards_stay_under_the_limit_and_read_back_by_name(tmp_path: Path) -> None:
    """Rank 0 writes a shard whenever the next parameter would take it over the limit (memory stays
    about one shard); a parameter larger than the limit gets a shard of its own."""
    torch.manual_seed(0)
    params = {"a": torch.randn(10), "big": torch.randn(40), "b": torch.randn(6), "c": torch.randn(6)}
    writer = ShardWriter(tmp_path, limit=3 * 4 * 12)  # bytes: the 3 tensors of a 12-element parameter
    for name, weight in params.items():
        writer.add(name, {"fp32": weight, "exp_avg": weight * 2, "exp_avg_sq": weight * 3})
    files = writer.close()
    assert list(files) == ["state-00001.safetensors", "state-00002.safetensors", "state-00003.safetensors"]
    assert [sorted({k.split("/")[1] for k in load_file(tmp_path / f)}) for f in files] == [["a"], ["big"], ["b", "c"]]
    state = CheckpointState(tmp_path, {"adam_step": 3, "loss_scale": None, "state_files": files})
    for name, weight in params.items():
        assert torch.equal(state.tensor(name, "exp_avg_sq"), weight * 3)
    assert dict(state.weights()).keys() == params.keys()


# ---------------------------------------------------------------------------------------------
# Nothing from a checkpoint runs as code


class Planted:
    """Unpickling this creates ``marker``: the proof that a file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": Planted(marker)}, path)


@pytest.mark.parametrize("target", ["state-00001.safetensors", "rng/rank-00000.safetensors", "format-1 model.pt"])
def test_a_planted_pickle_runs_nothing_and_fails_with_one_line(saved: Path, target: str, monkeypatch, capsys) -> None:
    monkeypatch.chdir(saved)
    out = copy_run(saved, f"planted-{target.split('/')[0].split()[0]}")
    ckpt = out / "checkpoints" / "step-4"
    marker = saved / f"marker-{out.name}"
    if target.startswith("format-1"):  # a checkpoint as polar-train 0.1 wrote it: pickled torch files
        meta = json.loads((ckpt / STATE_FILE).read_text())
        (ckpt / STATE_FILE).write_text(json.dumps({**meta, "format": 1}))
        for name in ("model.pt", "optimizer.pt", "rng/rank-00000.pt"):
            plant(ckpt / name, marker)
        expected = f"{ckpt}: is a format-1 checkpoint of polar-train 0.1 (pickled files: model.pt, optimizer.pt, rng/rank-00000.pt)"
    else:
        plant(ckpt / target, marker)
        expected = f"{ckpt / target}: "
    for command in (["convert", str(ckpt), str(saved / "converted")],
                    ["train", "cfg.yaml", "data.eval_files=[]", f"output_dir={out}", "train.resume=auto"]):
        assert cli_main(command) == 2
        assert one_line_error(capsys).startswith(f"polar-train: error: {expected}")
        assert not marker.exists()
    assert not (saved / "converted").exists()


def test_pickled_files_a_checkpoint_does_not_need_are_never_read(saved: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(saved)
    out = copy_run(saved, "stray")
    ckpt = out / "checkpoints" / "step-4"
    marker = saved / "marker-stray"
    for name in ("model.pt", "optimizer.pt", "deepspeed/mp_rank_00_model_states.pt", "rng/rank-00000.pt"):
        plant(ckpt / name, marker)
    assert cli_main(["convert", str(ckpt), str(saved / "stray-hf")]) == 0
    assert train_cli(saved, f"output_dir={out}", "train.max_steps=5") == 0
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints: one line naming the file and the step to use instead


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated shard": ("state-00001.safetensors", truncate, "holds {size} bytes, the checkpoint wrote"),
    "missing shard": ("state-00001.safetensors", Path.unlink, "is missing from the checkpoint"),
    "garbled state": (STATE_FILE, lambda p: p.write_text('{"step": 4, "form'), "cannot be read (Unterminated string"),
    "missing rng": ("rng/rank-00000.safetensors", Path.unlink, "is missing from the checkpoint"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_checkpoint_stops_convert_and_resume_with_one_line(saved: Path, damage: str, monkeypatch,
                                                                     capsys) -> None:
    monkeypatch.chdir(saved)
    out = copy_run(saved, "damaged-" + damage.replace(" ", "-"))
    name, harm, what = DAMAGE[damage]
    path = out / "checkpoints" / "step-4" / name
    size = path.stat().st_size // 2
    harm(path)
    expected = (f"polar-train: error: {path}: {what.format(size=size)}")
    fix = f"it was damaged or is still being copied; use another step: {out / 'checkpoints' / 'step-2'})"
    for command in (["convert", str(out), str(saved / "converted")],
                    ["train", "cfg.yaml", "data.eval_files=[]", f"output_dir={out}"]):  # checkpoint.resume=auto
        assert cli_main(command) == 2
        err = one_line_error(capsys)
        assert err.startswith(expected) and err.endswith(fix), err
    assert (out / "checkpoints" / "step-4" / COMPLETE).exists()  # nothing removed: the user decides


# ---------------------------------------------------------------------------------------------
# DeepSpeed: the tested range, its internals checked at engine build


def test_pyproject_pins_the_tested_deepspeed_range(repo_root: Path) -> None:
    from polar_train.engine.deepspeed_compat import SUPPORTED

    assert f'"{SUPPORTED}",' in (repo_root / "pyproject.toml").read_text()


def test_a_deepspeed_without_an_internal_we_use_is_refused_with_one_line(monkeypatch) -> None:
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from polar_train.engine.deepspeed_compat import import_deepspeed
    from polar_train.engine.deepspeed_compat import SUPPORTED, check_deepspeed, internal

    import_deepspeed()
    check_deepspeed()  # the installed version has everything
    monkeypatch.delattr(DeepSpeedZeroOptimizer, "_lazy_init_hp_params_optimizer_state")
    with pytest.raises(UserError) as error:
        check_deepspeed()
    assert str(error.value).startswith("deepspeed: DeepSpeed ")
    assert str(error.value).endswith(f"has no DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state, which "
                                     f"polar-train uses (install a tested version: pip install '{SUPPORTED}')")
    with pytest.raises(UserError, match=r"has no object\.fp16_groups, which polar-train uses"):
        internal(object(), "fp16_groups")
