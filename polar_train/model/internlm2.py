"""InternLM2ForRewardModel in the official Hugging Face layout, over a packed (varlen) token axis.

Legend: T = tokens in a flat micro-batch, N = rewards asked for (one per sequence), H = hidden
size, nh = query heads, nkv = key/value heads, g = nh // nkv, hd = head dim, I = FFN size.

Parameter names equal the checkpoint's tensor names (SPEC section 4), so ``state_dict()`` can be
written to and read from a POLAR checkpoint with no renaming:

    model.tok_embeddings.weight                   [V, H]
    model.layers.{i}.attention_norm.weight        [H]
    model.layers.{i}.attention.wqkv.weight        [(nh + 2 * nkv) * hd, H]
    model.layers.{i}.attention.wo.weight          [H, nh * hd]
    model.layers.{i}.ffn_norm.weight              [H]
    model.layers.{i}.feed_forward.w1/w3.weight    [I, H]
    model.layers.{i}.feed_forward.w2.weight       [H, I]
    model.norm.weight                             [H]
    v_head.weight                                 [1, H]

The model holds no buffers: RoPE angles are computed per forward from the position ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from polar_train.errors import UserError
from polar_train.model.attention import AttentionPlan, plan_attention, varlen_attention
from polar_train.model.ulysses import SequenceCut, SequenceGroup, gather_sequence, ulysses_attention
from polar_train.model.varlen import VarlenMeta

_REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
_ROPE_TYPES = ("dynamic", "linear")


@dataclass
class ModelConfig:
    """The fields of an InternLM2 ``config.json`` the model uses, plus the raw dict (``raw``).

    ``raw`` keeps every original key so an export writes them all back unchanged. Defaults for
    optional keys are those of the official ``InternLM2Config``.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"type": "dynamic" | "linear", "factor": f}
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    reward_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 2
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_type(self) -> str | None:
        if not self.rope_scaling:
            return None
        return self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))

    @property
    def share_max_len(self) -> int | None:
        """Longest sequence whose common prefix with others may run once (``packing.prefix_to_share``),
        or None for no limit: dynamic RoPE gives a longer sequence its own base, so its prefix differs."""
        return self.max_position_embeddings if self.rope_type == "dynamic" else None

    @property
    def rope_factor(self) -> float:
        return float(self.rope_scaling["factor"]) if self.rope_scaling else 1.0

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Validate and parse a config dict; ``source`` names the file in error messages."""
        if not isinstance(d, dict):
            raise UserError(source, "is not a JSON object", "expected a Hugging Face config.json")
        missing = [k for k in _REQUIRED_KEYS if d.get(k) is None]
        if missing:
            raise UserError(source, f"key(s) {', '.join(map(repr, missing))} missing",
                            "expected an InternLM2 config.json (model_type 'internlm2')")

        def integer(key: str, value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(source, f"key '{key}' is {value!r}", "expected a positive integer")
            return value

        def number(key: str, value: Any) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise UserError(source, f"key '{key}' is {value!r}", "expected a positive number")
            return float(value)

        def token(key: str, default: int | None) -> int | None:
            value = d.get(key, default)
            if value is None:
                return None
            if isinstance(value, list):  # some configs list several eos ids; keep the first
                value = value[0] if value else None
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise UserError(source, f"key '{key}' is {value!r}", "expected an integer token id")
            return value

        nh = integer("num_attention_heads", d["num_attention_heads"])
        nkv_raw = d.get("num_key_value_heads")
        nkv = nh if nkv_raw is None else integer("num_key_value_heads", nkv_raw)
        hidden = integer("hidden_size", d["hidden_size"])
        if hidden % nh:
            raise UserError(source, f"key 'hidden_size' ({hidden}) is not divisible by "
                            f"'num_attention_heads' ({nh})", "fix the config")
        if nh % nkv:
            raise UserError(source, f"key 'num_attention_heads' ({nh}) is not divisible by "
                            f"'num_key_value_heads' ({nkv})", "fix the config")
        if (hidden // nh) % 2:
            raise UserError(source, f"head dim {hidden // nh} is odd", "RoPE needs an even head dim")
        if d.get("bias") is True:
            raise UserError(source, "key 'bias' is true", "POLAR / InternLM2 reward models have no biases")
        if d.get("hidden_act", "silu") != "silu":
            raise UserError(source, f"key 'hidden_act' is {d['hidden_act']!r}", "only 'silu' is supported")
        if d.get("tie_word_embeddings") is True:
            raise UserError(source, "key 'tie_word_embeddings' is true", "expected false (SPEC 4)")
        scaling = d.get("rope_scaling")
        if scaling is not None:
            kind = scaling.get("type", scaling.get("rope_type")) if isinstance(scaling, dict) else None
            if kind not in _ROPE_TYPES or not isinstance(scaling.get("factor"), (int, float)):
                raise UserError(source, f"key 'rope_scaling' is {scaling!r}",
                                'expected null or {"type": "dynamic" | "linear", "factor": <number>}')
            if kind == "dynamic" and scaling["factor"] < 1.0:
                raise UserError(source, f"key 'rope_scaling.factor' is {scaling['factor']}", "expected >= 1")
        return cls(
            vocab_size=integer("vocab_size", d["vocab_size"]),
            hidden_size=hidden,
            num_hidden_layers=integer("num_hidden_layers", d["num_hidden_layers"]),
            num_attention_heads=nh,
            num_key_value_heads=nkv,
            intermediate_size=integer("intermediate_size", d["intermediate_size"]),
            rms_norm_eps=number("rms_norm_eps", d.get("rms_norm_eps", 1e-6)),
            rope_theta=number("rope_theta", d.get("rope_theta", 10000.0)),
            rope_scaling=dict(scaling) if scaling else None,
            max_position_embeddings=integer("max_position_embeddings", d.get("max_position_embeddings", 2048)),
            initializer_range=number("initializer_range", d.get("initializer_range", 0.02)),
            reward_token_id=token("reward_token_id", None),
            bos_token_id=token("bos_token_id", 1),
            eos_token_id=token("eos_token_id", 2),
            pad_token_id=token("pad_token_id", 2),
            raw=json.loads(json.dumps(d)),  # deep copy
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise UserError(path, "config file not found", "point to a Hugging Face checkpoint folder")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(path, f"is not valid JSON ({e})", "restore the checkpoint's config.json") from None
        return cls.from_dict(d, source=str(path))

    @classmethod
    def fresh(cls, hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
              num_key_value_heads: int, intermediate_size: int, vocab_size: int,
              reward_token_id: int, *, max_position_embeddings: int = 4096, rope_theta: float = 1e6,
              rope_scaling: dict[str, Any] | None = None, rms_norm_eps: float = 1e-5,
              initializer_range: float = 0.02, bos_token_id: int = 1, eos_token_id: int = 2,
              pad_token_id: int = 2) -> "ModelConfig":
        """A complete config in the official POLAR / InternLM2 form, for a fresh (demo) model.

        ``rope_scaling`` defaults to POLAR's ``{"type": "dynamic", "factor": 2.0}``.
        """
        d = {
            "architectures": ["InternLM2ForRewardModel"],
            "attn_implementation": "eager",
            "auto_map": {
                "AutoConfig": "configuration_internlm2.InternLM2Config",
                "AutoModel": "modeling_internlm2.InternLM2ForRewardModel",
            },
            "bias": False,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "hidden_act": "silu",
            "hidden_size": hidden_size,
            "initializer_range": initializer_range,
            "intermediate_size": intermediate_size,
            "max_position_embeddings": max_position_embeddings,
            "model_type": "internlm2",
            "num_attention_heads": num_attention_heads,
            "num_hidden_layers": num_hidden_layers,
            "num_key_value_heads": num_key_value_heads,
            "pad_token_id": pad_token_id,
            "pretraining_tp": 1,
            "reward_token_id": reward_token_id,
            "rms_norm_eps": rms_norm_eps,
            "rope_scaling": rope_scaling if rope_scaling is not None else {"type": "dynamic", "factor": 2.0},
            "rope_theta": rope_theta,
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
            "use_cache": True,
            "vocab_size": vocab_size,
        }
        return cls.from_dict(d, source="ModelConfig.fresh")


class RMSNorm(nn.Module):
    """``w * (x / sqrt(mean(x^2) + eps))`` computed in fp32, cast back before the weight (as InternLM2)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(config: ModelConfig, position_ids: torch.Tensor,
                 seq_len_per_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables ``cos, sin`` of shape [T, hd] in fp32 for the rotate-half form (SPEC 4).

    Standard: ``inv_freq = 1 / theta^(arange(0, hd, 2) / hd)``. Dynamic NTK scaling changes the
    base only for tokens whose sequence length ``n`` exceeds ``max_position_embeddings``:
    ``base' = theta * ((f * n / max_pos) - (f - 1)) ** (hd / (hd - 2))`` (InternLM2's
    ``InternLM2DynamicNTKScalingRotaryEmbedding``). Linear scaling divides positions by ``f``.
    """
    hd, theta, device = config.head_dim, config.rope_theta, position_ids.device
    exponent = torch.arange(0, hd, 2, device=device).float() / hd  # [hd/2]
    inv_freq = 1.0 / (theta ** exponent)  # [hd/2] fp32, exactly the reference formula
    pos = position_ids.float()  # [T]
    if config.rope_type == "linear":
        pos = pos / config.rope_factor
    freqs = pos[:, None] * inv_freq[None, :]  # [T, hd/2]
    if config.rope_type == "dynamic":
        f, max_pos = config.rope_factor, config.max_position_embeddings
        n = seq_len_per_token.to(device=device, dtype=torch.float64)  # [T]
        # Compute the base in fp64 like the reference's Python float; the power in fp32 as there.
        base = theta * ((f * n / max_pos) - (f - 1)) ** (hd / (hd - 2))  # [T]
        scaled = 1.0 / (base.float()[:, None] ** exponent[None, :])  # [T, hd/2]
        long = (seq_len_per_token > max_pos).to(device)[:, None]  # [T, 1]
        freqs = torch.where(long, pos[:, None] * scaled, freqs)
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, hd]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: [T, heads, hd]; cos, sin: [T, hd] (cast to x's dtype, as InternLM2)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # rotate_half(x)
    cos, sin = cos.to(x.dtype)[:, None, :], sin.to(x.dtype)[:, None, :]
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.nh, self.nkv, self.hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.wqkv = nn.Linear(config.hidden_size, (self.nh + 2 * self.nkv) * self.hd, bias=False)
        self.wo = nn.Linear(self.nh * self.hd, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: AttentionPlan,
                keep: torch.Tensor | None = None, cut: SequenceCut | None = None) -> torch.Tensor:
        """x: [T, H] -> [T, H], or [N, H] for the rows ``keep`` only (keys still use all T). Under
        sequence parallelism (``cut``) x is this rank's [T_r, H] and attention exchanges heads for tokens."""
        T, g = x.shape[0], self.nh // self.nkv
        # wqkv rows grouped per KV head: [g query heads, 1 key, 1 value] (SPEC 4).
        qkv = self.wqkv(x).view(T, self.nkv, g + 2, self.hd)  # [T, nkv, g+2, hd]
        q = qkv[:, :, :g].reshape(T, self.nh, self.hd)  # [T, nh, hd], head h uses kv head h // g
        k = qkv[:, :, g]  # [T, nkv, hd]
        v = qkv[:, :, g + 1]  # [T, nkv, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = varlen_attention(q, k, v, plan) if cut is None else ulysses_attention(q, k, v, plan, cut)  # [T, nh, hd]
        out = out.reshape(T, self.nh * self.hd)
        if keep is not None:
            out = out.index_select(0, keep)  # [N, nh*hd]
        return self.wo(out)


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: AttentionPlan,
                keep: torch.Tensor | None = None, cut: SequenceCut | None = None) -> torch.Tensor:
        """Pre-norm block. x: [T, H] -> [T, H]; with ``keep`` ([N]) only those rows are returned."""
        h = self.attention(self.attention_norm(x), cos, sin, plan, keep, cut)
        x = (x if keep is None else x.index_select(0, keep)) + h
        return x + self.feed_forward(self.ffn_norm(x))


