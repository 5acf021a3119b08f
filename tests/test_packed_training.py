"""Packing is the same function: packed == alone, shared prefix == separate, pairs isolated.

Everything fp32 on CPU with the reference fixture checkpoint (dynamic RoPE, GQA 4:1).
"""

import importlib.util
import random
from pathlib import Path

import pytest
import torch

from polar_train.data_report import packing_stats
from polar_train.loss import pair_losses
from polar_train.model import VarlenMeta, load_model
from polar_train.packing import GroupLengths, build_micro_batch

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "internlm2-reward-tiny"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_model(FIXTURE, attention="sdpa")


def make_pairs(n, seed=0, vocab=127, reward=127):
    """POLAR-shaped id pairs: a shared prefix (BOS prompt ref SEP prompt) then two outputs."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prefix = [1] + [rng.randrange(3, vocab) for _ in range(rng.randrange(2, 40))]
        c = prefix + [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 30))] + [reward]
        r = prefix + [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 30))] + [reward]
        if rng.random() < 0.2:
            r = c[:-1] + [5, reward]  # chosen is a prefix of rejected
        pairs.append((c, r))
    return pairs


def alone(model, seq):
    ids = torch.tensor(seq)
    return model(ids, torch.arange(len(seq)), VarlenMeta.from_lengths([len(seq)]), torch.tensor([len(seq) - 1]))[0]


@pytest.mark.parametrize("shared", [True, False])
def test_packed_rewards_equal_each_sequence_alone(model, shared):
    pairs = make_pairs(12)
    mb = build_micro_batch(pairs, shared_prefix=shared)
    with torch.no_grad():
        rewards = model(mb.input_ids, mb.position_ids, mb.meta, mb.seq_index[torch.cat([mb.better, mb.worse])])
        expected = torch.stack([alone(model, c) for c, _ in pairs] + [alone(model, r) for _, r in pairs])
    assert torch.allclose(rewards, expected, atol=1e-5, rtol=0)
    if shared:
        assert mb.num_tokens < sum(len(c) + len(r) for c, r in pairs)


def grads_of(model, batches, n_pairs):
    model.zero_grad(set_to_none=True)
    for mb in batches:
        chosen, rejected = model(mb.input_ids, mb.position_ids, mb.meta, mb.seq_index[torch.cat([mb.better, mb.worse])]).chunk(2)
        (pair_losses(chosen, rejected).sum() / n_pairs).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradients_equal_for_shared_plain_and_one_pair_at_a_time(model):
    pairs = make_pairs(8, seed=1)
    shared = grads_of(model, [build_micro_batch(pairs, shared_prefix=True)], len(pairs))
    plain = grads_of(model, [build_micro_batch(pairs, shared_prefix=False)], len(pairs))
    single = grads_of(model, [build_micro_batch([p], shared_prefix=False) for p in pairs], len(pairs))
    for name in shared:
        scale = single[name].abs().max().clamp_min(1e-12)
        assert (shared[name] - single[name]).abs().max() / scale < 1e-5, name
        assert (plain[name] - single[name]).abs().max() / scale < 1e-5, name
    assert any(g.abs().max() > 0 for g in single.values())


def test_changing_one_pair_leaves_the_others_unchanged(model):
    pairs = make_pairs(6, seed=2)
    before = model(*_inputs(build_micro_batch(pairs, shared_prefix=True))).detach()
    c, r = pairs[2]
    pairs[2] = (c[:3] + [(c[3] + 1) % 120 + 3] + c[4:], r[:3] + [(c[3] + 1) % 120 + 3] + r[4:])  # inside the prefix
    after = model(*_inputs(build_micro_batch(pairs, shared_prefix=True))).detach()
    others = [i for i in range(12) if i not in (2, 8)]  # rewards: 6 chosen then 6 rejected
    assert torch.allclose(before[others], after[others], atol=1e-6, rtol=0)
    assert not torch.allclose(before[[2, 8]], after[[2, 8]], atol=1e-6)


def _inputs(mb):
    return mb.input_ids, mb.position_ids, mb.meta, mb.seq_index[torch.cat([mb.better, mb.worse])]


def polar_like_pairs(n, seed=0):
    """Token-level pairs with the length mix of scripts/make_length_mix.py (one source of lengths)."""
    spec = importlib.util.spec_from_file_location("make_length_mix", REPO / "scripts" / "make_length_mix.py")
    mix = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mix)
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        lengths = {f: mix.draw_length(rng, *mix.LENGTHS[f]) for f in mix.LENGTHS}
        # SPEC 3: budget L = 16384 - 4 and the prompt keeps its last P tokens
        p_budget = min((16380 - lengths["reference"] - lengths[o]) // 2 for o in ("chosen", "rejected"))
        prompt = min(lengths["prompt"], p_budget)
        prefix = [1] + [7] * (2 * prompt + lengths["reference"])  # BOS p ref <|reward|> p
        pairs.append((prefix + [8] * lengths["chosen"] + [9], prefix + [10] * lengths["rejected"] + [9]))
    return pairs


def test_polar_like_mix_fills_16k_micro_batches_and_shares_a_quarter_of_tokens():
    pairs = polar_like_pairs(1280)
    stats = packing_stats(GroupLengths.from_pairs(pairs), max_tokens=16384, pairs_per_step=320, shared_prefix=True, share_max_len=None, seed=0)
    assert stats["fill_ratio"] >= 0.97, stats
    assert stats["shared_prefix_saving"] >= 0.25, stats
    plain = packing_stats(GroupLengths.from_pairs(pairs), max_tokens=16384, pairs_per_step=320, shared_prefix=False, share_max_len=None, seed=0)
    assert plain["fill_ratio"] >= 0.97, plain
