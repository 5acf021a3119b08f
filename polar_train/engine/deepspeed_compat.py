"""Every use of DeepSpeed's internals, in one place, checked when an engine is built.

polar-train uses DeepSpeed's public API (``initialize``, ``backward``, ``step``, the
tensor-fragment functions ``safe_get/set_full_fp32_param`` and ``safe_get/set_full_optimizer_state``)
and, where that API has gaps, these internals (tested with ``SUPPORTED``):

- ``DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state`` (ZeRO-1/2; ``BF16_Optimizer``
  likewise): links each parameter's fragment to the AdamW moments, which DeepSpeed does only at
  the first step; a resume sets the moments before that step;
- ``DeepSpeedZeroOptimizer_Stage3.fp32_partitioned_groups_flat``: the fp32 masters whose AdamW
  state a resume creates (ZeRO-3 lists them in the param groups only during a step);
- ``FP16_UnfusedOptimizer.fp16_groups`` / ``fp32_groups`` (ZeRO-0 fp16): its fp32 master copies,
  which the fragment API does not reach, and the two stage-0 fp16 quirks of 0.19 (see
  ``fp16_zero0_scales_loss`` and ``DeepSpeedEngine.undo_phantom_step``);
- ``optimizer.loss_scale`` (a settable property of every fp16 optimizer) to restore the loss scale;
- the parameter attributes ``ds_id`` / ``ds_shape`` (ZeRO-3) and ``_hp_mapping`` (the fragment link).

A DeepSpeed without one of them stops the run at engine build with one line naming it and the
supported range, instead of failing (or silently training differently) mid-run.
"""

from __future__ import annotations

import logging
import os
import warnings
from datetime import timedelta
from typing import Any

import torch

from polar_train.errors import UserError

log = logging.getLogger("polar_train")

SUPPORTED = "deepspeed>=0.19.8,<0.20"  # the range pyproject.toml pins: what the test suite ran with
# (module, name, attribute or None): what polar-train calls, public first, then the internals above
# that exist on a class (instance attributes are checked where they are read, by ``internal``)
REQUIRED = (
    *(("deepspeed", name, None) for name in ("initialize", "init_distributed")),
    *(("deepspeed.zero", name, None) for name in ("Init", "GatheredParameters", "register_external_parameter")),
    *(("deepspeed.utils", name, None) for name in ("safe_get_full_fp32_param", "safe_set_full_fp32_param",
                                                   "safe_get_full_optimizer_state", "safe_set_full_optimizer_state")),
    ("deepspeed.runtime.base_optimizer", "ZeROOptimizer", None),
    *(("deepspeed.runtime.engine", "DeepSpeedEngine", method) for method in
      ("set_gradient_accumulation_boundary", "was_step_applied", "get_global_grad_norm")),
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer", "_lazy_init_hp_params_optimizer_state"),
    ("deepspeed.runtime.bf16_optimizer", "BF16_Optimizer", "_lazy_init_hp_params_optimizer_state"),
    ("deepspeed.runtime.fp16.unfused_optimizer", "FP16_UnfusedOptimizer", "loss_scale"),
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer", "loss_scale"),
    ("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3", "loss_scale"),
)


