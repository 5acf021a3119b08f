"""``DeepSpeedEngine``: DeepSpeed ZeRO 0/2/3 over NCCL (GPUs) or gloo (CPU), one process per
device, launched by ``torchrun`` (or alone). With deepspeed_compat.py the only modules that
import ``deepspeed``, lazily, so model / data / packing code runs without it.

Gradient scaling: the loop's loss is already a mean over ALL pairs of the step (SPEC 5): each
rank back-propagates ``sum(its pair losses) / global_pairs``, so the SUM of the ranks' gradients
is the step's gradient. DeepSpeed AVERAGES gradients over data-parallel ranks (divides the sum by
the world size), so ``backward`` multiplies the loss by the world size first; its
gradient-accumulation division is off (``gradient_accumulation_steps: 1``, ``scale_wrt_gas=False``)
and the accumulation boundary is set per micro-batch by the loop (steps have different
micro-batch counts, equal on every rank).

The training state moves by parameter name through DeepSpeed's tensor-fragment API
(``safe_get/set_full_fp32_param``, ``safe_get/set_full_optimizer_state``): every rank calls them,
one parameter at a time, and each keeps or contributes its own fragment.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch

from polar_train.config import DeepSpeedSection, ModelSection, OptimizerSection
import polar_train.engine.deepspeed_compat as compat
from polar_train.engine.deepspeed_compat import import_deepspeed
from polar_train.engine.dist import Dist
from polar_train.adapters import is_lora_param
from polar_train.engine.optim import adam_state, adam_step, adamw_settings, build_optimizer, set_lr
from polar_train.engine.protocol import ADAM_MOMENTS, DTYPES, NamedState, StepResult
from polar_train.errors import TrainingError
from polar_train.model.build import ModelSource

log = logging.getLogger("polar_train")


def deepspeed_config(settings: OptimizerSection, ds: DeepSpeedSection, world_size: int, precision: str) -> dict:
    """The DeepSpeed config dict. The loop packs its own micro-batches, so DeepSpeed's batch sizes
    are placeholders (1 per rank, no accumulation); boundaries are set per micro-batch."""
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage == 3:  # DeepSpeed's cap on gathered parameters kept live (its default is 1e9; prefetch 5e7)
        zero["stage3_max_live_parameters"] = ds.max_live_parameters
        zero["stage3_prefetch_bucket_size"] = min(ds.max_live_parameters, 50_000_000)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "gradient_clipping": settings.grad_clip,
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

    def __init__(self, dist: Dist, source: ModelSource, precision: str, *, model: ModelSection,
                 optimizer: OptimizerSection, deepspeed: DeepSpeedSection, load_weights: bool):
        ds, settings, model_section = deepspeed, optimizer, model
        deepspeed = import_deepspeed()
        compat.check_deepspeed()
        self.rank, self.world_size, self.device = dist.rank, dist.world_size, dist.device
        self.precision, self.zero_stage = precision, ds.zero_stage
        self.offload_optimizer, self.offload_params = ds.offload_optimizer, ds.offload_params
        self.dist = dist
        dtype = DTYPES[precision]  # DeepSpeed keeps the parameters in it (fp32 masters in the optimizer)
        ds_config = deepspeed_config(settings, ds, dist.world_size, precision)
        if ds.zero_stage == 3:
            with deepspeed.zero.Init(config_dict_or_path=ds_config):
                model = source.build(model_section, dist.device, dtype, dtype, partitioned=True)
            if load_weights:
                load_partitioned(model, source, dist.rank)
            # forward reads v_head.weight directly (F.linear in fp32), not through v_head's forward:
            # tell ZeRO-3 to gather it with the top module
            deepspeed.zero.register_external_parameter(model, model.v_head.weight)
        else:
            model = source.build(model_section, dist.device, dtype, dtype, load_weights=load_weights)
        trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: a frozen base has no master, no state
        # DeepSpeed points this optimizer's param groups at its fp32 masters (ZeRO: flat partitions);
        # set_lr writes into them, which is what ZeRO's optimizer steps with
        if ds.offload_optimizer:  # ZeRO-Offload steps on the CPU with DeepSpeed's vectorised Adam (compiles once)
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            self.optimizer = DeepSpeedCPUAdam(trainable, adamw_mode=True, **adamw_settings(settings))
        else:
            self.optimizer = build_optimizer(trainable, settings)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=ds_config)
        self.scale_loss_here = compat.fp16_zero0_scales_loss(self.engine, precision)
        self.undo_phantom_step()
        self.model = self.engine  # forward through the engine: its hooks gather ZeRO-3 params
        self.attention: str = model.attention

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
        if self.precision != "fp16" or compat.is_zero_optimizer(self.engine.optimizer):
            return
        masters = compat.replicated_masters(self.engine, self.zero_stage)
        if not masters and self.optimizer.state:
            raise TrainingError("deepspeed", f"{type(self.engine.optimizer).__name__} stepped the optimizer at "
                                "build time and its fp32 masters cannot be reached to undo it",
                                "use deepspeed.zero_stage=2 or engine.precision=bf16")
        for low, high in masters.items():
            high.copy_(low)
        self.optimizer.state.clear()

    def autocast(self) -> AbstractContextManager[Any]:
        return contextlib.nullcontext()  # DeepSpeed keeps the parameters in bf16 / fp16 itself

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        loss = loss * self.world_size  # undo DeepSpeed's average over ranks
        if self.scale_loss_here:
            loss = loss * self.current_loss_scale()
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
                return StepResult(norm, False, 1.0)
        scale = self.current_loss_scale()
        self.engine.step()
        if norm is None:
            raw = self.engine.get_global_grad_norm()
            norm = float(raw) if raw is not None else float("nan")  # host sync, once per step
            if self.scale_loss_here:  # the stage-0 fp16 optimizers measure the still-scaled gradients
                norm /= scale
        applied = self.engine.was_step_applied() and math.isfinite(norm)
        return StepResult(norm, applied, scale)

    def current_loss_scale(self) -> float:
        return compat.get_loss_scale(self.engine) if self.precision == "fp16" else 1.0

    @property
    def loss_scale(self) -> float | None:
        return compat.get_loss_scale(self.engine) if self.precision == "fp16" else None

    @property
    def adam_step(self) -> int:
        return adam_step(self.optimizer)  # the same count on every rank

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.dist.all_reduce_sum(tensor)

    def _full_masters(self) -> Iterator[tuple[str, torch.nn.Parameter, torch.Tensor, bool]]:
        """(name, parameter, its whole fp32 master, whether it is reached by the fragment API), one
        parameter at a time: a collective under ZeRO (every rank iterates to the end)."""
        from deepspeed.utils import safe_get_full_fp32_param

        copies = compat.replicated_masters(self.engine, self.zero_stage)
        for name, param in self.engine.module.named_parameters():
            if not param.requires_grad:  # a frozen base (LoRA) has no master: it is the source's
                continue
            full = safe_get_full_fp32_param(param)  # None without a ZeRO / bf16 optimizer
            if full is None:  # ZeRO-0: the parameter is its own master (fp32) or has an fp32 copy
                yield name, param, copies.get(param, param), False
            else:
                yield name, param, full, True

    def named_state(self) -> Iterator[tuple[str, dict[str, torch.Tensor] | None]]:
        """Each parameter's fp32 master and AdamW moments, whole, on rank 0 (a collective)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        stepped = bool(self.optimizer.state)  # the same on every rank: they step together
        if stepped:
            compat.link_optimizer_state(self.engine)
        for name, param, master, fragments in self._full_masters():
            full = {"fp32": master}
            for key in ADAM_MOMENTS if param.requires_grad else ():
                if not stepped:  # zero moments, as AdamW starts them
                    full[key] = torch.zeros(compat.full_shape(param))
                elif fragments:
                    full[key] = safe_get_full_optimizer_state(param, key)
                else:
                    full[key] = self.optimizer.state[master][key]
            yield name, {k: t.detach().float().cpu() for k, t in full.items()} if self.rank == 0 else None

    @torch.no_grad()
    def load_named_state(self, state: NamedState) -> None:
        """Every rank calls it (ZeRO-3 re-partitions each working weight from rank 0) and reads
        whole tensors, one at a time, keeping its own fragment."""
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        named = {name: p for name, p in self.engine.module.named_parameters() if p.requires_grad}
        state.check({name: compat.full_shape(p) for name, p in named.items()})
        for master in compat.flat_masters(self.engine, self.optimizer):
            adam_state(self.optimizer, master, state.adam_step)
        compat.link_optimizer_state(self.engine)
        copies = compat.replicated_masters(self.engine, self.zero_stage)
        for name, param in named.items():
            weight = state.tensor(name, "fp32").to(self.device)
            if compat.has_fragment(param):  # ZeRO-1/2/3: this rank's fragment
                safe_set_full_fp32_param(param, weight)
                for key in ADAM_MOMENTS:
                    safe_set_full_optimizer_state(param, state.tensor(name, key).to(self.device), key)
            else:  # ZeRO-0: the parameter is its own master (fp32) or has an fp32 copy (bf16 / fp16)
                master = copies.get(param, param)
                master.copy_(weight)
                for key in ADAM_MOMENTS:
                    self.optimizer.state[master][key].copy_(state.tensor(name, key))
            # the working weights the forward reads (bf16 / fp16 copies, or ZeRO's own fp32 ones)
            if compat.is_partitioned(param):  # ZeRO-3: gathered, set on rank 0, re-partitioned
                with deepspeed.zero.GatheredParameters(param, modifier_rank=0):
                    if self.rank == 0:
                        param.data.copy_(weight)
            else:
                param.data.copy_(weight)
        if self.precision == "fp16" and state.loss_scale:
            compat.set_loss_scale(self.engine, state.loss_scale)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The fp32 master weights, one tensor at a time (a collective: every rank calls it); the
        whole dict on rank 0 (CPU), None elsewhere."""
        state = {name: master.detach().float().cpu() for name, _, master, _ in self._full_masters() if self.rank == 0}
        return state if self.rank == 0 else None


def load_partitioned(model: torch.nn.Module, source: ModelSource, rank: int) -> None:
    """Copy the base weights into a ZeRO-3 partitioned model, one tensor at a time: each rank
    gathers the (empty) full tensor, rank 0 fills it from disk, DeepSpeed re-partitions it."""
    import deepspeed

    with source.tensors() as get:  # every rank opens the headers (cheap); only rank 0 reads data
        for name, param in model.named_parameters():
            if is_lora_param(name):  # an adapter keeps its own init (model/lora.py)
                continue
            with deepspeed.zero.GatheredParameters(param, modifier_rank=0):
                if rank == 0:
                    param.data.copy_(get(name))
