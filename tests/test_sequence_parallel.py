"""train.sequence_parallel (issue 18): the settings check, in one line naming the key and the fix.

Only the check is built (see polar_train/engine/sequence_parallel.py): the all-to-all attention
is not, so a run with a valid train.sequence_parallel > 1 is refused in one line too.
"""

from __future__ import annotations

import pytest
import torch

from polar_train import cli
from polar_train.config import ConfigError
from polar_train.engine.sequence_parallel import SequenceParallelPlan, plan_sequence_parallel, refuse_unbuilt

from test_errors import assert_one_error, run_cli


@pytest.mark.parametrize("size, world, heads, kv, plan", [
    (1, 1, 32, 8, SequenceParallelPlan(1, 1, 1)),
    (1, 4, 32, 8, SequenceParallelPlan(1, 4, 1)),
    (2, 4, 32, 8, SequenceParallelPlan(2, 2, 1)),
    (8, 8, 32, 8, SequenceParallelPlan(8, 1, 1)),
    (16, 16, 32, 8, SequenceParallelPlan(16, 1, 2)),  # 8 KV heads over 16 ranks: each repeated twice
    (4, 4, 4, 2, SequenceParallelPlan(4, 1, 2)),
])
def test_plan(size, world, heads, kv, plan):
    assert plan_sequence_parallel(size, world, heads, kv) == plan


@pytest.mark.parametrize("size, world, heads, kv, message", [
    (2, 1, 32, 8, "train.sequence_parallel=2: needs one process per rank of the group, this run has 1 process "
                  "(launch with torchrun --nproc_per_node=2 (or a multiple), or set train.sequence_parallel=1)"),
    (4, 6, 32, 8, "train.sequence_parallel=4: the world size 6 is not a multiple of it "
                  "(launch a multiple of 4 processes, or set train.sequence_parallel to a divisor of 6)"),
    (3, 3, 32, 8, "train.sequence_parallel=3: the model's 32 attention heads do not divide by it "
                  "(set train.sequence_parallel to a divisor of 32)"),
    (4, 4, 12, 6, "train.sequence_parallel=4: the model's 6 KV heads neither divide by it nor divide it "
                  "(set train.sequence_parallel to a divisor or a multiple of 6 that divides 12)"),
])
def test_bad_plan_is_one_line(size, world, heads, kv, message):
    with pytest.raises(ConfigError) as info:
        plan_sequence_parallel(size, world, heads, kv)
    assert str(info.value) == message


def test_a_valid_group_is_refused_while_unbuilt():
    refuse_unbuilt(SequenceParallelPlan(1, 4, 1))  # SP=1 trains as before
    with pytest.raises(ConfigError, match=r"^train.sequence_parallel=2: sequence parallelism is not built"):
        refuse_unbuilt(SequenceParallelPlan(2, 2, 1))


@pytest.mark.parametrize("override, where, fix", [
    ("train.sequence_parallel=0", "train.sequence_parallel: must be > 0, got 0", ""),
    ("train.sequence_parallel=2", "train.sequence_parallel=2: needs one process per rank of the group",
     "or set train.sequence_parallel=1"),
])
def test_through_train(override, where, fix, capsys, repo_root, tiny_tokenizer_path, tmp_path):
    code, err = run_cli(capsys, "train", repo_root / "configs/demo.yaml", override, f"output_dir={tmp_path / 'run'}",
                        f"model.fresh.tokenizer={tiny_tokenizer_path}")
    assert_one_error(code, err, 2, where, fix)


# --- the all-to-all attention layer (polar_train/model/ulysses.py), 2 gloo ranks --------------

def _micro_batch():
    from polar_train.packing import build_micro_batch
    prefix = list(range(10, 27))  # 17 shared tokens: the cut at 11 falls inside the prefix
    return build_micro_batch([(prefix + [1, 2, 3, 4, 5], prefix + [6, 7, 8]), ([30, 31, 32, 33], [30, 34, 35])],
                             shared_prefix=True)


def _qkv(num_tokens: int, nh: int, nkv: int):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(num_tokens, n, 8, generator=gen, dtype=torch.float64) for n in (nh, nkv, nkv)]


def _reference(nh: int, nkv: int, backend: str = "sdpa"):
    from polar_train.model.attention import plan_attention, varlen_attention
    batch = _micro_batch()
    q, k, v = (t.requires_grad_() for t in _qkv(batch.num_tokens, nh, nkv))
    out = varlen_attention(q, k, v, plan_attention(batch.meta, backend, batch.num_tokens))
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weight).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad, weight


def _rank_main(rank: int, world: int, init: str, nh: int, nkv: int, sizes: list[int], result: str,
               kernel: str) -> None:
    import inspect

    import torch.distributed as tdist
    from polar_train.model import attention
    from polar_train.model.attention import plan_attention
    from polar_train.model.ulysses import ulysses_attention
    from varlen_emulators import KERNELS
    backend = "sdpa"
    if kernel != "sdpa":  # the CPU emulator behind the CUDA branch (a spawned process has no monkeypatch)
        backend, fn = KERNELS[kernel]
        if backend == "flash_attn":
            attention._flash_attn_fn = lambda: fn
        else:
            attention._torch_varlen_fn = lambda: (fn, frozenset(inspect.signature(fn).parameters))
    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    batch = _micro_batch()
    start, end = sum(sizes[:rank]), sum(sizes[:rank + 1])
    q, k, v = (t[start:end].clone().requires_grad_() for t in _qkv(batch.num_tokens, nh, nkv))
    out = ulysses_attention(q, k, v, plan_attention(batch.meta, backend, batch.num_tokens), sizes, rank)
    weight = torch.linspace(-1, 1, batch.num_tokens * nh * 8, dtype=out.dtype).view(batch.num_tokens, nh, 8)
    (out * weight[start:end]).sum().backward()
    torch.save((out.detach(), q.grad, k.grad, v.grad), f"{result}.{rank}")
    tdist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("nh, nkv, kernel", [
    (4, 2, "sdpa"),  # GQA
    (4, 1, "sdpa"),  # one KV head, repeated over the group
    (4, 2, "flash_attn"),  # the CUDA branches' emulators under SP == sdpa in one process
    (4, 2, "torch_varlen-2.12"),
])
def test_ulysses_attention_equals_one_process(nh, nkv, kernel, tmp_path):
    import torch.multiprocessing as mp
    total = _micro_batch().num_tokens
    sizes = [11, total - 11]  # uneven, the cut inside the first pair's shared prefix
    mp.spawn(_rank_main, args=(2, f"file://{tmp_path / 'init'}", nh, nkv, sizes, str(tmp_path / "r"), kernel), nprocs=2)
    got = [torch.load(tmp_path / f"r.{r}") for r in range(2)]
    out, gq, gk, gv, _ = _reference(nh, nkv)
    tol = 1e-9 if kernel == "sdpa" else 1e-5  # the emulators compute in float32 (fp64 in, fp32 inside)
    for i, want in enumerate((out, gq, gk, gv)):
        torch.testing.assert_close(torch.cat([g[i] for g in got]), want, rtol=tol, atol=tol)
