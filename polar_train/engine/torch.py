"""``TorchEngine``: one process, plain PyTorch (the demo: no DeepSpeed import, no op compile)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch

from polar_train.config import OptimizerSection
from polar_train.engine.optim import adam_state, adam_step, build_optimizer, set_lr
from polar_train.engine.protocol import ADAM_MOMENTS, NamedState, StepResult


class TorchEngine:
    """One process, plain PyTorch AdamW; trainable parameters stay fp32 (a LoRA run's frozen base
    is in the compute dtype), autocast runs bf16 / fp16 (with a dynamic loss scale for fp16)."""

    kind = "torch"
    zero_stage = None
    rank = 0
    world_size = 1
    offload_optimizer = offload_params = False

    def __init__(self, model: torch.nn.Module, settings: OptimizerSection, device: torch.device,
                 precision: str = "fp32"):
        self.model = model.to(device)
        self.attention: str = model.attention
        self.device = device
        self.precision = precision
        self.grad_clip = settings.grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, settings)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def autocast(self) -> AbstractContextManager[Any]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> StepResult:
        """Clip and step. A non-finite gradient norm skips the update. One host sync, deliberate:
        deciding to skip needs it."""
        scale = 1.0
        if self.scaler:
            scale = float(self.scaler.get_scale())
            self.scaler.unscale_(self.optimizer)
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        applied = math.isfinite(norm)
        if self.scaler:
            self.scaler.step(self.optimizer)  # skips by itself when unscale_ found inf / nan
            self.scaler.update()
        elif applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(norm, applied, scale)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    @property
    def adam_step(self) -> int:
        return adam_step(self.optimizer)

    @property
    def loss_scale(self) -> float | None:
        return float(self.scaler.get_scale()) if self.scaler else None

    def named_state(self) -> Iterator[tuple[str, dict[str, torch.Tensor] | None]]:
        for name, param in self.model.named_parameters():
            if not param.requires_grad:  # a frozen base (LoRA) is the source's, not training state
                continue
            # empty before the first step: zero moments, as AdamW starts them
            state = self.optimizer.state.get(param, {})
            tensors = {"fp32": param, **{key: state[key] if state else torch.zeros_like(param) for key in ADAM_MOMENTS}}
            yield name, {key: t.detach().float().cpu() for key, t in tensors.items()}

    @torch.no_grad()
    def load_named_state(self, state: NamedState) -> None:
        named = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        state.check({name: p.shape for name, p in named.items()})
        for name, param in named.items():
            param.copy_(state.tensor(name, "fp32"))
            moments = adam_state(self.optimizer, param, state.adam_step)
            for key in ADAM_MOMENTS:
                moments[key].copy_(state.tensor(name, key))
        if self.scaler and state.loss_scale:
            self.scaler.load_state_dict({**self.scaler.state_dict(), "scale": state.loss_scale})

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().float().cpu() for name, p in self.model.named_parameters() if p.requires_grad}
