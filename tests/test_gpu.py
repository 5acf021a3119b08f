"""CUDA attention backends against the SDPA reference, bf16 (runs only where CUDA is present).

The varlen kernels (flash-attn, torch's varlen_attn) must give the rewards and gradients of
the per-sequence SDPA path within bf16 tolerance, for plain and shared-prefix layouts.
"""

import random

import pytest
import torch

from polar_train.loss import pair_losses
from polar_train.model import InternLM2RewardModel, ModelConfig
from polar_train.model.attention import BACKENDS, resolve_attention
from polar_train.packing import build_micro_batch
from polar_train.errors import UserError

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def available_varlen_backends() -> list[str]:
    found = []
    for name in ("flash_attn", "torch_varlen"):
        try:
            resolve_attention(name, torch.device("cuda"), torch.bfloat16)
            found.append(name)
        except UserError:
            pass
    return found


def pairs(n: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prefix = [1] + [rng.randrange(5, 500) for _ in range(rng.randrange(20, 300))]
        out.append((prefix + [rng.randrange(5, 500) for _ in range(rng.randrange(1, 200))] + [4],
                    prefix + [rng.randrange(5, 500) for _ in range(rng.randrange(1, 200))] + [4]))
    return out


@pytest.mark.parametrize("shared", [True, False])
def test_varlen_backends_match_sdpa_in_bf16(shared):
    backends = available_varlen_backends()
    if not backends:
        pytest.skip("neither flash-attn nor torch varlen_attn is usable here")
    assert set(backends) <= set(BACKENDS)
    config = ModelConfig.fresh(hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                               intermediate_size=512, vocab_size=512, reward_token_id=4)
    model = InternLM2RewardModel(config, attention="sdpa")
    model.init_weights(0)
    model = model.cuda().to(torch.bfloat16)
    mb = build_micro_batch(pairs(6), shared_prefix=shared).to("cuda")

    def rewards_and_grads(backend: str):
        model.attention = backend
        model.zero_grad(set_to_none=True)
        rewards = model(mb.input_ids, mb.position_ids, mb.meta, mb.seq_index[torch.cat([mb.better, mb.worse])]).float()
        chosen, rejected = rewards.chunk(2)
        pair_losses(chosen, rejected).mean().backward()
        return rewards.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters()}

    ref_rewards, ref_grads = rewards_and_grads("sdpa")
    for backend in backends:
        rewards, grads = rewards_and_grads(backend)
        # bf16: ~3 significant digits per op; two layers keep the error within a few percent
        assert torch.allclose(rewards, ref_rewards, atol=5e-2 * ref_rewards.abs().max().item() + 1e-2), backend
        for name, g in grads.items():
            scale = ref_grads[name].abs().max().clamp_min(1e-6)
            assert (g - ref_grads[name]).abs().max() / scale < 5e-2, (backend, name)
