"""``polar-train score``: rewards equal one-sequence-per-forward scoring, prefixes shared, fields kept."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from polar_train.cli import main
from polar_train.data import encode_candidates, flatten_text
from polar_train.errors import UserError
from polar_train.evaluate import split_group
from polar_train.model import VarlenMeta
from polar_train.packing import group_cost
from polar_train.scoring import ScoreStats, load_scorer, read_rows, score_file, score_rows
from polar_train.tokenizer import special_token_ids

MAX_LENGTH, MAX_RESPONSE = 64, 32
ADDED = ["prompt_truncated", "response_truncated", "skip_reason"]
LONG_PROMPT = "Pick a number from 1 to 9. " * 6  # 50 tokens: cut to fit max_length 64
LONG_TEXT = "The answer is 12. " * 8  # 49 tokens: cut to max_response_length 32

CLIENT_ROWS = [
    {"id": 1, "prompt": "What is the capital of China?", "reference": "Beijing.", "output": "Beijing.", "meta": {"k": [1, 2]}},
    {"id": 2, "prompt": "What is the capital of China?", "reference": "Beijing.", "output": "Shanghai."},
    {"output": "It is Beijing.", "id": 3, "reference": "Beijing.", "prompt": "What is the capital of China?"},
    {"id": 4, "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}],
     "reference": [{"role": "assistant", "content": "apple"}], "output": [{"role": "assistant", "content": "pear"}]},
    {"id": 5, "prompt": "What is the capital of China?", "reference": "Beijing.", "output": "Beijing.", "wrapper": "pretrain"},
    {"id": 6, "prompt": "Name a fruit.", "reference": "", "output": "apple", "wrapper": None},
    {"id": 7, "prompt": LONG_PROMPT, "reference": "12", "output": "The answer is 12."},  # prompt truncated
    {"id": 8, "prompt": "What is 7 + 5?", "reference": "12", "output": LONG_TEXT},  # response truncated
    {"id": 9, "prompt": "What is 7 + 5?", "reference": LONG_TEXT, "output": LONG_TEXT},  # does not fit
    {"id": 10, "prompt": "What is 7 + 5?", "reference": "12", "output": "12", "reward": "stale"},
]
PAIR_ROWS = [
    {"prompt": "What is the capital of China?", "reference": "Beijing.", "chosen": "Beijing.", "rejected": "Shanghai.", "n": 0},
    {"prompt": "What is the capital of China?", "reference": "Beijing.", "chosen": "It is Beijing.", "rejected": "Beijing."},
    {"prompt": [{"role": "user", "content": "What is 7 + 5?"}], "reference": "12", "chosen": "12", "rejected": "13"},
    {"prompt": LONG_PROMPT, "reference": "12", "chosen": "The answer is 12.", "rejected": LONG_TEXT},
    {"prompt": "What is 7 + 5?", "reference": LONG_TEXT, "chosen": "12", "rejected": LONG_TEXT},  # does not fit
]


def build_checkpoint(folder: Path, tokenizer_dir: Path, model) -> Path:
    """A checkpoint in the fixture's layout: config.json, model.safetensors, tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.raw, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, repo_root, sharp_tiny_model) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("score") / "ckpt", repo_root / "data" / "tokenizer",
                            sharp_tiny_model(seed=1))


@pytest.fixture(scope="module")
def scorer(checkpoint):
    return load_scorer(checkpoint, device="cpu")


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def alone(model, tokenizer, row: dict) -> tuple[list[float] | None, bool | None, bool | None, list[int]]:
    """Rewards of a row computed independently: encode_candidates, then one forward per sequence.

    Returns (rewards, prompt_truncated, response_truncated, sequence lengths)."""
    sep_id, reward_id = special_token_ids(tokenizer, None)
    outputs = [row["output"]] if "output" in row else [row["chosen"], row["rejected"]]
    enc = encode_candidates(tokenizer, flatten_text(row["prompt"], "prompt"), flatten_text(row["reference"], "reference"),
                            [flatten_text(o, "output") for o in outputs], row.get("wrapper") or "sft",
                            max_length=MAX_LENGTH, max_response_length=MAX_RESPONSE, sep_id=sep_id, reward_id=reward_id)
    if enc is None:
        return None, None, None, []
    rewards = []
    with torch.no_grad():
        for ids in enc.input_ids:
            n = len(ids)
            r = model(torch.tensor(ids), torch.arange(n), VarlenMeta.from_lengths([n]), torch.tensor([n - 1]))
            rewards.append(r.item())
    return rewards, enc.prompt_truncated, enc.response_truncated, [len(ids) for ids in enc.input_ids]


