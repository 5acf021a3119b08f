"""Everything a short GPU window should measure, as one command with one JSON summary.

Run through ``scripts/gpu_check.sh`` (it picks the interpreter). Stages, in order, each a
subprocess with its own time budget inside an overall budget (a stage that fails or runs out of
time is recorded and the next one runs):

  wheels      install the wheels of .whl/ (scripts/gpu_wheels.sh) that this machine lacks into a
              target folder put on PYTHONPATH; passes when deepspeed and datasets import
  env         versions, device, the attention backend ``auto`` resolves to, varlen_attn's signature
  tests       tests/test_gpu.py (CUDA kernels against SDPA in bf16), on the GPU also the emulator tests
  data        a POLAR-like length mix (scripts/make_length_mix.py)
  bench_1.8b  scripts/bench.py, polar-1.8b shape, bf16: padded vs packed vs packed + shared prefix
              (pairs/s, TFLOP/s, MFU against a matmul peak measured in the run, peak memory)
  train       5 steps of ``polar-train train`` on a fresh POLAR-1.8B-shaped model under DeepSpeed
              ZeRO-2, bf16, torch_varlen (the demo tokenizer sizes the vocabulary: 600, not 92544)
  bench_7b    scripts/bench.py, polar-7b shape
  long_sp1    scripts/bench.py --compare sp on one GPU: one polar-1.8b-shaped pair of 32k, 64k, 128k,
              256k packed tokens (gradient checkpointing, bf16) until one runs out of memory; the
              longest that fits at SP=1 (last: it gets what time is left). SP > 1 needs several
              GPUs (a group of train.sequence_parallel ranks): not measured on a one-GPU machine

``--dry-run`` runs the same stages on CPU with tiny shapes, sdpa attention, fp32 and DeepSpeed
ZeRO-2 over gloo, so CI keeps the script working (tests/test_gpu_check.py).

Writes ``$OUT/gpu_check.json`` (the summary), ``$OUT/gpu_check.log`` (every stage's output),
the bench JSONs and the train run's metrics.jsonl / train.log. Large files (the data, the run's
export, the installed wheels) go to ``--work`` instead, so that they do not travel back.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ("deepspeed", "datasets")  # what the wheels stage must make importable

# tests/test_varlen_emulation.py's tests that need no ../shared fixture (it does not travel)
GPU_EMULATOR_TESTS = ("test_emulator_equals_per_sequence_sdpa", "test_emulator_mutant_aligned_top_left_differs_from_sdpa",
                      "test_flash_attn_documented_mask_examples", "test_rows_past_the_last_query_offset_are_left_unwritten",
                      "test_emulators_reject_what_the_kernels_reject",
                      "test_emulator_of_the_installed_torch_has_its_signature")

# (hidden, layers, heads, kv heads, intermediate) of the fresh model the train stage builds
TRAIN_SHAPES = {"gpu": (2048, 24, 16, 8, 8192), "dry-run": (32, 2, 4, 2, 64)}  # polar-1.8b, SPEC 4

ENV_PROBE = """
import importlib.metadata as md, inspect, json, torch
from polar_train.model.attention import resolve_attention
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
cuda = torch.cuda.is_available()
device = torch.device("cuda" if cuda else "cpu")
try:
    from torch.nn.attention.varlen import varlen_attn
    varlen = list(inspect.signature(varlen_attn).parameters)
except ImportError:
    varlen = None
