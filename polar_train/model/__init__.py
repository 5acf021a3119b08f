"""The POLAR reward model (InternLM2ForRewardModel layout), its attention backends and HF I/O."""

from polar_train.model.attention import BACKENDS, resolve_attention
from polar_train.model.hf import (
    WeightReader,
    check_checkpoint_folder,
    checkpoint_shapes,
    load_model,
    parse_size,
    save_model,
    save_state_dict,
    weight_files,
)
from polar_train.model.internlm2 import InternLM2RewardModel, ModelConfig
from polar_train.model.varlen import VarlenMeta

__all__ = [
    "BACKENDS",
    "InternLM2RewardModel",
    "ModelConfig",
    "VarlenMeta",
    "WeightReader",
    "check_checkpoint_folder",
    "checkpoint_shapes",
    "load_model",
    "parse_size",
    "resolve_attention",
    "save_model",
    "save_state_dict",
    "weight_files",
]
