"""The CUDA attention branches, run on CPU through emulated kernels (tests/varlen_emulators.py).

Two layers: the emulators equal plain per-sequence SDPA on random varlen cases (so they compute
what the kernels document), and the whole model's ``flash_attn`` / ``torch_varlen`` branches give
the rewards and gradients of its ``sdpa`` branch, fp32, with and without shared prefixes. The
mutation tests feed the comparison a known bug and assert that it then fails.
"""

from __future__ import annotations

import functools
import inspect
import random

import pytest
import torch
import torch.nn.functional as F

from polar_train.loss import pair_losses
from polar_train.model import load_model
from polar_train.packing import MicroBatch, build_micro_batch
from varlen_emulators import KERNELS, TORCH_VARLEN, flash_attn_varlen_func, use_kernel, varlen_attn_2_12


# ---- the emulators against SDPA ----

def sdpa_varlen(q, k, v, lengths_q, lengths_k):
    """Per-sequence SDPA with an explicit bottom-right causal mask (query i sees key j iff
    j <= i + Lk - Lq); q: [Tq, nh, hd], k, v: [Tk, nkv, hd] -> [Tq, nh, hd]."""
    g = q.shape[1] // k.shape[1]
    out, a, b = [], 0, 0
    for lq, lk in zip(lengths_q, lengths_k):
        mask = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
        qi = q[a:a + lq].transpose(0, 1)  # [nh, Lq, hd]
        ki = k[b:b + lk].repeat_interleave(g, dim=1).transpose(0, 1)  # [nh, Lk, hd]
        vi = v[b:b + lk].repeat_interleave(g, dim=1).transpose(0, 1)
        out.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask).transpose(0, 1))
        a, b = a + lq, b + lk
    return torch.cat(out)


def random_case(seed: int, nh: int, nkv: int, hd: int = 8):
    """Sequences with Lq <= Lk (equal, a rejected-suffix shape, a single query), fp32, requiring grad."""
    rng = random.Random(seed)
    lengths_k = [rng.randrange(1, 24) for _ in range(rng.randrange(1, 6))]
    lengths_q = [rng.choice([lk, rng.randrange(1, lk + 1), 1]) for lk in lengths_k]
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lengths_q), nh, hd, generator=gen, requires_grad=True)
    k = torch.randn(sum(lengths_k), nkv, hd, generator=gen, requires_grad=True)
    v = torch.randn(sum(lengths_k), nkv, hd, generator=gen, requires_grad=True)
    return q, k, v, lengths_q, lengths_k


def cu(lengths):
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)


def call_causal(name, fn, q, k, v, lengths_q, lengths_k):
    """Call one emulated kernel the way attention.py does: causal, GQA where the kernel has it."""
    args = (cu(lengths_q), cu(lengths_k), max(lengths_q), max(lengths_k))
    if name == "flash_attn":
        return fn(q, k, v, *args, causal=True)
    g = q.shape[1] // k.shape[1]
    if name == "torch_varlen-2.12":
        return fn(q, k, v, *args, window_size=(-1, 0), enable_gqa=g > 1)
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    if name == "torch_varlen-2.10":
        return fn(q, k, v, *args, is_causal=True)
    return fn(q, k, v, *args, window_size=(-1, 0))


def max_error_to_sdpa(name, fn, seed, nh, nkv):
    """Largest |emulator - SDPA| over the output and the q, k, v gradients of a random case."""
    q, k, v, lengths_q, lengths_k = random_case(seed, nh, nkv)
    out = call_causal(name, fn, q, k, v, lengths_q, lengths_k)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    ref = sdpa_varlen(q, k, v, lengths_q, lengths_k)
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    assert out.shape == ref.shape == q.shape
    return max((a - b).abs().max().item() for a, b in zip((out, *grads), (ref, *ref_grads)))


@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 2), (4, 1)], ids=lambda h: f"{h[0]}:{h[1]}")
def test_emulator_equals_per_sequence_sdpa(name, heads):
    for seed in range(5):
        assert max_error_to_sdpa(name, KERNELS[name][1], seed, *heads) < 1e-5, seed


