"""scripts/gpu_check.sh, the one command a lent GPU machine runs, kept working on CPU.

``--dry-run`` runs every stage (wheels, env, tests, data, both benchmarks, 5 DeepSpeed ZeRO-2
steps) with tiny shapes; the GPU run writes the same summary keys.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ["wheels", "env", "tests", "data", "bench_1.8b", "train", "bench_7b", "long_sp1"]


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_passes_every_stage_and_writes_the_summary(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--work", str(tmp_path / "work"),
                           "--wheels", str(tmp_path / "no_wheels")],
                          cwd=REPO, env=dict(os.environ, OUT=str(out), PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=1900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert (summary["mode"], summary["passed"]) == ("dry-run", True)
    assert list(summary["stages"]) == STAGES
    assert {n: s["status"] for n, s in summary["stages"].items()} == dict.fromkeys(STAGES, "passed")
    assert {"torch", "device", "attention_auto_bf16", "varlen_attn_params", "packages"} <= set(summary["env"])
    assert summary["env"]["attention_auto_bf16"] == "sdpa"
    tests = summary["stages"]["tests"]
    assert tests["counts"]["skipped"] >= 1 and "failed" not in tests["counts"]  # CUDA tests skip on CPU
    for name in ("bench_1.8b", "bench_7b"):
        bench = summary["stages"][name]
        assert set(bench["results"]) == {"padded", "packed", "shared"}
        assert bench["results"]["shared"]["pairs_per_s"] > 0 and bench["ratios"]["tokens_saved_by_shared_prefix"] > 0
    train = summary["stages"]["train"]
    assert (train["steps"], train["engine"], train["attention"], train["precision"]) == (5, "deepspeed", "sdpa", "fp32")
    assert len(train["loss"]) == 5 and train["pairs_per_s"] > 0
    long = summary["stages"]["long_sp1"]
    assert long["longest_fitting_tokens"] == 512 and list(long["results"]) == ["256", "512"]
    assert long["results"]["512"]["sp1"][0]["saved_mib"] > long["results"]["256"]["sp1"][0]["saved_mib"] > 0
    written = {p.name for p in out.iterdir()}
    assert {"gpu_check.json", "gpu_check.log", "bench_1.8b.json", "bench_7b.json", "long_sp1.json", "train_config.json",
            "train_metrics.jsonl", "train_train.log"} <= written
    assert "===== train:" in (out / "gpu_check.log").read_text()


def fake_wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal valid pure-Python wheel holding package ``name``."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", f"__version__ = {version!r}\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_wheels_stage_installs_only_what_is_missing(tmp_path):
    """A wheel of a distribution already installed is left alone (a copy on PYTHONPATH would
    shadow the machine's own); a missing one lands in the target folder and imports from there."""
    gpu_check = load_gpu_check()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "polar_gpu_check_probe", "1.0")
    fake_wheel(wheels, "pytest", "0.0.1")  # installed here: must not be installed again
    (tmp_path / "out").mkdir()
    check = gpu_check.Check(tmp_path / "out", tmp_path / "work", budget_s=120, dry_run=True)
    gpu_check.wheels_stage(check, wheels, required=("polar_gpu_check_probe",))
    summary = check.finish()
    stage = summary["stages"]["wheels"]
    assert stage["status"] == "passed", stage.get("error")
    assert (stage["installed"], stage["already_present"]) == (["polar_gpu_check_probe-1.0-py3-none-any.whl"], ["pytest"])
    assert (tmp_path / "work" / "site" / "polar_gpu_check_probe" / "__init__.py").exists()
    assert not (tmp_path / "work" / "site" / "pytest").exists()
    assert "polar_gpu_check_probe 1.0" in (tmp_path / "out" / "gpu_check.log").read_text()


@pytest.mark.parametrize("mode", ["gpu", "dry-run"])
def test_train_config_of_each_mode_loads(tmp_path, mode):
    """The GPU run's config is only ever loaded there: check it here (keys, types, choices)."""
    from polar_train.config import load_config

    gpu_check = load_gpu_check()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(gpu_check.train_config(mode, tmp_path / "run", tmp_path / "pairs.jsonl")))
    cfg = load_config(path)
    expected = ("torch_varlen", "bf16", 2048, 24) if mode == "gpu" else ("sdpa", "fp32", 32, 2)
    assert (cfg.model.attention, cfg.engine.precision, cfg.model.fresh.hidden_size, cfg.model.fresh.num_layers) == expected
    assert (cfg.deepspeed.enabled, cfg.deepspeed.zero_stage, cfg.train.max_steps) == (True, 2, 5)


def test_gpu_run_selects_existing_emulator_tests():
    """A renamed emulator test would make the GPU run's pytest fail on a missing node."""
    import test_varlen_emulation

    gpu_check = load_gpu_check()
    assert all(callable(getattr(test_varlen_emulation, name, None)) for name in gpu_check.GPU_EMULATOR_TESTS)
    assert not any("model" in name for name in gpu_check.GPU_EMULATOR_TESTS)  # those need ../shared
