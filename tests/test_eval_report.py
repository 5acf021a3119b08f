"""``polar-train eval``: report figures, PNG plots, and the library functions the trainer calls."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from polar_train.cli import main
from polar_train.evaluate import group_rewards, implied_pairs, pair_report, reward_summary, write_report
from polar_train.model import InternLM2RewardModel, ModelConfig, VarlenMeta, save_model
from polar_train.packing import Group

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LONG = "The answer is 12. " * 8
PAIRS = [
    {"prompt": "What is the capital of China?", "reference": "Beijing.", "chosen": "Beijing.", "rejected": "Shanghai."},
    {"prompt": "What is 7 + 5?", "reference": "12", "chosen": "The answer is 12.", "rejected": "It is 13.", "id": "b"},
    {"prompt": [{"role": "user", "content": "Name a fruit."}], "reference": "apple", "chosen": "apple", "rejected": "pear"},
    {"prompt": "Pick a number from 1 to 9. " * 6, "reference": "7", "chosen": "7", "rejected": "8"},  # prompt cut
    {"prompt": "What is 7 + 5?", "reference": "12", "chosen": "12", "rejected": LONG},  # response cut
    {"prompt": "What is 7 + 5?", "reference": LONG, "chosen": LONG, "rejected": "12"},  # does not fit
]


def pair_rewards(model, pairs, **options):
    """([N], [N]) rewards of (chosen ids, rejected ids) pairs, each pair one group of two."""
    return implied_pairs(group_rewards(model, pairs, **options), [Group.pair(c, r) for c, r in pairs])


def test_pair_report_figures():
    chosen = torch.tensor([2.0, 1.0, 0.5, -1.0])
    rejected = torch.tensor([1.0, 1.0, 1.5, -3.0])
    report = pair_report(chosen, rejected, num_dropped=2, num_prompt_truncated=1)
    assert report["pairs"] == 4
    assert report["accuracy"] == 0.5  # a tie counts as wrong
    assert report["ties"] == 1
    assert report["mean_margin"] == pytest.approx(0.5)
    margin = chosen - rejected
    assert report["ranking_loss"] == pytest.approx(-torch.nn.functional.logsigmoid(margin).mean().item())
    both = torch.cat([chosen, rejected]).double()
    assert report["reward_mean"] == pytest.approx(both.mean().item())
    assert report["reward_std"] == pytest.approx(both.std(correction=0).item())
    assert report["num_dropped"] == 2 and report["num_prompt_truncated"] == 1
    assert report["nonfinite_rewards"] == 0
    c = report["chosen"]
    assert list(c) == ["mean", "std", "min", "p5", "p25", "p50", "p75", "p95", "max"]
    assert c["p50"] == pytest.approx(0.75) and c["min"] == -1.0 and c["max"] == 2.0
    assert c["p25"] == pytest.approx(0.125)  # linear interpolation, as numpy's default
    assert report["rejected"]["std"] == pytest.approx(torch.tensor([1.0, 1.0, 1.5, -3.0]).std(correction=0).item())
    assert report["margin"]["mean"] == pytest.approx(0.5)
    json.dumps(report, allow_nan=False)

    empty = pair_report([], [])
    assert empty["pairs"] == 0 and empty["accuracy"] is None and empty["chosen"]["p95"] is None
    with pytest.raises(ValueError, match="3 rewards"):
        pair_report([1.0, 2.0, 3.0], [1.0])
    with pytest.raises(TypeError, match="num_dropped"):
        pair_report([1.0], [0.0], num_dropped=1.5)
    assert reward_summary([3.0])["std"] == 0.0


def test_pair_rewards_equal_each_sequence_alone():
    """What the trainer's eval calls: packed pairs, shared prefixes, a pair over the budget split."""
    config = ModelConfig.fresh(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=64, vocab_size=64, reward_token_id=63)
    model = InternLM2RewardModel(config)
    model.init_weights(seed=2)
    g = torch.Generator().manual_seed(0)
    pairs = []
    for n_prefix, n_c, n_r in [(6, 3, 4), (0, 5, 2), (20, 9, 12), (3, 1, 1)]:
        prefix = torch.randint(0, 63, (n_prefix,), generator=g).tolist()
        pairs.append((prefix + torch.randint(0, 63, (n_c,), generator=g).tolist() + [63],
                      prefix + torch.randint(0, 63, (n_r,), generator=g).tolist() + [63]))

    def alone(ids: list[int]) -> float:
        n = len(ids)
        with torch.no_grad():
            return model(torch.tensor(ids), torch.arange(n), VarlenMeta.from_lengths([n]), torch.tensor([n - 1])).item()

    expected_c = torch.tensor([alone(c) for c, _ in pairs])
    expected_r = torch.tensor([alone(r) for _, r in pairs])
    for max_tokens, shared in [(1000, True), (1000, False), (30, True)]:  # pair 2 costs more than 30
        chosen, rejected = pair_rewards(model, pairs, max_tokens=max_tokens, shared_prefix=shared)
        torch.testing.assert_close(chosen, expected_c, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rejected, expected_r, atol=1e-5, rtol=1e-5)


