"""Ranked lists (SPEC 10): rows of every kind, their encoding against the expanded pair rows,
one prefix + K suffixes in a micro-batch, and a loss equal to that of the expanded pairs."""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from polar_train.config import LossSection
from polar_train.data import PairRecord, encode_pair
from polar_train.errors import UserError
from polar_train.loss import pair_losses, plackett_luce
from polar_train.model import VarlenMeta, load_model
from polar_train.packing import Group, build_micro_batch, group_cost, shared_prefix_length
from polar_train.ranked import encode_preference, parse_preference
from polar_train.store_build import load_pair_store
from polar_train.tokenizer import special_token_ids
from polar_train.train import batch_loss, loss_function

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "internlm2-reward-tiny"


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def expanded(obj: dict) -> list[PairRecord]:
    """The pair rows a list row stands for, written out by hand."""
    pref = parse_preference(obj)
    return [PairRecord(pref.prompt, pref.reference, pref.candidates[i], pref.candidates[j], "sft", "x") for i, j in pref.pairs]


# --- rows ------------------------------------------------------------------------------------


def test_every_row_kind_implies_its_pairs_and_order() -> None:
    ranked = parse_preference({"prompt": "p", "reference": "R", "ranked": ["a", "b", "c"]})
    assert (ranked.reference, ranked.candidates, ranked.pairs, ranked.order) == ("R", ["a", "b", "c"], [(0, 1), (0, 2), (1, 2)], [0, 1, 2])
    polar = parse_preference({"prompt": "p", "ranked": ["A", "B", "C"]})  # POLAR's recipe: A is the reference
    assert (polar.reference, polar.candidates, polar.pairs, polar.is_list) == ("A", ["B", "C"], [(0, 1)], False)
    scored = parse_preference({"prompt": "p", "reference": "R", "candidates": ["x", "y", "z", "w"], "scores": [1, 3, 1, 0.5]})
    assert scored.pairs == [(0, 3), (1, 0), (1, 2), (1, 3), (2, 3)]  # x and z tie: no pair between them
    assert scored.order == [1, 0, 2, 3]
    best_is_reference = parse_preference({"prompt": "p", "candidates": ["x", "y", "z"], "scores": [2, 9, 1]})
    assert (best_is_reference.reference, best_is_reference.candidates, best_is_reference.pairs) == ("y", ["x", "z"], [(0, 1)])
    pair = parse_preference({"prompt": "p", "reference": "R", "chosen": "c", "rejected": "r"})
    assert (pair.candidates, pair.pairs, pair.order, pair.is_list) == (["c", "r"], [(0, 1)], [0, 1], False)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "reference": "R", "candidates": ["a", "b"], "scores": [1]},
     "field 'scores' has 1 values for 2 candidates"),
    ({"prompt": "p", "reference": "R", "ranked": ["a"]}, "field 'ranked' has 1 candidate(s) besides the reference; expected at least 2"),
    ({"prompt": "p", "ranked": ["A", "b"]}, "field 'ranked' has 1 candidate(s)"),
    ({"prompt": "p", "reference": "R", "candidates": ["a", "b"], "scores": [1, "2"]}, "field 'scores[1]' is of type string"),
    ('{"prompt": "p", "reference": "R", "candidates": ["a", "b"], "scores": [1, NaN]}', "field 'scores[1]' is nan"),
    ({"prompt": "p", "reference": "R", "ranked": ["a", "b"], "candidates": ["a", "b"], "scores": [1, 2]},
     "the row has both 'ranked' and 'candidates'"),
    ({"prompt": "p", "candidates": ["a", "b", "c"], "scores": [3, 3, 1]}, "no 'reference' and candidates [0, 1] tie for the best score 3"),
    ({"prompt": "p", "reference": "R", "ranked": ["a", 7]}, "field 'ranked[1]' is of type integer"),
    ({"prompt": "p", "reference": "R", "candidates": ["a", "b"]}, "field 'scores' is missing"),
])
def test_a_bad_list_row_is_one_line_with_file_line_and_field(tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase,
                                                             row, message: str) -> None:
    good = {"prompt": "p", "reference": "R", "ranked": ["a", "b", "c"]}
    path = write(tmp_path / "lists.jsonl", [good, row])
    with pytest.raises(UserError) as error:
        load_pair_store([str(path)], tiny_tokenizer, "tiny")
    assert error.value.exit_code == 2 and "\n" not in str(error.value)
    assert str(error.value).startswith(f"{path}:2: {message}"), str(error.value)


