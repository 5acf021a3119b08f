"""Packing invariants that need no model: layout, budgets, coverage, determinism, rank balance."""

import random

import pytest

from polar_train.packing import (
    FILLER,
    StepPlanner,
    best_fit_decreasing,
    build_micro_batch,
    pair_cost,
    shared_prefix_length,
)


def random_pairs(n, seed=0, max_len=60):
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prefix = [rng.randrange(3, 50) for _ in range(rng.randrange(1, max_len))]
        c = prefix + [rng.randrange(3, 50) for _ in range(rng.randrange(0, max_len))] + [99]
        r = prefix + [rng.randrange(3, 50) for _ in range(rng.randrange(0, max_len))] + [99]
        pairs.append((c, r))
    return pairs


def test_shared_layout_matches_the_module_diagram():
    # pair 0 shares [1, 2, 3, 4]; pair 1 shares nothing
    pairs = [([1, 2, 3, 4, 5, 9], [1, 2, 3, 4, 6, 9]), ([7, 8, 9], [5, 6, 9])]
    mb = build_micro_batch(pairs, shared_prefix=True)
    assert mb.input_ids.tolist() == [1, 2, 3, 4, 5, 9, 6, 9, 7, 8, 9, 5, 6, 9]
    assert mb.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 4, 5, 0, 1, 2, 0, 1, 2]
    assert mb.meta.cu_seqlens_q.tolist() == [0, 6, 8, 11, 14]
    assert mb.meta.cu_seqlens_k.tolist() == [0, 6, 12, 15, 18]
    assert mb.meta.key_index.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13]
    assert mb.seq_index[mb.better].tolist() == [5, 10] and mb.seq_index[mb.worse].tolist() == [7, 13]
    assert mb.meta.seq_len_per_token.tolist() == [6] * 6 + [6] * 2 + [3] * 3 + [3] * 3
    assert (mb.meta.max_seqlen_q, mb.meta.max_seqlen_k) == (6, 6)
    assert not mb.meta.keys_are_queries


def test_plain_layout_restarts_positions_per_sequence():
    pairs = [([1, 2, 3, 4, 5, 9], [1, 2, 3, 4, 6, 9]), ([7, 8, 9], [5, 6, 9])]
    mb = build_micro_batch(pairs, shared_prefix=False)
    assert mb.input_ids.tolist() == [1, 2, 3, 4, 5, 9, 1, 2, 3, 4, 6, 9, 7, 8, 9, 5, 6, 9]
    assert mb.position_ids.tolist() == [0, 1, 2, 3, 4, 5] * 2 + [0, 1, 2] * 2
    assert mb.meta.key_index.tolist() == list(range(18))
    assert mb.meta.keys_are_queries  # the CUDA backends skip the key gather
    assert mb.seq_index[mb.better].tolist() == [5, 14] and mb.seq_index[mb.worse].tolist() == [11, 17]


def test_identical_candidates_keep_one_token_each():
    assert shared_prefix_length([1, 2, 9], [1, 2, 9]) == 2
    mb = build_micro_batch([([1, 2, 9], [1, 2, 9])], shared_prefix=True)
    assert mb.input_ids.tolist() == [1, 2, 9, 9]
    assert mb.position_ids.tolist() == [0, 1, 2, 2]
    assert mb.seq_index[mb.better].tolist() == [2] and mb.seq_index[mb.worse].tolist() == [3]


def test_dynamic_rope_limit_disables_sharing_for_long_pairs():
    c, r = [1, 2, 3, 4, 9], [1, 2, 3, 5, 9]
    assert pair_cost(c, r, True) == 7
    assert pair_cost(c, r, True, share_max_len=4) == 10  # longer than max_position_embeddings
    mb = build_micro_batch([(c, r)], shared_prefix=True, share_max_len=4)
    assert mb.meta.key_index.tolist() == list(range(10))