@pytest.mark.parametrize("rows, fields", [(CLIENT_ROWS, ["reward"]), (PAIR_ROWS, ["chosen_reward", "rejected_reward"]),
                                          (CLIENT_ROWS[:4] + PAIR_ROWS[:3], None)])
@pytest.mark.parametrize("max_tokens", [4096, 40])
def test_rewards_equal_scoring_each_sequence_alone(scorer, rows, fields, max_tokens):
    model, tokenizer = scorer
    stats = ScoreStats()
    scored = score_rows(model, tokenizer, rows, max_length=MAX_LENGTH, max_response_length=MAX_RESPONSE,
                        max_tokens=max_tokens, stats=stats)
    assert len(scored) == len(rows)
    num_unfit = 0
    lengths = []
    for row, out in zip(rows, scored):
        names = fields or (["reward"] if "output" in row else ["chosen_reward", "rejected_reward"])
        # every input field unchanged and in its place, then the added ones
        assert list(out)[: len(row)] == list(row)
        assert list(out) == list(row) + [n for n in names + ADDED if n not in row]
        assert {k: out[k] for k in row if k not in names} == {k: v for k, v in row.items() if k not in names}
        expected, prompt_cut, response_cut, lens = alone(model, tokenizer, row)
        lengths += lens
        assert (out["prompt_truncated"], out["response_truncated"]) == (prompt_cut, response_cut)
        if expected is None:
            num_unfit += 1
            assert all(out[n] is None for n in names)
            assert f"max_length={MAX_LENGTH}" in out["skip_reason"]
        else:
            assert out["skip_reason"] is None
            assert [out[n] for n in names] == pytest.approx(expected, abs=2e-5, rel=1e-5)
    assert stats.num_unfit == num_unfit and stats.num_scored == len(rows) - num_unfit
    inf = stats.inference
    assert inf.num_packed_tokens <= inf.num_sequence_tokens
    assert inf.num_sequences == len(lengths) and inf.num_sequence_tokens == sum(lengths)
    assert inf.num_over_budget == sum(n > max_tokens for n in lengths)  # each ran alone
    if max_tokens == 4096:
        assert inf.num_forwards == 1
        assert inf.num_packed_tokens < inf.num_sequence_tokens  # candidates of one prompt share their prefix
    else:
        assert inf.num_forwards > 1 and sum(lengths) > max_tokens


def test_truncation_flags_follow_spec3(scorer):
    model, tokenizer = scorer
    # what the rows below were written for (the demo tokenizer is byte-level BPE)
    assert len(tokenizer.encode(LONG_TEXT)) > MAX_RESPONSE and len(tokenizer.encode(LONG_PROMPT)) > MAX_LENGTH // 2
    scored = score_rows(model, tokenizer, CLIENT_ROWS, max_length=MAX_LENGTH, max_response_length=MAX_RESPONSE)
    flags = {row["id"]: (row["prompt_truncated"], row["response_truncated"]) for row in scored}
    assert flags[1] == (False, False)
    assert flags[7] == (True, False)
    assert flags[8] == (False, True)
    assert flags[9] == (None, None)
    assert scored[8]["reward"] is None and "reference 32 + output 32 tokens" in scored[8]["skip_reason"]
    assert isinstance(scored[9]["reward"], float)  # the input's stale "reward" replaced in place
    assert list(scored[9])[:5] == ["id", "prompt", "reference", "output", "reward"]


def test_identical_rewards_for_identical_rows_and_bf16_autocast_runs(scorer):
    model, tokenizer = scorer
    rows = [CLIENT_ROWS[0], dict(CLIENT_ROWS[0], id=99)]
    a, b = score_rows(model, tokenizer, rows, max_length=MAX_LENGTH, max_response_length=MAX_RESPONSE)
    assert a["reward"] == pytest.approx(b["reward"], abs=1e-6)
    (c,) = score_rows(model, tokenizer, rows[:1], max_length=MAX_LENGTH, autocast_dtype=torch.bfloat16)
    assert c["reward"] == pytest.approx(a["reward"], abs=0.1)