def test_write_report_without_plots_and_with_nan(tmp_path):
    report = pair_report([1.0, float("nan")], [0.0, 0.0])
    assert report["nonfinite_rewards"] == 1
    written = write_report(report, tmp_path / "r", [1.0, float("nan")], [0.0, 0.0], plots=False)
    assert list(written) == ["report.json"]
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["report.json"]
    loaded = json.loads((tmp_path / "r" / "report.json").read_text())  # strict JSON: NaN written as null
    assert loaded["reward_mean"] is None and loaded["nonfinite_rewards"] == 1
    written = write_report(report, tmp_path / "r", [1.0, float("nan")], [0.0, 0.0])  # NaN left out of plots
    assert (tmp_path / "r" / "margin.png").read_bytes().startswith(PNG_SIGNATURE)


@pytest.fixture(scope="module")
def exported_model(tmp_path_factory, repo_root, sharp_tiny_model) -> Path:
    """A tiny random model exported with save_model, the demo tokenizer copied from its folder."""
    model = sharp_tiny_model(seed=5)
    tokenizer_dir = repo_root / "data" / "tokenizer"
    return save_model(model, tmp_path_factory.mktemp("eval") / "hf", base_dir=tokenizer_dir)


def test_eval_cli_writes_report_and_plots(exported_model, tmp_path):
    import matplotlib.image

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(exported_model), "--data", str(data), "--output-dir", str(out),
                 "--max-length", "64", "--max-response-length", "32", "--max-tokens", "200", "--device", "cpu"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["margin.png", "report.json", "rewards.png", "scored.jsonl"]

    report = json.loads((out / "report.json").read_text())
    for key in ("pairs", "accuracy", "ties", "mean_margin", "reward_mean", "reward_std", "num_dropped",
                "num_prompt_truncated", "num_response_truncated", "chosen", "rejected", "margin", "settings"):
        assert key in report, key
    assert (report["pairs"], report["num_dropped"]) == (5, 1)
    assert report["num_prompt_truncated"] == 1 and report["num_response_truncated"] == 1
    for side in ("chosen", "rejected"):
        assert all(f"p{q}" in report[side] for q in (5, 25, 50, 75, 95))
        assert report[side]["p5"] <= report[side]["p50"] <= report[side]["p95"]
    assert report["settings"]["max_length"] == 64 and report["settings"]["model"] == str(exported_model)

    scored = [json.loads(line) for line in (out / "scored.jsonl").read_text().splitlines()]
    assert len(scored) == len(PAIRS) and scored[1]["id"] == "b"
    kept = [row for row in scored if row["chosen_reward"] is not None]
    assert report["chosen"]["mean"] == pytest.approx(sum(r["chosen_reward"] for r in kept) / len(kept))
    assert report["accuracy"] == sum(r["chosen_reward"] > r["rejected_reward"] for r in kept) / len(kept)
    assert not math.isnan(report["reward_std"])

    for name in ("rewards.png", "margin.png"):
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE)
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_eval_rejects_client_rows(exported_model, tmp_path, capsys):
    data = tmp_path / "client.jsonl"
    data.write_text(json.dumps({"prompt": "a", "reference": "b", "output": "c"}) + "\n")
    code = main(["eval", "--model", str(exported_model), "--data", str(data), "--output-dir", str(tmp_path / "e")])
    assert code == 2
    assert "client.jsonl:1: field 'chosen' is missing; expected a string or a list of messages" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
