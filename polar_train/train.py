"""The training recipe: ``run(cfg)`` reads top to bottom.

JSONL -> POLAR token ids (data.py) -> step plan and this rank's packed micro-batches
(packing.py) -> reward model (model/) -> Bradley-Terry loss (loss.py) -> engine step at the
LR ``lr_at(step, total_steps)`` (engine/: one process, or DeepSpeed ZeRO under torchrun);
evaluation at the start, every ``train.eval_steps`` and at the end; checkpoints every
``checkpoint.save_steps`` and on SIGTERM / SIGINT (checkpoint.py); the HF export under
``output_dir/hf`` (export.py).

The same code runs on every rank: all ranks compute the same step plan, each packs and runs
its own share, and the figures of a step are summed over ranks once per step.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from polar_train.checkpoint import TrainerState, find_resume, fresh_state, load_checkpoint, save_checkpoint
from polar_train.config import Config, LossSection, ScheduleSection, to_dict
from polar_train.engine import build_engine, distributed, lr_at
from polar_train.engine.sequence_parallel import join_sequence_parallel, plan_sequence_parallel
from polar_train.errors import TrainingError
from polar_train.evaluate import build_report, group_rewards, implied_pairs, list_loss, write_report
from polar_train.export import export_hf
from polar_train.loss import pair_losses, pair_stats, plackett_luce, summarize
from polar_train.model.build import ModelSource
from polar_train.model.lora import count_parameters
from polar_train.packing import MicroBatch, StepPlanner, pack_step
from polar_train.reporting import MetricsWriter, format_metrics, setup_logging
from polar_train.rundir import hold_output_dir, preflight, prepare_output_dir, write_skipped_rows
from polar_train.store_build import load_pairs
from polar_train.tokenizer import load_tokenizer, special_token_ids

log = logging.getLogger("polar_train")


def run(cfg: Config) -> dict[str, float]:
    """Train, evaluate and export; returns the final eval metrics (or the last train ones)."""
    out = Path(cfg.output_dir)
    preflight(cfg.data, cfg.model, cfg.deepspeed)  # every input checked in about a second, before any heavy work
    with distributed(cfg.deepspeed) as dist, StopSignals() as stop, contextlib.ExitStack() as held:
        with dist.rank_zero_first("preparing the output folder"):  # rank 0 alone writes the run files
            if dist.rank == 0:  # one run per folder: locked until this process ends, however it ends
                held.enter_context(hold_output_dir(out))
                prepare_output_dir(out, to_dict(cfg))  # refuses a folder holding a different run
        setup_logging(out / "train.log", rank=dist.rank)
        torch.manual_seed(cfg.seed)
        # rank 0 picks the checkpoint and checks its files (one line if damaged), before any heavy work
        resume_from = dist.decide_on_rank_zero("choosing the checkpoint to resume from",
                                               lambda: find_resume(out, cfg.checkpoint, cfg.model.lora))

        source = ModelSource.from_config(cfg.model, cfg.seed)
        # before any tokenizing: a group that cannot split the heads fails in one line
        sp_plan = plan_sequence_parallel(cfg.train.sequence_parallel, dist.world_size,
                                         source.config.num_attention_heads, source.config.num_key_value_heads)
        tokenizer = load_tokenizer(source.files_dir, trust_remote_code=cfg.model.trust_remote_code)
        special_token_ids(tokenizer, source.config.reward_token_id)
        share_max_len = source.config.share_max_len
        # every rank tokenizes its share of the rows into the shared cache, then maps the whole
        train_set = load_pairs(cfg.data, cfg.data.train_files, tokenizer, source.files_dir, share_max_len, "train",
                               group=dist)
        eval_set = (load_pairs(cfg.data, cfg.data.eval_files, tokenizer, source.files_dir, share_max_len, "eval",
                               group=dist)
                    if cfg.data.eval_files else None)
        if dist.rank == 0:
            write_skipped_rows(out, {"train": train_set.skipped, "eval": eval_set.skipped if eval_set else []})
        # sequence parallelism: each group of train.sequence_parallel ranks is one data-parallel rank, and
        # data.max_tokens the budget of a group's micro-batch (engine/sequence_parallel.py)
        planner = StepPlanner(train_set.costs, pairs_per_step=cfg.train.pairs_per_step, max_tokens=cfg.data.max_tokens,
                              num_ranks=sp_plan.data_parallel, seed=cfg.seed)
        total_steps = cfg.train.max_steps or cfg.train.epochs * planner.steps_per_epoch
        # a LoRA checkpoint holds the trainable parameters only: the frozen base comes from the source
        engine = build_engine(dist, source, model=cfg.model, optimizer=cfg.optimizer, deepspeed=cfg.deepspeed,
                              engine=cfg.engine, load_weights=resume_from is None or cfg.model.lora.enabled)
        sp = join_sequence_parallel(sp_plan, dist)
        sp.attach(engine.model)  # under SP each rank runs its cut of the group's micro-batches
        if resume_from:
            state = load_checkpoint(engine, dist, resume_from, out)
            if dist.rank == 0 and state.total_steps != total_steps:
                warn_length_change(resume_from, state, total_steps, cfg.optimizer.lr, cfg.schedule)
            state.total_steps = total_steps
        else:
            state = fresh_state(dist, out, total_steps)
        writer = MetricsWriter(out, enabled=dist.rank == 0, resumed_at=state.step)
        zero = f" ZeRO-{engine.zero_stage}" if engine.zero_stage is not None else ""
        log.info("attention %s | precision %s | %d rank(s), engine %s%s | device %s", engine.attention,
                 engine.precision, dist.world_size, engine.kind, zero, dist.device)
        log.info("%d train pairs, %d steps of %d pairs", len(train_set.pairs), total_steps, cfg.train.pairs_per_step)
        if sp_plan.size > 1:
            log.info("sequence parallel: %d group(s) of %d ranks, each micro-batch split along its tokens",
                     sp_plan.data_parallel, sp_plan.size)
        trainable, total = count_parameters(engine.model)
        log.info("trainable parameters: %s of %s (%.2f%%)%s", f"{trainable:,}", f"{total:,}", 100 * trainable / total,
                 f" | LoRA rank {cfg.model.lora.rank} on {', '.join(cfg.model.lora.target_modules)} + v_head"
                 if cfg.model.lora.enabled else "")
        losses_of = loss_function(cfg.loss)

        def evaluate(step: int) -> dict[str, float]:
            if eval_set is None:
                return {}
            # the one packed-inference path of `polar-train eval` and `score`, split over the ranks
            # the eval pairs' ids are read from the store for the duration of the eval only
            rows = eval_set.pairs.read(range(len(eval_set.pairs)))  # pair rows and lists
            rewards = group_rewards(engine.model, [g.seqs for g in rows], max_tokens=cfg.data.max_tokens,
                                    shared_prefix=cfg.data.shared_prefix, share_max_len=share_max_len,
                                    device=dist.device, autocast=engine.autocast,
                                    ranks=sp.data_ranks)  # per row, per sequence
            chosen, rejected = implied_pairs(rewards, rows)  # [P] each
            metrics = eval_metrics(chosen, rejected, losses_of)
            if cfg.loss.kind == "listwise":
                metrics["loss"] = list_loss(rewards, rows)
            state.eval_report = build_report(rewards, rows, **eval_set.counts)
            if dist.rank == 0:  # eval/step-N/report.json; the final one, with its plots, next to hf/
                final = step == total_steps
                write_report(state.eval_report, out / "eval" / ("final" if final else f"step-{step}"),
                             chosen, rejected, plots=final)
            writer.write(step, "eval", metrics)
            log.info("eval step %d | %s", step, format_metrics(metrics, ("loss", "accuracy", "margin")))
            return metrics

        if state.step == 0:
            state.last_eval = evaluate(0)
        # closed on an error too
        bar = held.enter_context(tqdm(total=total_steps, initial=state.step, desc="train", unit="step",
                                      disable=dist.rank != 0, dynamic_ncols=True))
        for step in range(state.step, total_steps):
            t0 = time.perf_counter()
            epoch, in_epoch = divmod(step, planner.steps_per_epoch)
            rows = planner.step_pairs(epoch, in_epoch)  # the global batch: pair rows and lists
            # the loss divides by the step's implied pairs (listwise: its lists), on all ranks
            step_count = len(rows) if cfg.loss.kind == "listwise" else int(train_set.num_pairs[rows].sum())
            micro_batches = pack_step(planner.plan(epoch, in_epoch)[sp.data_rank], train_set.pairs,
                                      shared_prefix=cfg.data.shared_prefix, share_max_len=share_max_len)
            engine.model.train()
            loss_sum = torch.zeros((), device=dist.device)
            stats = torch.zeros(6, device=dist.device)
            num_tokens = 0
            for i, mb in enumerate(micro_batches):  # the same count on every rank (ZeRO-3 lockstep)
                num_tokens += mb.num_tokens
                mb = mb.to(dist.device)
                with engine.autocast():
                    rewards = engine.model(mb.input_ids, mb.position_ids, mb.meta, mb.seq_index).float()  # [S]
                chosen, rejected = rewards[mb.better], rewards[mb.worse]  # [P] every implied pair of every row
                loss = batch_loss(cfg.loss, losses_of, rewards, mb)
                # a mean over ALL pairs (lists) of the step on all ranks (SPEC 5, 10); the engine undoes
                # DeepSpeed's rank average
                engine.backward(loss / step_count, last=i == len(micro_batches) - 1)
                loss_sum += loss.detach()
                stats += pair_stats(chosen, rejected, mb.pair_weight)
            # a function of the step: nothing to save or restore
            lr = lr_at(step, total_steps, cfg.optimizer.lr, cfg.schedule)
            engine.set_lr(lr)
            result = engine.step()
            tokens = torch.tensor([float(num_tokens)], device=dist.device)
            figures = sp.count_once(torch.cat([loss_sum[None], stats, tokens]))  # a group's ranks hold the same figures
            stopping = torch.tensor([float(stop.requested is not None)], device=dist.device)
            # one host sync per optimizer step, deliberate: every rank must agree on skipping and stopping
            totals = engine.all_reduce_sum(torch.cat([figures, stopping])).tolist()
            state.step = step + 1
            bad = not math.isfinite(totals[0]) or (not result.applied and result.loss_scale <= 1.0)
            state.bad_in_a_row = state.bad_in_a_row + 1 if bad else 0
            if bad:
                log.warning("step %d: non-finite loss or gradient norm, update skipped (%d in a row)", state.step,
                            state.bad_in_a_row)
                if state.bad_in_a_row >= cfg.train.max_bad_steps:
                    bar.close()
                    raise NonFiniteError(state.step, state.bad_in_a_row)
            elif not result.applied:
                log.info("step %d: fp16 overflow at loss scale %g, update skipped, scale lowered", state.step,
                         result.loss_scale)
            if state.step % cfg.train.log_steps == 0 or state.step == total_steps:
                seconds = time.perf_counter() - t0
                metrics = summarize(torch.tensor(totals[1:7]), totals[0])
                metrics["loss"] = totals[0] / step_count  # per implied pair, or per list (listwise)
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
            save_steps = cfg.checkpoint.save_steps
            if stopping or (save_steps and (state.step % save_steps == 0 or state.step == total_steps)):
                path = save_checkpoint(engine, dist, out, state, source, checkpoint=cfg.checkpoint,
                                       lora=cfg.model.lora, config=to_dict(cfg))
                log.info("checkpoint %s", path)
            if stopping:
                bar.close()
                writer.close()
                log.warning("stopped by %s after step %d; resume with:\n  %s",
                            stop.requested or "a signal on another rank",
                            state.step, resume_command())
                return state.last_eval or state.last_train
        bar.close()
        final = evaluate(total_steps) or state.last_train
        export_hf(engine, source, out / "hf", checkpoint=cfg.checkpoint, lora=cfg.model.lora, config=to_dict(cfg),
                  eval_report=state.eval_report)
        writer.close()
        log.info("done: %s", out / "hf")
        return final


def warn_length_change(ckpt: Path, state: TrainerState, total_steps: int, peak_lr: float,
                       schedule: ScheduleSection) -> None:
    """A resume with another total (``train.max_steps`` / ``train.epochs`` changed) continues with
    one warning naming old -> new total and the LR at the resume step before -> after: the
    schedule is a function of (step, total), so from here on it follows the new total's curve."""
    step, old_total = state.step, state.total_steps
    log.warning("resuming %s with another length: %d -> %d steps (train.max_steps / train.epochs changed); "
                "the LR schedule now follows the %d-step curve: LR at step %d %.4g -> %.4g", ckpt, old_total,
                total_steps, total_steps, step, lr_at(step, old_total, peak_lr, schedule),
                lr_at(step, total_steps, peak_lr, schedule))