def test_emulator_mutant_aligned_top_left_differs_from_sdpa():
    """flash-attn < 2.1 aligned the causal mask top-left: wrong whenever Lq < Lk, so the
    comparison above must see it (and must not see it where Lq == Lk everywhere)."""
    top_left = functools.partial(flash_attn_varlen_func, _align="top_left")
    errors = [max_error_to_sdpa("flash_attn", top_left, seed, 4, 2) for seed in range(5)]
    assert max(errors) > 1e-2, errors
    q, k, v, lengths, _ = random_case(0, 4, 2)
    k, v = k.detach()[:q.shape[0]], v.detach()[:q.shape[0]]  # Lq == Lk: both alignments agree
    assert torch.equal(top_left(q, k, v, cu(lengths), cu(lengths), max(lengths), max(lengths), causal=True),
                       flash_attn_varlen_func(q, k, v, cu(lengths), cu(lengths), max(lengths), max(lengths), causal=True))


def test_flash_attn_documented_mask_examples():
    """flash-attn's docstring: seqlen_q 2, seqlen_k 5 -> mask 1 1 1 1 0 / 1 1 1 1 1; seqlen_q 5,
    seqlen_k 2 -> the first three query rows see no key and output zeros."""
    v = torch.eye(5).view(5, 1, 5)  # value j = one-hot j, so the output row shows which keys were seen
    q, k = torch.zeros(2, 1, 5), torch.zeros(5, 1, 5)  # equal scores: uniform over the seen keys
    out = flash_attn_varlen_func(q, k, v, cu([2]), cu([5]), 2, 5, causal=True)[:, 0]
    assert torch.allclose(out, torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]) / torch.tensor([[4.0], [5.0]]))
    out = flash_attn_varlen_func(torch.zeros(5, 1, 5), k[:2], v[:2], cu([5]), cu([2]), 5, 2, causal=True)[:, 0]
    assert torch.equal(out[:3], torch.zeros(3, 5))
    assert torch.allclose(out[3:, :2], torch.tensor([[1.0, 0.0], [0.5, 0.5]]))