def import_deepspeed() -> Any:
    """``import deepspeed`` with its accelerator named (no auto-detect warning) and its logs quiet."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    # DeepSpeed calls torch.distributed functions that newer torch deprecates, once per collective
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed",
                            category=FutureWarning)
    return deepspeed


def init_distributed(backend: str, timeout: timedelta, store: torch.distributed.Store | None = None) -> None:
    """The process group (env://, or on ``store``: ``dist.attempt_store``), then DeepSpeed's view of it."""
    if store is not None:
        torch.distributed.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                             world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    import_deepspeed().init_distributed(dist_backend=backend, verbose=False, timeout=timeout)


def missing(what: str) -> UserError:
    import deepspeed

    return UserError("deepspeed", f"DeepSpeed {deepspeed.__version__} has no {what}, which polar-train uses",
                     f"install a tested version: pip install '{SUPPORTED}'")


def check_deepspeed() -> None:
    """At engine build: every function, class and class attribute polar-train relies on is there."""
    import importlib

    import deepspeed

    for module, name, attr in REQUIRED:
        try:  # `deepspeed.zero` is an attribute of the package, not an importable module
            found = importlib.import_module(module)
        except ImportError:
            found = deepspeed
            for part in module.split(".")[1:]:
                found = getattr(found, part, None)
        owner = getattr(found, name, None)
        if owner is None:
            raise missing(f"{module}.{name}")
        if attr is not None and not hasattr(owner, attr):
            raise missing(f"{name}.{attr}")


def internal(obj: Any, attr: str) -> Any:
    """``obj.attr`` of a DeepSpeed object, or the one-line error naming it (instance attributes
    that ``check_deepspeed`` cannot see on the class)."""
    if not hasattr(obj, attr):
        raise missing(f"{type(obj).__name__}.{attr}")
    return getattr(obj, attr)


def is_zero_optimizer(optimizer: Any) -> bool:
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    return isinstance(optimizer, ZeROOptimizer)


def fp16_zero0_scales_loss(engine: Any, precision: str) -> bool:
    """DeepSpeed 0.19 applies the fp16 loss scale in ``engine.backward`` only for ZeRO optimizers
    (stage >= 1) or a torch GradScaler, yet its stage-0 fp16 optimizers (FP16_Optimizer,
    FP16_UnfusedOptimizer) still divide the gradients by that scale in step(): AdamW would see
    gradients 2^16 times too small and clipping would never act. True: polar-train scales the loss."""
    return (precision == "fp16" and not is_zero_optimizer(engine.optimizer)
            and getattr(engine, "torch_autocast_z0_gradscaler", None) is None)


def replicated_masters(engine: Any, zero_stage: int) -> dict[torch.nn.Parameter, torch.Tensor]:
    """ZeRO-0 in bf16 / fp16 (DeepSpeed's FP16_UnfusedOptimizer): parameter -> its fp32 master
    copy. Empty where the tensor-fragment API reaches the masters (ZeRO-1/2/3, BF16_Optimizer) or
    the parameters are the masters (ZeRO-0 fp32)."""
    opt = engine.optimizer
    if zero_stage != 0 or type(opt).__name__ not in ("FP16_UnfusedOptimizer", "FP16_Optimizer"):
        return {}
    low, high = internal(opt, "fp16_groups"), internal(opt, "fp32_groups")
    return {p: m for lows, highs in zip(low, high) for p, m in zip(lows, highs)}


def flat_masters(engine: Any, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The fp32 tensors the AdamW state is keyed by: ZeRO-3's flat partitions (listed in the param
    groups only during a step), else the param groups' tensors (ZeRO-1/2 partitions, ZeRO-0)."""
    if type(engine.optimizer).__name__ == "DeepSpeedZeroOptimizer_Stage3":
        return list(internal(engine.optimizer, "fp32_partitioned_groups_flat"))
    return [m for group in optimizer.param_groups for m in group["params"]]


def link_optimizer_state(engine: Any) -> None:
    """ZeRO-1/2 (and bf16 ZeRO-0/1) link each parameter's fragment to the AdamW moments at the
    first step; the fragment API needs that link before it (a resume, a save before any update)."""
    name = type(engine.optimizer).__name__
    if name in ("DeepSpeedZeroOptimizer", "BF16_Optimizer"):
        internal(engine.optimizer, "_lazy_init_hp_params_optimizer_state")()


def is_partitioned(param: torch.nn.Parameter) -> bool:
    """ZeRO-3: the parameter holds only this rank's piece (``ds_id`` set by ``zero.Init``)."""
    return hasattr(param, "ds_id")


def has_fragment(param: torch.nn.Parameter) -> bool:
    """The fragment API reaches this parameter's fp32 master (ZeRO-3, or the ``_hp_mapping`` link
    of ZeRO-1/2 and BF16_Optimizer); False for ZeRO-0 fp32 / fp16."""
    return is_partitioned(param) or hasattr(param, "_hp_mapping")


def full_shape(param: torch.nn.Parameter) -> torch.Size:
    """The whole parameter's shape (ZeRO-3 keeps it in ``ds_shape``; the tensor is a piece)."""
    return torch.Size(getattr(param, "ds_shape", param.shape))


def get_loss_scale(engine: Any) -> float:
    return float(internal(engine.optimizer, "loss_scale"))


def set_loss_scale(engine: Any, scale: float) -> None:
    internal(engine.optimizer, "loss_scale")  # the check; the property has a setter in every fp16 optimizer
    engine.optimizer.loss_scale = scale
