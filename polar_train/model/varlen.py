"""Variable-length attention metadata shared by packing (producer) and the model (consumer).

Legend: T = tokens in a flat micro-batch, S = attention sequences, K = gathered key slots.

A micro-batch is one flat token axis with no padding. Each attention sequence ``s`` has a
contiguous span of *queries* ``[cu_seqlens_q[s], cu_seqlens_q[s+1])`` on that axis and a list
of *keys/values* given by ``key_index[cu_seqlens_k[s]:cu_seqlens_k[s+1]]`` (flat token indices).
For an ordinary sequence the key list is its own query span. For the rejected suffix of a
shared-prefix pair (SPEC section 6) the key list is ``prefix span + suffix span``, so it has
more keys than queries and the causal mask is aligned bottom-right: query ``i`` of ``Lq``
sees key ``j`` of ``Lk`` iff ``j <= i + (Lk - Lq)`` (flash-attention >= 2.1 semantics).

    flat axis:  [ p p p p c c | r r ]         p prefix, c chosen suffix, r rejected suffix
    seq 0  q:     0 1 2 3 4 5               k: 0 1 2 3 4 5
    seq 1  q:                   6 7         k: 0 1 2 3 6 7
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VarlenMeta:
    cu_seqlens_q: torch.Tensor  # [S+1] int32, query span offsets on the flat axis
    cu_seqlens_k: torch.Tensor  # [S+1] int32, offsets into key_index
    key_index: torch.Tensor  # [K] int64, flat token index of each key/value slot
    max_seqlen_q: int
    max_seqlen_k: int
    # [T] int64: full length (keys) of the sequence whose query span holds each token. Only
    # dynamic RoPE scaling reads it: it changes the base for sequences longer than
    # max_position_embeddings (SPEC section 4).
    seq_len_per_token: torch.Tensor
    # True when key_index is the identity (no shared prefix anywhere): the CUDA backends then
    # skip the key gather, which they could not otherwise know without a device sync.
    keys_are_queries: bool = False

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens_q.numel() - 1

    def to(self, device: torch.device | str) -> "VarlenMeta":
        return VarlenMeta(
            cu_seqlens_q=self.cu_seqlens_q.to(device),
            cu_seqlens_k=self.cu_seqlens_k.to(device),
            key_index=self.key_index.to(device),
            max_seqlen_q=self.max_seqlen_q,
            max_seqlen_k=self.max_seqlen_k,
            seq_len_per_token=self.seq_len_per_token.to(device),
            keys_are_queries=self.keys_are_queries,
        )

    @classmethod
    def from_lengths(cls, lengths: list[int]) -> "VarlenMeta":
        """Plain packing: consecutive independent sequences of the given lengths.

        >>> m = VarlenMeta.from_lengths([3, 2]); m.cu_seqlens_q.tolist(), m.key_index.tolist()
        ([0, 3, 5], [0, 1, 2, 3, 4])
        """
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        cu = torch.tensor(offsets, dtype=torch.int32)
        total = offsets[-1]
        seq_len = torch.repeat_interleave(
            torch.tensor(lengths, dtype=torch.int64), torch.tensor(lengths, dtype=torch.int64)
        )
        return cls(
            cu_seqlens_q=cu,
            cu_seqlens_k=cu.clone(),
            key_index=torch.arange(total, dtype=torch.int64),
            max_seqlen_q=max(lengths),
            max_seqlen_k=max(lengths),
            seq_len_per_token=seq_len,
            keys_are_queries=True,
        )
