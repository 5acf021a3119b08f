"""The training recipe: ``run(cfg)`` reads top to bottom.

JSONL -> POLAR token ids (data.py) -> step plan and this rank's packed micro-batches
(packing.py) -> reward model (model/) -> Bradley-Terry loss (loss.py) -> engine step
(engine.py: one process, or DeepSpeed ZeRO under torchrun); evaluation at the start, every
``train.eval_steps`` and at the end; checkpoints every ``train.save_steps`` and on
SIGTERM / SIGINT (checkpoint.py); the HF export under ``output_dir/hf``.

The same code runs on every rank: all ranks compute the same step plan, each packs and runs
its own share, and the figures of a step are summed over ranks once per step.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from polar_train.checkpoint import ModelSource, export_hf, find_resume, fresh_state, load_checkpoint, save_checkpoint
from polar_train.config import Config
from polar_train.engine import build_engine, distributed
from polar_train.errors import TrainingError
from polar_train.evaluate import pair_report, write_report
from polar_train.loss import pair_losses, pair_stats, summarize
from polar_train.packing import StepPlanner, pack_step
from polar_train.reporting import MetricsWriter, format_metrics, setup_logging
from polar_train.rundir import preflight, prepare_output_dir, write_skipped_rows
from polar_train.store import PairSet, load_pairs
from polar_train.tokenizer import load_tokenizer, special_token_ids

log = logging.getLogger("polar_train")


def run(cfg: Config) -> dict[str, float]:
    """Train, evaluate and export; returns the final eval metrics (or the last train ones)."""
    out = Path(cfg.output_dir)
    preflight(cfg)  # every input checked in about a second, before any heavy work
    with distributed(cfg.deepspeed) as dist, StopSignals() as stop:
        prepare_output_dir(out, cfg)  # refuses a folder holding a different run
        setup_logging(out / "train.log", rank=dist.rank)
        torch.manual_seed(cfg.seed)

        source = ModelSource.from_config(cfg.model, cfg.seed)
        tokenizer = load_tokenizer(source.files_dir)
        special_token_ids(tokenizer, source.config.reward_token_id)
        share_max_len = source.config.max_position_embeddings if source.config.rope_scaling else None
        # every rank tokenizes its share of the rows into the shared cache, then maps the whole
        train_set = load_pairs(cfg.data, cfg.data.train_files, tokenizer, source.files_dir, share_max_len, "train", group=dist)
        eval_set = (load_pairs(cfg.data, cfg.data.eval_files, tokenizer, source.files_dir, share_max_len, "eval", group=dist)
                    if cfg.data.eval_files else None)
        if dist.rank == 0:
            write_skipped_rows(out, {"train": train_set.skipped, "eval": eval_set.skipped if eval_set else []})
        planner = StepPlanner(train_set.costs, pairs_per_step=cfg.train.pairs_per_step, max_tokens=cfg.data.max_tokens,
                              num_ranks=dist.world_size, seed=cfg.seed)
        total_steps = cfg.train.max_steps or cfg.train.epochs * planner.steps_per_epoch
        resume_from = find_resume(cfg)
        engine = build_engine(cfg, dist, source, total_steps, load_weights=resume_from is None)
        state = load_checkpoint(engine, dist, resume_from, out) if resume_from else fresh_state(dist, out)
        writer = MetricsWriter(out, enabled=dist.rank == 0, resumed_at=state.step)
        log.info("attention %s | precision %s | %d rank(s), engine %s%s | device %s", engine.attention, engine.precision,
                 dist.world_size, engine.kind, f" ZeRO-{engine.zero_stage}" if engine.zero_stage is not None else "", dist.device)
        log.info("%d train pairs, %d steps of %d pairs", len(train_set.pairs), total_steps, cfg.train.pairs_per_step)

        def evaluate(step: int) -> dict[str, float]:
            if eval_set is None:
                return {}
            chosen, rejected = eval_rewards(engine, eval_set, cfg, share_max_len).unbind(1)  # [N] each
            metrics = eval_metrics(chosen, rejected, cfg)
            state.eval_report = pair_report(chosen.cpu(), rejected.cpu(), num_dropped=eval_set.num_over_budget)
            if dist.rank == 0:  # eval/step-N/report.json; the final one, with its plots, next to hf/
                final = step == total_steps
                write_report(state.eval_report, out / "eval" / ("final" if final else f"step-{step}"),
                             chosen.cpu(), rejected.cpu(), plots=final)
            writer.write(step, "eval", metrics)
            log.info("eval step %d | %s", step, format_metrics(metrics, ("loss", "accuracy", "margin")))
            return metrics

        if state.step == 0:
            state.last_eval = evaluate(0)
        bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", disable=dist.rank != 0, dynamic_ncols=True)
        for step in range(state.step, total_steps):
            t0 = time.perf_counter()
            epoch, in_epoch = divmod(step, planner.steps_per_epoch)
            step_pairs = len(planner.step_pairs(epoch, in_epoch))  # the global batch: the loss divides by it
            micro_batches = pack_step(planner.plan(epoch, in_epoch)[dist.rank], train_set.pairs,
                                      shared_prefix=cfg.data.shared_prefix, share_max_len=share_max_len)
            engine.model.train()
            loss_sum = torch.zeros((), device=dist.device)
            stats = torch.zeros(6, device=dist.device)
            num_tokens = 0
            for i, mb in enumerate(micro_batches):  # the same count on every rank (ZeRO-3 lockstep)
                num_tokens += mb.num_tokens
                mb = mb.to(dist.device)
                with engine.autocast():
                    rewards = engine.model(mb.input_ids, mb.position_ids, mb.meta, mb.reward_index).float()  # [2P]
                chosen, rejected = rewards.chunk(2)
                losses = mb.pair_weight * pair_losses(
                    chosen, rejected, loss=cfg.train.loss, penalty=cfg.train.penalty, penalty_weight=cfg.train.penalty_weight
                )
                # a mean over ALL pairs of the step on all ranks (SPEC 5); the engine undoes DeepSpeed's rank average
                engine.backward(losses.sum() / step_pairs, last=i == len(micro_batches) - 1)
                loss_sum += losses.detach().sum()
                stats += pair_stats(chosen, rejected, mb.pair_weight)
            lr = engine.lr
            result = engine.step()
            extra = torch.tensor([num_tokens, float(stop.requested is not None)], device=dist.device)
            # one host sync per optimizer step, deliberate: every rank must agree on skipping and stopping
            totals = engine.all_reduce_sum(torch.cat([loss_sum[None], stats, extra])).tolist()
            state.step = step + 1
            bad = not math.isfinite(totals[0]) or (not result.applied and result.loss_scale <= 1.0)
            state.bad_in_a_row = state.bad_in_a_row + 1 if bad else 0
            if bad:
                log.warning("step %d: non-finite loss or gradient norm, update skipped (%d in a row)", state.step, state.bad_in_a_row)
                if state.bad_in_a_row >= cfg.train.max_bad_steps:
                    bar.close()
                    raise NonFiniteError(state.step, state.bad_in_a_row)
            elif not result.applied:
                log.info("step %d: fp16 overflow at loss scale %g, update skipped, scale lowered", state.step, result.loss_scale)
            if state.step % cfg.train.log_steps == 0 or state.step == total_steps:
                seconds = time.perf_counter() - t0
                metrics = summarize(torch.tensor(totals[1:7]), totals[0])
                metrics.update(lr=lr, grad_norm=result.grad_norm, pairs=int(totals[1]), tokens=int(totals[7]),
                               micro_batches=len(micro_batches), pairs_per_s=totals[1] / seconds,
                               tokens_per_s=totals[7] / seconds, epoch=epoch)
                if engine.precision == "fp16":
                    metrics["loss_scale"] = result.loss_scale
                writer.write(state.step, "train", metrics)
                state.last_train = metrics
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.3f}", lr=f"{lr:.2e}")
            bar.update(1)
            if cfg.train.eval_steps and state.step % cfg.train.eval_steps == 0 and state.step < total_steps:
                state.last_eval = evaluate(state.step)
            stopping = totals[8] > 0  # SIGTERM / SIGINT reached some rank
            if stopping or (cfg.train.save_steps and (state.step % cfg.train.save_steps == 0 or state.step == total_steps)):
                path = save_checkpoint(engine, dist, out, state, cfg, source)
                log.info("checkpoint %s", path)
            if stopping:
                bar.close()
                writer.close()
                log.warning("stopped by %s after step %d; resume with:\n  %s", stop.requested or "a signal on another rank",
                            state.step, resume_command())
                return state.last_eval or state.last_train
        bar.close()
        final = evaluate(total_steps) or state.last_train
        export_hf(engine, source, cfg, out / "hf", eval_report=state.eval_report)
        writer.close()
        log.info("done: %s", out / "hf")
        return final


class NonFiniteError(TrainingError):
    def __init__(self, step: int, count: int):
        super().__init__(
            f"step {step}", f"{count} steps in a row had a non-finite loss or gradient norm",
            "lower train.lr, check the data, or raise train.max_bad_steps",
        )


class StopSignals:
    """SIGTERM / SIGINT ask the loop to finish its step, save a checkpoint and return (exit 0).
    A second SIGINT interrupts at once. ``requested`` is the signal's name, or None."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self) -> "StopSignals":
        self.requested: str | None = None
        in_main = threading.current_thread() is threading.main_thread()  # only there can Python handle signals
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS} if in_main else {}
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning("%s: finishing this step, then saving a checkpoint and stopping", self.requested)

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def resume_command() -> str:
    """The command line that continues this run (``train.resume=auto``: the latest checkpoint)."""
    args = sys.argv[1:]
    if args[:1] != ["train"]:
        return "run the same training again with train.resume=auto"
    args = [a for a in args if not a.startswith("train.resume=")] + ["train.resume=auto"]
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return f"torchrun <the same launch options> -m polar_train {shlex.join(args)}"
    return f"polar-train {shlex.join(args)}"


