"""Choosing and building an engine."""

from __future__ import annotations

import torch

from polar_train.config import Config
from polar_train.engine.deepspeed import DeepSpeedEngine
from polar_train.engine.dist import Dist
from polar_train.engine.protocol import DTYPES, Engine
from polar_train.engine.torch import TorchEngine
from polar_train.errors import UserError
from polar_train.model.build import ModelSource


def resolve_precision(precision: str, device: torch.device) -> str:
    """``fp32`` | ``bf16`` | ``fp16``. ``auto`` = bf16 on a GPU that supports it, else fp32."""
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return "bf16" if bf16_ok else "fp32"
    if precision == "bf16" and device.type == "cuda" and not bf16_ok:
        raise UserError("train.precision", f"bf16 is not supported on {torch.cuda.get_device_name(device)}",
                        "use train.precision=fp16 (loss scaling) or fp32")
    return precision  # bf16 / fp16 on a CPU: autocast runs them, slowly


def build_engine(cfg: Config, dist: Dist, source: ModelSource, *, load_weights: bool = True) -> Engine:
    """``TorchEngine`` for one process without DeepSpeed, else ``DeepSpeedEngine``.

    ``load_weights=False`` when a checkpoint will overwrite the weights (resume).
    """
    precision = resolve_precision(cfg.train.precision, dist.device)
    if not dist.uses_deepspeed:  # fp32 parameters; autocast computes in the precision's dtype
        # LoRA: the frozen base held in the compute dtype (no fp32 copy), the trainable parameters in fp32
        dtype = DTYPES[precision] if cfg.model.lora.enabled else torch.float32
        model = source.build(cfg.model, dist.device, dtype, DTYPES[precision], load_weights=load_weights,
                             trainable_dtype=torch.float32)
        return TorchEngine(model, cfg.optimizer, dist.device, precision)
    return DeepSpeedEngine(cfg, dist, source, precision, load_weights=load_weights)
