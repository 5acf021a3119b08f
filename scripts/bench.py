"""Side-by-side training throughput: padded batches vs packing vs packing + shared prefix.

One process, the same model weights, the same pairs and the same optimizer steps for all
three modes; each step is forward + backward + AdamW step. Modes:

  padded  what TRL's RewardTrainer does: a micro-batch of b pairs becomes a [2b, Lmax] batch
          (chosen and rejected rows) padded to its longest row, attention is one dense SDPA
          call with a causal + padding mask. b is chosen so padded runs as many micro-batches
          per step as plain packing does.
  packed  polar-train's padding-free micro-batches (best-fit decreasing, varlen attention),
          chosen and rejected as two sequences.
  shared  the same with the shared prefix computed once (SPEC section 6).

Figures: pairs/s, tokens computed (pad included for padded), tokens/s, and on CUDA achieved
TFLOP/s, MFU against a bf16 matmul peak measured in the same run, and peak memory. Ratios are
printed against padded and packed. Model FLOPs per computed token (Kaplan et al. 2020, the
usual 6N rule): 6 x non-embedding parameters, plus attention 12 x layers x heads x head_dim
per attended (query, key) pair (forward 4 = QK^T + AV at 2 FLOP per multiply-add, x3 for
backward). Padded mode is credited only with its real tokens' FLOPs (useful work).

Ranked lists (``--compare lists``, SPEC 10): the same lists trained (a) as lists, one prefix + K
suffixes each, and (b) expanded into their implied pair rows, each pair with its shared prefix
(today's best); the same rows per step, the same initial weights, the same loss (the mean over
every implied pair of the step). The last output line is JSON: ``lists_vs_pairs_speedup``
(implied pairs/s, lists over pairs) and ``lists_vs_pairs_tokens`` (tokens computed, lists over pairs).
    python scripts/make_length_mix.py --ranked 4 --num-pairs 192 --scale 0.125 --out /tmp/ranked_mix.jsonl
    python scripts/bench.py --compare lists --data /tmp/ranked_mix.jsonl --shape cpu

Sequence parallelism (``--compare sp``, issue 18): one long pair (``--seq-tokens`` packed tokens:
a shared prefix of half, two suffixes of a quarter each) trained under torchrun, first by rank 0
alone (SP=1), then split over all ranks (SP=world, model/ulysses.py). Per rank: step time
(forward + backward + the group's gradient all-reduce + AdamW), the bytes autograd saves for
backward (activations, counted by a saved-tensors hook) and the peak memory of a step over that
before it (CPU: RSS; CUDA: allocated). A comma list of lengths on one GPU finds the longest that fits.
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node=2 scripts/bench.py --compare sp --shape cpu --seq-tokens 8192

CPU (tiny model; ratios only):
    python scripts/make_length_mix.py --scale 0.125 --num-pairs 256 --out /tmp/mix.jsonl
    python scripts/bench.py --data /tmp/mix.jsonl --shape tiny --steps 4 --pairs-per-step 64 --max-tokens 8192
LoRA vs full fine-tune (training-state bytes, peak RSS of a step, step time; docs/benchmarks.md):
    python scripts/bench.py --data /tmp/mix.jsonl --shape small --steps 3 --pairs-per-step 16 --max-tokens 4096 --lora-rank 16
GPU (random POLAR-shaped weights, bf16):
    python scripts/bench.py --data data/length_mix.jsonl --shape polar-1.8b --steps 5 --pairs-per-step 64
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import polar_train.model.internlm2 as internlm2_module
from polar_train.model import InternLM2RewardModel, ModelConfig, resolve_attention
from polar_train.model.varlen import VarlenMeta
from polar_train.packing import Group, PairList, StepPlanner, best_fit_decreasing, group_cost, pack_step, pair_cost
from polar_train.store_build import load_pair_store
from polar_train.tokenizer import load_tokenizer, special_token_ids

SHAPES = {  # hidden, layers, heads, kv heads, intermediate (SPEC 4; 1.8B as believed there)
    "tiny": (128, 4, 4, 2, 352),
    "cpu": (256, 4, 4, 2, 704),
    "small": (512, 8, 8, 4, 1408),
    "polar-1.8b": (2048, 24, 16, 8, 8192),
    "polar-7b": (4096, 32, 32, 8, 14336),
}


def build_model(shape: str, vocab: int, reward_id: int, attention: str, device, dtype) -> InternLM2RewardModel:
    h, layers, heads, kv, inter = SHAPES[shape]
    config = ModelConfig.fresh(
        hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        intermediate_size=inter, vocab_size=vocab, reward_token_id=reward_id, max_position_embeddings=262144,
        rope_theta=5e7,
    )
    if device.type != "cuda":
        model = InternLM2RewardModel(config, attention=attention)
        model.init_weights(0)
        return model.to(device=device, dtype=dtype)
    # Built and drawn on the GPU: init_weights draws every value on the CPU from one generator
    # (device-independent values), about a minute for 7B; a benchmark needs only the same scale.
    with torch.device(device):
        model = InternLM2RewardModel(config, attention=attention)
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0.0, config.initializer_range)
    return model.to(dtype=dtype)


# ---- padded baseline: dense [B, L] batches through the same weights ----

def padded_attention(q, k, v, plan):
    """Dense SDPA over a [B, L] batch laid flat as B rows of L tokens: causal + padding mask."""
    B, L, valid = plan.padded
    nh, nkv, hd = q.shape[1], k.shape[1], q.shape[2]
    q = q.view(B, L, nh, hd).transpose(1, 2)  # [B, nh, L, hd]
    k = k.view(B, L, nkv, hd).transpose(1, 2).repeat_interleave(nh // nkv, dim=1)
    v = v.view(B, L, nkv, hd).transpose(1, 2).repeat_interleave(nh // nkv, dim=1)
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    mask = causal[None, None] & valid[:, None, None, :]  # [B, 1, L, L]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(B * L, nh, hd)


class PaddedPlan:
    def __init__(self, B, L, valid):
        self.padded = (B, L, valid)


def padded_batch(pairs, device):
    """[2b, Lmax] right-padded rows (chosen rows then rejected rows), flattened."""
    rows = [c for c, _ in pairs] + [r for _, r in pairs]
    L = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    valid = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        valid[i, : len(r)] = True
    last = torch.tensor([i * L + len(r) - 1 for i, r in enumerate(rows)])
    pos = torch.arange(L).repeat(len(rows))
    meta = VarlenMeta.from_lengths([L] * len(rows))  # rope: every row its own sequence of length L
    return ids.flatten().to(device), pos.to(device), meta.to(device), last.to(device), PaddedPlan(len(rows), L, valid.to(device))


# ---- measurement ----

def pair_index(mb) -> torch.Tensor:
    """Flat reward positions: every pair's chosen, then every pair's rejected (``rewards.chunk(2)``)."""
    return torch.cat([mb.seq_index[mb.better], mb.seq_index[mb.worse]])


def attended_pairs(lq: int, lk: int) -> int:
    """(query, key) pairs a bottom-right causal mask allows."""
    return lq * (lk - lq) + lq * (lq + 1) // 2


def run_mode(mode, model, opt, steps_plan, pairs, device, cast, sync):
    """Returns seconds, real pairs, tokens computed, attended (q,k) pairs of real tokens."""
    n_pairs = tokens = att = 0
    sync()
    t0 = time.perf_counter()
    for plan_bins in steps_plan:
        step_pairs = sum(len(b) for b in plan_bins)
        if mode == "padded":
            for bin_ids in plan_bins:
                got = [pairs[i] for i in bin_ids]
                ids, pos, meta, last, pplan = padded_batch(got, device)
                orig = internlm2_module.plan_attention
                internlm2_module.plan_attention = lambda meta, backend, num_tokens: pplan
                internlm2_module.varlen_attention = padded_attention
                try:
                    with cast:
                        rewards = model(ids, pos, meta, last).float()
                    c, r = rewards.chunk(2)
                    # inside the patch: gradient checkpointing runs the attention again in backward
                    (-F.logsigmoid(c - r)).sum().div(step_pairs).backward()
                finally:
                    internlm2_module.plan_attention = orig
                    internlm2_module.varlen_attention = ORIGINAL_ATTENTION
                tokens += ids.numel()
                att += sum(attended_pairs(len(s), len(s)) for p in got for s in p)
        else:
            for mb in pack_step(plan_bins, PairList(pairs), shared_prefix=mode == "shared"):
                lens_q = (mb.meta.cu_seqlens_q[1:] - mb.meta.cu_seqlens_q[:-1]).tolist()
                lens_k = (mb.meta.cu_seqlens_k[1:] - mb.meta.cu_seqlens_k[:-1]).tolist()
                att += sum(attended_pairs(a, b) for a, b in zip(lens_q, lens_k))
                tokens += mb.num_tokens
                mb = mb.to(device)
                with cast:
                    rewards = model(mb.input_ids, mb.position_ids, mb.meta, pair_index(mb)).float()
                c, r = rewards.chunk(2)
                (-F.logsigmoid(c - r)).sum().div(step_pairs).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        n_pairs += step_pairs
    sync()
    return time.perf_counter() - t0, n_pairs, tokens, att


ORIGINAL_ATTENTION = internlm2_module.varlen_attention


# ---- LoRA vs full fine-tune: training-state bytes, peak RSS of a step, step time ----

def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def read_peak_rss() -> int:
    """This process's peak resident set size since the last ``reset_peak_rss`` (VmHWM), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := the current RSS


