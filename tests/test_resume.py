"""Checkpoints and exact resume: layout, pruning, completeness, SIGKILL + resume, convert.

The helpers at the top (a tiny run folder, launching ``polar-train train`` as a subprocess,
reading metrics and weights back) are shared with test_distributed.py and test_faults.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from polar_train.checkpoint import COMPLETE, find_resume, resolve_checkpoint
from polar_train.export import convert
from polar_train.cli import main as cli_main
from polar_train.config import load_config
from polar_train.errors import UserError
from polar_train.tokenizer import build_tokenizer, save_tokenizer
from polar_train.train import run

WORDS = "apple pear plum fig kiwi lime mango grape melon peach berry cherry lemon olive date".split()
TIMING_KEYS = ("pairs_per_s", "tokens_per_s")
# Data whose per-rank micro-batch counts differ before balancing (see test_distributed.py).
RUN_CONFIG = """\
seed: 0
model:
  attention: sdpa
  fresh: {tokenizer: tok, hidden_size: 32, num_layers: 2, num_heads: 4, num_kv_heads: 2, intermediate_size: 64}
data:
  train_files: [train.jsonl]
  eval_files: [eval.jsonl]
  max_length: 512
  max_tokens: 180
  cache_dir: ""
train: {lr: 2.0e-3, warmup_ratio: 0.0, pairs_per_step: 12, max_steps: 6, precision: fp32, log_steps: 1}
"""


def make_run_folder(folder: Path) -> Path:
    """A tiny tokenizer, 64 train / 12 eval pairs of varied length, and ``cfg.yaml`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    save_tokenizer(build_tokenizer([" ".join(WORDS)] * 4 + ["It is"], vocab_size=300), folder / "tok")
    rng = random.Random(10)  # seed 10: two of the first six steps pack unequal counts on 2 ranks
    for name, n, lengths in (("train", 64, [2, 4, 8, 16, 32]), ("eval", 12, [2, 8, 24])):
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(n):
                ref = rng.choice(WORDS)
                row = {"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.choice(lengths))), "reference": ref,
                       "chosen": f"It is {ref}.", "rejected": f"It is {rng.choice(WORDS)} {rng.choice(WORDS)}."}
                f.write(json.dumps(row) + "\n")
    (folder / "cfg.yaml").write_text(RUN_CONFIG, encoding="utf-8")
    return folder


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """In-process runs on one thread, like the subprocess ones (OMP_NUM_THREADS=1): on a busy
    2-core machine two OpenMP threads measured 40x slower for this tiny model."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run_folder(tmp_path_factory.mktemp("run"))


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "polar-train" / "torch_extensions"))
    return env


def train_command(*overrides: str, nproc: int = 0) -> list[str]:
    """``python -m polar_train train cfg.yaml ...``, under ``torchrun --standalone`` when nproc > 0."""
    launcher = [sys.executable, "-m", "polar_train"]
    if nproc:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                    "-m", "polar_train"]
    return [*launcher, "train", "cfg.yaml", *overrides]


def train(folder: Path, *overrides: str, nproc: int = 0, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run training in a subprocess in ``folder``; fails the test with its output if it fails."""
    proc = subprocess.run(train_command(*overrides, nproc=nproc), cwd=folder, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def start_training(folder: Path, *overrides: str, nproc: int = 0, log_name: str = "proc.log") -> subprocess.Popen:
    log = open(folder / log_name, "w")
    return subprocess.Popen(train_command(*overrides, nproc=nproc), cwd=folder, env=subprocess_env(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(condition, timeout: float, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early with {proc.returncode}")
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.02)


def metric_rows(out: Path) -> list[dict]:
    """metrics.jsonl without the timing figures (they differ between runs)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def train_losses(out: Path) -> list[float]:
    return [r["loss"] for r in metric_rows(out) if r["split"] == "train"]


def hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(folder / shard))
    return state


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    wa, wb = hf_weights(a), hf_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


def in_process_config(folder: Path, out: str, *overrides: str):
    """A Config for ``run`` in this process, with paths relative to ``folder``."""
    cfg = load_config(folder / "cfg.yaml", [f"output_dir={folder / out}", *overrides])
    cfg.model.fresh.tokenizer = str(folder / "tok")
    cfg.data.train_files = [str(folder / "train.jsonl")]
    cfg.data.eval_files = [str(folder / "eval.jsonl")]
    return cfg


# ---------------------------------------------------------------------------------------------


def test_checkpoint_layout_pruning_and_convert(run_folder: Path) -> None:
    out = run_folder / "layout"
    run(in_process_config(run_folder, "layout", "train.save_steps=2", "train.save_total_limit=2"))

    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-4", "step-6"]  # step-2 pruned, no temp folders
    ckpt = root / "step-6"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        [COMPLETE, "config.yaml", "metrics.jsonl", "model_files", "rng", "state-00001.safetensors", "trainer_state.json"])
    assert [p.name for p in (ckpt / "rng").iterdir()] == ["rank-00000.safetensors"]
    tokenizer_files = [p.name for p in (run_folder / "tok").iterdir()]  # transformers 4.x writes one more than 5.x
    assert sorted(p.name for p in (ckpt / "model_files").iterdir()) == sorted(["config.json", *tokenizer_files])
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["step"], state["engine"], state["world_size"], state["export_dtype"]) == (6, "torch", 1, "float32")
    assert (state["format"], state["total_steps"], state["adam_step"], state["loss_scale"]) == (2, 6, 6, None)
    assert state["last_train"]["loss"] == train_losses(out)[-1]
    assert load_config(ckpt / "config.yaml").output_dir == str(out)

    # convert: a step folder or the run folder (= its latest) gives the trainer's own export
    for source in (ckpt, out):
        converted = convert(source, run_folder / "converted")
        assert sorted(p.name for p in converted.iterdir()) == sorted(p.name for p in (out / "hf").iterdir())
        assert (converted / "config.json").read_text() == (out / "hf" / "config.json").read_text()
        assert_same_weights(converted, out / "hf")
    assert convert(root / "step-4", run_folder / "older", dtype="bfloat16")
    assert next(iter(hf_weights(run_folder / "older").values())).dtype == torch.bfloat16


def test_resume_from_a_step_reproduces_the_uninterrupted_run(run_folder: Path) -> None:
    run(in_process_config(run_folder, "full", "train.save_steps=3", "train.eval_steps=3"))
    full = run_folder / "full"
    resumed = run_folder / "resumed"
    final = run(in_process_config(run_folder, "resumed", f"train.resume={full / 'checkpoints' / 'step-3'}", "train.eval_steps=3"))

    assert metric_rows(resumed) == metric_rows(full)  # no duplicated rows, step-0 eval not re-run
    assert [(r["step"], r["split"]) for r in metric_rows(resumed) if r["split"] == "eval"] == [(0, "eval"), (3, "eval"), (6, "eval")]
    assert final["loss"] == metric_rows(full)[-1]["loss"]
    assert_same_weights(resumed / "hf", full / "hf")


def kill_after_checkpoint(folder: Path, name: str, step: int, *overrides: str) -> None:
    """Start training into ``folder/name``, SIGKILL it once its step-``step`` checkpoint is complete,
    and check that it died mid-run (no export)."""
    proc = start_training(folder, f"output_dir={name}", *overrides)
    ckpt = folder / name / "checkpoints" / f"step-{step}"
    try:
        wait_for(lambda: (ckpt / COMPLETE).exists(), timeout=120, proc=proc)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (folder / name / "hf").exists()  # killed mid-run


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_matches(run_folder: Path) -> None:
    steps = ["train.max_steps=12", "train.save_steps=2"]
    train(run_folder, "output_dir=ref12", *steps)

    kill_after_checkpoint(run_folder, "killed", 4, *steps)
    killed_at = max(r["step"] for r in metric_rows(run_folder / "killed"))
    assert 4 <= killed_at < 12

    train(run_folder, "output_dir=killed", *steps)  # checkpoint.resume=auto (the default)
    resumed = run_folder / "killed"
    assert metric_rows(resumed) == metric_rows(run_folder / "ref12")
    torch.testing.assert_close(torch.tensor(train_losses(resumed)), torch.tensor(train_losses(run_folder / "ref12")),
                               rtol=1e-6, atol=0)
    assert_same_weights(resumed / "hf", run_folder / "ref12" / "hf", atol=1e-6)


def test_incomplete_checkpoints_are_ignored_and_reported(run_folder: Path, capsys) -> None:
    out = run_folder / "partial"
    run(in_process_config(run_folder, "partial", "train.save_steps=3", "train.max_steps=3"))
    root = out / "checkpoints"
    # what a crash leaves: a temp folder mid-save, and a renamed folder whose COMPLETE never came
    (root / ".tmp-step-5").mkdir()
    (root / "step-4").mkdir()
    (root / "step-4" / "trainer_state.json").write_text("{}")

    cfg = in_process_config(run_folder, "partial")
    assert find_resume(out, cfg.checkpoint, cfg.model.lora) == root / "step-3"
    assert resolve_checkpoint(out, "x") == root / "step-3"
    with pytest.raises(UserError, match="incomplete checkpoint"):
        resolve_checkpoint(root / "step-4", "train.resume")
    cfg.checkpoint.resume = "never"
    with pytest.raises(UserError, match="earlier run's checkpoints"):
        find_resume(out, cfg.checkpoint, cfg.model.lora)

    assert cli_main(["convert", str(root / "step-4"), str(run_folder / "x")]) == 2
    assert "incomplete checkpoint" in capsys.readouterr().err
    assert cli_main(["convert", str(run_folder / "tok"), str(run_folder / "x")]) == 2
    assert "is not a checkpoint" in capsys.readouterr().err
    assert not (run_folder / "x").exists()