@torch.no_grad()
def eval_rewards(engine, eval_set: PairSet, cfg: Config, share_max_len: int | None) -> torch.Tensor:
    """[N, 2] rewards (chosen, rejected) of every eval pair, on every rank. The pairs are split
    across ranks like a training step (equal micro-batch counts: ZeRO-3 needs every rank in
    every forward); each rank fills its rows and one all-reduce gathers them."""
    plan = StepPlanner(eval_set.costs, pairs_per_step=len(eval_set.pairs), max_tokens=cfg.data.max_tokens,
                       num_ranks=engine.world_size).plan(0, 0)[engine.rank]
    rewards = torch.zeros(len(eval_set.pairs), 2, device=engine.device)
    engine.model.eval()
    for mb in pack_step(plan, eval_set.pairs, shared_prefix=cfg.data.shared_prefix, share_max_len=share_max_len):
        mb = mb.to(engine.device)
        real = mb.pair_weight > 0  # [P] False for filler pairs
        ids = torch.tensor(mb.pair_ids, device=engine.device)[real]
        with engine.autocast():
            out = engine.model(mb.input_ids, mb.position_ids, mb.meta, mb.reward_index).float()  # [2P]
        rewards[ids] = torch.stack(out.chunk(2), dim=1)[real]  # [P, 2] -> this rank's rows
    engine.model.train()
    return engine.all_reduce_sum(rewards)


def eval_metrics(chosen: torch.Tensor, rejected: torch.Tensor, cfg: Config) -> dict[str, float]:
    losses = pair_losses(chosen, rejected, loss=cfg.train.loss, penalty=cfg.train.penalty, penalty_weight=cfg.train.penalty_weight)
    return summarize(pair_stats(chosen, rejected, torch.ones_like(chosen)), float(losses.sum()))
