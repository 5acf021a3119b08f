"""The training recipe: ``run(cfg)`` reads top to bottom.

JSONL -> POLAR token ids (data.py) -> step plan and packed micro-batches (packing.py) ->
reward model (model/) -> Bradley-Terry loss (loss.py) -> engine step (engine.py); evaluation
at the start, every ``train.eval_steps`` and at the end; the HF export under ``output_dir/hf``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from polar_train.config import Config, save_config, to_dict
from polar_train.data import load_pair_dataset
from polar_train.engine import TorchEngine
from polar_train.errors import UserError
from polar_train.evaluate import pair_rewards
from polar_train.loss import pair_losses, pair_stats, summarize
from polar_train.model import InternLM2RewardModel, ModelConfig, load_model, resolve_attention, save_model
from polar_train.packing import StepPlanner, pack_step, pair_cost
from polar_train.reporting import MetricsWriter, format_metrics, setup_logging
from polar_train.tokenizer import load_tokenizer, special_token_ids

log = logging.getLogger("polar_train")


@dataclass
class PairSet:
    """Token-id pairs that fit the micro-batch budget, and how many did not."""

    pairs: list[tuple[list[int], list[int]]]
    costs: list[int]
    num_over_budget: int


def run(cfg: Config) -> dict[str, float]:
    """Train, evaluate and export; returns the final eval metrics (or the last train ones)."""
    out = Path(cfg.output_dir)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    prepare_output_dir(out, cfg)
    setup_logging(out / "train.log")
    torch.manual_seed(cfg.seed)

    model, tokenizer_path = build_model(cfg, device)
    tokenizer = load_tokenizer(tokenizer_path)
    special_token_ids(tokenizer, model.config.reward_token_id)
    share_max_len = model.config.max_position_embeddings if model.config.rope_scaling else None
    autocast_dtype = resolve_precision(cfg.train.precision, device)
    log.info("attention %s | precision %s | device %s", model.attention, autocast_dtype or "fp32", device)

    train_set = load_pairs(cfg, cfg.data.train_files, tokenizer, tokenizer_path, share_max_len, "train")
    eval_set = load_pairs(cfg, cfg.data.eval_files, tokenizer, tokenizer_path, share_max_len, "eval") if cfg.data.eval_files else None
    planner = StepPlanner(
        train_set.costs, pairs_per_step=cfg.train.pairs_per_step, max_tokens=cfg.data.max_tokens, seed=cfg.seed
    )
    total_steps = cfg.train.max_steps or cfg.train.epochs * planner.steps_per_epoch
    engine = TorchEngine(model, cfg.train, total_steps, device)
    writer = MetricsWriter(out, enabled=engine.rank == 0)
    log.info("%d train pairs, %d steps of %d pairs", len(train_set.pairs), total_steps, cfg.train.pairs_per_step)

    def evaluate(step: int) -> dict[str, float]:
        if eval_set is None:
            return {}
        metrics = eval_metrics(engine.model, eval_set, cfg, device, autocast_dtype, share_max_len)
        writer.write(step, "eval", metrics)
        log.info("eval step %d | %s", step, format_metrics(metrics, ("loss", "accuracy", "margin")))
        return metrics

    cast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    final = evaluate(0)
    bad_in_a_row = 0
    bar = tqdm(total=total_steps, desc="train", unit="step", disable=engine.rank != 0, dynamic_ncols=True)
    for step in range(total_steps):
        t0 = time.perf_counter()
        epoch, in_epoch = divmod(step, planner.steps_per_epoch)
        step_pairs = len(planner.step_pairs(epoch, in_epoch))  # the global batch: the loss divides by it
        plan = planner.plan(epoch, in_epoch)[engine.rank]
        micro_batches = pack_step(plan, train_set.pairs, shared_prefix=cfg.data.shared_prefix, share_max_len=share_max_len)
        engine.model.train()
        loss_sum = torch.zeros((), device=device)
        stats = torch.zeros(6, device=device)
        num_tokens = 0
        for mb in micro_batches:
            num_tokens += mb.num_tokens
            mb = mb.to(device)
            with cast:
                rewards = engine.model(mb.input_ids, mb.position_ids, mb.meta, mb.reward_index).float()  # [2P]
            chosen, rejected = rewards.chunk(2)
            losses = mb.pair_weight * pair_losses(
                chosen, rejected, loss=cfg.train.loss, penalty=cfg.train.penalty, penalty_weight=cfg.train.penalty_weight
            )
            engine.backward(losses.sum() / step_pairs)  # a mean over ALL pairs of the step (SPEC 5)
            loss_sum += losses.detach().sum()
            stats += pair_stats(chosen, rejected, mb.pair_weight)
        lr = engine.lr
        grad_norm, applied = engine.step()
        totals = engine.all_reduce_sum(torch.cat([loss_sum[None], stats, torch.tensor([num_tokens], device=device)]))
        bad_in_a_row = 0 if applied else bad_in_a_row + 1
        if bad_in_a_row:
            log.warning("step %d: non-finite gradient norm, update skipped (%d in a row)", step + 1, bad_in_a_row)
            if bad_in_a_row >= cfg.train.max_bad_steps:
                raise NonFiniteError(step + 1, bad_in_a_row)
        if (step + 1) % cfg.train.log_steps == 0 or step + 1 == total_steps:
            values = totals.tolist()  # host sync once per logged step, deliberate
            metrics = summarize(torch.tensor(values[1:7]), values[0])
            seconds = time.perf_counter() - t0
            metrics.update(
                lr=lr,
                grad_norm=float(grad_norm),
                pairs=int(values[1]),
                tokens=int(values[7]),
                micro_batches=len(micro_batches),
                pairs_per_s=values[1] / seconds,
                tokens_per_s=values[7] / seconds,
                epoch=epoch,
            )
            writer.write(step + 1, "train", metrics)
            final = metrics
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.3f}", lr=f"{lr:.2e}")
        bar.update(1)
        if cfg.train.eval_steps and (step + 1) % cfg.train.eval_steps == 0 and step + 1 < total_steps:
            evaluate(step + 1)
    bar.close()
    final = evaluate(total_steps) or final
    export(engine.model, cfg, out / "hf", tokenizer_path)
    writer.close()
    log.info("done: %s", out / "hf")
    return final


class NonFiniteError(UserError):
    exit_code = 1

    def __init__(self, step: int, count: int):
        super().__init__(
            f"step {step}", f"{count} steps in a row had a non-finite loss or gradient norm",
            "lower train.lr, check the data, or raise train.max_bad_steps",
        )


def prepare_output_dir(out: Path, cfg: Config) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for fp32. ``auto`` = bf16 on a GPU that supports it, else fp32."""
    if precision == "fp32":
        return None
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" and not supported:
        if device.type == "cpu":
            return torch.bfloat16  # asked for explicitly: CPU autocast does bf16, slowly
        raise UserError("train.precision", f"bf16 is not supported on {device}", "use train.precision=fp32")
    return torch.bfloat16 if supported else None


