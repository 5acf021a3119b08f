"""Pairs -> optimizer steps -> per-rank micro-batches: flat, padding-free, shared prefix once.

Legend: T = tokens in a micro-batch, S = attention sequences (one per candidate), P = implied
pairs, G = rows (pairs and lists), K = gathered key slots (see ``polar_train.model.varlen``).

Two pairs packed into one micro-batch, pair 0 with a shared prefix, pair 1 without one
(``cost`` = tokens the pair occupies)::

    input_ids     [ p p p p c c r r | C C C R R R ]
    position_ids  [ 0 1 2 3 4 5 4 5 | 0 1 2 0 1 2 ]
    sequences       <-- s0 --->     | <s2-> <s3->       s1 = the two r tokens, whose keys are
    key_index       s0: 0..5, s1: 0 1 2 3 6 7, s2: 8 9 10, s3: 11 12 13
    seq_index     [5, 7, 10, 13]  better [0, 2]  worse [1, 3]   (the reward token ends every candidate)

The rejected suffix is a sequence whose queries are its own tokens and whose keys are the
prefix followed by itself, causal bottom-right, positions continuing after the prefix: it is
the same function as running the rejected candidate alone (SPEC section 6).

A ranked list (``Group``: K sequences and the pairs they imply, SPEC 10) is the same layout with
K suffixes: ``[p a' | b' | c' | d']``, one reward per sequence (``seq_index`` [S]), and each
implied pair reads two of them (``better``, ``worse`` [P]); a pair row is the K=2 case. A row is
never split across micro-batches.

Pairs are read by index: the planner sees one cost per pair (a numpy array, ``GroupLengths``),
and ``pack_step`` asks a ``PairReader`` (the memory-mapped store, ``polar_train.store``) for the
ids of the few pairs a micro-batch holds. Nothing here holds the dataset's tokens.

Step plan: each epoch shuffles the kept pairs (seeded), cuts them into optimizer steps of
``pairs_per_step`` pairs, splits each step's pairs across ranks balanced by tokens, and packs
each rank's share best-fit decreasing into micro-batches of at most ``max_tokens`` tokens.
Ranks then get the same number of micro-batches (ZeRO-3 gathers parameters in lockstep): a
rank with fewer splits its fullest micro-batch, or runs a zero-weight filler one. The plan
depends only on (lengths, seed, epoch, step, ranks), never on the layout's runtime state, so
every rank computes it alone and a resumed run replays it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np
import torch

from polar_train.model.varlen import VarlenMeta

FILLER = -1  # pair id of a zero-weight filler pair


def shared_prefix_length(*seqs: Sequence[int]) -> int:
    """Longest common prefix of id lists, capped so each sequence keeps >= 1 token of its own.

    >>> shared_prefix_length([1, 5, 6, 9], [1, 5, 7, 9])
    2
    >>> shared_prefix_length([1, 5, 9], [1, 5, 9])
    2
    """
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for other in seqs[1:]:
        # binary search on slice equality: ~log2(n) comparisons in C instead of n in Python (the
        # store build computes this for every row; a per-id loop was a fifth of its time)
        lo, hi = 0, max(n, 0)  # first[:lo] == other[:lo]; the common prefix is < hi + 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if first[lo:mid] == other[lo:mid]:
                lo = mid
            else:
                hi = mid - 1
        n = lo
    return max(n, 0)


def prefix_to_share(seqs: Sequence[Sequence[int]], share: bool, share_max_len: int | None) -> int:
    """Prefix length the layout shares among ``seqs`` (0 = separate sequences).

    ``share_max_len``: with dynamic RoPE scaling, a sequence longer than the model's
    ``max_position_embeddings`` gets its own RoPE base, so a prefix is shared only when every
    sequence stays within it (the prefix keys must be identical for all of them).
    """
    if not share or len(seqs) < 2:
        return 0
    if share_max_len is not None and max(len(s) for s in seqs) > share_max_len:
        return 0
    return shared_prefix_length(*seqs)


def group_cost(seqs: Sequence[Sequence[int]], share: bool, share_max_len: int | None = None) -> int:
    """Tokens a group of sequences occupies in a micro-batch."""
    return sum(len(s) for s in seqs) - (len(seqs) - 1) * prefix_to_share(seqs, share, share_max_len)


def pair_cost(chosen: Sequence[int], rejected: Sequence[int], share: bool, share_max_len: int | None = None) -> int:
    """Tokens the pair occupies in a micro-batch."""
    return group_cost((chosen, rejected), share, share_max_len)


@dataclass(frozen=True)
class GroupLengths:
    """Per row (a pair or a list): its sequences' summed and longest length, their count and
    their ``shared_prefix_length``, [N] each.

    Enough to compute every row's cost for either layout at once (``costs``), the same numbers
    as ``group_cost`` on the ids: the store keeps these columns so no rank reads ids to plan.
    """

    total: np.ndarray  # [N] int64, summed lengths of the row's sequences
    longest: np.ndarray  # [N] int32
    num_seqs: np.ndarray  # [N] int32, 2 for a pair row
    prefix: np.ndarray  # [N] int32, shared_prefix_length(*seqs)

    @classmethod
    def from_groups(cls, groups: Sequence[Sequence[Sequence[int]]]) -> GroupLengths:
        """From id lists (tests, small sets): the store computes these columns at tokenization."""
        return cls(np.asarray([sum(len(s) for s in g) for g in groups], dtype=np.int64),
                   np.asarray([max(len(s) for s in g) for g in groups], dtype=np.int32),
                   np.asarray([len(g) for g in groups], dtype=np.int32),
                   np.asarray([shared_prefix_length(*g) for g in groups], dtype=np.int32))

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> GroupLengths:
        return cls.from_groups([(c, r) for c, r in pairs])

    def costs(self, share: bool, share_max_len: int | None = None) -> np.ndarray:
        """[N] int64: ``group_cost`` of every row (the prefix counts once where it is shared)."""
        total = self.total.astype(np.int64)
        if not share:
            return total
        shared = self.prefix.astype(np.int64) * (self.num_seqs.astype(np.int64) - 1)
        if share_max_len is not None:  # see prefix_to_share: dynamic RoPE scaling
            shared = np.where(self.longest > share_max_len, 0, shared)
        return total - shared


@dataclass(frozen=True)
class Group:
    """One row on the packing side: its sequences, the pairs they imply, and its ranking.

    A pair row is ``Group.pair(chosen, rejected)``: two sequences, one pair, order [0, 1].
    """

    seqs: list[list[int]]  # token ids, each ending with the reward token
    better: list[int]  # [P] index into seqs of each implied pair's better candidate
    worse: list[int]  # [P]
    order: list[int]  # indices into seqs, best first (the Plackett-Luce list)

    @classmethod
    def pair(cls, chosen: Sequence[int], rejected: Sequence[int]) -> Group:
        return cls([list(chosen), list(rejected)], [0], [1], [0, 1])

    @classmethod
    def of(cls, item: Group | tuple[Sequence[int], Sequence[int]]) -> Group:
        """A ``Group`` as it is, a ``(chosen, rejected)`` tuple as a pair group."""
        return item if isinstance(item, Group) else cls.pair(*item)


@dataclass
class FlatLayout:
    input_ids: torch.Tensor  # [T] int64
    position_ids: torch.Tensor  # [T] int64
    meta: VarlenMeta
    last_index: list[list[int]]  # per group, per sequence: flat index of its last token


def layout_groups(
    groups: Sequence[Sequence[Sequence[int]]], *, shared_prefix: bool, share_max_len: int | None = None
) -> FlatLayout:
    """Lay groups of sequences on one flat axis; a group's common prefix is stored once.

    Group ``[a, b, c]`` with shared prefix ``p`` becomes ``[p a' | b' | c']``: ``a`` is the
    contiguous span ``p a'``; ``b'`` and ``c'`` are query spans whose keys are ``p`` then
    themselves, positions continuing after ``p`` (see the module diagram).
    """
    ids: list[int] = []
    pos: list[int] = []
    cu_q, cu_k, keys, seq_len = [0], [0], [], []
    last_index: list[list[int]] = []
    for seqs in groups:
        n = prefix_to_share(seqs, shared_prefix, share_max_len)
        group_start = len(ids)
        lasts = []
        for k, seq in enumerate(seqs):
            skip = n if k > 0 else 0  # the first sequence holds the prefix
            start = len(ids)
            ids.extend(seq[skip:])
            pos.extend(range(skip, len(seq)))
            cu_q.append(len(ids))
            if skip:
                keys.extend(range(group_start, group_start + skip))
            keys.extend(range(start, len(ids)))
            cu_k.append(len(keys))
            seq_len.extend([len(seq)] * (len(seq) - skip))
            lasts.append(len(ids) - 1)
        last_index.append(lasts)
    cu_q_t = torch.tensor(cu_q, dtype=torch.int32)
    cu_k_t = torch.tensor(cu_k, dtype=torch.int32)
    meta = VarlenMeta(
        cu_seqlens_q=cu_q_t,
        cu_seqlens_k=cu_k_t,
        key_index=torch.tensor(keys, dtype=torch.int64),
        max_seqlen_q=int((cu_q_t[1:] - cu_q_t[:-1]).max()) if len(cu_q) > 1 else 0,
        max_seqlen_k=int((cu_k_t[1:] - cu_k_t[:-1]).max()) if len(cu_k) > 1 else 0,
        seq_len_per_token=torch.tensor(seq_len, dtype=torch.int64),
        keys_are_queries=len(keys) == len(ids),  # every sequence's keys are its own queries
    )
    return FlatLayout(
        torch.tensor(ids, dtype=torch.int64), torch.tensor(pos, dtype=torch.int64), meta, last_index
    )


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [T] int64
    position_ids: torch.Tensor  # [T] int64
    meta: VarlenMeta
    seq_index: torch.Tensor  # [S] int64 flat index of each sequence's reward token (its last)
    better: torch.Tensor  # [P] int64 index into the [S] rewards of each implied pair's better candidate
    worse: torch.Tensor  # [P] int64
    pair_weight: torch.Tensor  # [P] float32, 1 = real pair, 0 = filler
    # [G, L] int64 index into the [S] rewards, each row's list best first (L = longest, padded)
    order_index: torch.Tensor
    order_mask: torch.Tensor  # [G, L] bool, True where order_index is a candidate
    list_weight: torch.Tensor  # [G] float32, 1 = real row, 0 = filler
    pair_ids: list[int] = field(default_factory=list)  # dataset index per row (group), FILLER for fillers

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device | str) -> "MicroBatch":
        moved = {name: getattr(self, name).to(device) for name in
                 ("seq_index", "better", "worse", "pair_weight", "order_index", "order_mask", "list_weight")}
        return MicroBatch(input_ids=self.input_ids.to(device, non_blocking=True),
                          position_ids=self.position_ids.to(device, non_blocking=True),
                          meta=self.meta.to(device), pair_ids=self.pair_ids, **moved)


def build_micro_batch(
    groups: Sequence[Group | tuple[Sequence[int], Sequence[int]]],
    *,
    shared_prefix: bool,
    pair_ids: Sequence[int] | None = None,
    share_max_len: int | None = None,
) -> MicroBatch:
    """Lay out rows (``Group``s, or ``(chosen_ids, rejected_ids)`` pairs) on one flat axis (see
    the module diagram): each row's common prefix once, then each of its K sequences' own tokens."""
    groups = [Group.of(g) for g in groups]
    flat = layout_groups([g.seqs for g in groups], shared_prefix=shared_prefix, share_max_len=share_max_len)
    pair_ids = list(pair_ids) if pair_ids is not None else list(range(len(groups)))
    first = [0]  # group g's sequences are rewards[first[g]:first[g + 1]]
    for g in groups:
        first.append(first[-1] + len(g.seqs))
    better = [first[k] + b for k, g in enumerate(groups) for b in g.better]
    worse = [first[k] + w for k, g in enumerate(groups) for w in g.worse]
    weight = [0.0 if pair_ids[k] == FILLER else 1.0 for k, g in enumerate(groups) for _ in g.better]
    width = max((len(g.order) for g in groups), default=0)
    order = [[first[k] + o for o in g.order] + [0] * (width - len(g.order)) for k, g in enumerate(groups)]
    mask = [[True] * len(g.order) + [False] * (width - len(g.order)) for g in groups]
    return MicroBatch(
        input_ids=flat.input_ids,
        position_ids=flat.position_ids,
        meta=flat.meta,
        seq_index=torch.tensor([i for lasts in flat.last_index for i in lasts], dtype=torch.int64),
        better=torch.tensor(better, dtype=torch.int64),
        worse=torch.tensor(worse, dtype=torch.int64),
        pair_weight=torch.tensor(weight, dtype=torch.float32),
        order_index=torch.tensor(order, dtype=torch.int64).reshape(len(groups), width),
        order_mask=torch.tensor(mask, dtype=torch.bool).reshape(len(groups), width),
        list_weight=torch.tensor([0.0 if i == FILLER else 1.0 for i in pair_ids], dtype=torch.float32),
        pair_ids=pair_ids,
    )


def best_fit_decreasing(items: Sequence[int], costs: Sequence[int], budget: int) -> list[list[int]]:
    """Pack ``items`` (ids) into bins of total cost <= budget: largest first, each into the
    fullest bin it still fits (Johnson 1973). Deterministic: ties keep the input order.

    >>> best_fit_decreasing([0, 1, 2, 3], [6, 5, 4, 3], 10)
    [[0, 2], [1, 3]]
    """
    order = sorted(range(len(items)), key=lambda k: -costs[k])  # stable: ties keep input order
    bins: list[list[int]] = []
    loads: list[int] = []
    for k in order:
        c = costs[k]
        best, best_load = -1, -1
        for b, load in enumerate(loads):
            if best_load < load and load + c <= budget:
                best, best_load = b, load
        if best < 0:
            bins.append([items[k]])
            loads.append(c)
        else:
            bins[best].append(items[k])
            loads[best] += c
    return bins


def split_across_ranks(items: Sequence[int], costs: Sequence[int], num_ranks: int) -> list[list[int]]:
    """Longest-processing-time split: each pair, largest first, to the rank with fewest tokens."""
    shares: list[list[int]] = [[] for _ in range(num_ranks)]
    loads = [0] * num_ranks
    for k in sorted(range(len(items)), key=lambda k: -costs[k]):
        r = min(range(num_ranks), key=lambda r: (loads[r], r))
        shares[r].append(items[k])
        loads[r] += costs[k]
    return shares


class StepPlanner:
    """Which pairs each rank computes in each micro-batch of each optimizer step.

    ``costs[i]`` is the token cost of pair i (``pair_cost``, or ``GroupLengths.costs`` for all at
    once); pairs costing more than ``max_tokens`` must already be removed by the caller (and
    counted). The planner holds the costs and one epoch's order as numpy arrays (16 bytes per
    pair) and touches only the current step's pairs in Python.
    """

    def __init__(self, costs: Sequence[int] | np.ndarray, *, pairs_per_step: int, max_tokens: int, num_ranks: int = 1,
                 seed: int = 0):
        self.costs = np.asarray(costs, dtype=np.int64)  # [N]
        too_long = np.flatnonzero(self.costs > max_tokens)
        assert not len(too_long), f"pairs over the token budget must be dropped first: {too_long[:5].tolist()}"
        self.pairs_per_step = pairs_per_step
        self.max_tokens = max_tokens
        self.num_ranks = num_ranks
        self.seed = seed
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.costs) / self.pairs_per_step)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """[N] int64: the epoch's seeded shuffle of all pair ids, a function of (seed, epoch) only
        (kept for the current epoch: every step of it reads this order)."""
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed % 2**64, epoch])  # PCG64 seeded by (seed, epoch)
            self._order = (epoch, rng.permutation(len(self.costs)))
        return self._order[1]

    def step_pairs(self, epoch: int, step_in_epoch: int) -> list[int]:
        s = step_in_epoch * self.pairs_per_step
        return self.epoch_order(epoch)[s : s + self.pairs_per_step].tolist()

    def plan(self, epoch: int, step_in_epoch: int) -> list[list[list[int]]]:
        """[rank][micro-batch] -> pair ids; every rank has the same number of micro-batches."""
        pairs = self.step_pairs(epoch, step_in_epoch)
        costs = dict(zip(pairs, self.costs[pairs].tolist()))  # this step's pairs only, as Python ints
        shares = split_across_ranks(pairs, [costs[i] for i in pairs], self.num_ranks)
        per_rank = [best_fit_decreasing(sh, [costs[i] for i in sh], self.max_tokens) for sh in shares]
        target = max(len(bins) for bins in per_rank)
        for bins in per_rank:
            while len(bins) < target:
                splittable = [b for b in bins if len(b) > 1]
                if splittable:
                    # halve the bin with most pairs: smaller micro-batches, same pairs, no filler
                    big = max(splittable, key=len)
                    bins.append(big[len(big) // 2 :])
                    del big[len(big) // 2 :]
                else:
                    bins.append([FILLER])
        return per_rank


def filler_pair() -> Group:
    """A two-token pair with weight 0: keeps a rank in lockstep without changing the loss."""
    return Group.pair([0, 0], [0, 0])


class PairReader(Protocol):
    """Reads rows by index: the store (``polar_train.store.PairStore``) or ``PairList``."""

    def __len__(self) -> int: ...

    def read(self, ids: Sequence[int]) -> list[Group]:
        """The ``Group`` of each row in ``ids``, in that order."""
        ...


class PairList:
    """A ``PairReader`` over rows already in memory (tests, benchmarks): ``Group``s or ``(chosen, rejected)`` pairs."""

    def __init__(self, rows: Sequence[Group | tuple[Sequence[int], Sequence[int]]]):
        self.rows = [Group.of(r) for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, ids: Sequence[int]) -> list[Group]:
        return [self.rows[i] for i in ids]


def pack_step(
    plan_for_rank: list[list[int]],
    reader: PairReader,
    *,
    shared_prefix: bool,
    share_max_len: int | None = None,
) -> list[MicroBatch]:
    """Build this rank's micro-batches for one step from its plan, reading only its rows."""
    out = []
    for bin_ids in plan_for_rank:
        real = [i for i in bin_ids if i != FILLER]
        read = iter(reader.read(real))
        got = [filler_pair() if i == FILLER else next(read) for i in bin_ids]
        out.append(build_micro_batch(got, shared_prefix=shared_prefix, pair_ids=bin_ids, share_max_len=share_max_len))
    return out
