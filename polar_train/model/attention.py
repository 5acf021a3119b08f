"""Variable-length causal attention over a packed token axis, three backends (SPEC 7).

Legend: T = tokens on the flat axis, K = gathered key slots, nh / nkv = query / key-value heads,
hd = head dim, S = attention sequences.

Every backend computes, for each attention sequence of ``VarlenMeta`` (see varlen.py), softmax
attention of its query span over its gathered keys ``key_index[cu_seqlens_k[s]:cu_seqlens_k[s+1]]``
with the causal mask aligned bottom-right (query ``i`` of ``Lq`` sees key ``j`` of ``Lk`` iff
``j <= i + Lk - Lq``), scale ``1/sqrt(hd)``, GQA with query head ``h`` reading KV head
``h // (nh // nkv)``:

- ``flash_attn``: ``flash_attn.flash_attn_varlen_func`` (CUDA, fp16/bf16). ``causal=True`` is
  bottom-right aligned since flash-attn 2.1.
- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10, CUDA, fp16/bf16).
  Its signature changed: 2.10 takes ``is_causal``, 2.11+ ``window_size=(-1, 0)`` (flash-attn
  window semantics, also bottom-right), 2.12+ adds ``enable_gqa``. Detected with ``inspect``.
- ``sdpa``: reference path, any device and dtype. One ``scaled_dot_product_attention`` call
  per sequence; ``is_causal`` only when ``Lq == Lk`` (SDPA aligns it top-left), otherwise an
  explicit bottom-right boolean mask. A loop over sequences measured ~3x faster on CPU than one
  block-diagonal mask (SPEC 8).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from polar_train.errors import UserError
from polar_train.model.varlen import VarlenMeta

BACKENDS = ("flash_attn", "torch_varlen", "sdpa")
_HALF = (torch.float16, torch.bfloat16)
_SDPA_HAS_GQA = torch.__version__ >= "2.5"  # type: ignore[operator]  # TorchVersion compares to str


def _flash_attn_fn() -> Callable[..., Any]:
    """``flash_attn.flash_attn_varlen_func``, imported on first call. The one place the model
    looks the kernel up, so that tests can put a CPU emulator here (tests/varlen_emulators.py)."""
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


@functools.cache
def _torch_varlen_fn() -> tuple[Callable[..., Any], frozenset[str]] | None:
    """``varlen_attn`` and the names of its parameters, or None when this torch lacks it (the
    lookup tests replace with an emulator of one signature generation)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _why_unavailable(name: str, device: torch.device, dtype: torch.dtype | None) -> str | None:
    """None when backend ``name`` can run here, else the reason and what to do about it."""
    if name == "sdpa":
        return None
    if device.type != "cuda":
        return f"'{name}' needs a CUDA device, the model is on '{device.type}' (use 'sdpa' on CPU)"
    if dtype is not None and dtype not in _HALF:
        return f"'{name}' runs in float16/bfloat16 only, the model is {dtype} (use bf16 or 'sdpa')"
    if name == "flash_attn":
        if importlib.util.find_spec("flash_attn") is None:
            return "flash-attn is not installed (pip install flash-attn --no-build-isolation, or use 'torch_varlen')"
        try:
            _flash_attn_fn()
        except Exception as e:  # a broken build (ABI mismatch with torch) raises all sorts
            return f"flash-attn is installed but fails to import ({type(e).__name__}: {e}); reinstall it for this torch"
        return None
    if name == "torch_varlen":
        found = _torch_varlen_fn()
        if found is None:
            return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn (needs torch >= 2.10)"
        params = found[1]
        if not ({"is_causal", "window_size"} & params):
            return f"torch {torch.__version__}'s varlen_attn has an unknown signature {sorted(params)}"
        return None
    raise AssertionError(name)


