"""POLAR-1.8B's real shapes (vocab 92544, 16 query heads over 8 KV heads, hidden 2048, bf16 shards + index,
the real tokenizer) through score, a 2-step LoRA train and convert; 2 layers instead of 24 to stay fast."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ROWS = ROOT.parent / "shared" / "fixtures" / "internlm2-real-tokenizer" / "rows.jsonl"
CLI = [sys.executable, "-m", "polar_train"]

pytest.importorskip("sentencepiece")


def _run(*args: str) -> None:
    subprocess.run([str(a) for a in args], check=True, cwd=ROOT, capture_output=True, text=True)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        out.update(load_file(f))
    return out


def _rewards(path: Path) -> list[float]:
    return [json.loads(line)["reward"] for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_polar_shaped_score_lora_train_convert(tmp_path: Path) -> None:
    base = tmp_path / "base"
    _run(sys.executable, "scripts/make_polar_shaped.py", base, "--layers", "2")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]
    _run(*CLI, "score", "--model", base, "--data", ROWS, "--output", tmp_path / "base.jsonl", "--max-tokens", "512")
    base_rewards = _rewards(tmp_path / "base.jsonl")
    assert len(base_rewards) == len(ROWS.read_text().splitlines())
    assert all(math.isfinite(r) for r in base_rewards)

    train = tmp_path / "train.jsonl"
    train.write_text("".join((ROOT / "data" / "demo_train.jsonl").read_text().splitlines(keepends=True)[:8]))
    run = tmp_path / "run"
    _run(*CLI, "train", "configs/demo.yaml", f"model.path={base}", "model.lora.rank=8", "train.max_steps=2",
         "train.pairs_per_step=2", "data.max_tokens=512", f"data.train_files=[{train}]", "data.eval_files=[]",
         f"output_dir={run}", "checkpoint.save_steps=1")
    converted = tmp_path / "step2"
    _run(*CLI, "convert", run / "checkpoints" / "step-2", converted)
    final, conv = _weights(run / "hf"), _weights(converted)
    assert final.keys() == conv.keys() == _weights(base).keys()
    for name in final:
        assert torch.equal(final[name], conv[name]), name
    for model, out in ((converted, "conv.jsonl"), (run / "hf", "final.jsonl")):
        _run(*CLI, "score", "--model", model, "--data", ROWS, "--output", tmp_path / out, "--max-tokens", "512")
    assert _rewards(tmp_path / "conv.jsonl") == _rewards(tmp_path / "final.jsonl")
    assert all(math.isfinite(r) for r in _rewards(tmp_path / "conv.jsonl"))
