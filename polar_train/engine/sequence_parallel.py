"""Sequence parallelism (``train.sequence_parallel``, issue 18): settings check, groups, data view.

Ulysses-style sequence parallelism (SPEC 12, model/ulysses.py) exchanges heads for sequence around
attention, so each rank of a group of size ``sp`` holds ``heads / sp`` query heads of the whole
sequence. That fixes what a run may ask for, checked here before any model is built:

- the world size is a multiple of ``sp`` (data parallel = world size / sp);
- the query heads divide by ``sp``;
- KV heads divide by ``sp``, or ``sp`` divides by the KV heads: then each KV head is repeated
  ``sp / kv_heads`` times before the all-to-all (the way xtuner repeats KV, SPEC 12), which costs
  that factor in KV all-to-all traffic but keeps every query's keys exact;
- ``sp > 1`` needs one process per rank (torchrun).

Groups are ``sp`` consecutive ranks (``[0, 1], [2, 3]`` for 4 ranks and ``sp = 2``). The data
planner sees one data-parallel rank per group (``data_rank``): every rank of a group packs the
same micro-batches and runs them on its cut of the tokens.

Gradients: every rank of a group computes the same loss (the reward values are gathered,
``ulysses.gather_sequence``), and the gradient each rank accumulates is its cut's part of the
group's gradient, so the SUM over the group is the group's gradient. The engines already turn the
data-parallel reduction into a sum over ALL ranks (DeepSpeed's average times the world size,
engine/deepspeed.py), and a sum over all ranks is the sum over groups of the sum within each
group: the step's gradient, exactly that of one process, with no other scale. The step's figures
(loss, pairs, tokens) are counted once per group (``count_once``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from polar_train.config import ConfigError
from polar_train.engine.dist import Dist
from polar_train.model.ulysses import SequenceGroup

KEY = "train.sequence_parallel"


@dataclass(frozen=True)
class SequenceParallelPlan:
    """How a run splits: ``data_parallel`` groups of ``size`` ranks; ``kv_repeat`` copies of each KV head."""

    size: int
    data_parallel: int
    kv_repeat: int


def plan_sequence_parallel(size: int, world_size: int, num_heads: int, num_kv_heads: int) -> SequenceParallelPlan:
    """Check ``train.sequence_parallel`` against the launch and the model; one ``ConfigError`` line if not."""
    if size == 1:
        return SequenceParallelPlan(1, world_size, 1)
    if world_size == 1:
        raise ConfigError(f"{KEY}={size}", "needs one process per rank of the group, this run has 1 process",
                          f"launch with torchrun --nproc_per_node={size} (or a multiple), or set {KEY}=1")
    if world_size % size:
        raise ConfigError(f"{KEY}={size}", f"the world size {world_size} is not a multiple of it",
                          f"launch a multiple of {size} processes, or set {KEY} to a divisor of {world_size}")
    if num_heads % size:
        raise ConfigError(f"{KEY}={size}", f"the model's {num_heads} attention heads do not divide by it",
                          f"set {KEY} to a divisor of {num_heads}")
    if num_kv_heads % size and size % num_kv_heads:
        raise ConfigError(f"{KEY}={size}", f"the model's {num_kv_heads} KV heads neither divide by it nor divide it",
                          f"set {KEY} to a divisor or a multiple of {num_kv_heads} that divides {num_heads}")
    return SequenceParallelPlan(size, world_size // size, max(1, size // num_kv_heads))


@dataclass
class SequenceParallel:
    """This rank in its group: ``data_rank`` is the planner's rank, ``leads`` the group's first rank."""

    plan: SequenceParallelPlan
    rank: int  # global
    dist: Dist
    group: SequenceGroup | None = field(default=None)  # None when size == 1

    @property
    def data_rank(self) -> int:
        return self.rank // self.plan.size

    @property
    def leads(self) -> bool:
        return self.rank % self.plan.size == 0

    def attach(self, model: torch.nn.Module) -> None:
        """Make ``model`` (or the module a DeepSpeed engine wraps) run on this rank's cut of every batch."""
        if self.group is not None:
            getattr(model, "module", model).sequence_group = self.group

    def count_once(self, figures: torch.Tensor) -> torch.Tensor:
        """``figures`` as this rank adds them to a sum over all ranks: a group's ranks hold the same
        figures, so only the group's first rank counts them (exact, no division)."""
        return figures if self.leads else torch.zeros_like(figures)

    @property
    def data_ranks(self) -> "DataRanks":
        """The ``Ranks`` the evaluation splits its forwards over: one per group."""
        return DataRanks(self)


@dataclass
class DataRanks:
    """``polar_train.ranks.Ranks`` seen by data and evaluation: each group is one rank."""

    sp: SequenceParallel

    @property
    def rank(self) -> int:
        return self.sp.data_rank

    @property
    def world_size(self) -> int:
        return self.sp.plan.data_parallel

    @property
    def device(self) -> torch.device:
        return self.sp.dist.device

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.sp.dist.all_reduce_sum(self.sp.count_once(tensor))


def join_sequence_parallel(plan: SequenceParallelPlan, dist: Dist) -> SequenceParallel:
    """Form the process groups of ``plan`` (a collective: every rank creates every group, in order)."""
    if plan.size == 1:
        return SequenceParallel(plan, dist.rank, dist)
    mine: Any = None
    for first in range(0, dist.world_size, plan.size):
        group = torch.distributed.new_group(list(range(first, first + plan.size)))
        if first <= dist.rank < first + plan.size:
            mine = group
    return SequenceParallel(plan, dist.rank, dist, SequenceGroup(dist.rank % plan.size, plan.size, mine))