class Backbone(nn.Module):
    """The ``model.`` prefix of the checkpoint: embeddings, decoder layers, final norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                           padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class InternLM2RewardModel(nn.Module):
    """POLAR reward model over a packed token axis; ``attention`` is a resolved backend name.

    Example (two sequences of 3 and 2 tokens, rewards at their last tokens)::

        meta = VarlenMeta.from_lengths([3, 2])
        rewards = model(ids, torch.tensor([0, 1, 2, 0, 1]), meta, torch.tensor([2, 4]))  # [2] fp32
    """

    def __init__(self, config: ModelConfig, attention: str = "sdpa",
                 gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.config = config
        self.attention = attention
        self.gradient_checkpointing = gradient_checkpointing
        self.model = Backbone(config)
        self.v_head = nn.Linear(config.hidden_size, 1, bias=False)
        # set by engine.sequence_parallel when train.sequence_parallel > 1: each forward then runs on
        # this rank's cut of the tokens (model/ulysses.py); every rank of the group calls it with the same batch
        self.sequence_group: SequenceGroup | None = None

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Fresh weights: normal(0, initializer_range) for linears and embeddings (v_head too),
        ones for norms, a zero padding row (as InternLM2's ``_init_weights``). Device-independent:
        values are drawn on the CPU from one generator in parameter order."""
        gen = torch.Generator().manual_seed(seed)
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                w = torch.empty(module.weight.shape).normal_(0.0, std, generator=gen)
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    w[module.padding_idx] = 0.0
                module.weight.copy_(w)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor, meta: VarlenMeta,
                      keep: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states: [T, H], or [N, H] at rows ``keep`` (the last layer's
        output projection and FFN then run on those rows only). Under sequence parallelism this
        rank's cut only, [T_r, H] (``keep`` must be None)."""
        assert input_ids.dim() == 1 and input_ids.shape == position_ids.shape, "flat [T] inputs expected"
        plan = plan_attention(meta, self.attention, num_tokens=input_ids.shape[0])  # the whole axis, also under SP
        seq_len = meta.seq_len_per_token
        cut = self.sequence_group.cut(input_ids.shape[0]) if self.sequence_group is not None else None
        if cut is not None:  # this rank's tokens; positions stay global within each sequence (RoPE)
            assert keep is None, "sequence parallelism computes every row of its cut"
            input_ids, position_ids, seq_len = (t[cut.start:cut.end] for t in (input_ids, position_ids, seq_len))
        cos, sin = rope_cos_sin(self.config, position_ids, seq_len)  # [T, hd] each
        x = self.model.tok_embeddings(input_ids)  # [T, H]
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            layer_keep = keep if i == last else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, plan, layer_keep, cut, use_reentrant=False)
            else:
                x = layer(x, cos, sin, plan, layer_keep, cut)
        return self.model.norm(x)

    def _token_values(self, input_ids: torch.Tensor, position_ids: torch.Tensor, meta: VarlenMeta) -> torch.Tensor:
        """[T] fp32 v_head output at every flat position; under SP computed on the cut, then gathered."""
        h = self.hidden_states(input_ids, position_ids, meta)  # [T, H] or [T_r, H]
        values = F.linear(h.float(), self.v_head.weight.float()).squeeze(-1)
        if self.sequence_group is None:
            return values
        return gather_sequence(values, self.sequence_group.cut(input_ids.shape[0]))  # [T_r] -> [T]

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, meta: VarlenMeta,
                reward_index: torch.Tensor) -> torch.Tensor:
        """Rewards [N] fp32: the v_head output at flat positions ``reward_index`` ([N] int64).

        input_ids, position_ids: [T] int64. The v_head runs in fp32 on the N selected rows.
        """
        if self.sequence_group is not None:  # each rank reads the reward tokens from the gathered values
            return self._token_values(input_ids, position_ids, meta)[reward_index]
        h = self.hidden_states(input_ids, position_ids, meta, keep=reward_index)  # [N, H]
        return F.linear(h.float(), self.v_head.weight.float()).squeeze(-1)  # [N]

    def score_tokens(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                     meta: VarlenMeta) -> torch.Tensor:
        """v_head output at every flat position: [T] fp32 (the reward is the value at a last token)."""
        return self._token_values(input_ids, position_ids, meta)


def num_parameters(config: ModelConfig) -> int:
    """Parameter count implied by a config (for logs and shard planning)."""
    H, I, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim * H
    per_layer = qkv + config.num_attention_heads * config.head_dim * H + 3 * H * I + 2 * H
    return config.vocab_size * H + L * per_layer + H + H

