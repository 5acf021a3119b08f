"""The optimisation engine: process groups, optimizer, LR schedule, precision, clipping.

Two engines, one interface (all the training loop uses)::

    engine.model(input_ids, position_ids, meta, reward_index) -> rewards [2P]
    engine.rank, engine.world_size, engine.device, engine.autocast()
    engine.backward(loss, last)   loss = this rank's summed pair losses / the step's GLOBAL pairs;
                                  last = the step's last micro-batch
    engine.step() -> StepResult   clip, update (or skip a non-finite one), advance the schedule
    engine.lr, engine.all_reduce_sum(t)
    engine.save_state(folder), engine.load_state(folder)   (checkpoint.py adds the rest)
    engine.load_portable(view)    the same state read by parameter name from a checkpoint of any
                                  engine, ZeRO stage or number of ranks (checkpoint.PortableState)
    engine.full_state_dict()      fp32 master weights on rank 0 (a collective)
    engine.launch                 engine kind, ranks, ZeRO stage, precision, offload (logs, metadata)
    engine.kind, engine.zero_stage, engine.precision, engine.attention

``TorchEngine``: one process, plain PyTorch (the demo: no DeepSpeed import, no op compile).
``DeepSpeedEngine``: DeepSpeed ZeRO 0/2/3 over NCCL (GPUs) or gloo (CPU), one process per device,
launched by ``torchrun`` (or alone). ``deepspeed`` is imported here and in checkpoint.py only,
lazily, so model/data/packing code runs without it.

Gradient scaling under DeepSpeed: the loop's loss is already a mean over ALL pairs of the step
(SPEC 5): each rank back-propagates ``sum(its pair losses) / global_pairs``, so the SUM of the
ranks' gradients is the step's gradient. DeepSpeed AVERAGES gradients over data-parallel ranks
(divides the sum by the world size), so ``backward`` multiplies the loss by the world size
first; its gradient-accumulation division is off (``gradient_accumulation_steps: 1``,
``scale_wrt_gas=False``) and the accumulation boundary is set per micro-batch by the loop
(steps have different micro-batch counts, equal on every rank).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import torch

from polar_train.config import Config, DeepSpeedSection, TrainSection
from polar_train.errors import TrainingError, UserError

log = logging.getLogger("polar_train")


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


def resolve_precision(precision: str, device: torch.device) -> str:
    """``fp32`` | ``bf16`` | ``fp16``. ``auto`` = bf16 on a GPU that supports it, else fp32."""
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return "bf16" if bf16_ok else "fp32"
    if precision == "bf16" and device.type == "cuda" and not bf16_ok:
        raise UserError("train.precision", f"bf16 is not supported on {torch.cuda.get_device_name(device)}",
                        "use train.precision=fp16 (loss scaling) or fp32")
    return precision  # bf16 / fp16 on a CPU: autocast runs them, slowly


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-element state; besides them, one step count


@dataclass
class StepResult:
    grad_norm: float  # global gradient norm before clipping (inf / nan when non-finite)
    applied: bool  # False: the update was skipped (non-finite gradients, or an fp16 overflow)
    loss_scale: float  # fp16 dynamic loss scale in use; 1.0 for bf16 / fp32


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


@dataclass
class Dist:
    """Where this process stands: rank, world size, device. ``world_size == 1`` has no group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    uses_deepspeed: bool = False

    def barrier(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if torch.distributed.is_initialized() and self.world_size > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any (one small all-reduce)."""
        return bool(self.all_reduce_sum(torch.tensor([float(flag)], device=self.device)).item())

    @contextlib.contextmanager
    def rank_zero_first(self, what: str) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. fills a cache), then the others; an error on rank 0
        stops the others too instead of leaving them waiting."""
        if self.world_size == 1:
            yield
            return
        if self.rank != 0:
            if self.any_rank(False):
                raise TrainingError(f"rank {self.rank}", f"rank 0 failed while {what}", "see rank 0's error above")
            yield
            return
        try:
            yield
        except BaseException:
            self.any_rank(True)
            raise
        self.any_rank(False)


@contextlib.contextmanager
def distributed(ds: DeepSpeedSection) -> Iterator[Dist]:
    """The process group for this run (none for one process without DeepSpeed).

    On a clean exit every rank meets at a barrier and the group is destroyed: without it 15-20%
    of gloo runs abort at interpreter teardown (SPEC 8). On an error the group is destroyed
    without a barrier (the other ranks may be gone); a lost peer becomes a ``TrainingError``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if not ds.enabled:
        if world > 1:
            raise UserError("deepspeed.enabled", f"{world} processes were launched but DeepSpeed is off",
                            "set deepspeed.enabled=true: several processes train through DeepSpeed only")
        yield Dist(device=torch.device("cuda") if cuda else torch.device("cpu"))
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if "RANK" not in os.environ:  # `polar-train train` alone: a world of one on a free local port
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if cuda:
        torch.cuda.set_device(local_rank)
    deepspeed = import_deepspeed()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False,
                               timeout=timedelta(minutes=ds.timeout_minutes))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    dist = Dist(rank, world, local_rank, torch.device("cuda", local_rank) if cuda else torch.device("cpu"), True)
    try:
        yield dist
    except (torch.distributed.DistBackendError, RuntimeError) as e:
        torch.distributed.destroy_process_group()
        if isinstance(e, torch.distributed.DistBackendError) or "gloo" in str(e).lower() or "nccl" in str(e).lower():
            raise TrainingError(f"rank {rank}", f"lost contact with another rank ({str(e).splitlines()[0]})",
                                "another process died or hung: see its error; resume with train.resume=auto") from e
        raise
    except BaseException:
        torch.distributed.destroy_process_group()
        raise
    dist.barrier()
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def import_deepspeed():
    """``import deepspeed`` with its accelerator named (no auto-detect warning) and its logs quiet."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    # DeepSpeed calls torch.distributed functions that newer torch deprecates, once per collective
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)
    return deepspeed