def lora_vs_full(args, pairs, tokenizer, reward_id, attention, device, sync) -> dict:
    """The same packed steps (shared prefix) for a LoRA model and the full model, one after the
    other in this process (LoRA first: the full run's larger peak is not hidden by leftovers).
    Like the trainer: trainable parameters fp32 (the masters), a LoRA run's frozen base in the
    compute dtype (bf16 on CUDA with autocast; fp32 on a CPU), AdamW over the trainable ones."""
    from polar_train.adapters import LoraSection
    from polar_train.model.lora import add_adapters

    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    cast = torch.autocast("cuda", dtype=compute) if device.type == "cuda" else contextlib.nullcontext()
    planner = StepPlanner([pair_cost(c, r, True) for c, r in pairs], pairs_per_step=args.pairs_per_step,
                          max_tokens=args.max_tokens, seed=0)
    plans = [planner.plan(0, k)[0] for k in range(args.steps + 1)]
    results = {}
    for mode in ("lora", "full"):
        model = build_model(args.shape, len(tokenizer), reward_id, attention, device, torch.float32)
        model.gradient_checkpointing = args.gradient_checkpointing
        if mode == "lora":
            add_adapters(model, LoraSection(rank=args.lora_rank, alpha=2.0 * args.lora_rank), seed=0)
            for param in model.parameters():
                param.data = param.data.to(torch.float32 if param.requires_grad else compute)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-6, foreach=False)
        times, grads = [], 0
        for k, plan_bins in enumerate(plans):  # step 0: warm-up (AdamW creates its state), not measured
            if k == 1:
                reset_peak_rss()
            sync()
            t0 = time.perf_counter()
            step_pairs = sum(len(b) for b in plan_bins)
            for mb in pack_step(plan_bins, pairs, shared_prefix=True):
                mb = mb.to(device)
                with cast:
                    rewards = model(mb.input_ids, mb.position_ids, mb.meta, pair_index(mb)).float()
                c, r = rewards.chunk(2)
                (-F.logsigmoid(c - r)).sum().div(step_pairs).backward()
            grads = tensor_bytes(p.grad for p in trainable if p.grad is not None)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            times.append(time.perf_counter() - t0)
        params = tensor_bytes(model.parameters())
        state = tensor_bytes(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
        results[mode] = {
            "trainable_parameters": sum(p.numel() for p in trainable), "parameters": sum(p.numel() for p in model.parameters()),
            "parameter_bytes": params, "gradient_bytes": grads, "optimizer_state_bytes": state,
            "training_state_bytes": params + grads + state,
            "peak_rss_bytes": read_peak_rss() if device.type == "cpu" else None,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
            "step_seconds": statistics.mean(times[1:]),
        }
        del model, opt, trainable
        gc.collect()
    results["ratios"] = {key: results["lora"][key] / results["full"][key]
                         for key in ("training_state_bytes", "peak_rss_bytes", "step_seconds") if results["full"][key]}
    return results


def print_lora_vs_full(results: dict, args, device) -> None:
    mib = 2**20
    print(f"device {device} | shape {args.shape} | LoRA rank {args.lora_rank} (alpha {2 * args.lora_rank}) on wqkv, wo, "
          f"w1, w2, w3 + v_head | {args.steps} steps x {args.pairs_per_step} pairs | budget {args.max_tokens}")
    print(f"{'mode':5} {'trainable':>12} {'params MiB':>11} {'grads MiB':>10} {'optim MiB':>10} {'state MiB':>10} "
          f"{'peak RSS MiB':>13} {'s/step':>7}")
    for mode in ("lora", "full"):
        r = results[mode]
        rss = f"{r['peak_rss_bytes'] / mib:.0f}" if r["peak_rss_bytes"] else "-"
        print(f"{mode:5} {r['trainable_parameters']:>12,} {r['parameter_bytes'] / mib:11.1f} {r['gradient_bytes'] / mib:10.1f} "
              f"{r['optimizer_state_bytes'] / mib:10.1f} {r['training_state_bytes'] / mib:10.1f} {rss:>13} {r['step_seconds']:7.2f}")
    print("lora / full: " + ", ".join(f"{k} {v:.3f}x" for k, v in results["ratios"].items()))


def matmul_peak_tflops(device, dtype) -> float:
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    iters = 20
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="POLAR-format JSONL (scripts/make_length_mix.py); not for --compare sp")
    p.add_argument("--tokenizer", default="data/tokenizer")
    p.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    p.add_argument("--steps", type=int, default=4, help="measured optimizer steps per mode")
    p.add_argument("--rounds", type=int, default=2, help="repeat all modes; the best round counts")
    p.add_argument("--pairs-per-step", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=16384, help="micro-batch budget of the packed modes")
    p.add_argument("--max-length", type=int, default=16384)
    p.add_argument("--attention", default="auto")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="instead of the three modes: LoRA of this rank vs the full fine-tune (memory, step time)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--compare", default="layouts", choices=["layouts", "lists", "sp"],
                   help="layouts: padded / packed / shared pairs; lists: ranked lists vs their expanded pairs; "
                        "sp: one long pair, SP=1 vs SP=world under torchrun")
    p.add_argument("--seq-tokens", default="8192",
                   help="--compare sp: packed tokens of the pair; a comma list is a ladder of lengths")
    args = p.parse_args()
    if args.compare == "sp":
        compare_sequence_parallel(args)
        return
    if not args.data:
        p.error("--data is required (except with --compare sp)")
    if args.compare == "lists":
        compare_lists(args)
        return

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cast = contextlib.nullcontext()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tokenizer = load_tokenizer(args.tokenizer)
    _, reward_id = special_token_ids(tokenizer, None)
    store, stats = load_pair_store([args.data], tokenizer, args.tokenizer, max_length=args.max_length,
                                   max_response_length=4096, cache_dir=None, on_error="raise")
    pairs = [(c, r) for c, r in store.read_pairs(range(len(store)))
             if pair_cost(c, r, False) <= args.max_tokens]  # every mode sees the same pairs (a benchmark's few)
    attention = resolve_attention(args.attention, device)
    if args.lora_rank:
        results = lora_vs_full(args, pairs, tokenizer, reward_id, attention, device, sync)
        print_lora_vs_full(results, args, device)
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
        return
    model = build_model(args.shape, len(tokenizer), reward_id, attention, device, dtype)
    model.gradient_checkpointing = args.gradient_checkpointing
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=device.type == "cuda")

    n_steps = args.steps + 1  # one warm-up step per mode, not measured
    plans = {}
    for mode in ("packed", "shared"):
        planner = StepPlanner([pair_cost(c, r, mode == "shared") for c, r in pairs],
                              pairs_per_step=args.pairs_per_step, max_tokens=args.max_tokens, seed=0)
        plans[mode] = [planner.plan(0, k)[0] for k in range(n_steps)]
    mbs_per_step = statistics.mean(len(p) for p in plans["packed"])
    b = max(1, math.ceil(args.pairs_per_step / mbs_per_step))
    plans["padded"] = []
    for step in plans["packed"]:
        ids = sorted(i for bin_ids in step for i in bin_ids)  # same pairs, random order
        ids = [ids[j] for j in torch.randperm(len(ids), generator=torch.Generator().manual_seed(len(plans["padded"]))).tolist()]
        plans["padded"].append([ids[j : j + b] for j in range(0, len(ids), b)])

    non_embed = sum(p.numel() for n, p in model.named_parameters() if "tok_embeddings" not in n)
    cfg = model.config
    att_flops = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim
    peak = matmul_peak_tflops(device, dtype) if device.type == "cuda" else None
    results = {m: {"seconds": float("inf")} for m in ("padded", "packed", "shared")}
    for _ in range(args.rounds):
        for mode in ("padded", "packed", "shared"):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            run_mode(mode, model, opt, plans[mode][:1], pairs, device, cast, sync)  # warm-up
            sec, n, tok, att = run_mode(mode, model, opt, plans[mode][1:], pairs, device, cast, sync)
            if sec < results[mode]["seconds"]:
                real_tokens = sum(pair_cost(*pairs[i], mode == "shared") for s in plans[mode][1:] for bin_ids in s for i in bin_ids)
                useful_tokens = real_tokens if mode != "padded" else sum(len(c) + len(r) for s in plans[mode][1:] for bin_ids in s for c, r in [pairs[i] for i in bin_ids])
                flops = 6 * non_embed * useful_tokens + att_flops * att
                results[mode] = {
                    "seconds": sec, "pairs": n, "pairs_per_s": n / sec, "tokens_computed": tok,
                    "tokens_per_s": tok / sec, "micro_batches": sum(len(s) for s in plans[mode][1:]),
                    "tflops": flops / sec / 1e12,
                    "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
                }
                if peak:
                    results[mode]["mfu"] = results[mode]["tflops"] / peak

    print(f"device {device} | shape {args.shape} | attention {attention} | dtype {dtype} | "
          f"{len(pairs)} pairs | {args.steps} steps x {args.pairs_per_step} pairs | budget {args.max_tokens} | padded b={b}"
          + (f" | bf16 matmul peak {peak:.0f} TFLOP/s" if peak else ""))
    print(f"{'mode':8} {'pairs/s':>9} {'tokens computed':>16} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}")
    for mode, r in results.items():
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        print(f"{mode:8} {r['pairs_per_s']:9.2f} {r['tokens_computed']:16d} {r['tokens_per_s']:10.0f} {r['tflops']:8.3f} {mfu:>6} {mem:>9}")
    ratios = {
        "shared_vs_padded": results["shared"]["pairs_per_s"] / results["padded"]["pairs_per_s"],
        "shared_vs_packed": results["shared"]["pairs_per_s"] / results["packed"]["pairs_per_s"],
        "packed_vs_padded": results["packed"]["pairs_per_s"] / results["padded"]["pairs_per_s"],
        "tokens_saved_by_shared_prefix": 1 - results["shared"]["tokens_computed"] / results["packed"]["tokens_computed"],
        "padding_share_of_padded": 1 - results["packed"]["tokens_computed"] / results["padded"]["tokens_computed"],
    }
    print("ratios: " + ", ".join(f"{k} {v:.2f}" + ("x" if "vs" in k else "") for k, v in ratios.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "ratios": ratios}, indent=2))