def build_model(cfg: Config, device: torch.device) -> tuple[InternLM2RewardModel, str]:
    """The base checkpoint at ``model.path``, or a fresh model of ``model.fresh``'s shape."""
    attention = resolve_attention(cfg.model.attention, device)
    if cfg.model.path:
        if cfg.model.fresh.tokenizer:
            log.info("model.path is set: the fresh-model shape (model.fresh) is not used")
        model = load_model(cfg.model.path, attention=attention, gradient_checkpointing=cfg.model.gradient_checkpointing)
        return model, cfg.model.path
    fresh = cfg.model.fresh
    tokenizer = load_tokenizer(fresh.tokenizer)
    _, reward_id = special_token_ids(tokenizer, None)
    config = ModelConfig.fresh(
        vocab_size=len(tokenizer),
        hidden_size=fresh.hidden_size,
        num_hidden_layers=fresh.num_layers,
        num_attention_heads=fresh.num_heads,
        num_key_value_heads=fresh.num_kv_heads,
        intermediate_size=fresh.intermediate_size,
        max_position_embeddings=fresh.max_position_embeddings,
        rope_theta=fresh.rope_theta,
        reward_token_id=reward_id,
    )
    model = InternLM2RewardModel(config, attention=attention, gradient_checkpointing=cfg.model.gradient_checkpointing)
    model.init_weights(cfg.seed)
    log.info("fresh model: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    return model, fresh.tokenizer


def load_pairs(cfg: Config, files, tokenizer, tokenizer_path: str, share_max_len: int | None, split: str) -> PairSet:
    dataset, stats = load_pair_dataset(
        list(files), tokenizer, tokenizer_path,
        max_length=cfg.data.max_length, max_response_length=cfg.data.max_response_length,
        cache_dir=cfg.data.cache_dir or None, on_error=cfg.data.on_error,
    )
    pairs, costs, over = [], [], 0
    for c, r in zip(dataset["chosen_ids"], dataset["rejected_ids"]):
        cost = pair_cost(c, r, cfg.data.shared_prefix, share_max_len)
        if cost > cfg.data.max_tokens:
            over += 1
            continue
        pairs.append((c, r))
        costs.append(cost)
    if over:
        log.warning("%s data: %d pairs longer than data.max_tokens=%d dropped", split, over, cfg.data.max_tokens)
    if not pairs:
        raise UserError(
            ",".join(files), "no pair fits the length limits",
            f"raise data.max_tokens ({cfg.data.max_tokens}) or data.max_length ({cfg.data.max_length})",
        )
    return PairSet(pairs, costs, over)


def eval_metrics(model, eval_set: PairSet, cfg: Config, device, autocast_dtype, share_max_len) -> dict[str, float]:
    chosen, rejected = pair_rewards(
        model, eval_set.pairs, max_tokens=cfg.data.max_tokens, shared_prefix=cfg.data.shared_prefix,
        share_max_len=share_max_len, device=device, autocast_dtype=autocast_dtype,
    )
    losses = pair_losses(chosen, rejected, loss=cfg.train.loss, penalty=cfg.train.penalty, penalty_weight=cfg.train.penalty_weight)
    return summarize(pair_stats(chosen, rejected, torch.ones_like(chosen)), float(losses.sum()))


def export(model, cfg: Config, hf_dir: Path, tokenizer_path: str) -> None:
    dtype = None if cfg.train.export_dtype == "auto" else getattr(torch, cfg.train.export_dtype)
    save_model(model, hf_dir, base_dir=cfg.model.path or tokenizer_path, dtype=dtype)
