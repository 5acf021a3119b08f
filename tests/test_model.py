"""The reward model: fixture parity, packing invariances, shared prefixes, RoPE, head layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from polar_train.errors import UserError
from polar_train.model import InternLM2RewardModel, ModelConfig, VarlenMeta, load_model, resolve_attention

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "internlm2-reward-tiny"


def tiny_model(seed: int = 0, **overrides) -> InternLM2RewardModel:
    """Fresh fp32 model: 2 layers, 6 query heads over 2 KV heads (g = 3), head dim 8."""
    kw = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
              intermediate_size=96, vocab_size=64, reward_token_id=63)
    kw.update(overrides)
    model = InternLM2RewardModel(ModelConfig.fresh(**kw))
    model.init_weights(seed)
    with torch.no_grad():  # larger weights than the 0.02 init so attention is far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10.0)
    return model


def pack(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, VarlenMeta, torch.Tensor]:
    """Plain packing: ids [T], positions [T], meta, reward index [S] (last token of each)."""
    lens = [len(s) for s in seqs]
    ids = torch.tensor([t for s in seqs for t in s])
    pos = torch.cat([torch.arange(n) for n in lens])
    return ids, pos, VarlenMeta.from_lengths(lens), torch.tensor(lens).cumsum(0) - 1


def pack_shared(prefix: list[int], c: list[int], r: list[int]):
    """One pair laid out once as [prefix | c | r] (SPEC 6), built by hand from the varlen.py contract."""
    P, Lc, Lr = len(prefix), len(c), len(r)
    ids = torch.tensor(prefix + c + r)
    pos = torch.cat([torch.arange(P + Lc), torch.arange(P, P + Lr)])
    key_index = torch.cat([torch.arange(P + Lc), torch.arange(P), torch.arange(P + Lc, P + Lc + Lr)])
    meta = VarlenMeta(
        cu_seqlens_q=torch.tensor([0, P + Lc, P + Lc + Lr], dtype=torch.int32),
        cu_seqlens_k=torch.tensor([0, P + Lc, 2 * P + Lc + Lr], dtype=torch.int32),
        key_index=key_index, max_seqlen_q=max(P + Lc, Lr), max_seqlen_k=max(P + Lc, P + Lr),
        seq_len_per_token=torch.tensor([P + Lc] * (P + Lc) + [P + Lr] * Lr),
    )
    return ids, pos, meta, torch.tensor([P + Lc - 1, P + Lc + Lr - 1])


def rand_seqs(lengths: list[int], seed: int = 0, vocab: int = 63) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() + [63] for n in lengths]


def grads(model: InternLM2RewardModel, rewards: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    (rewards * weights).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rel: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        err = (a[name] - b[name]).norm() / b[name].norm().clamp_min(1e-12)
        assert err <= rel, f"{name}: relative gradient error {err:.2e}"


# --- fixture parity --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture_model() -> InternLM2RewardModel:
    return load_model(FIXTURE)


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    return json.loads((FIXTURE / "expected.json").read_text())["cases"]


def test_fixture_rewards_one_sequence_per_forward(fixture_model, cases):
    with torch.no_grad():
        for case in cases:
            ids, pos, meta, idx = pack([case["input_ids"]])
            reward = fixture_model(ids, pos, meta, idx)
            assert reward.dtype == torch.float32 and reward.shape == (1,)
            assert abs(reward.item() - case["reward"]) <= 1e-4, case["input_ids"][:5]


def test_fixture_rewards_packed_in_one_forward(fixture_model, cases):
    with torch.no_grad():
        rewards = fixture_model(*pack([c["input_ids"] for c in cases]))
    expected = torch.tensor([c["reward"] for c in cases])
    assert (rewards - expected).abs().max().item() <= 1e-4


def test_score_tokens_ends_with_the_reward(fixture_model, cases):
    ids, pos, meta, idx = pack([c["input_ids"] for c in cases[:3]])
    with torch.no_grad():
        per_token = fixture_model.score_tokens(ids, pos, meta)
        rewards = fixture_model(ids, pos, meta, idx)
    assert per_token.shape == ids.shape
    torch.testing.assert_close(per_token[idx], rewards, rtol=0, atol=1e-6)


# --- packing invariances ---------------------------------------------------------------------


def test_packed_matches_alone():
    model = tiny_model()
    seqs = rand_seqs([1, 9, 30, 4, 17])
    with torch.no_grad():
        packed = model(*pack(seqs))
        alone = torch.cat([model(*pack([s])) for s in seqs])
    assert (packed - alone).abs().max().item() <= 1e-5


def test_changing_one_sequence_leaves_the_others_alone():
    model = tiny_model(seed=1)
    seqs = rand_seqs([12, 20, 7], seed=3)
    edited = [list(s) for s in seqs]
    edited[1][5] = (edited[1][5] + 1) % 63
    with torch.no_grad():
        a, b = model(*pack(seqs)), model(*pack(edited))
    assert (a[1] - b[1]).abs().item() > 1e-4  # the edit matters to its own sequence
    assert (a[[0, 2]] - b[[0, 2]]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prefix_matches_separate_sequences(checkpointing):
    model = tiny_model(seed=2)
    model.gradient_checkpointing = checkpointing
    model.train()
    prefix, c, r = rand_seqs([14], seed=5)[0][:-1], rand_seqs([6], seed=6)[0], rand_seqs([9], seed=7)[0]
    weights = torch.tensor([1.0, -0.7])

    separate = model(*pack([prefix + c, prefix + r]))
    g_sep = grads(model, separate, weights)
    shared = model(*pack_shared(prefix, c, r))
    g_shared = grads(model, shared, weights)

    assert (shared - separate).abs().max().item() <= 1e-5
    assert_grads_close(g_shared, g_sep, rel=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model(seed=4)
    model.train()
    batch = pack(rand_seqs([10, 5, 21], seed=8))
    weights = torch.tensor([0.5, -1.0, 2.0])
    plain = grads(model, model(*batch), weights)
    model.gradient_checkpointing = True
    assert_grads_close(grads(model, model(*batch), weights), plain, rel=1e-6)


# --- an independent transcription of SPEC 4 (float64, explicit per-head matrices) -------------


def naive_reward(model: InternLM2RewardModel, ids: list[int]) -> float:
    """One sequence, written from SPEC 4 with loops and explicit slices; no code shared."""
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    nh, nkv, hd, L = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, len(ids)
    g = nh // nkv
    theta = cfg.rope_theta
    if cfg.rope_scaling and L > cfg.max_position_embeddings:  # dynamic NTK (SPEC 4)
        f = cfg.rope_scaling["factor"]
        theta = theta * ((f * L / cfg.max_position_embeddings) - (f - 1)) ** (hd / (hd - 2))

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    def rope(x):  # x: [L, hd]; pairs (i, i + hd/2) rotated by pos * theta^(-2i/hd)
        out = x.clone()
        for p in range(L):
            for i in range(hd // 2):
                a = p * theta ** (-2 * i / hd)
                x1, x2 = x[p, i], x[p, i + hd // 2]
                out[p, i], out[p, i + hd // 2] = x1 * math.cos(a) - x2 * math.sin(a), x2 * math.cos(a) + x1 * math.sin(a)
        return out

    x = sd["model.tok_embeddings.weight"][ids]  # [L, H]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        h = rms(x, sd[pre + "attention_norm.weight"])
        wqkv = sd[pre + "attention.wqkv.weight"]
        heads = []
        for head in range(nh):
            kv, j = divmod(head, g)
            block = kv * (g + 2)  # rows of this KV group: g queries, then key, then value
            wq = wqkv[(block + j) * hd:(block + j + 1) * hd]
            wk = wqkv[(block + g) * hd:(block + g + 1) * hd]
            wv = wqkv[(block + g + 1) * hd:(block + g + 2) * hd]
            q, k, v = rope(h @ wq.T), rope(h @ wk.T), h @ wv.T
            scores = (q @ k.T / math.sqrt(hd)).masked_fill(~causal, float("-inf"))
            heads.append(torch.softmax(scores, -1) @ v)
        x = x + torch.cat(heads, -1) @ sd[pre + "attention.wo.weight"].T
        h = rms(x, sd[pre + "ffn_norm.weight"])
        gate, up = h @ sd[pre + "feed_forward.w1.weight"].T, h @ sd[pre + "feed_forward.w3.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ sd[pre + "feed_forward.w2.weight"].T
    x = rms(x, sd["model.norm.weight"])
    return (x[-1] @ sd["v_head.weight"][0]).item()


def test_matches_naive_transcription_with_gqa_grouping():
    model = tiny_model(seed=5, rope_theta=1000.0)
    seqs = rand_seqs([11, 3], seed=9)
    with torch.no_grad():
        rewards = model(*pack(seqs))
    for got, s in zip(rewards.tolist(), seqs):
        assert abs(got - naive_reward(model, s)) <= 1e-4 * max(1.0, abs(got))


def test_dynamic_rope_scales_only_long_sequences():
    # max_position_embeddings 16: the 24-token sequence uses the scaled base, the 8-token one not
    model = tiny_model(seed=6, rope_theta=100.0, max_position_embeddings=16,
                       rope_scaling={"type": "dynamic", "factor": 2.0})
    seqs = rand_seqs([23, 7], seed=10)
    with torch.no_grad():
        rewards = model(*pack(seqs))
        unscaled = InternLM2RewardModel(ModelConfig.from_dict({**model.config.raw, "rope_scaling": None}))
        unscaled.load_state_dict(model.state_dict())
        plain = unscaled(*pack(seqs))
    for got, s in zip(rewards.tolist(), seqs):
        assert abs(got - naive_reward(model, s)) <= 1e-4 * max(1.0, abs(got))
    assert abs(rewards[0] - plain[0]).item() > 1e-3  # the long one changed
    assert abs(rewards[1] - plain[1]).item() <= 1e-6  # the short one did not


def test_linear_rope_divides_positions():
    from polar_train.model.internlm2 import rope_cos_sin

    cfg = tiny_model(rope_scaling={"type": "linear", "factor": 4.0}).config
    plain_cfg = ModelConfig.from_dict({**cfg.raw, "rope_scaling": None})
    pos = torch.tensor([0, 4, 8])
    cos, _ = rope_cos_sin(cfg, pos, torch.full((3,), 3))
    ref, _ = rope_cos_sin(plain_cfg, torch.tensor([0, 1, 2]), torch.full((3,), 3))
    torch.testing.assert_close(cos, ref)


# --- construction, config, backends ----------------------------------------------------------


def test_parameter_names_are_the_checkpoint_names(fixture_model):
    from safetensors import safe_open

    with safe_open(str(FIXTURE / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(fixture_model.state_dict())


def test_init_weights_is_deterministic_and_complete():
    a, b = tiny_model(seed=3), tiny_model(seed=3)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert a.v_head.weight.abs().sum() > 0
    assert torch.equal(a.model.norm.weight, torch.ones(48))
    assert not torch.equal(a.v_head.weight, tiny_model(seed=4).v_head.weight)


def test_bf16_forward_runs_and_stays_close(fixture_model, cases):
    model = load_model(FIXTURE, dtype=torch.bfloat16)
    batch = pack([c["input_ids"] for c in cases])
    with torch.no_grad():
        rewards = model(*batch)
    assert rewards.dtype == torch.float32
    assert (rewards - torch.tensor([c["reward"] for c in cases])).abs().max() < 0.2


def test_config_errors_name_the_file_and_key(tmp_path):
    good = json.loads((FIXTURE / "config.json").read_text())
    bad = dict(good)
    del bad["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match=r"config\.json.*'hidden_size'"):
        ModelConfig.from_file(tmp_path / "config.json")
    with pytest.raises(UserError, match="num_key_value_heads"):
        ModelConfig.from_dict({**good, "num_key_value_heads": 3}, source="x/config.json")
    with pytest.raises(UserError, match="rope_scaling"):
        ModelConfig.from_dict({**good, "rope_scaling": {"type": "yarn", "factor": 2.0}})
    cfg = ModelConfig.from_dict(good)
    assert (cfg.num_key_value_heads, cfg.rope_type, cfg.rope_factor, cfg.reward_token_id) == (2, "dynamic", 2.0, 127)


def test_resolve_attention_on_cpu():
    assert resolve_attention("auto", "cpu") == "sdpa"
    assert resolve_attention("sdpa", "cpu") == "sdpa"
    for name in ("flash_attn", "torch_varlen"):
        with pytest.raises(UserError, match=r"model\.attention.*CUDA"):
            resolve_attention(name, "cpu")
    with pytest.raises(UserError, match="unknown attention backend"):
        resolve_attention("flash", "cpu")