def test_split_group_fits_the_budget():
    rng = random.Random(0)
    for _ in range(200):
        stem = [rng.randrange(5) for _ in range(rng.randrange(1, 12))]
        seqs = [stem[: rng.randrange(len(stem) + 1)] + [rng.randrange(5) for _ in range(rng.randrange(1, 6))]
                for _ in range(rng.randrange(1, 8))]
        budget = rng.randrange(3, 30)
        share_max_len = rng.choice([None, 10])
        chunks = split_group(seqs, budget, share_max_len)
        assert [i for c in chunks for i in c] == list(range(len(seqs)))
        for c in chunks:
            assert len(c) == 1 or group_cost([seqs[i] for i in c], True, share_max_len) <= budget


def test_score_file_and_cli(checkpoint, tmp_path, scorer):
    rows = CLIENT_ROWS + PAIR_ROWS  # the format is detected per row
    data = write_rows(tmp_path / "in.jsonl", rows)
    out = tmp_path / "sub" / "out.jsonl"
    code = main(["score", "--model", str(checkpoint), "--data", str(data), "--output", str(out), "--device", "cpu",
                 "--max-length", str(MAX_LENGTH), "--max-response-length", str(MAX_RESPONSE), "--max-tokens", "48"])
    assert code == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert not list(out.parent.glob(".*tmp*"))
    model, tokenizer = scorer
    expected = score_rows(model, tokenizer, rows, max_length=MAX_LENGTH, max_response_length=MAX_RESPONSE)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert list(g) == list(e)
        for key in e:
            if isinstance(e[key], float):
                assert g[key] == pytest.approx(e[key], abs=2e-5)
            else:
                assert g[key] == e[key]

    stats = score_file(model, tokenizer, data, tmp_path / "lib.jsonl", progress=False,
                       max_length=MAX_LENGTH, max_response_length=MAX_RESPONSE)
    assert (stats.num_rows, stats.num_client_rows, stats.num_pair_rows) == (15, 10, 5)
    assert stats.num_unfit == sum(e["skip_reason"] is not None for e in expected) == 2
    assert stats.num_prompt_truncated == sum(e["prompt_truncated"] is True for e in expected) > 0
    assert stats.num_response_truncated == sum(e["response_truncated"] is True for e in expected) > 0
    assert len((tmp_path / "lib.jsonl").read_text().splitlines()) == len(rows)


def test_bad_rows_are_user_errors(tmp_path, checkpoint, capsys):
    neither = write_rows(tmp_path / "neither.jsonl", [CLIENT_ROWS[0], {"prompt": "a", "reference": "b", "chosen": "c"}])
    with pytest.raises(UserError, match=r"neither\.jsonl:2: the row is neither a client row .* no 'rejected'"):
        read_rows(neither)
    both = write_rows(tmp_path / "both.jsonl", [dict(PAIR_ROWS[0], output="x")])
    with pytest.raises(UserError, match=r"both\.jsonl:1: .*'output'.*'chosen'/'rejected'"):
        read_rows(both)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CLIENT_ROWS[0]) + "\n" + json.dumps({"prompt": "a", "reference": 3, "output": "c"}) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:2: field 'reference' is of type integer"):
        read_rows(bad)
    with pytest.raises(UserError, match=r"pair rows are expected"):
        read_rows(write_rows(tmp_path / "c.jsonl", CLIENT_ROWS[:1]), expect="pair")
    with pytest.raises(UserError, match=r"row 1: field 'output'"):
        score_rows(None, None, [{"prompt": "a", "reference": "b", "output": 5}])

    code = main(["score", "--model", str(checkpoint), "--data", str(neither), "--output", str(tmp_path / "o.jsonl")])
    assert code == 2
    assert "neither.jsonl:2: the row is neither" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
    code = main(["score", "--model", str(checkpoint), "--data", str(both), "--output", str(tmp_path / "o.jsonl"),
                 "--device", "tpu"])
    assert code == 2 and "--device" in capsys.readouterr().err



def test_dtype_names_go_through_the_one_precision_resolver():
    from polar_train.engine import resolve_precision
    from polar_train.scoring import resolve_dtype

    cpu = torch.device("cpu")
    assert [resolve_dtype(n, cpu) for n in ("auto", "float32", "bfloat16", "float16")] == [
        torch.float32, torch.float32, torch.bfloat16, torch.float16]
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(UserError) as info:
        resolve_dtype("int8", cpu)
    assert (info.value.where, info.value.what) == ("--dtype", "unknown dtype 'int8'")
