"""Bradley-Terry objective, its focal variant, reward penalties, Plackett-Luce over ranked lists
and pair metrics (SPEC sections 5 and 10).

The loss functions return per-pair (per-list) losses and the caller sums them, never means: a
step's loss is the mean over every implied pair (``listwise``: every list) of the global batch
(all ranks, all micro-batches), and micro-batches hold different numbers of them, so the caller
divides the summed loss by the step's count once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pair_losses(
    chosen: torch.Tensor,  # [P] rewards of the chosen candidates
    rejected: torch.Tensor,  # [P]
    *,
    loss: str = "ranking",
    penalty: str = "none",
    penalty_weight: float = 0.01,
) -> torch.Tensor:  # [P] per-pair loss
    """Per-pair loss.

    ranking: ``-logsigmoid(r_c - r_r)`` (Bradley & Terry 1952; the POLAR recipe).
    focal: ``(1 - p)^2 * ranking`` with ``p = 2 * relu(sigmoid(r_c - r_r) - 0.5)`` (POLAR's xtuner
    focal ranking loss, after Lin et al. 2017).
    Penalties act on both rewards of the pair: ``log_barrier`` ``-log(5 - x) - log(x + 5)`` with x
    clamped to +-(5 - 1e-3), ``L2`` ``x^2``.
    """
    margin = chosen.float() - rejected.float()
    out = -F.logsigmoid(margin)
    if loss == "focal":
        p = 2.0 * torch.relu(torch.sigmoid(margin) - 0.5)
        out = (1.0 - p) ** 2 * out
    elif loss not in ("ranking", "listwise"):  # listwise on a pair is the ranking loss
        raise ValueError(f"unknown loss {loss!r}")
    if penalty != "none":
        both = torch.stack([chosen.float(), rejected.float()])  # [2, P]
        if penalty == "log_barrier":
            x = both.clamp(-5.0 + 1e-3, 5.0 - 1e-3)
            pen = -torch.log(5.0 - x) - torch.log(x + 5.0)
        elif penalty == "L2":
            pen = both**2
        else:
            raise ValueError(f"unknown penalty {penalty!r}")
        out = out + penalty_weight * pen.sum(0)
    return out


def plackett_luce(
    rewards: torch.Tensor,  # [G, K] rewards of each list's candidates, best first (padding anywhere masked)
    mask: torch.Tensor,  # [G, K] bool, True for real candidates (a prefix of each row)
) -> torch.Tensor:  # [G] per-list loss
    """Plackett-Luce negative log-likelihood of each ranking, divided by K - 1 (SPEC 10):
    ``-sum_{i<K} [r_i - log sum_{j>=i} exp(r_j)] / (K - 1)`` (Plackett 1975; Luce 1959).

    For K = 2 it is ``-logsigmoid(r_1 - r_2)``, the pair ranking loss.
    """
    r = rewards.float().masked_fill(~mask, -1e9)  # exp(-1e9 - max) == 0: padding joins no denominator
    tail = torch.logcumsumexp(r.flip(-1), dim=-1).flip(-1)  # [G, K] log sum_{j>=i} exp(r_j)
    k = mask.sum(-1)  # [G]
    terms = torch.where(mask, tail - r, torch.zeros_like(r))  # the last candidate's term is 0
    return terms.sum(-1) / (k - 1).clamp(min=1)


def pair_stats(chosen: torch.Tensor, rejected: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted sums kept on device until the step ends (one host sync per step, not per micro-batch).

    Returns [6]: pairs, correct, margin sum, chosen sum, rejected sum, chosen^2 + rejected^2 sum.
    ``weight`` is 1 for real pairs, 0 for the filler pairs that keep ranks in lockstep.
    """
    c, r, w = chosen.detach().float(), rejected.detach().float(), weight.float()
    return torch.stack(
        [w.sum(), (w * (c > r).float()).sum(), (w * (c - r)).sum(), (w * c).sum(), (w * r).sum(),
         (w * (c * c + r * r)).sum()]
    )


def summarize(stats: torch.Tensor, loss_sum: float) -> dict[str, float]:
    """Turn summed ``pair_stats`` (already reduced over micro-batches and ranks) into metrics."""
    n, correct, margin, c_sum, r_sum, sq_sum = stats.tolist()
    n = max(n, 1.0)
    mean_all = (c_sum + r_sum) / (2 * n)
    var_all = max(sq_sum / (2 * n) - mean_all**2, 0.0)
    return {
        "loss": loss_sum / n,
        "accuracy": correct / n,
        "margin": margin / n,
        "chosen_reward": c_sum / n,
        "rejected_reward": r_sum / n,
        "reward_std": var_all**0.5,
    }
