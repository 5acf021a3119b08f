"""The contract between the training loop, the checkpoint and an engine, written down.

Two engines implement ``Engine``: ``torch.TorchEngine`` (one process, plain PyTorch) and
``deepspeed.DeepSpeedEngine`` (DeepSpeed ZeRO 0/2/3 over a process group). The loop uses the
forward, ``backward``, ``set_lr`` and ``step``; checkpoint.py uses ``named_state`` /
``load_named_state``, which move the training state by parameter name, so a checkpoint written
by any engine, ZeRO stage or number of ranks resumes on any other::

    for name, tensors in engine.named_state():     # a collective: every rank iterates
        tensors  # rank 0: {"fp32": master weight, "exp_avg": ..., "exp_avg_sq": ...} (CPU fp32); else None
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from polar_train.errors import UserError

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-element state; besides them, one step count
STATE_KEYS = ("fp32", *ADAM_MOMENTS)  # what a checkpoint holds per trainable parameter
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # engine.precision -> dtype


def resolve_precision(precision: str, device: torch.device, key: str = "engine.precision") -> str:
    """``fp32`` | ``bf16`` | ``fp16``. ``auto`` = bf16 on a GPU that supports it, else fp32.
    The one resolver of training (``engine.precision``) and scoring (``--dtype``, named by ``key``)."""
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return "bf16" if bf16_ok else "fp32"
    if precision == "bf16" and device.type == "cuda" and not bf16_ok:
        raise UserError(key, f"bf16 is not supported on {torch.cuda.get_device_name(device)}",
                        f"use {key}=fp16 (loss scaling) or fp32" if "." in key else "use float16 or float32")
    return precision  # bf16 / fp16 on a CPU: autocast runs them, slowly


@dataclass
class StepResult:
    grad_norm: float  # global gradient norm before clipping (inf / nan when non-finite)
    applied: bool  # False: the update was skipped (non-finite gradients, or an fp16 overflow)
    loss_scale: float  # fp16 dynamic loss scale in use; 1.0 for bf16 / fp32


class NamedState(Protocol):
    """A saved training state read by parameter name (checkpoint.CheckpointState)."""

    adam_step: int  # AdamW steps taken (its bias correction); 0 before the first
    loss_scale: float | None  # fp16 dynamic loss scale; None for bf16 / fp32

    def check(self, shapes: Mapping[str, torch.Size]) -> None:
        """Raise a one-line ``UserError`` unless the state holds exactly these parameters."""

    def tensor(self, name: str, key: str) -> torch.Tensor:
        """The full fp32 tensor ``key`` (one of ``STATE_KEYS``) of parameter ``name``."""


class Engine(Protocol):
    """What the training loop and checkpoint.py need of an engine."""

    model: torch.nn.Module  # model(input_ids [T], position_ids [T], meta, seq_index [S]) -> rewards [S]
    rank: int
    world_size: int
    device: torch.device
    kind: str  # "torch" | "deepspeed"
    zero_stage: int | None
    precision: str  # "fp32" | "bf16" | "fp16"
    attention: str  # the attention backend in use
    offload_optimizer: bool
    offload_params: bool

    def autocast(self) -> AbstractContextManager[Any]: ...

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """``loss`` = this rank's summed pair losses / the step's GLOBAL pairs; ``last`` = the
        step's last micro-batch."""

    def set_lr(self, lr: float) -> None:
        """Write the LR of the coming step into the optimizer's param groups."""

    def step(self) -> StepResult:
        """Clip and update, or skip a non-finite update."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...

    @property
    def adam_step(self) -> int: ...

    @property
    def loss_scale(self) -> float | None: ...

    def named_state(self) -> Iterator[tuple[str, dict[str, torch.Tensor] | None]]:
        """Every trainable parameter's fp32 master weight and AdamW moments, one parameter at a time
        (a collective); whole CPU tensors on rank 0, None on the other ranks. A LoRA run's frozen
        base is not training state: it comes from the model source again on resume."""

    def load_named_state(self, state: NamedState) -> None:
        """Set every master weight, both AdamW moments, the AdamW step (and the fp16 loss scale)
        exactly from ``state`` (every rank calls it)."""

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The trainable parameters' fp32 master weights (all of them in a full fine-tune) on rank 0
        (a collective), None elsewhere."""


def launch_of(engine: Engine) -> dict[str, Any]:
    """What a checkpoint records of the launch that wrote it (logs and metadata)."""
    return {"engine": engine.kind, "world_size": engine.world_size, "zero_stage": engine.zero_stage,
            "precision": engine.precision, "offload_optimizer": engine.offload_optimizer,
            "offload_params": engine.offload_params}


def describe_launch(launch: Mapping[str, Any]) -> str:
    """``2 rank(s), deepspeed ZeRO-2, bf16, optimizer offload``."""
    what = f"{launch['world_size']} rank(s), {launch['engine']}"
    if launch["engine"] == "deepspeed":
        what += f" ZeRO-{launch['zero_stage']}"
    what += f", {launch['precision']}"
    offload = [k.split("_")[1] for k in ("offload_optimizer", "offload_params") if launch.get(k)]
    return what + (f", {' + '.join(offload)} offload" if offload else "")