def test_rows_past_the_last_query_offset_are_left_unwritten():
    """The kernels fill an empty_like(q): rows no sequence covers hold garbage; the emulator's NaN
    makes any read of them show in a comparison."""
    q, k, v = torch.randn(5, 2, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    out = flash_attn_varlen_func(q, k, v, cu([3]), cu([3]), 3, 3, causal=True)
    assert out[3:].isnan().all() and not out[:3].isnan().any()


def test_emulators_reject_what_the_kernels_reject():
    q, k, v, lengths_q, lengths_k = (t.detach() if torch.is_tensor(t) else t for t in random_case(1, 4, 2))
    args = (cu(lengths_q), cu(lengths_k), max(lengths_q), max(lengths_k))
    with pytest.raises(RuntimeError, match="cu_seqlens_q must have dtype int32"):
        flash_attn_varlen_func(q, k, v, args[0].long(), *args[1:], causal=True)
    with pytest.raises(RuntimeError, match="cu_seqlens_k must be a contiguous"):
        flash_attn_varlen_func(q, k, v, args[0], torch.stack([args[1], args[1]], 1)[:, 0], *args[2:], causal=True)
    with pytest.raises(RuntimeError, match="must divide number of heads"):
        flash_attn_varlen_func(q[:, :3], k, v, *args, causal=True)
    with pytest.raises(RuntimeError, match="same dtype"):
        flash_attn_varlen_func(q.double(), k, v, *args, causal=True)
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        flash_attn_varlen_func(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, *args, causal=True)
    with pytest.raises(AssertionError, match="below the longest sequence"):
        flash_attn_varlen_func(q, k, v, args[0], args[1], args[2] - 1, args[3], causal=True)
    with pytest.raises(TypeError, match="Python ints"):
        flash_attn_varlen_func(q, k, v, args[0], args[1], torch.tensor(args[2]), args[3], causal=True)
    for gen in ("2.10", "2.11"):
        with pytest.raises(ValueError, match="needs equal heads"):
            TORCH_VARLEN[gen](q, k, v, *args)
    with pytest.raises(ValueError, match="needs equal heads"):
        varlen_attn_2_12(q, k, v, *args, window_size=(-1, 0))
    with pytest.raises(TypeError):  # 2.10 has no scale, 2.11 no enable_gqa: the model must not pass them
        TORCH_VARLEN["2.10"](q, k, v, *args, scale=0.5)
    with pytest.raises(TypeError):
        TORCH_VARLEN["2.11"](q, k, v, *args, enable_gqa=True)


def test_emulator_of_the_installed_torch_has_its_signature():
    """The emulated generation the installed varlen_attn belongs to has its exact parameter list
    (torch 2.13 here: 2.12+; torch 2.11 on the GPU machine: 2.11)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        pytest.skip(f"torch {torch.__version__} has no varlen_attn")
    real = list(inspect.signature(varlen_attn).parameters)
    generation = "2.12" if "enable_gqa" in real else "2.11" if "window_size" in real else "2.10"
    assert list(inspect.signature(TORCH_VARLEN[generation]).parameters) == real, generation


# ---- the whole model: emulated CUDA branches against the sdpa branch ----

@pytest.fixture(scope="module")
def model(fixture_dir):
    return load_model(fixture_dir, attention="sdpa")  # the shared fixture: fp32, dynamic RoPE, GQA 8:2


def make_pairs(n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """POLAR-shaped pairs (shared prefix, then two outputs, reward token 127 last); one pair
    whose rejected extends the chosen, one with no common prefix beyond BOS."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prefix = [1] + [rng.randrange(3, 127) for _ in range(rng.randrange(2, 30))]
        pairs.append((prefix + [rng.randrange(3, 127) for _ in range(rng.randrange(1, 20))] + [127],
                      prefix + [rng.randrange(3, 127) for _ in range(rng.randrange(1, 20))] + [127]))
    pairs.append((pairs[0][0], pairs[0][0][:-1] + [5, 127]))
    pairs.append(([1, 9, 127], [1, 10, 11, 127]))
    return pairs


def rewards_and_grads(model, mb: MicroBatch, backend: str):
    model.attention = backend
    model.zero_grad(set_to_none=True)
    try:
        rewards = model(mb.input_ids, mb.position_ids, mb.meta, mb.seq_index[torch.cat([mb.better, mb.worse])])
    finally:
        model.attention = "sdpa"
    chosen, rejected = rewards.chunk(2)
    pair_losses(chosen, rejected).mean().backward()
    return rewards.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def errors_to_sdpa(model, mb: MicroBatch, backend: str) -> tuple[float, float]:
    """(max |reward - sdpa reward|, max over parameters of |grad - sdpa grad| / max |sdpa grad|)."""
    ref_rewards, ref_grads = rewards_and_grads(model, mb, "sdpa")
    rewards, grads = rewards_and_grads(model, mb, backend)
    assert set(grads) == set(ref_grads)
    grad_error = max(((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item() for n, g in ref_grads.items())
    return (rewards - ref_rewards).abs().max().item(), grad_error


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "plain"])
@pytest.mark.parametrize("name", list(KERNELS))
def test_model_branch_equals_sdpa(model, monkeypatch, name, shared):
    backend, fn = KERNELS[name]
    calls = use_kernel(monkeypatch, backend, fn)
    mb = build_micro_batch(make_pairs(6, seed=3), shared_prefix=shared)
    assert mb.meta.keys_are_queries is not shared  # the shared layout really gathers prefix keys
    reward_error, grad_error = errors_to_sdpa(model, mb, backend)
    assert calls.calls == model.config.num_hidden_layers  # the emulated branch ran, once per layer
    assert reward_error < 1e-5 and grad_error < 1e-5, (reward_error, grad_error)


def query_offsets_as_key_offsets(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs):
    """A plausible bug: the key spans taken from the query offsets (the prefix keys then go missing)."""
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_q, max_seqlen_q, max_seqlen_q, **kwargs)


@pytest.mark.parametrize("mutant", [functools.partial(flash_attn_varlen_func, _align="top_left"),
                                    query_offsets_as_key_offsets], ids=["top_left", "query_offsets_as_key_offsets"])
def test_model_comparison_fails_for_a_mutant(model, monkeypatch, mutant):
    """The comparison can fail: each mutant is harmless without shared prefixes (every Lq == Lk,
    keys are queries) and must be caught with them."""
    use_kernel(monkeypatch, "flash_attn", mutant)
    pairs = make_pairs(6, seed=3)
    assert max(errors_to_sdpa(model, build_micro_batch(pairs, shared_prefix=False), "flash_attn")) < 1e-5
    reward_error, grad_error = errors_to_sdpa(model, build_micro_batch(pairs, shared_prefix=True), "flash_attn")
    assert reward_error > 1e-3 and grad_error > 1e-3, (reward_error, grad_error)
