"""Sequence parallelism (``train.sequence_parallel``, issue 18): the settings check.

Ulysses-style sequence parallelism (SPEC 12) exchanges heads for sequence around attention, so
each rank of a group of size ``sp`` holds ``heads / sp`` query heads of the whole sequence. That
fixes what a run may ask for, checked here before any model is built:

- the world size is a multiple of ``sp`` (data parallel = world size / sp);
- the query heads divide by ``sp``;
- KV heads divide by ``sp``, or ``sp`` divides by the KV heads: then each KV head is repeated
  ``sp / kv_heads`` times before the all-to-all (the way xtuner repeats KV, SPEC 12), which costs
  that factor in KV all-to-all traffic but keeps every query's keys exact;
- ``sp > 1`` needs one process per rank (torchrun).

The all-to-all layer itself is not in this build: a run with ``sp > 1`` that passes these checks
stops with one line saying so (``refuse_unbuilt``) rather than training without it.
"""

from __future__ import annotations

from dataclasses import dataclass

from polar_train.config import ConfigError

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


def refuse_unbuilt(plan: SequenceParallelPlan) -> None:
    """Stop a run that asks for ``sp > 1``: the all-to-all attention is not built yet (see the module doc)."""
    if plan.size > 1:
        raise ConfigError(f"{KEY}={plan.size}", "sequence parallelism is not built in this version yet",
                          f"set {KEY}=1 and raise data.max_tokens to hold the longest pair")
