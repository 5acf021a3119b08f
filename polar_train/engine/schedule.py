"""The learning rate as a pure function of the step (nanoGPT's ``get_lr``).

The loop writes ``lr_at(step, total_steps, peak_lr, schedule)`` into the optimizer before every step:
there is no scheduler object, nothing to save in a checkpoint and nothing to fix up on resume.
A resume only needs ``total_steps``, which the checkpoint records (a changed total is visible).
"""

from __future__ import annotations

import math

from polar_train.config import ScheduleSection


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return max(1, math.ceil(warmup_ratio * total_steps)) if warmup_ratio > 0 else 0


def lr_at(step: int, total_steps: int, peak_lr: float, schedule: ScheduleSection) -> float:
    """The LR of optimizer step ``step`` (0-based) of a run of ``total_steps``: linear warm-up over
    the first ``schedule.warmup_ratio`` of steps, then cosine towards ``schedule.min_lr_ratio`` x
    ``peak_lr`` (``optimizer.lr``), reached at step ``total_steps``.

    The POLAR recipe (xtuner LinearLR warm-up for 3% of steps, then CosineAnnealingLR to 0.1 x lr);
    the same values LambdaLR gave earlier versions (``lr * factor``, in that order).

    >>> [round(lr_at(s, 8, 1.0, ScheduleSection(warmup_ratio=0.25, min_lr_ratio=0.1)), 4) for s in range(8)]
    [0.5, 1.0, 1.0, 0.9397, 0.775, 0.55, 0.325, 0.1603]
    """
    warmup = warmup_steps(total_steps, schedule.warmup_ratio)
    if step < warmup:
        factor = (step + 1) / warmup
    else:
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        factor = schedule.min_lr_ratio + (1.0 - schedule.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak_lr * factor