print(json.dumps({
    "torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name() if cuda else "cpu",
    "capability": list(torch.cuda.get_device_capability()) if cuda else None,
    "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
    "attention_auto_bf16": resolve_attention("auto", device, torch.bfloat16 if cuda else None),
    "varlen_attn_params": varlen,
    "packages": {n: version(n) for n in ("transformers", "deepspeed", "datasets", "pyarrow", "pandas", "fsspec",
                                         "huggingface-hub", "flash-attn", "pydantic", "typing-extensions", "numpy")},
}))
"""


class Check:
    """Runs the stages against one overall deadline and collects the summary."""

    def __init__(self, out: Path, work: Path, budget_s: float, dry_run: bool) -> None:
        self.out, self.work, self.dry_run = out, work, dry_run
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.log = (out / "gpu_check.log").open("w")
        self.site = work / "site"
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(self.site), str(REPO), os.environ.get("PYTHONPATH", "")]))
        # the log stays current if the device tool kills this script; the GPU machine has no network
        self.env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        if dry_run:
            self.env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's cpu accelerator without a warning (SPEC 8)
        self.summary: dict[str, Any] = {"mode": "dry-run" if dry_run else "gpu", "budget_s": budget_s,
                                        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stages": {}}

    def run(self, name: str, cmd: list[str], budget_s: float) -> dict[str, Any]:
        """Run ``cmd`` in its own process group for at most ``budget_s`` (and never past the
        deadline); its output goes to the log. Returns the stage's record (also in the summary)."""
        left = self.deadline - time.monotonic()
        if self.dry_run:  # the budgets fit the GPU run; a loaded CI machine gets slack instead
            budget_s *= 3
        stage: dict[str, Any] = {"command": " ".join(cmd), "budget_s": round(min(budget_s, max(left, 0)), 1)}
        self.summary["stages"][name] = stage
        if left < 5:
            stage.update(status="skipped", error="no time left in the overall budget")
            return stage
        self.log.write(f"\n===== {name}: {stage['command']}\n")
        self.log.flush()
        begin = self.log.tell()
        start = time.monotonic()
        # output straight into the log, so that it survives a kill of this whole script
        proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=stage["budget_s"])
            stage.update(status="passed" if proc.returncode == 0 else "failed", returncode=proc.returncode)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the stage and whatever it started (torch workers)
            proc.wait()
            stage.update(status="timeout", returncode=None)
        stage["seconds"] = round(time.monotonic() - start, 1)
        with open(self.log.name, errors="replace") as f:
            f.seek(begin)
            stage["output"] = f.read()
        if stage["status"] != "passed":
            stage["error"] = "\n".join(stage["output"].strip().splitlines()[-15:])
        return stage

    def guarded(self, name: str, stage_fn: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        """Run one stage function; a bug in reading its results fails that stage, not the check.
        The summary is rewritten after every stage, so a killed check still leaves one."""
        try:
            stage_fn(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - recorded, the next stage still runs
            stage = self.summary["stages"].setdefault(name, {})
            stage.update(status="failed", error=f"gpu_check.py: {type(e).__name__}: {e}")
        self.write_summary()

    def write_summary(self) -> None:
        self.summary["seconds"] = round(time.monotonic() - self.t0, 1)
        self.summary["passed"] = all(s.get("status") == "passed" for s in self.summary["stages"].values())
        stages = {name: {k: v for k, v in stage.items() if k != "output"} for name, stage in self.summary["stages"].items()}
        (self.out / "gpu_check.json").write_text(json.dumps({**self.summary, "stages": stages}, indent=2) + "\n")

    def finish(self) -> dict[str, Any]:
        self.write_summary()
        self.log.close()
        return json.loads((self.out / "gpu_check.json").read_text())


def is_installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def wheels_stage(check: Check, wheel_dir: Path, required: tuple[str, ...] = REQUIRED) -> None:
    """Install the wheels whose distribution this interpreter lacks (one already there wins: a
    second copy on PYTHONPATH would shadow it), then check that ``required`` import."""
    shutil.rmtree(check.site, ignore_errors=True)
    check.site.mkdir(parents=True)
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    names = {re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower(): w for w in wheels}
    missing = [name for name in names if not is_installed(name)]
    to_install = [str(names[n]) for n in missing]
    stage = check.run("wheels", [sys.executable, __file__, "install-wheels", str(check.site), ",".join(required),
                                 *to_install], budget_s=90)
    stage.update(wheel_dir=str(wheel_dir), available=len(wheels),
                 installed=[Path(w).name for w in to_install], already_present=sorted(set(names) - set(missing)))


def install_wheels(site: str, required: str, *wheels: str) -> None:
    """The wheels stage's process: ``pip install --target`` when pip is there (else unzip: a wheel
    is a zip of what --target would hold), then import each of ``required`` (comma-separated)."""
    if wheels and importlib.util.find_spec("pip"):
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--target", site, *wheels], check=True)
    else:
        for wheel in wheels:
            zipfile.ZipFile(wheel).extractall(site)
    versions = [f"{name} {getattr(importlib.import_module(name), '__version__', '?')}" for name in required.split(",")]
    print(f"installed {len(wheels)} wheel(s) into {site}; " + ", ".join(versions))


def env_stage(check: Check) -> None:
    stage = check.run("env", [sys.executable, "-c", ENV_PROBE], budget_s=60)
    if stage["status"] == "passed":
        check.summary["env"] = json.loads([line for line in stage["output"].splitlines() if line.startswith("{")][-1])


def tests_stage(check: Check) -> None:
    """The CUDA tests (skipped on CPU); on the GPU machine also the emulator tests, which check the
    emulated varlen_attn signature against that machine's torch (not the model-level ones: the
    shared fixture checkpoint beside the repository does not travel to the GPU machine)."""
    emulators = [f"tests/test_varlen_emulation.py::{name}" for name in GPU_EMULATOR_TESTS]
    files = ["tests/test_gpu.py"] + ([] if check.dry_run else emulators)
    stage = check.run("tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files], budget_s=120)
    counts = re.findall(r"(\d+) (passed|failed|skipped|error)", stage.get("output", ""))
    stage["counts"] = {kind: int(n) for n, kind in counts}


def data_stage(check: Check, data: Path, mix_args: list[str]) -> None:
    check.run("data", [sys.executable, "scripts/make_length_mix.py", "--out", str(data), *mix_args], budget_s=60)


def bench_stage(check: Check, name: str, shape: str, data: Path, args: list[str], budget_s: float) -> None:
    result = check.out / f"{name}.json"
    stage = check.run(name, [sys.executable, "scripts/bench.py", "--data", str(data), "--shape", shape,
                             "--rounds", "1", "--json", str(result), *args], budget_s=budget_s)
    stage["shape"] = shape
    if stage["status"] == "passed":
        bench = json.loads(result.read_text())
        keep = ("pairs_per_s", "tokens_per_s", "tflops", "mfu", "peak_memory_gib")
        stage["results"] = {mode: {k: r.get(k) for k in keep} for mode, r in bench["results"].items()}
        stage["ratios"] = bench["ratios"]


def long_stage(check: Check, shape: str, args: list[str], budget_s: float) -> None:
    """SP=1 at growing lengths on one device (scripts/bench.py --compare sp under a 1-process torchrun)."""
    result = check.out / "long_sp1.json"
    stage = check.run("long_sp1", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                                   "scripts/bench.py", "--compare", "sp", "--shape", shape, "--json", str(result), *args],
                      budget_s=budget_s)
    stage["shape"] = shape
    if stage["status"] == "passed":
        bench = json.loads(result.read_text())
        stage.update(longest_fitting_tokens=bench["longest_fitting_tokens"], results=bench["results"])


def train_config(mode: str, run_dir: Path, data: Path) -> dict[str, Any]:
    """The train stage's config: a fresh model of TRAIN_SHAPES[mode], DeepSpeed ZeRO-2, 5 steps;
    on the GPU bf16 and torch_varlen, in the dry run fp32 and sdpa (the CUDA backends refuse CPU)."""
    gpu = mode == "gpu"
    hidden, layers, heads, kv, inter = TRAIN_SHAPES[mode]
    return {
        "output_dir": str(run_dir), "seed": 0,
        "model": {"attention": "torch_varlen" if gpu else "sdpa", "gradient_checkpointing": True,
                  "fresh": {"tokenizer": str(REPO / "data" / "tokenizer"), "hidden_size": hidden, "num_layers": layers,
                            "num_heads": heads, "num_kv_heads": kv, "intermediate_size": inter,
                            "max_position_embeddings": 262144, "rope_theta": 5.0e7}},
        "data": {"train_files": [str(data)], "eval_files": [], "max_length": 16384, "max_response_length": 4096,
                 "max_tokens": 32768 if gpu else 4096, "cache_dir": ""},
        "train": {"max_steps": 5, "pairs_per_step": 32 if gpu else 4, "log_steps": 1, "lr": 1.0e-5,
                  "precision": "bf16" if gpu else "fp32", "export_dtype": "bfloat16" if gpu else "float32"},
        "deepspeed": {"enabled": True, "zero_stage": 2},
    }


def train_stage(check: Check, data: Path, budget_s: float) -> None:
    """5 optimizer steps of the real CLI under DeepSpeed ZeRO-2 on a fresh model."""
    run_dir = check.work / "train_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = train_config(check.summary["mode"], run_dir, data)
    config_path = check.out / "train_config.json"  # JSON is YAML: the CLI reads it as is
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    stage = check.run("train", [sys.executable, "-m", "polar_train", "train", str(config_path)], budget_s=budget_s)
    for name in ("metrics.jsonl", "train.log"):
        if (run_dir / name).exists():
            shutil.copy(run_dir / name, check.out / f"train_{name}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (run_dir / "metrics.jsonl").exists() else []
    train_rows = [r for r in rows if r.get("split") == "train"]
    stage["steps"] = len(train_rows)
    if train_rows:
        later = train_rows[1:] or train_rows  # step 1 pays for warm-up
        stage.update(loss=[r["loss"] for r in train_rows],
                     pairs_per_s=sum(r["pairs_per_s"] for r in later) / len(later),
                     tokens_per_s=sum(r["tokens_per_s"] for r in later) / len(later))
    match = re.search(r"attention (\S+) \| precision (\S+) \| .*engine (\S+)", stage.get("output", ""))
    if match:
        stage.update(attention=match.group(1), precision=match.group(2), engine=match.group(3))
    if stage["status"] == "passed" and stage["steps"] != 5:
        stage.update(status="failed", error=f"{stage['steps']} train steps logged, expected 5")


def main() -> None:
    if sys.argv[1:2] == ["install-wheels"]:  # the wheels stage's subprocess (see wheels_stage)
        install_wheels(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, sdpa, fp32 (what CI runs)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_out", help="summary and log folder (default $OUT)")
    parser.add_argument("--work", default="/tmp/polar-gpu-check", help="large files: data, run, installed wheels")
    parser.add_argument("--wheels", default=str(REPO / ".whl"), help="folder made by scripts/gpu_wheels.sh")
    parser.add_argument("--budget", type=float, help="overall seconds (default 530: a device command may run "
                        "600; 1800 with --dry-run)")
    args = parser.parse_args()
    budget = args.budget or (1800 if args.dry_run else 530)

    out, work = Path(args.out).resolve(), Path(args.work).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    check = Check(out, work, budget, args.dry_run)
    check.guarded("wheels", wheels_stage, Path(args.wheels))
    check.guarded("env", env_stage)
    check.guarded("tests", tests_stage)
    data = work / "length_mix.jsonl"
    mix = ["--num-pairs", "32", "--scale", "0.05"] if args.dry_run else ["--num-pairs", "256"]  # dry run: 5% lengths
    check.guarded("data", data_stage, data, mix)
    if args.dry_run:
        tiny = ["--steps", "1", "--pairs-per-step", "4", "--max-tokens", "4096", "--gradient-checkpointing"]
        check.guarded("bench_1.8b", bench_stage, "bench_1.8b", "tiny", data, tiny, budget_s=150)
        check.guarded("train", train_stage, data, budget_s=170)
        check.guarded("bench_7b", bench_stage, "bench_7b", "tiny", data, tiny, budget_s=200)
        check.guarded("long_sp1", long_stage, "tiny", ["--seq-tokens", "256,512", "--steps", "1"], budget_s=60)
    else:
        # gradient checkpointing: the padded baseline's [2b, Lmax] batches would not fit otherwise
        check.guarded("bench_1.8b", bench_stage, "bench_1.8b", "polar-1.8b", data,
                      ["--steps", "2", "--pairs-per-step", "32", "--gradient-checkpointing"], budget_s=150)
        check.guarded("train", train_stage, data, budget_s=170)  # the fresh model is drawn on the CPU
        check.guarded("bench_7b", bench_stage, "bench_7b", "polar-7b", data,
                      ["--steps", "2", "--pairs-per-step", "8", "--gradient-checkpointing"], budget_s=200)
        check.guarded("long_sp1", long_stage, "polar-1.8b", ["--seq-tokens", "32768,65536,131072,262144", "--steps", "1",
                                                             "--gradient-checkpointing"], budget_s=120)
    summary = check.finish()
    for name, stage in summary["stages"].items():
        print(f"{name:11} {stage['status']:8} {stage.get('seconds', 0):6.1f} s" + (
            f"  {stage['error'].splitlines()[-1]}" if stage.get("error") else ""))
    # the whole summary on stdout too: the device tool returns the output's last 12,000 characters
    print(json.dumps({**summary, "stages": {n: {k: v for k, v in s.items() if k not in ("command", "error")}
                                            for n, s in summary["stages"].items()}}))
    print(f"summary: {out / 'gpu_check.json'}  log: {out / 'gpu_check.log'}")
    sys.exit(0 if summary["passed"] else 1)


if __name__ == "__main__":
    main()