def test_the_cli_reports_a_bad_list_row_in_one_line_exit_2(tmp_path: Path, capsys, repo_root: Path,
                                                            tiny_tokenizer_path: Path) -> None:
    from test_errors import assert_one_error, base_args, run_cli

    good = {"prompt": "p", "reference": "R", "ranked": ["a", "b", "c"]}
    path = write(tmp_path / "bad.jsonl", [good, {"prompt": "p", "reference": "R", "candidates": ["a", "b"], "scores": [1, 2, 3]}])
    code, err = run_cli(capsys, "data", repo_root / "configs/demo.yaml", *base_args(tmp_path, tiny_tokenizer_path, path))
    for handler in list(logging.getLogger("polar_train").handlers):  # cli.main pointed them at the captured stderr
        logging.getLogger("polar_train").removeHandler(handler)
    assert_one_error(code, err, 2, f"{path}:2: field 'scores' has 3 values for 2 candidates")


# --- encoding: each implied pair is its expanded pair row, id for id ----------------------------


def encode_kwargs(tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict:
    sep_id, reward_id = special_token_ids(tokenizer, None)
    return dict(max_length=max_length, max_response_length=4096, sep_id=sep_id, reward_id=reward_id)


def test_a_list_encodes_each_implied_pair_as_its_expanded_row(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    row = {"prompt": "What is the capital of China?", "reference": "Beijing.",
           "ranked": ["Beijing.", "It is Beijing, the capital.", "Shanghai.", "I do not know the answer at all."]}
    kwargs = encode_kwargs(tiny_tokenizer, 16384)
    enc = encode_preference(tiny_tokenizer, parse_preference(row), **kwargs)
    assert len(enc.seqs) == 4 and enc.order == [0, 1, 2, 3] and len(enc.better) == 6  # one sequence per candidate
    for record, b, w in zip(expanded(row), enc.better, enc.worse):
        assert (enc.seqs[b], enc.seqs[w]) == encode_pair(tiny_tokenizer, record, **kwargs)
    # one prefix + 4 suffixes instead of 6 pairs of (prefix + 2 suffixes)
    pairs_cost = sum(group_cost(p, True) for p in (encode_pair(tiny_tokenizer, r, **kwargs) for r in expanded(row)))
    assert group_cost(enc.seqs, True) < pairs_cost / 2


def test_candidates_whose_prompts_truncate_differently_keep_their_expanded_ids(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    """The prompt budget is per pair: a long candidate cuts the prompt of its pairs only."""
    row = {"prompt": " ".join(["what is the capital of china"] * 6), "reference": "Beijing.",
           "ranked": ["Beijing.", " ".join(["it is beijing"] * 5), "Shanghai."]}
    kwargs = encode_kwargs(tiny_tokenizer, 64)  # prompt 120 tokens; budgets P = 24, 4, 24
    enc = encode_preference(tiny_tokenizer, parse_preference(row), **kwargs)
    assert enc.prompt_truncated and enc.num_pairs_too_long == 0
    # pairs (0, 1) and (1, 2) keep 4 prompt tokens, pair (0, 2) keeps 24: candidates 0 and 2 get two sequences each
    assert len(enc.seqs) == 5 and enc.better == [0, 2, 1] and enc.worse == [1, 3, 4]
    assert enc.order == [2, 1, 3]  # each candidate's sequence with the most prompt kept
    for record, b, w in zip(expanded(row), enc.better, enc.worse):
        assert (enc.seqs[b], enc.seqs[w]) == encode_pair(tiny_tokenizer, record, **kwargs)
    # the packed row shares only what all five really have in common (BOS and the kept prompt's start differ)
    mb = build_micro_batch([Group(enc.seqs, enc.better, enc.worse, enc.order)], shared_prefix=True)
    assert shared_prefix_length(*enc.seqs) < shared_prefix_length(enc.seqs[0], enc.seqs[1])
    assert mb.num_tokens == group_cost(enc.seqs, True)


def test_a_pair_row_is_the_k2_list_with_todays_ids(tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    pair = {"prompt": "What is 7 + 5?", "reference": "12", "chosen": "12.", "rejected": "13."}
    same = {"prompt": "What is 7 + 5?", "reference": "12", "ranked": ["12.", "13."]}
    store, stats = load_pair_store([str(write(tmp_path / "m.jsonl", [pair, same]))], tiny_tokenizer, "tiny")
    kwargs = encode_kwargs(tiny_tokenizer, 16384)
    want = encode_pair(tiny_tokenizer, PairRecord(**{k: pair[k] for k in ("prompt", "reference", "chosen", "rejected")},
                                                  wrapper="sft", source="x"), **kwargs)
    assert store.read_pairs([0, 1]) == [want, want]
    assert (stats.num_pairs, stats.num_lists, stats.num_implied_pairs) == (2, 0, 2)  # two ranked: a pair


def test_stats_count_lists_pairs_saved_tokens_and_pairs_that_teach_nothing(tmp_path: Path,
                                                                          tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    rows = [{"prompt": "What is 7 + 5?", "reference": "12", "ranked": ["12.", "twelve", "13.", "7"]},
            {"prompt": "Hi", "reference": "Hello", "chosen": "Hey", "rejected": "Hey"},
            {"prompt": "Hi", "reference": "Hello", "candidates": ["a", "b", "c"], "scores": [1, 1, 1]}]
    store, stats = load_pair_store([str(write(tmp_path / "m.jsonl", rows))], tiny_tokenizer, "tiny")
    assert (stats.num_pairs, stats.num_lists, stats.num_implied_pairs, stats.num_identical_pairs) == (2, 1, 7, 1)
    assert stats.num_too_long == 1  # equal scores imply no pair: nothing to train, dropped and counted
    groups = store.read([0, 1])
    assert stats.tokens_as_lists == sum(group_cost(g.seqs, True) for g in groups)
    assert stats.tokens_as_pairs == sum(group_cost((g.seqs[b], g.seqs[w]), True) for g in groups for b, w in zip(g.better, g.worse))
    assert "1 ranked lists, 7 implied pairs" in stats.summary()


# --- packing and loss: a list trains exactly what its expanded pairs train ----------------------


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_model(FIXTURE, attention="sdpa")


def random_lists(n: int, k: int, seed: int = 0, reward: int = 127) -> list[Group]:
    g = torch.Generator().manual_seed(seed)
    lists = []
    for _ in range(n):
        prefix = [1] + torch.randint(3, 127, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g).tolist()
        seqs = [prefix + torch.randint(3, 127, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist() + [reward]
                for _ in range(k)]
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        lists.append(Group(seqs, [i for i, _ in pairs], [j for _, j in pairs], list(range(k))))
    return lists


def alone(model, seq: list[int]) -> torch.Tensor:
    ids = torch.tensor(seq)
    return model(ids, torch.arange(len(seq)), VarlenMeta.from_lengths([len(seq)]), torch.tensor([len(seq) - 1]))[0]


def test_a_lists_rewards_equal_each_candidate_scored_alone(model) -> None:
    lists = random_lists(3, 4, seed=1)
    mb = build_micro_batch(lists, shared_prefix=True)
    with torch.no_grad():
        rewards = model(mb.input_ids, mb.position_ids, mb.meta, mb.seq_index)  # [S] fp32
        expected = torch.stack([alone(model, s) for g in lists for s in g.seqs])
    assert torch.allclose(rewards, expected, atol=1e-5, rtol=0)
    assert mb.num_tokens == sum(group_cost(g.seqs, True) for g in lists)  # one prefix + 4 suffixes per list
    assert mb.better.tolist()[:6] == [0, 0, 0, 1, 1, 2] and mb.worse.tolist()[:6] == [1, 2, 3, 2, 3, 3]


def grads(model, mb, loss: LossSection, count: int) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    rewards = model(mb.input_ids, mb.position_ids, mb.meta, mb.seq_index).float()
    value = batch_loss(loss, loss_function(loss), rewards, mb) / count
    value.backward()
    return value.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("loss", [LossSection(), LossSection(kind="focal", penalty="log_barrier", penalty_weight=0.1)])
def test_the_loss_and_gradients_of_a_list_equal_those_of_its_expanded_pairs(model, loss: LossSection) -> None:
    lists = random_lists(2, 4, seed=2)
    pairs = [(g.seqs[b], g.seqs[w]) for g in lists for b, w in zip(g.better, g.worse)]
    as_lists = grads(model, build_micro_batch(lists, shared_prefix=True), loss, len(pairs))
    as_pairs = grads(model, build_micro_batch(pairs, shared_prefix=True), loss, len(pairs))
    assert as_lists[0] == pytest.approx(as_pairs[0], rel=1e-5)  # the same rewards, summed in another order
    for name, grad in as_pairs[1].items():
        scale = grad.abs().max().clamp_min(1e-12)
        assert (as_lists[1][name] - grad).abs().max() / scale < 1e-5, name


def test_pair_rows_reproduce_todays_loss(model) -> None:
    """The old path: rewards of every better then every worse sequence [2P], chunk(2), pair_losses; the K=2 case of the new one."""
    pairs = [(g.seqs[0], g.seqs[1]) for g in random_lists(5, 2, seed=3)]
    mb = build_micro_batch(pairs, shared_prefix=True)
    loss = LossSection(kind="focal", penalty="L2")
    with torch.no_grad():
        chosen, rejected = model(mb.input_ids, mb.position_ids, mb.meta, mb.seq_index[torch.cat([mb.better, mb.worse])]).float().chunk(2)
        today = pair_losses(chosen, rejected, loss="focal", penalty="L2", penalty_weight=loss.penalty_weight)
        rewards = model(mb.input_ids, mb.position_ids, mb.meta, mb.seq_index).float()  # [2P]: c0 r0 c1 r1 ...
        now = batch_loss(loss, loss_function(loss), rewards, mb)
    assert torch.allclose(rewards.reshape(-1, 2).T, torch.stack([chosen, rejected]), atol=1e-6, rtol=0)
    assert now.item() == pytest.approx(today.sum().item(), rel=1e-6)
    # and on the very same rewards, the very same figure
    assert batch_loss(loss, loss_function(loss), torch.stack([chosen, rejected], 1).reshape(-1), mb).item() == today.sum().item()


def test_plackett_luce_is_the_cited_formula_and_the_ranking_loss_for_two() -> None:
    r = torch.tensor([[2.0, 0.5, -1.0, 0.3], [1.0, -1.0, 0.0, 0.0]])
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    got = plackett_luce(r, mask)
    first = sum(math.log(sum(math.exp(x) for x in r[0, i:].tolist())) - r[0, i].item() for i in range(3)) / 3
    assert got[0].item() == pytest.approx(first, rel=1e-6)
    assert got[1].item() == pytest.approx(pair_losses(r[1, :1], r[1, 1:2]).item(), rel=1e-6)
    # a filler row (weight 0) and its padding give finite, zero gradients
    x = r.clone().requires_grad_()
    (plackett_luce(x, mask) * torch.tensor([1.0, 0.0])).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[1].abs().sum() == 0


def test_listwise_on_pair_rows_is_the_ranking_loss(model) -> None:
    pairs = [(g.seqs[0], g.seqs[1]) for g in random_lists(4, 2, seed=4)]
    mb = build_micro_batch(pairs, shared_prefix=True)
    with torch.no_grad():
        rewards = model(mb.input_ids, mb.position_ids, mb.meta, mb.seq_index).float()
        listwise = batch_loss(LossSection(kind="listwise"), None, rewards, mb)
        ranking = batch_loss(LossSection(), functools.partial(pair_losses), rewards, mb)
    assert listwise.item() == pytest.approx(ranking.item(), rel=1e-6)


# --- score: a list row gets one reward per candidate, each as if scored alone -------------------


def test_score_gives_a_list_rows_rewards_equal_to_each_candidate_scored_alone(tmp_path: Path, repo_root: Path,
                                                                              sharp_tiny_model) -> None:
    from polar_train.scoring import load_scorer, score_rows
    from test_scoring import build_checkpoint

    model, tokenizer = load_scorer(build_checkpoint(tmp_path / "ckpt", repo_root / "data" / "tokenizer",
                                                    sharp_tiny_model(seed=1)), device="cpu")
    row = {"prompt": "What is 7 + 5? Think step by step.", "reference": "12", "id": 7,
           "candidates": ["12.", "It is 12, since 7 + 5 = 12.", "13", [{"role": "assistant", "content": "twelve"}]]}
    clients = [{"prompt": row["prompt"], "reference": row["reference"], "output": c} for c in row["candidates"]]
    for max_length in (4096, 40):  # at 40 the long candidate truncates the prompt: only its own sequence
        scored = score_rows(model, tokenizer, [row], max_length=max_length, max_response_length=4096, max_tokens=4096)[0]
        alone = [r["reward"] for r in score_rows(model, tokenizer, clients, max_length=max_length, max_response_length=4096,
                                                  max_tokens=1)]  # one sequence per forward
        assert list(scored)[:4] == ["prompt", "reference", "id", "candidates"] and len(scored["rewards"]) == 4
        assert scored["rewards"] == pytest.approx(alone, abs=1e-5)
        assert scored["prompt_truncated"] == (max_length == 40)


def test_normalize_applies_the_exports_reward_stats_and_names_a_missing_file(tmp_path: Path) -> None:
    from polar_train.evaluate import normalize_rewards, read_reward_stats, reward_stats

    stats = reward_stats([[1.0, 3.0], [2.0, 6.0, 3.0]])  # each candidate once
    assert stats == {"mean": 3.0, "std": pytest.approx(math.sqrt(2.8)), "candidates": 5}
    (tmp_path / "reward_stats.json").write_text(json.dumps(stats))
    mean, std = read_reward_stats(tmp_path)
    row = normalize_rewards({"rewards": [3.0, 6.0], "reward": None, "chosen_reward": 1.0}, mean, std)
    assert row == {"rewards": [0.0, pytest.approx(3 / std)], "reward": None, "chosen_reward": pytest.approx(-2 / std)}
    with pytest.raises(UserError, match="reward_stats.json: is missing: --normalize needs"):
        read_reward_stats(tmp_path / "nowhere")
