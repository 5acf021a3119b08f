"""``Ranks``: what data and inference code need of the processes that share a job.

``engine.Dist`` has it (training passes its ``dist``); store.py (building the cache, each rank
its share of the rows) and evaluate.py (each rank its share of the forwards) take it, so
neither imports ``torch.distributed``. ``None`` where a function takes one means one process.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Ranks(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over every rank (every rank calls it; returned, maybe in place)."""
