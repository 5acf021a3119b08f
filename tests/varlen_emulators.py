"""CPU stand-ins for the CUDA varlen attention kernels, with their documented contracts.

Legend: Tq / Tk = query / key rows on the flat axes, nh / nkv = query / key-value heads,
hd = head dim, S = sequences.

The model's ``flash_attn`` and ``torch_varlen`` branches (polar_train/model/attention.py) only run
on CUDA. These emulators take the same arguments, check what the real kernels check, and compute
the same function in plain torch (any dtype, so fp32 on CPU), so that tests run those branches in
CI. ``use_kernel`` puts one into the model's kernel lookup. Sources of the contracts:

- ``flash_attn.flash_attn_varlen_func`` (flash-attn 2.x, ``flash_attn_interface.py``): q
  ``(total_q, nheads, headdim)``, k/v ``(total_k, nheads_k, headdim)``; ``cu_seqlens_*`` int32
  ``(batch_size + 1,)`` on the tensors' device, contiguous; heads of q divisible by heads of kv
  (q head ``h`` reads kv head ``h // (nheads // nheads_k)``); ``softmax_scale`` defaults to
  ``1/sqrt(headdim)``; ``causal=True`` is aligned to the bottom-right corner since 2.1 (for
  ``seqlen_q = 2, seqlen_k = 5`` the mask is ``1 1 1 1 0 / 1 1 1 1 1``), and a query row no key
  may see outputs zeros. The C++ side rejects other cu_seqlens dtypes and a last dimension with
  stride != 1.
- ``torch.nn.attention.varlen.varlen_attn``: 2.10 ``(query, key, value, cu_seq_q, cu_seq_k,
  max_q, max_k, is_causal=False, return_aux=None)``, shapes ``(T, H, D)`` (equal heads, no scale
  argument); 2.11 keyword-only ``return_aux, scale, window_size=(-1, -1)`` (flash-attn windows:
  ``(-1, 0)`` is causal); 2.12+ adds ``enable_gqa`` (unequal heads without it raise),
  ``seqused_k``, ``block_table``, ``num_splits`` (the signature of the installed torch 2.13).

One deliberate difference: the emulators also take float32 (the kernels take fp16 / bf16 only, and
``resolve_attention`` keeps fp32 models off those backends), so that the comparison with the SDPA
path can be tight. ``max_seqlen_*`` size the kernel's launch grid: a value below the longest
sequence leaves rows unwritten, so the emulators reject it. Rows of q past ``cu_seqlens_q[-1]``
are never written by the kernels (``empty_like``): the emulators fill them with NaN so that
reading them shows.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Literal

import pytest
import torch

from polar_train.model import attention

Align = Literal["bottom_right", "top_left"]


def _offsets(name: str, cu: torch.Tensor, like: torch.Tensor, num_rows: int) -> list[int]:
    """Validate one cu_seqlens tensor as the kernels do and return it as a host list."""
    if cu.dtype != torch.int32:
        raise RuntimeError(f"{name} must have dtype int32, got {cu.dtype}")
    if cu.device != like.device:
        raise RuntimeError(f"{name} must be on {like.device}, got {cu.device}")
    if cu.dim() != 1 or not cu.is_contiguous():
        raise RuntimeError(f"{name} must be a contiguous 1-D tensor")
    offsets = cu.tolist()
    # the kernels read these without checking: a violation is a wrong result or an illegal
    # memory access on a GPU, an assertion here
    assert offsets[0] == 0 and all(a <= b for a, b in zip(offsets, offsets[1:])), f"{name} not increasing: {offsets}"
    assert offsets[-1] <= num_rows, f"{name} ends at {offsets[-1]}, past the {num_rows} rows it indexes"
    return offsets


def varlen_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                     max_q: int, max_k: int, *, scale: float, window: tuple[int, int] = (-1, -1),
                     align: Align = "bottom_right") -> torch.Tensor:
    """The function every varlen kernel computes. q: [Tq, nh, hd]; k, v: [Tk, nkv, hd] -> [Tq, nh, hd].

    Per sequence s, softmax(scale * q_s k_s^T) v_s over the keys a window allows: with
    ``shift = Lk - Lq`` (bottom-right) or 0 (top-left, flash-attn < 2.1), query i sees key j iff
    ``i + shift - left <= j <= i + shift + right`` (a side of -1 is unbounded). Computed in fp32.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise RuntimeError(f"{name} must be [total, heads, head_dim], got {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise RuntimeError("Input tensor must have contiguous last dimension")
    if not (q.dtype == k.dtype == v.dtype):
        raise RuntimeError(f"query and key must have the same dtype ({q.dtype}, {k.dtype}, {v.dtype})")
    if k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        raise RuntimeError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must match q's head dim {q.shape[-1]}")
    nh, nkv = q.shape[1], k.shape[1]
    if nh % nkv:
        raise RuntimeError("Number of heads in key/value must divide number of heads in query")
    offsets_q = _offsets("cu_seqlens_q", cu_q, q, q.shape[0])
    offsets_k = _offsets("cu_seqlens_k", cu_k, q, k.shape[0])
    if len(offsets_q) != len(offsets_k):
        raise RuntimeError(f"cu_seqlens_k must have shape (batch_size + 1) = ({len(offsets_q)})")
    if not (isinstance(max_q, int) and isinstance(max_k, int)):
        raise TypeError(f"max_seqlen_q / max_seqlen_k must be Python ints, got {type(max_q)}, {type(max_k)}")
    lengths_q = [b - a for a, b in zip(offsets_q, offsets_q[1:])]
    lengths_k = [b - a for a, b in zip(offsets_k, offsets_k[1:])]
    assert max_q >= max(lengths_q) and max_k >= max(lengths_k), (
        f"max_seqlen ({max_q}, {max_k}) below the longest sequence ({max(lengths_q)}, {max(lengths_k)})")

    left, right = window
    pieces = []
    for s in range(len(lengths_q)):
        qs = q[offsets_q[s]:offsets_q[s + 1]].float()  # [Lq, nh, hd]
        ks = k[offsets_k[s]:offsets_k[s + 1]].float().repeat_interleave(nh // nkv, dim=1)  # [Lk, nh, hd]
        vs = v[offsets_k[s]:offsets_k[s + 1]].float().repeat_interleave(nh // nkv, dim=1)
        lq, lk = qs.shape[0], ks.shape[0]
        i = torch.arange(lq, device=q.device)[:, None] + (lk - lq if align == "bottom_right" else 0)
        j = torch.arange(lk, device=q.device)[None, :]
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device)  # [Lq, Lk]
        if right >= 0:
            allowed &= j <= i + right
        if left >= 0:
            allowed &= j >= i - left
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale  # [nh, Lq, Lk]
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        probs = torch.where(allowed.any(-1, keepdim=True), probs, 0.0)  # a row seeing no key: zeros
        pieces.append(torch.einsum("hqk,khd->qhd", probs, vs).to(q.dtype))  # [Lq, nh, hd]
    unwritten = q.shape[0] - offsets_q[-1]
    pieces.append(q.new_full((unwritten, nh, v.shape[-1]), float("nan")))
    return torch.cat(pieces)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None,
                           *, _align: Align = "bottom_right"):
    """flash-attn 2.x's varlen entry point (its public signature, newest 2.x release)."""
    assert dropout_p == 0.0 and softcap == 0.0 and alibi_slopes is None and block_table is None \
        and not return_attn_probs, "emulated: no dropout, softcap, ALiBi, paged KV or returned probabilities"
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    window = (window_size[0], 0) if causal else tuple(window_size)
    return varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            scale=scale, window=window, align=_align)


