"""Ulysses sequence parallelism (issue 18, SPEC 12): a packed micro-batch split along its tokens.

Each rank of a sequence-parallel group of ``sp`` ranks holds a contiguous cut of the packed flat
axis (``sizes[r]`` tokens on rank ``r``, balanced by tokens; a cut may fall anywhere, inside a
shared prefix too). Everything per token (embeddings, norms, MLP, projections, the reward head)
runs on the cut. Around attention, one all-to-all turns ``[T_r, heads, hd]`` into
``[T, heads / sp, hd]``: every rank then sees the whole flat axis for its share of the heads, so
the packed offsets and the key gather onto the shared prefix (``VarlenMeta``) stay valid
unchanged and the backend runs exactly as without SP. A second all-to-all turns the output back.

GQA: with ``nkv >= sp`` (``nkv % sp == 0``) the KV heads are split like the query heads: rank
``j`` gets query heads ``j*nh/sp ..`` and KV heads ``j*nkv/sp ..``, exactly the ones its query
heads read (query head ``h`` reads KV head ``h // (nh / nkv)``). With ``nkv < sp`` each KV head is
repeated ``sp / nkv`` times before the exchange (as xtuner does, SPEC 12), so rank ``j`` receives
the one KV head its ``nh / sp`` query heads share; this costs that factor in KV traffic only.

Legend: T = tokens of the micro-batch, T_r = tokens of rank r's cut, nh / nkv = heads, hd = head dim.

Written on ``torch.distributed.all_to_all_single`` (gloo on CPU, NCCL on GPU) rather than
DeepSpeed's ``_SeqAllToAll``, which assumes equal cuts of a padded ``[batch, seq, ...]`` layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from polar_train.model.attention import AttentionPlan, varlen_attention


@dataclass(frozen=True)
class SequenceGroup:
    """This process's place in its sequence-parallel group (``group``: its process group)."""

    rank: int  # within the group
    size: int
    group: Any = None

    def cut(self, num_tokens: int) -> "SequenceCut":
        """Balanced by tokens: the first ``T % sp`` ranks hold one token more.

        >>> SequenceGroup(1, 2).cut(5)
        SequenceCut(sizes=[3, 2], rank=1, group=None)
        """
        base, extra = divmod(num_tokens, self.size)
        return SequenceCut([base + (r < extra) for r in range(self.size)], self.rank, self.group)


@dataclass(frozen=True)
class SequenceCut:
    """How one micro-batch's flat axis is cut over the group: rank ``r`` holds ``sizes[r]`` tokens."""

    sizes: list[int]
    rank: int
    group: Any = None

    @property
    def start(self) -> int:
        return sum(self.sizes[:self.rank])

    @property
    def end(self) -> int:
        return self.start + self.sizes[self.rank]


def _exchange(x: torch.Tensor, send: list[int], receive: list[int], group: Any) -> torch.Tensor:
    # all_to_all_single with split sizes: gloo's list all_to_all wants equal shapes, our cuts are uneven
    out = x.new_empty((sum(receive), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=receive, input_split_sizes=send, group=group)
    return out


def _seq_to_heads(x: torch.Tensor, cut: SequenceCut) -> torch.Tensor:
    """[T_r, H, hd] on each rank -> [T, H / sp, hd]: rank j receives head slice j of every cut."""
    sp, (n, h, hd) = len(cut.sizes), x.shape
    by_rank = x.view(n, sp, h // sp, hd).transpose(0, 1).reshape(sp * n, h // sp, hd)  # head slice j first
    return _exchange(by_rank, [n] * sp, cut.sizes, cut.group)


def _heads_to_seq(x: torch.Tensor, cut: SequenceCut) -> torch.Tensor:
    """The inverse: [T, H / sp, hd] -> [T_r, H, hd]."""
    sp, n, (_, hs, hd) = len(cut.sizes), cut.sizes[cut.rank], x.shape
    got = _exchange(x, cut.sizes, [n] * sp, cut.group)  # [sp * T_r, H / sp, hd], head slice j from rank j
    return got.view(sp, n, hs, hd).transpose(0, 1).reshape(n, sp * hs, hd)


class _Exchange(torch.autograd.Function):
    """Sequence -> heads (``to_heads``) or back; the gradient takes the opposite exchange."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, to_heads: bool, cut: SequenceCut) -> torch.Tensor:
        ctx.to_heads, ctx.cut = to_heads, cut
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, cut)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        back = _heads_to_seq if ctx.to_heads else _seq_to_heads
        return back(grad, ctx.cut), None, None


class _Gather(torch.autograd.Function):
    """[T_r, ...] cuts -> the whole [T, ...] on every rank of the group.

    Backward keeps this rank's rows of the gradient, not a sum over the group: every rank of a
    group computes the same loss from the same gathered values, so each rank's gradient of that
    loss already is the gradient for its own cut (summing would count the loss ``sp`` times)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cut: SequenceCut) -> torch.Tensor:
        ctx.cut = cut
        sp, n = len(cut.sizes), cut.sizes[cut.rank]
        return _exchange(x.repeat(sp, *([1] * (x.dim() - 1))), [n] * sp, cut.sizes, cut.group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad[ctx.cut.start:ctx.cut.end], None


def gather_sequence(x: torch.Tensor, cut: SequenceCut) -> torch.Tensor:
    """This rank's [T_r, ...] rows -> all [T, ...] rows of the micro-batch (see ``_Gather``)."""
    return _Gather.apply(x, cut)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan,
                      cut: SequenceCut) -> torch.Tensor:
    """``varlen_attention`` over the whole flat axis from this rank's cut: q [T_r, nh, hd], k, v [T_r, nkv, hd];
    ``plan`` is for the whole axis. Returns [T_r, nh, hd]."""
    sp = len(cut.sizes)
    if k.shape[1] % sp:  # fewer KV heads than ranks: repeat each so every rank gets the one its queries read
        k, v = k.repeat_interleave(sp // k.shape[1], dim=1), v.repeat_interleave(sp // v.shape[1], dim=1)
    q, k, v = (_Exchange.apply(t, True, cut) for t in (q, k, v))  # [T, nh / sp, hd], [T, nkv' / sp, hd]
    return _Exchange.apply(varlen_attention(q, k, v, plan), False, cut)