def resolve_attention(name: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """Turn ``model.attention`` (``auto | flash_attn | torch_varlen | sdpa``) into a backend name.

    ``auto`` picks the first usable of flash_attn, torch_varlen, sdpa. An explicitly requested
    backend that cannot run on ``device`` / ``dtype`` is a UserError saying why.

    >>> resolve_attention("auto", "cpu")
    'sdpa'
    """
    device = torch.device(device)
    if name == "auto":
        return next(b for b in BACKENDS if _why_unavailable(b, device, dtype) is None)
    if name not in BACKENDS:
        raise UserError("model.attention", f"unknown attention backend {name!r}",
                        "choose one of auto, " + ", ".join(BACKENDS))
    why = _why_unavailable(name, device, dtype)
    if why is not None:
        raise UserError("model.attention", f"backend {name!r} is unavailable: {why}",
                        "or set model.attention=auto")
    return name


@dataclass
class AttentionPlan:
    """What a backend needs, computed once per forward and shared by every layer."""

    backend: str
    meta: VarlenMeta
    gather_keys: bool = True  # False when key_index is the identity (no shared prefixes)
    # sdpa only, host-side: (q_start, q_end, k_start, k_end) per sequence, k offsets into the
    # gathered keys, and its mask: None -> is_causal (Lq == Lk), else [Lq, Lk] bool bottom-right.
    spans: list[tuple[int, int, int, int]] = field(default_factory=list)
    masks: list[torch.Tensor | None] = field(default_factory=list)


def plan_attention(meta: VarlenMeta, backend: str, num_tokens: int) -> AttentionPlan:
    """Prepare ``meta`` for ``backend``. For sdpa this reads the offsets to the host: one
    deliberate device sync per forward (none for the CUDA varlen backends)."""
    assert backend in BACKENDS, f"unresolved attention backend {backend!r} (call resolve_attention)"
    if backend != "sdpa":
        return AttentionPlan(backend, meta, gather_keys=not meta.keys_are_queries)
    cu_q = meta.cu_seqlens_q.tolist()  # host sync, once per forward
    cu_k = meta.cu_seqlens_k.tolist()
    assert cu_q[0] == 0 and cu_q[-1] == num_tokens, "query spans must tile the flat axis"
    identity = cu_k == cu_q and meta.key_index.numel() == num_tokens and torch.equal(
        meta.key_index, torch.arange(num_tokens, device=meta.key_index.device))
    plan = AttentionPlan(backend, meta, gather_keys=not identity)
    device = meta.key_index.device
    mask_cache: dict[tuple[int, int], torch.Tensor] = {}
    for s in range(len(cu_q) - 1):
        lq, lk = cu_q[s + 1] - cu_q[s], cu_k[s + 1] - cu_k[s]
        assert lq <= lk, f"sequence {s} has more queries ({lq}) than keys ({lk})"
        if lq == 0:
            continue
        plan.spans.append((cu_q[s], cu_q[s + 1], cu_k[s], cu_k[s + 1]))
        # query i sees key j iff j <= i + (lk - lq): a lower triangle shifted right
        if lq == lk:
            plan.masks.append(None)
            continue
        if (lq, lk) not in mask_cache:  # the rejected suffixes of a batch often share a shape
            mask_cache[(lq, lk)] = torch.ones(lq, lk, dtype=torch.bool, device=device).tril(lk - lq)
        plan.masks.append(mask_cache[(lq, lk)])
    return plan


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """q: [T, nh, hd]; k, v: [T, nkv, hd] (flat, ungathered) -> [T, nh, hd]."""
    scale = q.shape[-1] ** -0.5
    meta = plan.meta
    if plan.gather_keys:
        k, v = k.index_select(0, meta.key_index), v.index_select(0, meta.key_index)  # [K, nkv, hd]
    if plan.backend == "sdpa":
        return _sdpa(q, k, v, plan, scale)
    if plan.backend == "flash_attn":
        return _flash_attn_fn()(q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q,
                                meta.max_seqlen_k, dropout_p=0.0, softmax_scale=scale, causal=True)
    return _torch_varlen(q, k, v, meta, scale)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, scale: float) -> torch.Tensor:
    nh, nkv = q.shape[1], k.shape[1]
    if nh != nkv and not _SDPA_HAS_GQA:
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
    extra = {"enable_gqa": True} if k.shape[1] != nh else {}
    outs = []
    for (qs, qe, ks, ke), mask in zip(plan.spans, plan.masks):
        qi = q[qs:qe].transpose(0, 1).unsqueeze(0)  # [1, nh, Lq, hd]
        ki = k[ks:ke].transpose(0, 1).unsqueeze(0)  # [1, nkv, Lk, hd]
        vi = v[ks:ke].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, is_causal=mask is None,
                                           scale=scale, **extra)  # [1, nh, Lq, hd]
        outs.append(o[0].transpose(0, 1))  # [Lq, nh, hd]
    return torch.cat(outs)  # [T, nh, hd]: spans are in order and tile the axis


def _torch_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: VarlenMeta, scale: float) -> torch.Tensor:
    found = _torch_varlen_fn()
    assert found is not None, "torch_varlen selected without varlen_attn (call resolve_attention)"
    fn, params = found
    kwargs: dict[str, Any] = {}
    if "is_causal" in params:  # torch 2.10
        kwargs["is_causal"] = True
    else:  # torch 2.11+: flash-attn window semantics, (-1, 0) = causal, bottom-right aligned
        kwargs["window_size"] = (-1, 0)
    if "scale" in params:  # 2.10 has no scale argument; its default is 1/sqrt(hd) anyway
        kwargs["scale"] = scale
    nh, nkv = q.shape[1], k.shape[1]
    if nh != nkv:
        if "enable_gqa" in params:  # torch 2.12+
            kwargs["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
    return fn(q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q, meta.max_seqlen_k, **kwargs)
