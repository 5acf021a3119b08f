"""train.sequence_parallel (issue 18): settings checks, the all-to-all attention, the model under SP.

Multi-rank parts spawn gloo processes (torch.multiprocessing) on the CPU; training runs under
torchrun are in test_sequence_parallel_train.py.
"""

from __future__ import annotations

import pytest
import torch

from polar_train import cli
from polar_train.config import ConfigError
from polar_train.engine.sequence_parallel import SequenceParallelPlan, plan_sequence_parallel

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


def _install_emulator(kernel: str) -> str:
    """The backend name whose CUDA branch runs ``kernel``'s CPU emulator (a spawned process has no monkeypatch)."""
    import inspect

    from polar_train.model import attention
    from varlen_emulators import KERNELS
    if kernel == "sdpa":
        return "sdpa"
    backend, fn = KERNELS[kernel]
    if backend == "flash_attn":
        attention._flash_attn_fn = lambda: fn
    else:
        attention._torch_varlen_fn = lambda: (fn, frozenset(inspect.signature(fn).parameters))
    return backend


def _rank_main(rank: int, world: int, init: str, nh: int, nkv: int, sizes: list[int], result: str,
               kernel: str) -> None:
    import torch.distributed as tdist
    from polar_train.model.attention import plan_attention
    from polar_train.model.ulysses import SequenceCut, ulysses_attention
    backend = _install_emulator(kernel)
    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    batch = _micro_batch()
    start, end = sum(sizes[:rank]), sum(sizes[:rank + 1])
    q, k, v = (t[start:end].clone().requires_grad_() for t in _qkv(batch.num_tokens, nh, nkv))
    cut = SequenceCut(sizes, rank)
    out = ulysses_attention(q, k, v, plan_attention(batch.meta, backend, batch.num_tokens), cut)
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


# --- the whole model under SP: losses and parameter gradients == one process --------------------

def _model_batches():
    """Pair rows, a ranked list and a pair without a common prefix in two micro-batches; the cuts of
    2 and 4 ranks fall inside shared prefixes (checked in the test)."""
    from polar_train.packing import Group, build_micro_batch
    p = [1] + list(range(10, 40))  # a 31-token prompt shared by the first pair row
    first = build_micro_batch([(p + [5, 6, 7, 4], p + [8, 9, 4]), ([1, 41, 42, 4], [1, 43, 44, 45, 4])],
                              shared_prefix=True)
    q = [1] + list(range(50, 70))
    ranked = Group([q + [5, 4], q + [6, 7, 4], q + [8, 4]], better=[0, 0, 1], worse=[1, 2, 2], order=[0, 1, 2])
    second = build_micro_batch([ranked, ([2, 3, 4], [2, 9, 4])], shared_prefix=True)
    return [first, second]


def _tiny_model(nkv: int, gradient_checkpointing: bool = False, lora: bool = False):
    from polar_train.model import InternLM2RewardModel, ModelConfig
    config = ModelConfig.fresh(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=nkv,
                               intermediate_size=48, vocab_size=80, reward_token_id=4, max_position_embeddings=64)
    model = InternLM2RewardModel(config, gradient_checkpointing=gradient_checkpointing)
    model.init_weights(3)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(8.0)  # rewards that differ clearly between sequences
    if lora:
        from polar_train.adapters import LoraSection
        from polar_train.model.lora import add_adapters
        add_adapters(model, LoraSection(rank=4, alpha=8.0, target_modules=["wqkv", "wo"]), seed=1)
        with torch.no_grad():  # B starts at zero: make the adapters count in the forward
            for name, param in model.named_parameters():
                if name.endswith("lora_B"):
                    param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return model


def _losses_and_grads(model, kind: str):
    """The train loop's loss of every micro-batch (summed pair / list losses) and the summed gradients."""
    from polar_train.config import LossSection
    from polar_train.train import batch_loss, loss_function
    section = LossSection(kind=kind)
    losses = []
    model.train()
    for mb in _model_batches():
        rewards = model(mb.input_ids, mb.position_ids, mb.meta, mb.seq_index)
        loss = batch_loss(section, loss_function(section), rewards, mb)
        loss.backward()
        losses.append(loss.detach())
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return torch.stack(losses), grads


def _model_rank_main(rank: int, world: int, init: str, nkv: int, kind: str, extra: dict, result: str) -> None:
    import torch.distributed as tdist
    from polar_train.model.ulysses import SequenceGroup
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    extra = dict(extra)
    backend = _install_emulator(extra.pop("kernel", "sdpa"))
    model = _tiny_model(nkv, **extra)
    model.attention = backend
    model.sequence_group = SequenceGroup(rank, world)
    losses, grads = _losses_and_grads(model, kind)
    for g in grads.values():  # each rank holds its cut's part of the gradient: the group sums them
        tdist.all_reduce(g)
    torch.save((losses, grads), f"{result}.{rank}")
    tdist.destroy_process_group()


def _spawn_model(tmp_path, world: int, nkv: int, kind: str, **extra):
    import torch.multiprocessing as mp
    mp.spawn(_model_rank_main, args=(world, f"file://{tmp_path / 'init'}", nkv, kind, extra, str(tmp_path / "m")),
             nprocs=world)
    return [torch.load(tmp_path / f"m.{r}") for r in range(world)]


def test_the_cuts_fall_inside_shared_prefixes():
    from polar_train.model.ulysses import SequenceGroup
    first = _model_batches()[0]
    prefix_end = 31  # the first row's shared prefix occupies flat [0, 31)
    assert first.meta.key_index[first.meta.cu_seqlens_k[1]:].tolist()[:prefix_end] == list(range(prefix_end))
    for size in (2, 4):
        cut = SequenceGroup(0, size).cut(first.num_tokens)
        assert 0 < cut.end < prefix_end, (size, cut)


@pytest.mark.slow
@pytest.mark.parametrize("world, nkv, kind, extra", [
    (2, 2, "ranking", {}),  # GQA, KV heads split over the group
    (2, 2, "listwise", {}),
    (2, 1, "ranking", {}),  # one KV head, repeated for the 2 ranks
    (4, 2, "ranking", {}),  # 2 KV heads over 4 ranks: each repeated twice
    (2, 2, "ranking", {"gradient_checkpointing": True}),
    (2, 2, "ranking", {"lora": True}),
    (2, 2, "ranking", {"kernel": "flash_attn"}),  # the CUDA branches' CPU emulators under SP == sdpa without SP
    (2, 2, "ranking", {"kernel": "torch_varlen-2.12"}),
    (2, 1, "listwise", {"kernel": "torch_varlen-2.10"}),
])
def test_model_under_sp_equals_one_process(world, nkv, kind, extra, tmp_path):
    """SP=2 / 4 losses and parameter gradients (summed over the group) == one process, fp32."""
    reference = {k: v for k, v in extra.items() if k != "kernel"}  # always sdpa in one process
    want_losses, want_grads = _losses_and_grads(_tiny_model(nkv, **reference), kind)
    assert (want_losses.abs() > 1e-3).all()
    for losses, grads in _spawn_model(tmp_path, world, nkv, kind, **extra):
        torch.testing.assert_close(losses, want_losses, rtol=1e-5, atol=1e-5)
        assert grads.keys() == want_grads.keys()
        for name, want in want_grads.items():
            torch.testing.assert_close(grads[name], want, rtol=1e-5, atol=1e-5, msg=name)
