"""The optimisation engine: optimizer, LR schedule, clipping, and (later) process groups.

``TorchEngine`` runs one process with plain PyTorch. Everything the training loop needs from
an engine is the small interface below, so a distributed engine plugs in without touching
the loop: ``model``, ``device``, ``rank``, ``world_size``, ``backward(loss)``, ``step()``,
``lr``, ``all_reduce_sum(tensor)``.
"""

from __future__ import annotations

import math

import torch

from polar_train.config import TrainSection


def lr_lambda(total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """Linear warm-up over the first ``warmup_ratio`` of steps, then cosine to ``min_lr_ratio``.

    The POLAR recipe (xtuner LinearLR warm-up for 3% of steps, then CosineAnnealingLR to 0.1 x lr).
    """
    warmup = max(1, math.ceil(warmup_ratio * total_steps)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class TorchEngine:
    """One process, plain PyTorch AdamW; the model's parameters stay fp32 (autocast does bf16)."""

    rank = 0
    world_size = 1

    def __init__(self, model: torch.nn.Module, train: TrainSection, total_steps: int, device: torch.device):
        self.model = model.to(device)
        self.device = device
        self.grad_clip = train.grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        # foreach=False: the fused multi-tensor path reorders additions, and exact resume /
        # cross-engine comparisons want one fixed arithmetic order.
        self.optimizer = torch.optim.AdamW(
            self.params, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay, eps=1e-8, foreach=False
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(total_steps, train.warmup_ratio, train.min_lr_ratio)
        )

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> tuple[torch.Tensor, bool]:
        """Clip, step, advance the schedule. Returns (grad norm before clipping, applied).

        A non-finite gradient norm skips the update (the schedule still advances, so the LR
        stays tied to the step index). One host sync, deliberate: deciding to skip needs it.
        """
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        applied = bool(torch.isfinite(norm).item())
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm.detach(), applied

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor
