"""The real training job on CPU: the demo learns, the export reloads, the layout changes nothing."""

import json
from pathlib import Path

import pytest
import torch

from polar_train.config import load_config
from polar_train.model import load_model
from polar_train.store_build import load_pair_store
from polar_train.tokenizer import load_tokenizer
from polar_train.train import run

from test_eval_report import pair_rewards

REPO = Path(__file__).resolve().parents[1]


def demo_config(tmp_path: Path, name: str, *overrides: str):
    return load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"output_dir={tmp_path / name}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"model.fresh.tokenizer={REPO / 'data' / 'tokenizer'}",
            f"data.train_files={REPO / 'data' / 'demo_train.jsonl'}",
            f"data.eval_files={REPO / 'data' / 'demo_eval.jsonl'}",
            *overrides,
        ],
    )


def metrics(out: Path, split: str) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


@pytest.mark.parametrize("max_tokens", [None, 512], ids=["demo-budget", "several-micro-batches"])
def test_shared_prefix_layout_does_not_change_the_training_losses(tmp_path, max_tokens):
    losses = {}
    budget = [f"data.max_tokens={max_tokens}"] if max_tokens else []
    for shared in ("true", "false"):
        cfg = demo_config(
            tmp_path, f"run-{shared}", f"data.shared_prefix={shared}", "train.max_steps=5", "train.log_steps=1",
            "data.eval_files=[]", *budget,
        )
        run(cfg)
        rows = metrics(Path(cfg.output_dir), "train")
        assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
        losses[shared] = torch.tensor([r["loss"] for r in rows], dtype=torch.float64)
        tokens = sum(r["tokens"] for r in rows)
        losses[shared + "-tokens"] = tokens
    assert torch.allclose(losses["true"], losses["false"], rtol=1e-5, atol=0), (losses["true"], losses["false"])
    assert losses["true-tokens"] < 0.75 * losses["false-tokens"]  # the prefix really was computed once


@pytest.mark.slow
def test_demo_learns_and_its_export_reloads_with_identical_rewards(tmp_path):
    cfg = demo_config(tmp_path, "demo")
    run(cfg)
    out = Path(cfg.output_dir)
    evals = metrics(out, "eval")
    assert evals[0]["step"] == 0 and 0.35 <= evals[0]["accuracy"] <= 0.65, evals[0]
    assert evals[-1]["accuracy"] >= 0.90, evals[-1]
    assert {"config.yaml", "metrics.jsonl", "hf"} <= {p.name for p in out.iterdir()}
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    report = json.loads((out / "eval" / "final" / "report.json").read_text())
    assert report["accuracy"] == pytest.approx(evals[-1]["accuracy"]) and report["pairs"] == 200
    assert (out / "eval" / "final" / "rewards.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the export reloads and gives the rewards behind the final eval metrics
    tokenizer = load_tokenizer(out / "hf")
    store, _ = load_pair_store([cfg.data.eval_files[0]], tokenizer, str(out / "hf"), max_length=cfg.data.max_length,
                               max_response_length=cfg.data.max_response_length, cache_dir=None)
    pairs = store.read_pairs(range(len(store)))
    model = load_model(out / "hf")
    chosen, rejected = pair_rewards(model, pairs, max_tokens=cfg.data.max_tokens, shared_prefix=False)
    assert abs((chosen > rejected).double().mean().item() - evals[-1]["accuracy"]) < 1e-6
    assert abs((chosen - rejected).mean().item() - evals[-1]["margin"]) < 1e-5