def test_best_fit_decreasing_respects_budget_and_keeps_every_item():
    rng = random.Random(1)
    costs = [rng.randrange(1, 100) for _ in range(300)]
    bins = best_fit_decreasing(list(range(300)), costs, 100)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(costs[i] for i in b) <= 100 for b in bins)
    assert len(bins) <= 1.1 * sum(costs) / 100 + 2  # BFD is within 11/9 OPT + 1


@pytest.mark.parametrize("num_ranks", [1, 2, 3])
def test_every_pair_exactly_once_per_epoch_within_budget(num_ranks):
    pairs = random_pairs(103)
    costs = [pair_cost(c, r, True) for c, r in pairs]
    planner = StepPlanner(costs, pairs_per_step=16, max_tokens=256, num_ranks=num_ranks, seed=3)
    for epoch in range(2):
        seen = []
        for k in range(planner.steps_per_epoch):
            plan = planner.plan(epoch, k)
            assert len({len(rank_bins) for rank_bins in plan}) == 1  # same micro-batch count per rank
            step_ids = [i for rank_bins in plan for b in rank_bins for i in b if i != FILLER]
            assert sorted(step_ids) == sorted(planner.step_pairs(epoch, k))
            for rank_bins in plan:
                for b in rank_bins:
                    assert sum(costs[i] for i in b if i != FILLER) <= 256
            seen += step_ids
        assert sorted(seen) == list(range(103))
    assert planner.epoch_order(0).tolist() != planner.epoch_order(1).tolist()


def test_plan_is_deterministic_per_seed():
    costs = [pair_cost(c, r, True) for c, r in random_pairs(50)]
    a = StepPlanner(costs, pairs_per_step=8, max_tokens=200, num_ranks=2, seed=5)
    b = StepPlanner(costs, pairs_per_step=8, max_tokens=200, num_ranks=2, seed=5)
    c = StepPlanner(costs, pairs_per_step=8, max_tokens=200, num_ranks=2, seed=6)
    assert [a.plan(0, k) for k in range(7)] == [b.plan(0, k) for k in range(7)]
    assert [a.plan(0, k) for k in range(7)] != [c.plan(0, k) for k in range(7)]


def test_step_composition_does_not_depend_on_the_layout():
    pairs = random_pairs(40)
    shared = StepPlanner([pair_cost(c, r, True) for c, r in pairs], pairs_per_step=8, max_tokens=300, seed=1)
    plain = StepPlanner([pair_cost(c, r, False) for c, r in pairs], pairs_per_step=8, max_tokens=300, seed=1)
    for k in range(5):
        assert shared.step_pairs(0, k) == plain.step_pairs(0, k)


def test_ranks_are_balanced_by_tokens_and_padded_with_fillers_only_when_needed():
    # 3 single-pair steps on 2 ranks: one rank has 2 pairs, the other 1 pair + nothing to split
    costs = [90, 90, 90]
    planner = StepPlanner(costs, pairs_per_step=3, max_tokens=100, num_ranks=2, seed=0)
    plan = planner.plan(0, 0)
    assert [len(r) for r in plan] == [2, 2]
    assert sum(b == [FILLER] for r in plan for b in r) == 1
    # many small pairs: a rank with fewer bins splits one instead of adding a filler
    costs = [10] * 10 + [95]
    planner = StepPlanner(costs, pairs_per_step=11, max_tokens=100, num_ranks=2, seed=0)
    plan = planner.plan(0, 0)
    assert len(plan[0]) == len(plan[1])
    assert not any(b == [FILLER] for r in plan for b in r)
    loads = [sum(costs[i] for b in r for i in b) for r in plan]
    assert abs(loads[0] - loads[1]) <= 95


def test_filler_pairs_have_zero_weight():
    mb = build_micro_batch([([0, 0], [0, 0]), ([1, 9], [2, 9])], shared_prefix=True, pair_ids=[FILLER, 4])
    assert mb.pair_weight.tolist() == [0.0, 1.0]