class NonFiniteError(TrainingError):
    def __init__(self, step: int, count: int):
        super().__init__(
            f"step {step}", f"{count} steps in a row had a non-finite loss or gradient norm",
            "lower optimizer.lr, check the data, or raise train.max_bad_steps",
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
    """The command line that continues this run (``checkpoint.resume=auto``: the latest checkpoint)."""
    args = sys.argv[1:]
    if args[:1] != ["train"]:
        return "run the same training again with checkpoint.resume=auto"
    args = [a for a in args if not a.startswith(("train.resume=", "checkpoint.resume="))] + ["checkpoint.resume=auto"]
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return f"torchrun <the same launch options> -m polar_train {shlex.join(args)}"
    return f"polar-train {shlex.join(args)}"


def loss_function(loss: LossSection) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``losses_of(chosen, rejected)``: the [P] per-pair losses the ``loss`` section asks for."""
    return functools.partial(pair_losses, loss=loss.kind, penalty=loss.penalty, penalty_weight=loss.penalty_weight)


def batch_loss(loss: LossSection, losses_of: Callable, rewards: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    """The summed loss of a micro-batch from its [S] rewards: the pair loss over every implied pair,
    or (``listwise``) Plackett-Luce over every list; fillers weigh 0."""
    if loss.kind == "listwise":
        return (mb.list_weight * plackett_luce(rewards[mb.order_index], mb.order_mask)).sum()
    return (mb.pair_weight * losses_of(rewards[mb.better], rewards[mb.worse])).sum()


def eval_metrics(chosen: torch.Tensor, rejected: torch.Tensor, losses_of: Callable) -> dict[str, float]:
    """metrics.jsonl's eval figures: the training loss and the pair statistics over all eval pairs."""
    return summarize(pair_stats(chosen, rejected, torch.ones_like(chosen)), float(losses_of(chosen, rejected).sum()))
