"""The optimizer both engines step (AdamW), its state by hand, and the LR written into it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from polar_train.config import OptimizerSection
from polar_train.engine.protocol import ADAM_MOMENTS


def adamw_settings(settings: OptimizerSection) -> dict[str, Any]:
    """The recipe's AdamW: lr, betas, weight decay, eps (DeepSpeedCPUAdam takes the same)."""
    return dict(lr=settings.lr, betas=tuple(settings.betas), weight_decay=settings.weight_decay, eps=1e-8)


def build_optimizer(params: Iterable[torch.nn.Parameter], settings: OptimizerSection) -> torch.optim.Optimizer:
    """AdamW with the recipe's betas. ``foreach=False``: one fixed arithmetic order, so exact resume
    and cross-engine comparisons hold (ZeRO flattens parameters: no speed lost there)."""
    return torch.optim.AdamW(params, foreach=False, **adamw_settings(settings))


def adam_state(optimizer: torch.optim.Optimizer, master: torch.Tensor, step: int) -> dict:
    """``optimizer.state[master]`` at ``step`` with zeroed moments, created the way AdamW /
    DeepSpeedCPUAdam create it at their first step (which has not happened yet after a resume).
    Existing moment tensors are zeroed in place: ZeRO may hold views of them."""
    state = optimizer.state[master]
    if not state:
        state["step"] = torch.tensor(0.0) if isinstance(optimizer, torch.optim.AdamW) else 0  # CPU Adam: an int
        for key in ADAM_MOMENTS:
            state[key] = torch.zeros_like(master, dtype=torch.float32)
    for key in ADAM_MOMENTS:
        state[key].zero_()
    if torch.is_tensor(state["step"]):
        state["step"].fill_(step)
    else:
        state["step"] = step
    return state


def adam_step(optimizer: torch.optim.Optimizer) -> int:
    """The AdamW step count: one count shared by every parameter (0 before the first step)."""
    steps = {int(s["step"]) for s in optimizer.state.values() if s}
    if len(steps) > 1:
        raise RuntimeError(f"the optimizer holds parameters at different AdamW steps {sorted(steps)}")
    return steps.pop() if steps else 0


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