def train_steps(model, opt, steps: list[list[list[int]]], rows: list[Group], step_pairs: list[int], device, sync):
    """Run the planned steps (bins of row ids) with the training loss; seconds and tokens computed."""
    tokens = 0
    sync()
    t0 = time.perf_counter()
    for bins, count in zip(steps, step_pairs):
        for mb in pack_step(bins, PairList(rows), shared_prefix=True):
            tokens += mb.num_tokens
            mb = mb.to(device)
            rewards = model(mb.input_ids, mb.position_ids, mb.meta, mb.seq_index).float()  # [S]
            (-F.logsigmoid(rewards[mb.better] - rewards[mb.worse])).sum().div(count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - t0, tokens


def compare_lists(args: argparse.Namespace) -> None:
    """Ranked lists as lists vs as their expanded pair rows: same rows per step, same weights."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tokenizer = load_tokenizer(args.tokenizer)
    _, reward_id = special_token_ids(tokenizer, None)
    store, _ = load_pair_store([args.data], tokenizer, args.tokenizer, max_length=args.max_length,
                               max_response_length=4096, cache_dir=None, on_error="raise")
    lists = [g for g in store.read(range(len(store))) if group_cost(g.seqs, True) <= args.max_tokens]
    pairs, pairs_of = [], []  # each list's implied pairs as pair rows, and their ids
    for g in lists:
        pairs_of.append(list(range(len(pairs), len(pairs) + len(g.better))))
        pairs += [Group.pair(g.seqs[b], g.seqs[w]) for b, w in zip(g.better, g.worse)]
    planner = StepPlanner([group_cost(g.seqs, True) for g in lists], pairs_per_step=args.pairs_per_step,
                          max_tokens=args.max_tokens, seed=0)
    n_steps = min(args.steps + 1, planner.steps_per_epoch)  # the first step of each mode warms up
    row_ids = [planner.step_pairs(0, k) for k in range(n_steps)]
    step_pairs = [sum(len(lists[i].better) for i in ids) for ids in row_ids]
    plan = {"lists": [planner.plan(0, k)[0] for k in range(n_steps)], "pairs": []}
    pair_costs = [group_cost(p.seqs, True) for p in pairs]
    for ids in row_ids:  # the same rows, expanded, packed the same way
        expanded = [p for i in ids for p in pairs_of[i]]
        plan["pairs"].append(best_fit_decreasing(expanded, [pair_costs[p] for p in expanded], args.max_tokens))
    rows = {"lists": lists, "pairs": pairs}

    # one model per mode from the same initial weights; the modes alternate step by step, so a busy
    # machine slows both alike (the first step of each round warms up and is not counted)
    models = {}
    for mode in rows:
        models[mode] = build_model(args.shape, len(tokenizer), reward_id, resolve_attention(args.attention, device), device, dtype)
    initial = {k: v.detach().clone() for k, v in models["lists"].state_dict().items()}
    results = {m: {"seconds": float("inf")} for m in rows}
    for _ in range(args.rounds):
        seconds, tokens = dict.fromkeys(rows, 0.0), dict.fromkeys(rows, 0)
        opts = {}
        for mode, model in models.items():
            model.load_state_dict(initial)
            opts[mode] = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=device.type == "cuda")
        for k in range(n_steps):
            for mode in rows:
                sec, tok = train_steps(models[mode], opts[mode], plan[mode][k:k + 1], rows[mode], step_pairs[k:k + 1],
                                       device, sync)
                if k:
                    seconds[mode] += sec
                    tokens[mode] += tok
        for mode in rows:
            if seconds[mode] < results[mode]["seconds"]:
                n = sum(step_pairs[1:])
                results[mode] = {"seconds": seconds[mode], "implied_pairs": n, "pairs_per_s": n / seconds[mode],
                                 "tokens_computed": tokens[mode], "micro_batches": sum(len(s) for s in plan[mode][1:])}
    print(f"device {device} | shape {args.shape} | {len(lists)} lists, {len(pairs)} implied pairs | "
          f"{n_steps - 1} steps x {args.pairs_per_step} lists | budget {args.max_tokens}")
    print(f"{'mode':6} {'implied pairs/s':>16} {'tokens computed':>16} {'micro-batches':>14}")
    for mode, r in results.items():
        print(f"{mode:6} {r['pairs_per_s']:16.2f} {r['tokens_computed']:16d} {r['micro_batches']:14d}")
    summary = {"lists_vs_pairs_speedup": results["lists"]["pairs_per_s"] / results["pairs"]["pairs_per_s"],
               "lists_vs_pairs_tokens": results["lists"]["tokens_computed"] / results["pairs"]["tokens_computed"]}
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, **summary}, indent=2))
    print(json.dumps(summary))


def sp_step(model, opt, mb, group, device) -> tuple[float, int, int]:
    """One training step of ``mb``: seconds, bytes autograd saved for backward, peak memory growth
    (CUDA: allocated bytes; CPU: resident set)."""
    params = {p.data_ptr() for p in model.parameters()}
    saved: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:  # activations, not the weights they multiply
            saved[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return t

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back: the RSS growth is this step's alone
        reset_peak_rss()
        before = read_peak_rss()  # = the RSS now
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rewards = model(mb.input_ids, mb.position_ids, mb.meta, mb.seq_index).float()
    (-F.logsigmoid(rewards[mb.better] - rewards[mb.worse])).sum().backward()
    if group is not None:  # the cuts' gradients add up to the pair's (engine/sequence_parallel.py)
        for p in model.parameters():
            torch.distributed.all_reduce(p.grad, group=group)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if cuda else read_peak_rss()
    return time.perf_counter() - t0, sum(saved.values()), peak - before


def long_pair(n: int, vocab: int, reward_id: int, device):
    """One pair of ``n`` packed tokens: a shared prefix of n / 2, two suffixes of n / 4 (random ids)."""
    from polar_train.packing import build_micro_batch

    ids = torch.randint(5, vocab, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    prefix, chosen, rejected = ids[: n // 2], ids[n // 2: 3 * n // 4 - 1], ids[3 * n // 4: n - 1]
    return build_micro_batch([(prefix + chosen + [reward_id], prefix + rejected + [reward_id])],
                             shared_prefix=True).to(device)


def compare_sequence_parallel(args: argparse.Namespace) -> None:
    """One long pair per ``--seq-tokens`` length: rank 0 alone (SP=1), then all ranks as one
    sequence-parallel group. On one process only SP=1 runs, and a length that does not fit (out of
    memory) ends the ladder: the longest that fitted is reported (``longest_fitting_tokens``)."""
    import torch.distributed as tdist

    from polar_train.model.ulysses import SequenceGroup

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    tdist.init_process_group("nccl" if cuda else "gloo")
    rank, world = tdist.get_rank(), tdist.get_world_size()
    dtype = torch.bfloat16 if cuda else torch.float32
    tokenizer = load_tokenizer(args.tokenizer)
    _, reward_id = special_token_ids(tokenizer, None)
    model = build_model(args.shape, len(tokenizer), reward_id, resolve_attention(args.attention, device, dtype),
                        device, dtype)
    model.gradient_checkpointing = args.gradient_checkpointing
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    group = tdist.new_group(list(range(world)))
    results: dict[str, dict[str, list]] = {}
    longest = 0
    for n in [int(x) for x in str(args.seq_tokens).split(",")]:
        mb = long_pair(n, len(tokenizer), reward_id, device)
        results[str(n)] = {}
        try:
            for sp in sorted({1, world}):
                model.sequence_group = SequenceGroup(rank, sp, group) if sp > 1 else None
                runs = []
                for _ in range(args.steps + 1):  # the first step warms up
                    tdist.barrier()
                    if rank < sp:
                        runs.append(sp_step(model, opt, mb, group if sp > 1 else None, device))
                    tdist.barrier()
                mine = {"seconds": min(r[0] for r in runs[1:]), "saved_mib": runs[-1][1] / 2**20,
                        "peak_growth_mib": max(r[2] for r in runs[1:]) / 2**20} if runs else None
                per_rank: list = [None] * world
                tdist.all_gather_object(per_rank, mine)
                results[str(n)][f"sp{sp}"] = per_rank[:sp]
        except torch.OutOfMemoryError:  # one process only: ranks of a group would wait on each other
            results[str(n)] = {"out_of_memory": True}
            opt.zero_grad(set_to_none=True)
            break
        longest = n
    if rank == 0:
        print(f"device {device} | shape {args.shape} | {dtype} | {world} rank(s) | {args.steps} steps, best counts"
              + (" | gradient checkpointing" if args.gradient_checkpointing else ""))
        print(f"{'tokens':>7} {'run':5} {'rank':>4} {'step s':>8} {'saved MiB':>10} {'peak +MiB':>10}")
        for n, runs_of in results.items():
            for name, ranks in runs_of.items():
                for r, fig in enumerate(ranks if isinstance(ranks, list) else []):
                    print(f"{n:>7} {name:5} {r:4d} {fig['seconds']:8.3f} {fig['saved_mib']:10.1f} "
                          f"{fig['peak_growth_mib']:10.1f}")
            if "out_of_memory" in runs_of:
                print(f"{n:>7} out of memory")
        summary: dict[str, float] = {"longest_fitting_tokens": longest}
        last = results.get(str(longest), {})
        if world > 1 and "sp1" in last:
            one, many = last["sp1"][0], last[f"sp{world}"]
            summary.update(sp_step_speedup=one["seconds"] / max(f["seconds"] for f in many),
                           sp_saved_per_rank_ratio=max(f["saved_mib"] for f in many) / one["saved_mib"],
                           sp_peak_growth_ratio=max(f["peak_growth_mib"] for f in many) / one["peak_growth_mib"])
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, **summary}, indent=2))
        print(json.dumps(summary))
    tdist.destroy_process_group()

if __name__ == "__main__":
    main()
