"""Write a random-weight checkpoint with POLAR-1.8B-Base's shapes (issue 17, item 2).

    python scripts/make_polar_shaped.py OUT_DIR [--layers 24] [--hidden 2048] [--intermediate 8192]

The layout is the official InternLM2ForRewardModel one (the same tensor names and config keys as
``../shared/fixtures/internlm2-reward-tiny``): vocab 92544, 16 query heads over 8 key/value heads,
bf16, several ``model-0000k-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``, and
the real tokenizer copied from ``../shared/fixtures/internlm2-real-tokenizer``.

Memory-frugal on purpose: each shard's tensors are drawn directly in bf16 and written before the next
shard is drawn, so the peak is one shard (the embedding, ~380 MB at full size), never the whole model.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
TOKENIZER = FIXTURES / "internlm2-real-tokenizer"
VOCAB = 92544
REWARD_TOKEN = 92527  # [UNUSED_TOKEN_130], the token POLAR's client appends (fixture README)


def config_json(layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int) -> dict:
    return {
        "architectures": ["InternLM2ForRewardModel"], "attn_implementation": "eager",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModel": "modeling_internlm2.InternLM2ForRewardModel"},
        "bias": False, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": hidden,
        "initializer_range": 0.02, "intermediate_size": intermediate, "max_position_embeddings": 32768,
        "model_type": "internlm2", "num_attention_heads": heads, "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads, "pad_token_id": 2, "pretraining_tp": 1,
        "reward_token_id": REWARD_TOKEN, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 2.0, "type": "dynamic"}, "rope_theta": 1000000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.49.0",
        "use_cache": True, "vocab_size": VOCAB,
    }


def layer_shapes(i: int, hidden: int, heads: int, kv_heads: int, intermediate: int) -> dict[str, tuple[int, ...]]:
    head_dim = hidden // heads
    p = f"model.layers.{i}."
    return {p + "attention.wqkv.weight": ((heads + 2 * kv_heads) * head_dim, hidden),
            p + "attention.wo.weight": (hidden, hidden),
            p + "attention_norm.weight": (hidden,),
            p + "feed_forward.w1.weight": (intermediate, hidden),
            p + "feed_forward.w2.weight": (hidden, intermediate),
            p + "feed_forward.w3.weight": (intermediate, hidden),
            p + "ffn_norm.weight": (hidden,)}


def draw(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16) \
        if len(shape) == 1 or shape[0] * shape[-1] < 2**22 else _draw_rows(shape, gen)


def _draw_rows(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    # Row blocks in fp32 then bf16: never an fp32 copy of a whole large matrix.
    out = torch.empty(shape, dtype=torch.bfloat16)
    step = max(1, 2**22 // shape[-1])
    for r in range(0, shape[0], step):
        out[r:r + step] = (torch.randn((min(step, shape[0] - r), shape[-1]), generator=gen) * 0.02).to(torch.bfloat16)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--layers-per-shard", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(a.seed)
    # Shard 1: the embedding; then the layers in groups; the last shard also holds the final norm and v_head.
    groups: list[dict[str, tuple[int, ...]]] = [{"model.tok_embeddings.weight": (VOCAB, a.hidden)}]
    for start in range(0, a.layers, a.layers_per_shard):
        group: dict[str, tuple[int, ...]] = {}
        for i in range(start, min(a.layers, start + a.layers_per_shard)):
            group.update(layer_shapes(i, a.hidden, a.heads, a.kv_heads, a.intermediate))
        groups.append(group)
    groups[-1].update({"model.norm.weight": (a.hidden,), "v_head.weight": (1, a.hidden)})
    weight_map: dict[str, str] = {}
    total = 0
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: draw(name, shape, gen) for name, shape in group.items()}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    (out / "config.json").write_text(json.dumps(
        config_json(a.layers, a.hidden, a.heads, a.kv_heads, a.intermediate), indent=2) + "\n", encoding="utf-8")
    for f in TOKENIZER.iterdir():
        if f.name not in ("expected.json", "rows.jsonl"):
            shutil.copy2(f, out / f.name)
    print(f"{out}: {len(groups)} shards, {total / 2**30:.2f} GiB bf16")


if __name__ == "__main__":
    main()