def _equal_heads(query: torch.Tensor, key: torch.Tensor) -> None:
    if query.shape[1] != key.shape[1]:
        raise ValueError(f"query has {query.shape[1]} heads and key {key.shape[1]}: this varlen_attn needs "
                         "equal heads (enable_gqa=True from torch 2.12)")


def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """torch 2.10: ``is_causal`` (bottom-right, the flash kernel's), no scale, equal heads."""
    assert return_aux is None, "emulated: no auxiliary outputs"
    _equal_heads(query, key)
    return varlen_reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=query.shape[-1] ** -0.5,
                            window=(-1, 0) if is_causal else (-1, -1))


def varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1)):
    """torch 2.11: keyword-only ``scale`` and flash-attn ``window_size``, equal heads."""
    assert return_aux is None, "emulated: no auxiliary outputs"
    _equal_heads(query, key)
    return varlen_reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
                            scale=query.shape[-1] ** -0.5 if scale is None else scale, window=tuple(window_size))


def varlen_attn_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """torch 2.12+ (the signature of torch 2.13's): adds ``enable_gqa`` and KV-cache arguments."""
    assert return_aux is None and seqused_k is None and block_table is None, "emulated: training arguments only"
    if not enable_gqa:
        _equal_heads(query, key)
    return varlen_reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
                            scale=query.shape[-1] ** -0.5 if scale is None else scale, window=tuple(window_size))


TORCH_VARLEN = {"2.10": varlen_attn_2_10, "2.11": varlen_attn_2_11, "2.12": varlen_attn_2_12}

# Every (backend, emulated kernel) pair the model supports, as test ids.
KERNELS: dict[str, tuple[str, Callable[..., Any]]] = {
    "flash_attn": ("flash_attn", flash_attn_varlen_func),
    **{f"torch_varlen-{gen}": ("torch_varlen", fn) for gen, fn in TORCH_VARLEN.items()},
}


class CallCounter:
    """Wraps a kernel and counts its calls, so that a test knows the emulated branch ran."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.calls = fn, 0
        self.__signature__ = inspect.signature(fn)  # what attention.py's detection reads

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        return self.fn(*args, **kwargs)


def use_kernel(monkeypatch: pytest.MonkeyPatch, backend: str, fn: Callable[..., Any]) -> CallCounter:
    """Make the model's ``backend`` branch call ``fn`` (through the lookups in attention.py)."""
    counter = CallCounter(fn)
    if backend == "flash_attn":
        monkeypatch.setattr(attention, "_flash_attn_fn", lambda: counter)
    else:
        params = frozenset(inspect.signature(counter).parameters)
        monkeypatch.setattr(attention, "_torch_varlen_fn", lambda: (counter, params))
    return counter
