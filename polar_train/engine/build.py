"""Choosing and building an engine."""

from __future__ import annotations

import torch

from polar_train.config import DeepSpeedSection, EngineSection, ModelSection, OptimizerSection
from polar_train.engine.deepspeed import DeepSpeedEngine
from polar_train.engine.dist import Dist
from polar_train.engine.protocol import DTYPES, Engine, resolve_precision
from polar_train.engine.torch import TorchEngine
from polar_train.model.build import ModelSource


def build_engine(dist: Dist, source: ModelSource, *, model: ModelSection, optimizer: OptimizerSection,
                 deepspeed: DeepSpeedSection, engine: EngineSection, load_weights: bool = True) -> Engine:
    """``TorchEngine`` for one process without DeepSpeed, else ``DeepSpeedEngine``; each config
    section is the one its name says.

    ``load_weights=False`` when a checkpoint will overwrite the weights (resume).
    """
    precision = resolve_precision(engine.precision, dist.device)
    if not dist.uses_deepspeed:  # fp32 parameters; autocast computes in the precision's dtype
        # LoRA: the frozen base held in the compute dtype (no fp32 copy), the trainable parameters in fp32
        dtype = DTYPES[precision] if model.lora.enabled else torch.float32
        built = source.build(model, dist.device, dtype, DTYPES[precision], load_weights=load_weights,
                             trainable_dtype=torch.float32)
        return TorchEngine(built, optimizer, dist.device, precision)
    return DeepSpeedEngine(dist, source, precision, model=model, optimizer=optimizer, deepspeed=deepspeed,
                           load_weights=load_weights)
