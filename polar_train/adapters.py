"""LoRA's settings (``model.lora``) and the names its tensors have, in our model and in peft's layout.

Torch-free on purpose: config.py composes ``LoraSection`` and must stay cheap to import. The
layer itself and the merge are in model/lora.py.

Names. An adapter on ``model.layers.0.attention.wqkv`` adds two trainable parameters next to the
frozen ``...wqkv.weight``::

    model.layers.0.attention.wqkv.lora_A    [r, in]   (ours; peft: base_model.model.<same>.lora_A.weight)
    model.layers.0.attention.wqkv.lora_B    [out, r]  (ours; peft: base_model.model.<same>.lora_B.weight)
    v_head.weight                           [1, H]    trained in full
                                                      (peft: modules_to_save, base_model.model.v_head.weight)

The update of the weight is ``(alpha / r) * lora_B @ lora_A`` (Hu et al. 2021, arXiv 2106.09685,
Eq. 3; peft's ``scaling``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from polar_train.errors import UserError

LORA_TARGETS = ("wqkv", "wo", "w1", "w2", "w3")  # InternLM2's linear layers (SPEC 4)
LORA_PARAMS = ("lora_A", "lora_B")  # the parameters an adapter adds to its linear layer
HEAD = "v_head.weight"  # trained in full in a LoRA run: a random or stale head would be useless
PEFT_PREFIX = "base_model.model."  # peft's PeftModel -> LoraModel -> our module


@dataclass
class LoraSection:
    """LoRA: low-rank adapters on the frozen base (held in the compute dtype); v_head trained in full."""

    rank: int = 0  # adapter rank r; 0 = off (a full fine-tune)
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on each adapter's input, probability (0 .. 1)
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # linears that get an adapter

    def problems(self) -> list[str]:
        found = []
        if self.rank < 0:
            found.append(f"rank: must be >= 0, got {self.rank} (0 = LoRA off; an adapter rank such as 8 or 16)")
        if self.alpha <= 0:
            found.append(f"alpha: must be > 0, got {self.alpha} (the update is scaled by alpha / rank)")
        if not 0 <= self.dropout < 1:
            found.append(f"dropout: must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.target_modules if t not in LORA_TARGETS]
        if unknown:
            found.append(f"target_modules: {', '.join(unknown)} is not a linear layer of InternLM2 "
                         f"(choose from {', '.join(LORA_TARGETS)})")
        elif self.rank and not self.target_modules:
            found.append(f"target_modules: empty (choose from {', '.join(LORA_TARGETS)}, or set model.lora.rank=0)")
        return found

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def is_lora_param(name: str) -> bool:
    """Whether ``name`` is an adapter parameter (``...wqkv.lora_A``), not a base tensor."""
    return name.rsplit(".", 1)[-1] in LORA_PARAMS


def lora_settings(lora: LoraSection) -> dict[str, Any] | None:
    """What a checkpoint records of the LoRA that wrote it (None: a full fine-tune)."""
    if not lora.enabled:
        return None
    return {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
            "target_modules": sorted(set(lora.target_modules))}


def peft_name(name: str) -> str:
    """Our trainable parameter's name -> peft's adapter_model.safetensors key.

    >>> peft_name("model.layers.0.attention.wqkv.lora_A"), peft_name("v_head.weight")
    ('base_model.model.model.layers.0.attention.wqkv.lora_A.weight', 'base_model.model.v_head.weight')
    """
    return PEFT_PREFIX + (f"{name}.weight" if is_lora_param(name) else name)


def peft_config(lora: LoraSection, base_model: str | None) -> dict[str, Any]:
    """adapter_config.json as peft's ``LoraConfig`` writes it (the keys a loader reads)."""
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": sorted(lora.target_modules), "modules_to_save": ["v_head"],
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }


def check_resume_lora(saved: dict[str, Any] | None, lora: LoraSection, ckpt: object) -> None:
    """One line naming the ``model.lora`` key when the checkpoint ``ckpt`` was written with other
    LoRA settings, or is a full fine-tune's while this run is a LoRA one (or the reverse)."""
    now = lora_settings(lora)
    if saved == now:
        return
    if saved is None:
        raise UserError("model.lora.rank", f"is {lora.rank}, but {ckpt} is a checkpoint of a full fine-tune (no LoRA)",
                        "resume it with model.lora.rank=0, or start the LoRA run in a new output_dir")
    if now is None:
        raise UserError("model.lora.rank",
                        f"is 0 (a full fine-tune), but {ckpt} is a LoRA checkpoint (rank {saved['rank']})",
                        f"resume it with model.lora.rank={saved['rank']}, or start the full run in a new output_dir")
    key = next(k for k in now if saved.get(k) != now[k])
    raise UserError(f"model.lora.{key}", f"is {now[key]!r}, but {ckpt} was written with {saved.get(key)!r}",
                    f"resume it with model.lora.{key}={saved.get(key)}, or start a new run in a new output_dir")