def build_engine(cfg: Config, dist: Dist, source, total_steps: int, *, load_weights: bool = True):
    """``TorchEngine`` for one process without DeepSpeed, else ``DeepSpeedEngine``.

    ``source`` is a ``checkpoint.ModelSource`` (config + where the weights come from);
    ``load_weights=False`` when a checkpoint will overwrite them (resume).
    """
    precision = resolve_precision(cfg.train.precision, dist.device)
    if not dist.uses_deepspeed:  # fp32 parameters; autocast computes in the precision's dtype
        model = source.build(cfg.model, dist.device, torch.float32, DTYPES[precision], load_weights=load_weights)
        return TorchEngine(model, cfg.train, total_steps, dist.device, precision)
    return DeepSpeedEngine(cfg, dist, source, total_steps, precision, load_weights=load_weights)


def build_optimizer(params, train: TrainSection, *, cpu_adam: bool = False) -> torch.optim.Optimizer:
    """AdamW with the recipe's betas. ``foreach=False``: one fixed arithmetic order, so exact resume
    and cross-engine comparisons hold (ZeRO flattens parameters: no speed lost there)."""
    kwargs = dict(lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay, eps=1e-8)
    if cpu_adam:  # ZeRO-Offload steps on the CPU with DeepSpeed's vectorised Adam (compiles once)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(params, foreach=False, **kwargs)


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


# ---------------------------------------------------------------------------------------------
# One process, plain PyTorch
# ---------------------------------------------------------------------------------------------


class TorchEngine:
    """One process, plain PyTorch AdamW; parameters stay fp32, autocast runs bf16 / fp16 (with a
    dynamic loss scale for fp16)."""

    kind = "torch"
    zero_stage = None
    rank = 0
    world_size = 1
    offload_optimizer = offload_params = False

    def __init__(self, model: torch.nn.Module, train: TrainSection, total_steps: int, device: torch.device,
                 precision: str = "fp32"):
        self.model = model.to(device)
        self.attention = model.attention
        self.device = device
        self.precision = precision
        self.grad_clip = train.grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, train)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(total_steps, train.warmup_ratio, train.min_lr_ratio)
        )
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> StepResult:
        """Clip, step, advance the schedule. A non-finite gradient norm skips the update (the
        schedule still advances, so the LR stays tied to the step index). One host sync,
        deliberate: deciding to skip needs it."""
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
        self.scheduler.step()
        return StepResult(norm, applied, scale)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    @property
    def launch(self) -> dict:
        return launch_of(self)

    def save_state(self, folder: Path) -> None:
        """``model.pt`` (the state dict) and ``optimizer.pt``; ``param_names`` names the optimizer's
        parameter indices, so another engine can read the moments by name."""
        torch.save(self.model.state_dict(), folder / "model.pt")
        names = [name for name, p in self.model.named_parameters() if p.requires_grad]
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler else None, "param_names": names},
                   folder / "optimizer.pt")

    def load_state(self, folder: Path) -> None:
        self.model.load_state_dict(torch.load(folder / "model.pt", map_location=self.device, weights_only=True))
        state = torch.load(folder / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        load_scheduler(self.scheduler, state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])

    @torch.no_grad()
    def load_portable(self, view) -> None:
        """Weights, AdamW moments and step, schedule (and fp16 loss scale) from a checkpoint read by
        parameter name: one written by DeepSpeed, any ZeRO stage, any number of ranks."""
        named = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        view.check({name: p.shape for name, p in named.items()})
        for name, param in named.items():
            param.copy_(view.tensor(name, "fp32"))
            state = adam_state(self.optimizer, param, view.step)
            for key in ADAM_MOMENTS:
                state[key].copy_(view.tensor(name, key))
        load_scheduler(self.scheduler, view.scheduler)
        if self.scaler and view.loss_scale:
            self.scaler.load_state_dict({**self.scaler.state_dict(), "scale": view.loss_scale})

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}


