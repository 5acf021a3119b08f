"""Where a run's starting weights come from: a base HF folder (``model.path``) or a fresh init.

``ModelSource`` is what the engines build their model from; it knows the model's config, the
folder whose tokenizer and remote-code files an export copies, and how to read the starting
weights one tensor at a time (ZeRO-3 loads them partitioned).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from polar_train.adapters import HEAD
from polar_train.config import ModelSection
from polar_train.errors import UserError
from polar_train.model import hf
from polar_train.model.attention import resolve_attention
from polar_train.model.hf import load_model
from polar_train.model.internlm2 import InternLM2RewardModel, ModelConfig
from polar_train.model.lora import add_adapters
from polar_train.tokenizer import load_tokenizer, special_token_ids

log = logging.getLogger("polar_train")


@dataclass
class ModelSource:
    """The model's config and where its starting weights come from: the base HF folder
    ``model.path``, or a fresh init of ``model.fresh``'s shape drawn from ``seed``."""

    config: ModelConfig
    files_dir: Path  # tokenizer + *.py copied into exports: the base folder or the fresh tokenizer
    path: str = ""  # base HF folder; "" = fresh
    seed: int = 0

    @classmethod
    def from_config(cls, model: ModelSection, seed: int) -> "ModelSource":
        if model.path:
            path = Path(model.path)
            if not (path / "config.json").is_file():
                raise UserError("model.path", f"{path} is not a Hugging Face model folder (no config.json)",
                                "give the folder of a POLAR base checkpoint")
            if model.fresh.tokenizer:
                log.info("model.path is set: the fresh-model shape (model.fresh) is not used")
            return cls(ModelConfig.from_file(path / "config.json"), path, str(path), seed)
        fresh = model.fresh
        tokenizer = load_tokenizer(fresh.tokenizer)
        _, reward_id = special_token_ids(tokenizer, None)
        config = ModelConfig.fresh(
            vocab_size=len(tokenizer), hidden_size=fresh.hidden_size,
            num_hidden_layers=fresh.num_layers, num_attention_heads=fresh.num_heads,
            num_key_value_heads=fresh.num_kv_heads, intermediate_size=fresh.intermediate_size,
            max_position_embeddings=fresh.max_position_embeddings, rope_theta=fresh.rope_theta,
            reward_token_id=reward_id,
        )
        return cls(config, Path(fresh.tokenizer), "", seed)

    def build(self, model: ModelSection, device: torch.device, dtype: torch.dtype, compute_dtype: torch.dtype, *,
              load_weights: bool = True, partitioned: bool = False,
              trainable_dtype: torch.dtype | None = None) -> InternLM2RewardModel:
        """The whole model on ``device`` in ``dtype``. ``load_weights=False``: uninitialised memory
        (a checkpoint overwrites it); ``partitioned``: plain construction inside ``zero.Init``.

        With ``model.lora`` on, the base is frozen in ``dtype`` and the adapters and ``v_head``
        (the trainable parameters) are held in ``trainable_dtype`` (default ``dtype``): the
        plain engine keeps fp32 masters of those only; the head is read again from the source
        in that dtype, so it starts from the base's exact value.
        """
        built = self._build_base(model, device, dtype, compute_dtype, load_weights=load_weights,
                                 partitioned=partitioned)
        if not model.lora.enabled:
            return built
        add_adapters(built, model.lora, self.seed)
        if partitioned:  # inside zero.Init: DeepSpeed places and casts the new parameters itself
            return built
        trainable_dtype = trainable_dtype or dtype
        for param in built.parameters():
            if param.requires_grad:
                param.data = param.data.to(device=device, dtype=trainable_dtype)
        if load_weights and trainable_dtype != dtype:
            with self.tensors() as get, torch.no_grad():
                built.v_head.weight.copy_(get(HEAD))
        return built

    def _build_base(self, model: ModelSection, device: torch.device, dtype: torch.dtype, compute_dtype: torch.dtype, *,
                    load_weights: bool, partitioned: bool) -> InternLM2RewardModel:
        attention = resolve_attention(model.attention, device, compute_dtype)
        ckpt = model.gradient_checkpointing
        if partitioned:
            return InternLM2RewardModel(self.config, attention, ckpt)
        if not load_weights:
            with torch.device("meta"):
                empty = InternLM2RewardModel(self.config, attention, ckpt)
            return empty.to_empty(device=device).to(dtype)
        if self.path:
            loaded = load_model(self.path, attention="sdpa", dtype=dtype, device=device, gradient_checkpointing=ckpt)
            loaded.attention = attention  # resolved for the compute dtype (autocast), not the storage one
            return loaded
        fresh = InternLM2RewardModel(self.config, attention, ckpt)
        fresh.init_weights(self.seed)
        log.info("fresh model: %.2fM parameters", sum(p.numel() for p in fresh.parameters()) / 1e6)
        return fresh.to(device=device, dtype=dtype)

    @contextlib.contextmanager
    def tensors(self) -> Iterator[Callable[[str], torch.Tensor]]:
        """``get(name) -> tensor``, one tensor at a time (memory ~ one tensor). Opening checks the
        names and shapes against the config (headers only)."""
        if self.path:
            kind, files = hf.weight_files(self.path)
            with ExitStack() as stack:
                weights = hf.WeightReader(kind, files, stack)
                hf.check_tensors(weights.shapes(), self.config, self.path)
                yield weights.get
            return
        fresh: dict[str, torch.Tensor] = {}

        def get(name: str) -> torch.Tensor:
            if not fresh:  # fresh models are small (demo, tests): build it whole, once, on first use
                model = InternLM2RewardModel(self.config)
                model.init_weights(self.seed)
                fresh.update(model.state_dict())
            return fresh[name]

        yield get


def export_dtype(setting: str, config: ModelConfig) -> str:
    """``checkpoint.export_dtype`` resolved: ``auto`` = the base checkpoint's dtype (float32 if fresh)."""
    if setting != "auto":
        return setting
    base = config.raw.get("torch_dtype") or config.raw.get("dtype")
    return base if base in ("float32", "bfloat16", "float16") else "float32"
