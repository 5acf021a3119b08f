"""Ulysses all-to-all around attention (issue 18, SPEC 12): heads scattered, sequence gathered.

Each rank of a sequence-parallel group holds a contiguous cut of the packed flat axis
(``sizes[r]`` tokens on rank ``r``; a cut may fall anywhere, inside a shared prefix too). Before
attention, one all-to-all turns ``[T_r, heads, hd]`` into ``[T, heads / sp, hd]``: every rank then
sees the whole flat axis for its share of the heads, so the packed offsets and the key gather
onto the shared prefix (``VarlenMeta``) stay valid unchanged. A second all-to-all turns the
output back. KV heads fewer than the group are repeated first (``kv_repeat``), so query head
``h`` still reads KV head ``h * nkv // nh``.

Written on ``torch.distributed.all_to_all_single`` (gloo on CPU, NCCL on GPU) rather than DeepSpeed's
``_SeqAllToAll``, which assumes equal cuts of a padded ``[batch, seq, ...]`` layout.

Not wired into the model or the train loop yet: ``train.sequence_parallel > 1`` is refused
(``engine.sequence_parallel.refuse_unbuilt``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from polar_train.model.attention import AttentionPlan, varlen_attention


def _exchange(x: torch.Tensor, send: list[int], receive: list[int], group: Any) -> torch.Tensor:
    # all_to_all_single with split sizes: gloo's list all_to_all wants equal shapes, our cuts are uneven
    out = x.new_empty((sum(receive), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=receive, input_split_sizes=send, group=group)
    return out


def _seq_to_heads(x: torch.Tensor, sizes: list[int], rank: int, group: Any) -> torch.Tensor:
    """[T_r, H, hd] on each rank -> [T, H / sp, hd]: rank j receives head slice j of every cut."""
    sp, (n, h, hd) = len(sizes), x.shape
    by_rank = x.view(n, sp, h // sp, hd).transpose(0, 1).reshape(sp * n, h // sp, hd)  # head slice j first
    return _exchange(by_rank, [n] * sp, sizes, group)


def _heads_to_seq(x: torch.Tensor, sizes: list[int], rank: int, group: Any) -> torch.Tensor:
    """The inverse: [T, H / sp, hd] -> [T_r, H, hd]."""
    sp, n, (_, hs, hd) = len(sizes), sizes[rank], x.shape
    got = _exchange(x, sizes, [n] * sp, group)  # [sp * T_r, H / sp, hd], head slice j from rank j
    return got.view(sp, n, hs, hd).transpose(0, 1).reshape(n, sp * hs, hd)


class _Exchange(torch.autograd.Function):
    """Sequence -> heads (``to_heads``) or back; the gradient takes the opposite exchange."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, to_heads: bool, sizes: list[int], rank: int, group: Any) -> torch.Tensor:
        ctx.to_heads, ctx.sizes, ctx.rank, ctx.group = to_heads, sizes, rank, group
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, sizes, rank, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        back = _heads_to_seq if ctx.to_heads else _seq_to_heads
        return back(grad, ctx.sizes, ctx.rank, ctx.group), None, None, None, None


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, sizes: list[int],
                      rank: int, group: Any = None) -> torch.Tensor:
    """``varlen_attention`` over the whole flat axis from this rank's cut: q [T_r, nh, hd], k, v [T_r, nkv, hd];
    ``plan`` is for the whole axis, ``sizes`` the cut of each rank. Returns [T_r, nh, hd]."""
    sp = len(sizes)
    if k.shape[1] % sp:  # fewer KV heads than ranks: repeat each so every rank gets its own copy
        k, v = k.repeat_interleave(sp // k.shape[1], dim=1), v.repeat_interleave(sp // v.shape[1], dim=1)
    q, k, v = (_Exchange.apply(t, True, sizes, rank, group) for t in (q, k, v))
    return _Exchange.apply(varlen_attention(q, k, v, plan), False, sizes, rank, group)
