"""Rewards for many pairs with packed inference, and the metrics computed from them."""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from polar_train.packing import pack_in_order


@torch.no_grad()
def pair_rewards(
    model: torch.nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    max_tokens: int,
    shared_prefix: bool = True,
    share_max_len: int | None = None,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of every pair's chosen and rejected candidate, in input order: ([N], [N]) fp32.

    Pairs are packed best-fit decreasing into micro-batches of ``max_tokens`` tokens; a pair
    longer than that runs alone in its own micro-batch.
    """
    was_training = model.training
    model.eval()
    chosen = torch.empty(len(pairs))
    rejected = torch.empty(len(pairs))
    device = torch.device(device)
    cast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    for mb in pack_in_order(pairs, max_tokens=max_tokens, shared_prefix=shared_prefix, share_max_len=share_max_len):
        ids = torch.tensor(mb.pair_ids)
        mb = mb.to(device)
        with cast:
            rewards = model(mb.input_ids, mb.position_ids, mb.meta, mb.reward_index).float().cpu()  # [2P]
        chosen[ids] = rewards[: len(ids)]
        rejected[ids] = rewards[len(ids) :]
        if progress is not None:
            progress.update(len(ids))
    model.train(was_training)
    return chosen, rejected
