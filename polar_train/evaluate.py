"""Packed inference over groups of sequences, and the eval report (figures, JSON, plots).

Legend: N = pairs, G = groups of sequences sharing a prompt, T = tokens in one forward.

Inference: a *group* is a list of token-id sequences that begin alike (all candidates of one
prompt and reference). ``group_rewards`` lays each group out with its common prefix stored once
(``packing.layout_groups``), packs the groups best-fit decreasing into forwards of at most
``max_tokens`` tokens, and returns one reward per sequence, equal (up to float summation order)
to running every sequence alone. A group costlier than ``max_tokens`` is split into smaller
groups; a single sequence longer than ``max_tokens`` runs alone in its own forward::

    group A (3 outputs, prefix p)  ->  [p a1' | a2' | a3']       one forward may hold
    group B (pair, prefix q)       ->  [q c' | r']               several such groups

This is the one inference path: ``polar-train score`` and ``eval`` (scoring.py) and training's
own eval (train.py, each rank running its share of the forwards: ``Ranks``) all come here, so
training's eval and ``polar-train eval`` give the same figures on the same data and model.

Report: ``build_report(rewards, rows, **counts)`` turns the rewards of rows (pairs and lists)
into the figures a user (and the trainer at its eval steps) wants; ``write_report`` writes
``report.json`` and two PNG plots. Example::

    rewards = group_rewards(model, [row.seqs for row in rows], max_tokens=16384)
    report = build_report(rewards, rows, num_dropped=3)
    chosen, rejected = implied_pairs(rewards, rows)  # [P] each
    write_report(report, "runs/x/eval", chosen, rejected)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from polar_train.errors import UserError
from polar_train.files import write_atomically, write_text
from polar_train.model.card import REWARD_STATS
from polar_train.packing import Group, best_fit_decreasing, group_cost, layout_groups
from polar_train.ranks import Ranks

PERCENTILES = (5, 25, 50, 75, 95)
REPORT_FILE = "report.json"
REWARDS_PLOT = "rewards.png"  # chosen and rejected reward histograms, overlaid
MARGIN_PLOT = "margin.png"  # histogram of chosen - rejected


# ---------------------------------------------------------------------------------------------
# Packed inference
# ---------------------------------------------------------------------------------------------


def split_group(seqs: Sequence[Sequence[int]], max_tokens: int, share_max_len: int | None = None) -> list[list[int]]:
    """Cut a group into consecutive sub-groups (lists of indices) that each fit ``max_tokens``.

    Greedy in input order; the shared-prefix cost is updated incrementally (the common prefix
    of a sub-group is the shortest common prefix of each member with its first one), so a
    group of k sequences costs O(k * length). A sequence longer than ``max_tokens`` ends up alone.

    >>> split_group([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9, 9]], max_tokens=6)
    [[0, 1], [2]]
    """
    chunks: list[list[int]] = []
    first: Sequence[int] = ()
    common = total = min_len = max_len = 0
    for i, seq in enumerate(seqs):
        if chunks:
            n = 0  # common prefix of `seq` and the chunk's first sequence
            limit = min(common, len(seq))
            while n < limit and seq[n] == first[n]:
                n += 1
            k = len(chunks[-1]) + 1
            c_min, c_max, c_total = min(min_len, len(seq)), max(max_len, len(seq)), total + len(seq)
            shared = 0 if share_max_len is not None and c_max > share_max_len else min(n, c_min - 1)
            if c_total - (k - 1) * shared <= max_tokens:
                chunks[-1].append(i)
                common, total, min_len, max_len = n, c_total, c_min, c_max
                continue
        chunks.append([i])
        first, common, total, min_len, max_len = seq, len(seq), len(seq), len(seq), len(seq)
    return chunks


@dataclass
class InferenceStats:
    """Token accounting of one ``group_rewards`` call."""

    num_sequences: int = 0
    num_sequence_tokens: int = 0  # summed lengths: what separate sequences would cost
    num_packed_tokens: int = 0  # tokens actually run (shared prefixes once)
    num_forwards: int = 0
    num_over_budget: int = 0  # sequences longer than max_tokens, each run alone


@torch.no_grad()
def group_rewards(
    model: torch.nn.Module,
    groups: Sequence[Sequence[Sequence[int]]],
    *,
    max_tokens: int,
    shared_prefix: bool = True,
    share_max_len: int | None = None,
    device: torch.device | str | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    ranks: Ranks | None = None,
    on_forward: Callable[[list[tuple[int, int]]], None] | None = None,
    stats: InferenceStats | None = None,
) -> list[list[float]]:
    """Reward of every sequence of every group: ``out[g][k]`` for ``groups[g][k]``.

    ``share_max_len``: share a prefix only within groups whose sequences are all at most this
    long (dynamic RoPE scaling, ``ModelConfig.share_max_len``). ``device`` defaults to the
    model's. ``autocast`` makes the context each forward runs in (bf16 autocast for fp32
    weights). ``ranks``: split the forwards over processes (training's ``dist``; None = one process):
    every rank runs the same number of forwards (ZeRO-3 gathers parameters in lockstep; a rank
    short of work repeats a small forward and discards it), and one ``all_reduce_sum`` gathers
    the rewards, so every rank returns all of them. ``on_forward`` is
    called after each forward with the ``(group, index)`` pairs it scored (progress bars).
    ``stats``, when given, is filled in (this rank's forwards).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, not {max_tokens}")
    stats = stats if stats is not None else InferenceStats()
    device = torch.device(device) if device is not None else next(model.parameters()).device

    # (group, member indices) units that each fit the budget, unless one sequence alone does not
    units: list[tuple[int, list[int]]] = []
    for g, seqs in enumerate(groups):
        if not shared_prefix:
            units.extend((g, [k]) for k in range(len(seqs)))
        elif seqs:
            units.extend((g, chunk) for chunk in split_group(seqs, max_tokens, share_max_len))
        stats.num_sequences += len(seqs)
        stats.num_sequence_tokens += sum(len(s) for s in seqs)
        stats.num_over_budget += sum(len(s) > max_tokens for s in seqs)
    unit_seqs = [[groups[g][k] for k in members] for g, members in units]
    costs = [group_cost(seqs, shared_prefix, share_max_len) for seqs in unit_seqs]
    bins = best_fit_decreasing(list(range(len(units))), costs, max_tokens)
    offsets = [0]  # group g's rewards sit at flat[offsets[g]:offsets[g + 1]]
    for seqs in groups:
        offsets.append(offsets[-1] + len(seqs))
    flat = torch.zeros(offsets[-1], device=device)  # [S] this rank's rewards, zeros elsewhere
    rank, world_size = (ranks.rank, ranks.world_size) if ranks is not None else (0, 1)
    num_forwards = -(-len(bins) // world_size)  # the same on every rank
    mine = bins[rank::world_size]
    filler = [min(range(len(units)), key=costs.__getitem__)] if units else []  # the cheapest unit, discarded

    was_training = model.training
    model.eval()
    try:
        for i in range(num_forwards):
            unit_ids = mine[i] if i < len(mine) else filler
            packed = layout_groups([unit_seqs[u] for u in unit_ids], shared_prefix=shared_prefix,
                                   share_max_len=share_max_len)
            reward_index = torch.tensor([i for lasts in packed.last_index for i in lasts], dtype=torch.int64)
            with autocast() if autocast else contextlib.nullcontext():
                rewards = model(packed.input_ids.to(device), packed.position_ids.to(device), packed.meta.to(device),
                                reward_index.to(device))  # [S] fp32
            if i >= len(mine):
                continue
            done = [(units[u][0], k) for u in unit_ids for k in units[u][1]]
            flat[[offsets[g] + k for g, k in done]] = rewards.float()
            stats.num_packed_tokens += packed.input_ids.numel()
            stats.num_forwards += 1
            if on_forward is not None:
                on_forward(done)
    finally:
        model.train(was_training)
    if ranks is not None and world_size > 1:
        flat = ranks.all_reduce_sum(flat)
    values = flat.cpu().tolist()  # one host sync for the whole call, deliberate
    return [values[offsets[g]:offsets[g + 1]] for g in range(len(groups))]


def autocast_to(dtype: torch.dtype | None,
                device: torch.device | str) -> Callable[[], contextlib.AbstractContextManager] | None:
    """The ``autocast`` argument of ``group_rewards`` that computes in ``dtype`` (None: as stored)."""
    if dtype is None:
        return None
    return lambda: torch.autocast(torch.device(device).type, dtype=dtype)


def implied_pairs(rewards: Sequence[Sequence[float]], rows: Sequence[Group]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rewards of every implied pair of every row, row by row: ([P], [P]) fp32 (better, worse).

    ``rewards[g][k]`` is the reward of ``rows[g].seqs[k]`` (``group_rewards`` of the rows' seqs)."""
    chosen = [r[b] for r, g in zip(rewards, rows) for b in g.better]
    rejected = [r[w] for r, g in zip(rewards, rows) for w in g.worse]
    return torch.tensor(chosen, dtype=torch.float32), torch.tensor(rejected, dtype=torch.float32)


def list_loss(rewards: Sequence[Sequence[float]], rows: Sequence[Group]) -> float:
    """Mean Plackett-Luce loss (``loss.kind=listwise``) over the rows."""
    from polar_train.loss import plackett_luce

    losses = [plackett_luce(torch.tensor([[r[k] for k in g.order]]), torch.ones(1, len(g.order), dtype=torch.bool))
              for r, g in zip(rewards, rows)]
    return torch.cat(losses).mean().item() if losses else float("nan")


def reward_stats(rewards: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Mean and std (ddof 0) of every eval sequence's reward, each candidate once (not once per
    pair it is in): what ``polar-train score --normalize`` divides by (``reward_stats.json``)."""
    x = _as_float64([v for row in rewards for v in row])
    return {"mean": x.mean().item() if x.numel() else None, "std": x.std(correction=0).item() if x.numel() else None,
            "candidates": x.numel()}


def read_reward_stats(model_dir: str | os.PathLike[str]) -> tuple[float, float]:
    """``(mean, std)`` from the model folder's ``reward_stats.json`` (written by the export)."""
    path = Path(model_dir) / REWARD_STATS
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
        mean, std = float(stats["mean"]), float(stats["std"])
    except FileNotFoundError:
        raise UserError(path, "is missing: --normalize needs the reward statistics of the model's training eval",
                        "train with data.eval_files to get them, or drop --normalize") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(path, f"cannot be read ({error})", "export the model again, or drop --normalize") from None
    if not std > 0:
        raise UserError(path, f"std is {std}", "drop --normalize: the eval rewards did not vary")
    return mean, std


def normalize_rewards(row: dict[str, Any], mean: float, std: float) -> dict[str, Any]:
    """``(reward - mean) / std`` in every reward field of a scored row (null stays null)."""
    for name in ("reward", "chosen_reward", "rejected_reward"):
        if row.get(name) is not None:
            row[name] = (row[name] - mean) / std
    if row.get("rewards") is not None:
        row["rewards"] = [(r - mean) / std for r in row["rewards"]]
    return row


def list_report(rewards: Sequence[Sequence[float]], rows: Sequence[Group]) -> dict[str, Any]:
    """List figures, when some row ranks more than 2 candidates (a pair row counts as a list of 2):

    ``lists``; ``top1_accuracy``: the best-ranked candidate gets the highest reward (strictly);
    ``kendall_tau``: per list ``(concordant - discordant) / implied pairs`` (tau-a over the pairs
    the list implies; a reward tie counts as neither), averaged over the lists.
    """
    if not any(len(g.order) > 2 for g in rows):
        return {}
    top1, taus = [], []
    for r, g in zip(rewards, rows):
        best = r[g.order[0]]
        top1.append(all(best > r[k] for k in g.order[1:]))
        signs = [(r[b] > r[w]) - (r[b] < r[w]) for b, w in zip(g.better, g.worse)]
        taus.append(sum(signs) / len(signs))
    return {"lists": len(rows), "top1_accuracy": sum(top1) / len(rows), "kendall_tau": sum(taus) / len(rows)}


# ---------------------------------------------------------------------------------------------
# The eval report
# ---------------------------------------------------------------------------------------------


def build_report(rewards: Sequence[Sequence[float]], rows: Sequence[Group], **counts: int) -> dict[str, Any]:
    """The eval report of training's eval and of ``polar-train eval`` alike (the one builder):
    ``pair_report`` over every implied pair, ``list_report`` when some row is a list, and
    ``reward_stats``. ``rewards[g][k]`` is the reward of ``rows[g].seqs[k]``."""
    chosen, rejected = implied_pairs(rewards, rows)
    return {**pair_report(chosen, rejected, **counts), **list_report(rewards, rows),
            "reward_stats": reward_stats(rewards)}


def _as_float64(values: Any) -> torch.Tensor:
    return torch.as_tensor(values).detach().to(device="cpu", dtype=torch.float64).reshape(-1)


def reward_summary(values: Any) -> dict[str, float | None]:
    """mean, std (population, ddof 0), min, p5 ... p95 (linear interpolation), max; None when empty.

    >>> reward_summary([1.0, 2.0, 3.0, 4.0])["p50"]
    2.5
    """
    x = _as_float64(values)
    keys = ["mean", "std", "min", *(f"p{q}" for q in PERCENTILES), "max"]
    if x.numel() == 0:
        return dict.fromkeys(keys)
    quantiles = torch.quantile(x, torch.tensor(PERCENTILES, dtype=torch.float64) / 100).tolist()
    numbers = [x.mean().item(), x.std(correction=0).item(), x.min().item(), *quantiles, x.max().item()]
    return dict(zip(keys, numbers))


def pair_report(chosen: Any, rejected: Any, **counts: int) -> dict[str, Any]:
    """The figures of a pair evaluation, as a JSON-ready dict.

    ``chosen``, ``rejected``: [N] rewards (tensors, arrays or lists). ``counts``: integers
    copied to the report as given, by convention ``num_dropped`` (pairs that did not fit and
    got no reward), ``num_prompt_truncated``, ``num_response_truncated``.

    Scalars sit at the top level (a metrics writer can log them as they are): ``pairs``,
    ``accuracy`` (``mean(r_c > r_r)``: a tie counts as wrong, as in training), ``ties``
    (``r_c == r_r``), ``mean_margin``, ``ranking_loss`` (``mean -logsigmoid(r_c - r_r)``), and
    ``reward_mean`` / ``reward_std`` over all 2N rewards (what an RL user normalises rewards
    with). ``chosen``, ``rejected`` and ``margin`` hold ``reward_summary`` dicts. With N = 0 the
    figures are None. ``nonfinite_rewards`` counts NaN / inf rewards (a broken model; its
    figures are then NaN, which ``write_report`` writes as null).

    >>> r = pair_report([1.0, 0.5], [0.0, 0.5], num_dropped=1)
    >>> r["pairs"], r["accuracy"], r["ties"], r["mean_margin"], r["num_dropped"]
    (2, 0.5, 1, 0.5, 1)
    """
    c, r = _as_float64(chosen), _as_float64(rejected)
    if c.shape != r.shape:
        raise ValueError(f"chosen has {c.numel()} rewards and rejected {r.numel()}")
    for key, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"count {key}={value!r} is not an integer")
    n = c.numel()
    margin = c - r
    both = torch.cat([c, r])
    report: dict[str, Any] = {
        "pairs": n,
        "nonfinite_rewards": int((~torch.isfinite(both)).sum()),  # > 0: the model is broken
        "accuracy": (c > r).double().mean().item() if n else None,
        "ties": int((c == r).sum()),
        "mean_margin": margin.mean().item() if n else None,
        "ranking_loss": -torch.nn.functional.logsigmoid(margin).mean().item() if n else None,
        "reward_mean": both.mean().item() if n else None,
        "reward_std": both.std(correction=0).item() if n else None,
        **counts,
        "chosen": reward_summary(c),
        "rejected": reward_summary(r),
        "margin": reward_summary(margin),
    }
    return report


def _finite_or_null(value: Any) -> Any:
    """NaN and inf become None, so that report.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def _histograms(path: Path, series: list[tuple[str, torch.Tensor, str]], title: str, xlabel: str,
                zero_line: bool = False) -> None:
    """One PNG with the given series as overlaid histograms over shared bins (Agg, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = torch.cat([x for _, x, _ in series])
    lo, hi = (values.min().item(), values.max().item()) if values.numel() else (0.0, 1.0)
    if hi <= lo:  # all equal: give the single bar some width
        lo, hi = lo - 0.5, hi + 0.5
    bins = torch.linspace(lo, hi, 41).tolist()
    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, x, color in series:
        ax.hist(x.numpy(), bins=bins, alpha=0.55, label=f"{label} (n={x.numel()})", color=color)
    if zero_line:
        ax.axvline(0.0, color="black", linewidth=1, linestyle="--")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.legend()
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))


def write_report(report: dict[str, Any], out_dir: str | os.PathLike[str], chosen: Any = None, rejected: Any = None,
                 *, plots: bool = True) -> dict[str, Path]:
    """Write ``report.json`` and, with ``plots`` and the rewards, ``rewards.png`` (chosen and
    rejected histograms overlaid) and ``margin.png`` into ``out_dir`` (created). Every file is
    written to a temporary name and renamed. Returns name -> path of what was written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {REPORT_FILE: out / REPORT_FILE}
    text = json.dumps(_finite_or_null(report), indent=2, allow_nan=False) + "\n"
    write_text(written[REPORT_FILE], text)
    if plots and chosen is not None and rejected is not None:
        c, r = _as_float64(chosen).float(), _as_float64(rejected).float()
        keep = torch.isfinite(c) & torch.isfinite(r)  # a histogram cannot place NaN / inf
        c, r = c[keep], r[keep]
        n = report.get("pairs", c.numel())
        _histograms(out / REWARDS_PLOT, [("chosen", c, "tab:green"), ("rejected", r, "tab:red")],
                    f"Rewards of {n} pairs", "reward")
        accuracy = report.get("accuracy")
        title = "Margin chosen - rejected"
        title += f" (accuracy {accuracy:.3f})" if accuracy is not None else ""
        _histograms(out / MARGIN_PLOT, [("margin", c - r, "tab:blue")], title, "reward margin", zero_line=True)
        written[REWARDS_PLOT] = out / REWARDS_PLOT
        written[MARGIN_PLOT] = out / MARGIN_PLOT
    return written