def launch_of(engine) -> dict:
    """What a checkpoint records of the launch that wrote it; an equal launch resumes from each
    rank's own files (bitwise), any other reads the checkpoint by parameter name."""
    return {"engine": engine.kind, "world_size": engine.world_size, "zero_stage": engine.zero_stage,
            "precision": engine.precision, "offload_optimizer": engine.offload_optimizer,
            "offload_params": engine.offload_params}


def load_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict) -> None:
    """Restore a schedule and put its LR back into the optimizer (``load_state_dict`` alone does not)."""
    scheduler.load_state_dict(state)
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr


# ---------------------------------------------------------------------------------------------
# DeepSpeed ZeRO
# ---------------------------------------------------------------------------------------------


def deepspeed_config(train: TrainSection, ds: DeepSpeedSection, world_size: int, precision: str) -> dict:
    """The DeepSpeed config dict. The loop packs its own micro-batches, so DeepSpeed's batch sizes
    are placeholders (1 per rank, no accumulation); boundaries are set per micro-batch."""
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW
        "bf16": {"enabled": precision == "bf16"},
        # dynamic loss scale: start at 2^16, halve on overflow (the step is skipped), double after
        # 1000 clean steps (Micikevicius et al. 2018, "Mixed Precision Training")
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """DeepSpeed ZeRO 0/2/3 over every process of the group.

    Under ZeRO-3 the model is built inside ``deepspeed.zero.Init`` (each parameter partitioned as
    soon as its module exists) and the base weights are loaded one tensor at a time with
    ``GatheredParameters(modifier_rank=0)``: rank 0 reads the tensor and DeepSpeed scatters it,
    so no rank ever holds the whole model.
    """

    kind = "deepspeed"

    def __init__(self, cfg: Config, dist: Dist, source, total_steps: int, precision: str, *, load_weights: bool):
        deepspeed = import_deepspeed()
        ds = cfg.deepspeed
        self.rank, self.world_size, self.device = dist.rank, dist.world_size, dist.device
        self.precision, self.zero_stage = precision, ds.zero_stage
        self.offload_optimizer, self.offload_params = ds.offload_optimizer, ds.offload_params
        self.dist = dist
        dtype = DTYPES[precision]  # DeepSpeed keeps the parameters in it (fp32 masters in the optimizer)
        ds_config = deepspeed_config(cfg.train, ds, dist.world_size, precision)
        if ds.zero_stage == 3:
            with deepspeed.zero.Init(config_dict_or_path=ds_config):
                model = source.build(cfg.model, dist.device, dtype, dtype, partitioned=True)
            if load_weights:
                load_partitioned(model, source, dist.rank)
            # forward reads v_head.weight directly (F.linear in fp32), not through v_head's forward:
            # tell ZeRO-3 to gather it with the top module
            deepspeed.zero.register_external_parameter(model, model.v_head.weight)
        else:
            model = source.build(cfg.model, dist.device, dtype, dtype, load_weights=load_weights)
        # DeepSpeed points this optimizer's param groups at its fp32 masters (ZeRO: flat partitions)
        self.optimizer = build_optimizer(model.parameters(), cfg.train, cpu_adam=ds.offload_optimizer)
        # our own schedule, stepped on every step (also skipped ones, as TorchEngine does);
        # LambdaLR writes the LR into the param-group dicts ZeRO's optimizer steps with
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(total_steps, cfg.train.warmup_ratio, cfg.train.min_lr_ratio)
        )
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=ds_config)
        from deepspeed.runtime.base_optimizer import ZeROOptimizer

        # DeepSpeed 0.19 applies the fp16 loss scale in engine.backward only for ZeRO optimizers
        # (stage >= 1) or a torch GradScaler, yet its stage-0 fp16 optimizers (FP16_Optimizer,
        # FP16_UnfusedOptimizer) still divide the gradients by that scale in step(): AdamW would
        # see gradients 2^16 times too small and clipping would never act. Scale the loss here then.
        self.scale_loss_here = (precision == "fp16" and not isinstance(self.engine.optimizer, ZeROOptimizer)
                                and getattr(self.engine, "torch_autocast_z0_gradscaler", None) is None)
        self.undo_phantom_step()
        self.model = self.engine  # forward through the engine: its hooks gather ZeRO-3 params
        self.attention = model.attention

    @torch.no_grad()
    def undo_phantom_step(self) -> None:
        """DeepSpeed 0.19's stage-0 fp16 optimizers (FP16_UnfusedOptimizer, FP16_Optimizer) run
        ``initialize_optimizer_states`` when built: one real ``optimizer.step()`` on zero gradients.
        For AdamW that step counts (state step = 1 before any training, so every later bias
        correction is one step ahead: the first update is ~0.74x as large with betas (0.9, 0.95))
        and applies weight decay once to the fp32 masters. ZeRO-1/2/3 and bf16 create the state
        lazily at the first real step. Undo it: empty the AdamW state (created again at the first
        step, as everywhere else) and copy the masters back from the fp16 weights they were cloned
        from (exact). Without this ZeRO-0 fp16 drifts from ZeRO-2 fp16 from step 2 on."""
        from deepspeed.runtime.base_optimizer import ZeROOptimizer

        if self.precision != "fp16" or isinstance(self.engine.optimizer, ZeROOptimizer):
            return
        masters = self.replicated_masters()
        if not masters and self.optimizer.state:
            raise TrainingError("deepspeed", f"{type(self.engine.optimizer).__name__} stepped the optimizer at "
                                "build time and its fp32 masters cannot be reached to undo it",
                                "use deepspeed.zero_stage=2 or train.precision=bf16")
        for low, high in masters.items():
            high.copy_(low)
        self.optimizer.state.clear()

    def autocast(self):
        return contextlib.nullcontext()  # DeepSpeed keeps the parameters in bf16 / fp16 itself

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        loss = loss * self.world_size  # undo DeepSpeed's average over ranks
        if self.scale_loss_here:
            loss = loss * self.loss_scale()
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> StepResult:
        """DeepSpeed clips and steps; it skips an update whose gradients hold inf / nan (fp16
        overflow, or any non-finite norm under ZeRO). Stage 0 in fp32 neither measures the norm
        nor checks it: done here, on the gradients DeepSpeed has already averaged."""
        norm = None
        if self.zero_stage == 0 and self.precision == "fp32":
            params = [p for p in self.engine.module.parameters() if p.grad is not None]
            norm = float(torch.nn.utils.clip_grad_norm_(params, float("inf")))  # measures, clips nothing
            if not math.isfinite(norm):
                self.engine.zero_grad()
                self.scheduler.step()
                return StepResult(norm, False, 1.0)
        scale = self.loss_scale()
        self.engine.step()
        if norm is None:
            raw = self.engine.get_global_grad_norm()
            norm = float(raw) if raw is not None else float("nan")  # host sync, once per step
            if self.scale_loss_here:  # the stage-0 fp16 optimizers measure the still-scaled gradients
                norm /= scale
        applied = self.engine.was_step_applied() and math.isfinite(norm)
        self.scheduler.step()
        return StepResult(norm, applied, scale)

    def loss_scale(self) -> float:
        return float(getattr(self.engine.optimizer, "loss_scale", 1.0)) if self.precision == "fp16" else 1.0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.dist.all_reduce_sum(tensor)

    @property
    def launch(self) -> dict:
        return launch_of(self)

    def save_state(self, folder: Path) -> None:
        """Every rank writes its ZeRO partitions (``deepspeed/``); rank 0 the schedule."""
        self.engine.save_checkpoint(str(folder), tag="deepspeed", client_state={}, save_latest=False)
        if self.rank == 0:
            torch.save({"scheduler": self.scheduler.state_dict()}, folder / "scheduler.pt")

    def load_state(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag="deepspeed", load_optimizer_states=True,
                                              load_lr_scheduler_states=False, load_module_strict=True)
        if path is None:
            raise UserError(folder, "DeepSpeed could not load this checkpoint", "see the log above")
        load_scheduler(self.scheduler, torch.load(folder / "scheduler.pt", weights_only=True)["scheduler"])

    @torch.no_grad()
    def load_portable(self, view) -> None:
        """Weights, AdamW moments and step, schedule (and fp16 loss scale) from a checkpoint read by
        parameter name, written by any engine, ZeRO stage or number of ranks. Every rank calls it
        (ZeRO-3 re-partitions each working weight from rank 0) and reads whole tensors from the
        checkpoint, one at a time, keeping its own fragment (DeepSpeed's tensor-fragment API)."""
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        named = {name: p for name, p in self.engine.module.named_parameters() if p.requires_grad}
        view.check({name: getattr(p, "ds_shape", p.shape) for name, p in named.items()})
        # the fp32 masters the optimizer steps: ZeRO partitions (ZeRO-3 lists them only during a
        # step) or whole tensors (ZeRO-0)
        flat = getattr(self.engine.optimizer, "fp32_partitioned_groups_flat", None)
        for master in flat if flat is not None else [m for g in self.optimizer.param_groups for m in g["params"]]:
            adam_state(self.optimizer, master, view.step)
        # ZeRO-1/2 (and bf16 ZeRO-1) link each parameter's fragment to the moments at the first
        # step; the fragment API needs that link now (DeepSpeed's own method, run early)
        link = getattr(self.engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:
            link()
        copies = self.replicated_masters()
        for name, param in named.items():
            weight = view.tensor(name, "fp32").to(self.device)
            if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):  # ZeRO-1/2/3: this rank's fragment
                safe_set_full_fp32_param(param, weight)
                for key in ADAM_MOMENTS:
                    safe_set_full_optimizer_state(param, view.tensor(name, key).to(self.device), key)
            else:  # ZeRO-0: the parameter is its own master (fp32) or has an fp32 copy (bf16 / fp16)
                master = copies.get(param, param)
                master.copy_(weight)
                for key in ADAM_MOMENTS:
                    self.optimizer.state[master][key].copy_(view.tensor(name, key))
            # the working weights the forward reads (bf16 / fp16 copies, or ZeRO's own fp32 ones)
            if hasattr(param, "ds_id"):  # ZeRO-3: gathered, set on rank 0, re-partitioned
                with deepspeed.zero.GatheredParameters(param, modifier_rank=0):
                    if self.rank == 0:
                        param.data.copy_(weight)
            else:
                param.data.copy_(weight)
        load_scheduler(self.scheduler, view.scheduler)
        if self.precision == "fp16" and view.loss_scale:
            self.engine.optimizer.loss_scale = view.loss_scale

    def replicated_masters(self) -> dict[torch.nn.Parameter, torch.Tensor]:
        """ZeRO-0 in bf16 / fp16 (DeepSpeed's FP16_UnfusedOptimizer): parameter -> its fp32 master
        copy. Empty where the tensor-fragment API reaches the masters (ZeRO-1/2/3) or the
        parameters are the masters (ZeRO-0 fp32)."""
        opt = self.engine.optimizer
        if self.zero_stage != 0 or not (hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups")):
            return {}
        return {p: m for low, high in zip(opt.fp16_groups, opt.fp32_groups) for p, m in zip(low, high)}

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The fp32 master weights, one tensor at a time (a collective: every rank calls it); the
        whole dict on rank 0 (CPU), None elsewhere."""
        from deepspeed.utils import safe_get_full_fp32_param

        masters = self.replicated_masters()
        state = {}
        for name, param in self.engine.module.named_parameters():
            full = safe_get_full_fp32_param(param)  # None without a ZeRO / bf16 optimizer
            if full is None:
                full = masters.get(param, param).detach()
            if self.rank == 0:
                state[name] = full.detach().float().cpu()
        return state if self.rank == 0 else None


def load_partitioned(model: torch.nn.Module, source, rank: int) -> None:
    """Copy the base weights into a ZeRO-3 partitioned model, one tensor at a time: each rank
    gathers the (empty) full tensor, rank 0 fills it from disk, DeepSpeed re-partitions it."""
    import deepspeed

    with source.tensors() as get:  # every rank opens the headers (cheap); only rank 0 reads data
        for name, param in model.named_parameters():
            with deepspeed.zero.GatheredParameters(param, modifier_rank=0):
                if rank == 0:
                    param.data.copy_(get(name))
