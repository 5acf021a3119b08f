"""LoRA on our InternLM2 reward model: the adapter layer, adding adapters, and merging them.

Our own small LoRA rather than peft: the model is a plain ``nn.Module`` over a packed token axis
(not a transformers ``PreTrainedModel``); under ZeRO-3 adapters must be created inside
``deepspeed.zero.Init`` next to the partitioned base, and exact resume and the name-keyed
checkpoint need every parameter's name to stay what it is. ``LoraLinear`` keeps the base
``weight`` Parameter itself (same object, same state-dict name, already partitioned under ZeRO-3)
and adds ``lora_A`` / ``lora_B`` beside it (names and the peft layout: adapters.py)::

    y = x W^T + (alpha / r) * dropout(x) A^T B^T      W [out, in] frozen, A [r, in], B [out, r]

A is drawn kaiming-uniform and B is zero (Hu et al. 2021, arXiv 2106.09685, Sec. 4.1; the same
init as peft's default), so a fresh adapter leaves the model's rewards unchanged. Merging folds
the update into the base: ``W' = W + (alpha / r) * B @ A``, computed in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from polar_train.adapters import HEAD, LoraSection, is_lora_param


class LoraLinear(nn.Module):
    """A bias-free ``nn.Linear`` with a frozen ``weight`` and a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, generator: torch.Generator):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the base's own Parameter: its name, dtype, device (and ZeRO-3 partition) stay
        self.weight.requires_grad_(False)
        a = torch.empty(rank, self.in_features)  # drawn on the CPU: the same values on every device and rank
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # nn.Linear's own init, as peft
        self.lora_A = nn.Parameter(a)  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank))  # [out, r]: the update starts at zero
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [T, in] -> [T, out]
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # [T, r] -> [T, out]
        return F.linear(x, self.weight) + update * self.scale

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.lora_A.shape[0]}"


def target_linears(model: nn.Module, targets: list[str]) -> Iterator[tuple[str, nn.Module, str]]:
    """(qualified name, parent module, attribute) of every linear layer named in ``targets``."""
    for parent_name, parent in list(model.named_modules()):
        for attr, child in list(parent.named_children()):
            if attr in targets and isinstance(child, (nn.Linear, LoraLinear)):
                yield f"{parent_name}.{attr}" if parent_name else attr, parent, attr


def add_adapters(model: nn.Module, lora: LoraSection, seed: int) -> None:
    """Freeze every parameter but ``v_head.weight`` and put a ``LoraLinear`` on each target linear.

    The A matrices come from one CPU generator seeded from ``seed``, in module order: every
    engine, rank and ZeRO stage starts from the same adapters. Under ZeRO-3 call it inside
    ``deepspeed.zero.Init`` (the adapters are then partitioned as they are created).
    """
    for name, param in model.named_parameters():
        param.requires_grad_(name == HEAD)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + 7)  # a stream apart from the base init's
    found = list(target_linears(model, lora.target_modules))
    missing = sorted(set(lora.target_modules) - {name.rsplit(".", 1)[-1] for name, _, _ in found})
    if missing:  # config.py only lets InternLM2's names through; a model without them is a bug
        raise ValueError(f"model.lora.target_modules: no linear layer named {', '.join(missing)} in the model")
    for _, parent, attr in found:
        setattr(parent, attr, LoraLinear(getattr(parent, attr), lora.rank, lora.alpha, lora.dropout, generator))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; whole sizes under ZeRO-3 (``ds_numel``)."""
    trainable = total = 0
    for param in model.parameters():
        n = getattr(param, "ds_numel", param.numel())
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


class MergedWeights(Mapping):
    """The HF state dict of a LoRA run, read one tensor at a time: each target weight with its
    update merged (fp32), ``v_head.weight`` the trained one, every other tensor the base's own,
    untouched (embeddings and norms bitwise equal to the base).

    ``base(name)`` reads a base tensor; ``trainable`` maps our trainable parameter names (the
    ``lora_A`` / ``lora_B`` and ``v_head.weight``) to their fp32 values; ``names`` is the HF
    state dict's names, in order.
    """

    def __init__(self, base: Callable[[str], torch.Tensor], names: list[str],
                 trainable: Mapping[str, torch.Tensor], scale: float):
        self.base, self.names, self.trainable, self.scale = base, names, trainable, scale
        self.adapted = {name.rsplit(".", 1)[0] for name in trainable if is_lora_param(name)}  # "...wqkv"

    def __getitem__(self, name: str) -> torch.Tensor:
        if name == HEAD:
            return self.trainable[HEAD]
        module = name.removesuffix(".weight")
        if module not in self.adapted:
            return self.base(name)
        a, b = self.trainable[f"{module}.lora_A"].float(), self.trainable[f"{module}.lora_B"].float()
        return self.base(name).float() + self.scale * (b @ a)  # [out, r] @ [r, in]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)
