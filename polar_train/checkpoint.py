"""Training checkpoints: save and resume. Data, never code: safetensors and JSON only.

A run's output directory::

    output_dir/
      checkpoints/
        step-40/                   one checkpoint; it counts only once COMPLETE exists
          COMPLETE                 written last ({"step": 40}); a step-N without it is ignored
          trainer_state.json       format, step, total_steps, AdamW step, fp16 loss scale, the launch
                                   (engine, ranks, ZeRO stage, precision, offload), export dtype,
                                   metrics to continue, and every state file with its size in bytes
          state-00001.safetensors  per parameter NAME: "fp32/<name>" (master weight), "exp_avg/<name>",
          ...                      "exp_avg_sq/<name>" (AdamW moments); shards of at most ~2 GB;
                                   trainable parameters only (LoRA: adapters + v_head; the base is model.path's)
          rng/rank-00000.safetensors   RNG states, one file per rank
          config.yaml              the resolved run config
          model_files/             config.json + tokenizer + remote-code *.py: convert needs no base folder
          metrics.jsonl            the run's metrics up to this step (restored on resume)
        .tmp-step-50/              a save in progress (or one a crash interrupted: ignored, removed)
      hf/                          the final export (HF layout, SPEC 4)

Every engine writes the same files: it hands over each parameter's fp32 master and moments,
whole, one parameter at a time (``Engine.named_state``: DeepSpeed's tensor-fragment API under
ZeRO), and rank 0 writes them, one shard at a time. So a checkpoint resumes on ANY launch (16 GPUs
-> 8, ZeRO-2 -> ZeRO-3, DeepSpeed -> one plain process and back) and sets every master weight,
both AdamW moments and the AdamW step exactly. The LR is a function of (step, total_steps)
(engine/schedule.py): nothing of it is saved but ``total_steps``. The data position is the step
alone: the pairs of a step are a function of (seed, epoch, step), whatever the number of ranks.
RNG states are per rank: rank r restores the state rank r saved, ranks the saved run did not have
are seeded from (step, rank) (only LoRA dropout draws random numbers after the model's init).

Saving writes ``.tmp-step-N``, fsyncs it, renames it ``step-N``, then writes ``COMPLETE``: a crash
at any point leaves the previous checkpoint the latest.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from polar_train.adapters import LoraSection, check_resume_lora, lora_settings
from polar_train.config import CheckpointSection, save_config
from polar_train.engine.dist import Dist
from polar_train.engine.protocol import STATE_KEYS, Engine, describe_launch, launch_of
from polar_train.errors import TrainingError, UserError
from polar_train.files import fsync_tree, publish_dir, save_tensors, space_message, write_text
from polar_train.model import hf
from polar_train.model.build import ModelSource, export_dtype
from polar_train.model.lora import count_parameters
from polar_train.rng import rng_state, seed_rng, set_rng_state

log = logging.getLogger("polar_train")

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
MODEL_FILES = "model_files"
METRICS_FILE = "metrics.jsonl"
FORMAT_VERSION = 2  # 1: pickled torch / DeepSpeed files (polar-train 0.1), no longer read
SHARD_BYTES = 2 * 1024**3  # a state shard holds at most this much (a larger tensor gets one of its own)
_STEP_DIR = re.compile(r"step-(\d+)")


@dataclass
class TrainerState:
    """What the loop needs to continue besides the engine: the next step and running figures."""

    step: int = 0  # optimizer steps done
    total_steps: int = 0  # the run's length: the LR schedule's end (engine/schedule.py)
    bad_in_a_row: int = 0  # consecutive non-finite steps
    last_train: dict[str, Any] = field(default_factory=dict)
    last_eval: dict[str, Any] = field(default_factory=dict)
    eval_report: dict[str, Any] | None = None  # evaluate.pair_report of the last eval (the export's model card)


# --- saving ----------------------------------------------------------------------------------


def save_checkpoint(engine: Engine, dist: Dist, out: Path, state: TrainerState, source: ModelSource, *,
                    checkpoint: CheckpointSection, lora: LoraSection, config: Mapping[str, Any]) -> Path:
    """Write ``out/checkpoints/step-N`` (every rank calls this) and prune old ones; returns the path.
    ``config``: the run's config as a plain mapping (``config.to_dict``), saved as its config.yaml.

    A failed write (disk full, permissions) removes the partial folder and raises a
    ``TrainingError`` naming the folder, the space a checkpoint needs and the checkpoint that
    stays the latest.
    """
    root = out / CHECKPOINTS
    final, tmp = root / f"step-{state.step}", root / f".tmp-step-{state.step}"
    previous = latest_checkpoint(out)

    def failed(error: BaseException) -> TrainingError:
        if dist.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            if final.is_dir() and not (final / COMPLETE).is_file():  # renamed, but COMPLETE could not be written
                shutil.rmtree(final, ignore_errors=True)
        keep = (f"{previous} is intact and checkpoint.resume=auto continues from it" if previous
                else "no earlier checkpoint exists")
        what = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        # what a checkpoint takes: the previous one's size, else fp32 master + 2 AdamW moments per trainable parameter
        needed = (sum(f.stat().st_size for f in previous.rglob("*") if f.is_file()) if previous
                  else 12 * count_parameters(engine.model)[0])
        return TrainingError(final, f"checkpoint could not be written: {what}; {space_message(root, needed)}",
                             f"free disk space or fix permissions under {root}, lower checkpoint.save_total_limit, "
                             f"or set another output_dir; {keep}")

    error: OSError | None = None
    if dist.rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        except OSError as e:
            error = e
    if dist.any_rank(error is not None):
        raise failed(error or OSError(errno.EIO, "rank 0 could not create the checkpoint folder"))
    shards = ShardWriter(tmp) if dist.rank == 0 else None
    try:
        for name, tensors in engine.named_state():  # DeepSpeed: a collective, every rank iterates
            if shards is not None and tensors is not None:
                shards.add(name, tensors)
        save_tensors(rng_state(), tmp / "rng" / f"rank-{dist.rank:05d}.safetensors")
        if shards is not None:
            _write_run_files(tmp, out, state, checkpoint, lora, config, source, engine, shards.close())
    except OSError as e:
        error = e
    if dist.any_rank(error is not None):  # also the barrier: every rank's files are written
        raise failed(error or OSError(errno.EIO, "another rank failed to write its part"))
    try:
        if dist.local_rank == 0:  # the page cache is per machine: one rank per machine flushes it
            fsync_tree(tmp)
    except OSError as e:
        error = e
    if dist.any_rank(error is not None):
        raise failed(error or OSError(errno.EIO, "another machine failed to flush the checkpoint to disk"))
    if dist.rank == 0:
        try:
            publish_dir(tmp, final, synced=True)  # replaces an incomplete leftover of an interrupted run
            write_text(final / COMPLETE, json.dumps({"step": state.step}) + "\n")  # atomic, fsynced
        except OSError as e:
            error = e
    if dist.any_rank(error is not None):
        raise failed(error or OSError(errno.EIO, "rank 0 failed to finish the checkpoint"))
    if dist.rank == 0:
        try:
            _prune(root, checkpoint.save_total_limit)
        except OSError as e:  # the new checkpoint is complete: an old one left behind costs only space
            log.warning("could not remove old checkpoints under %s: %s", root, e)
    return final


class ShardWriter:
    """Writes a ``state-NNNNN.safetensors`` file whenever the next tensors would take it over
    ``limit`` bytes (memory: about one shard). A failed write is raised by ``close``, so rank 0
    keeps iterating ``named_state``, whose collectives the other ranks are in."""

    def __init__(self, folder: Path, limit: int = SHARD_BYTES):
        self.folder, self.limit = folder, limit
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: dict[str, int] = {}  # file name -> size in bytes
        self.error: OSError | None = None

    def add(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + nbytes > self.limit:
            self._write()
        if self.error is None:
            self.pending.update({f"{key}/{name}": t.contiguous() for key, t in tensors.items()})
            self.pending_bytes += nbytes

    def _write(self) -> None:
        path = self.folder / f"state-{len(self.files) + 1:05d}.safetensors"
        try:
            save_tensors(self.pending, path, metadata={"format": "pt"})
            self.files[path.name] = path.stat().st_size
        except OSError as e:
            self.error = e
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> dict[str, int]:
        if self.pending or not self.files:
            self._write()
        if self.error is not None:
            raise self.error
        return self.files


def _write_run_files(folder: Path, out: Path, state: TrainerState, checkpoint: CheckpointSection, lora: LoraSection,
                     config: Mapping[str, Any], source: ModelSource, engine: Engine,
                     state_files: dict[str, int]) -> None:
    meta = {
        "format": FORMAT_VERSION,
        **asdict(state),
        "adam_step": engine.adam_step,
        "loss_scale": engine.loss_scale,
        **launch_of(engine),  # engine, world_size, zero_stage, precision, offload_optimizer, offload_params
        "export_dtype": export_dtype(checkpoint.export_dtype, source.config),
        "base_model": source.path or None,
        "lora": lora_settings(lora),  # None: a full fine-tune (export.py merges a LoRA one)
        "state_files": state_files,
    }
    (folder / STATE_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    save_config(config, folder / "config.yaml")
    files = folder / MODEL_FILES
    files.mkdir()
    (files / "config.json").write_text(json.dumps(source.config.raw, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for f in sorted({f for pattern in ("*.py", *hf.SIDE_FILES) for f in source.files_dir.glob(pattern) if f.is_file()}):
        shutil.copy2(f, files / f.name)
    if (out / METRICS_FILE).is_file():
        shutil.copy2(out / METRICS_FILE, folder / METRICS_FILE)


def _prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; remove older ones and incomplete leftovers."""
    complete = complete_checkpoints(root.parent)
    for _, path in complete[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    done = {p for _, p in complete}
    for path in root.iterdir():
        stale = path.name.startswith(".tmp-step-") or _STEP_DIR.fullmatch(path.name)
        if path.is_dir() and path not in done and stale:
            shutil.rmtree(path, ignore_errors=True)


# --- finding and checking ----------------------------------------------------------------------


def complete_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under ``out/checkpoints``, oldest first."""
    root = out / CHECKPOINTS
    paths = root.iterdir() if root.is_dir() else []
    steps = ((m, p) for p in paths if (m := _STEP_DIR.fullmatch(p.name)) and (p / COMPLETE).is_file())
    return sorted((int(m.group(1)), p) for m, p in steps)


def latest_checkpoint(out: Path) -> Path | None:
    found = complete_checkpoints(out)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | Path, where: str) -> Path:
    """A complete checkpoint folder from a ``step-N`` folder or a run's output_dir (its latest)."""
    path = Path(path)
    expected = "expected output_dir/checkpoints/step-N or a run's output_dir"
    if not path.is_dir():
        raise UserError(where, f"{path} is not a folder" if path.exists() else f"{path} not found", expected)
    if (path / STATE_FILE).is_file() or _STEP_DIR.fullmatch(path.name):
        if not (path / COMPLETE).is_file():
            raise UserError(where, f"{path} is an incomplete checkpoint (its save was interrupted)",
                            f"use an earlier step-N folder, or the run's output_dir {path.parent.parent} "
                            "for its latest complete one")
        return path
    if (path / CHECKPOINTS).is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise UserError(where, f"{path / CHECKPOINTS} holds no complete checkpoint",
                            "the run saved none yet (checkpoint.save_steps)")
        return latest
    raise UserError(where, f"{path} is not a checkpoint", expected)


def find_resume(out: Path, checkpoint: CheckpointSection, lora: LoraSection) -> Path | None:
    """The checkpoint ``checkpoint.resume`` asks for (``auto`` = the latest complete one of
    ``out``, or none), checked file by file (``check_checkpoint``) before any heavy work, and
    against this run's ``lora`` settings. Rank 0 decides."""
    resume = checkpoint.resume
    if resume == "never":
        earlier = latest_checkpoint(out)
        if earlier is not None:  # a fresh run among them would be pruned first and mixed up on resume
            raise UserError("checkpoint.resume",
                            f"is never, but {out / CHECKPOINTS} holds an earlier run's checkpoints "
                            f"(latest {earlier.name})", "continue it with checkpoint.resume=auto, delete that folder, "
                            "or choose another output_dir")
        return None
    ckpt = latest_checkpoint(out) if resume == "auto" else resolve_checkpoint(resume, "checkpoint.resume")
    if ckpt is not None:
        check_resume_lora(check_checkpoint(ckpt).get("lora"), lora, ckpt)
    return ckpt


def damaged(path: Path, ckpt: Path, what: str) -> UserError:
    """The one line for a damaged checkpoint file: what is wrong and which other step to use."""
    others = [p for _, p in complete_checkpoints(ckpt.parent.parent) if p.resolve() != ckpt.resolve()]
    fix = f"use another step: {others[-1]}" if others else "the checkpoint is damaged: use another step, or start again"
    return UserError(path, what, f"it was damaged or is still being copied; {fix}")


def read_meta(ckpt: Path) -> dict[str, Any]:
    path = ckpt / STATE_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise damaged(path, ckpt, f"cannot be read ({str(e).splitlines()[0]})") from None
    if not isinstance(meta, dict):
        raise damaged(path, ckpt, "is not a JSON object")
    if meta.get("format") == 1:
        pickled = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*.pt"))[:3]
        raise UserError(ckpt, f"is a format-1 checkpoint of polar-train 0.1 (pickled files: {', '.join(pickled)}), "
                        "which this version does not read: unpickling can run code",
                        "resume or convert it with polar-train 0.1 if you trust it, or start the run again")
    missing = sorted({"format", "state_files", *(f.name for f in fields(TrainerState))} - meta.keys())
    if meta.get("format") != FORMAT_VERSION or missing:
        raise damaged(path, ckpt, f"is not a format-{FORMAT_VERSION} polar-train checkpoint state "
                      f"(format {meta.get('format')!r}{', missing ' + ', '.join(missing) if missing else ''})")
    return meta


def _open_safetensors(path: Path, ckpt: Path, size: int | None = None) -> Any:
    """``safe_open`` of a checkpoint file (headers only), or the one line naming what is wrong."""
    if not path.is_file():
        raise damaged(path, ckpt, "is missing from the checkpoint")
    if size is not None and path.stat().st_size != size:
        raise damaged(path, ckpt, f"holds {path.stat().st_size} bytes, the checkpoint wrote {size}")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:  # a malformed header, a pickle, garbage
        raise damaged(path, ckpt, f"is not a readable safetensors file ({str(e).splitlines()[0]})") from None


def check_checkpoint(ckpt: Path) -> dict[str, Any]:
    """Read ``trainer_state.json`` and check every state and RNG file (present, the size written,
    a safetensors header): a damaged or tampered checkpoint stops here with one line, before
    any heavy work. Returns the state."""
    meta = read_meta(ckpt)
    for name, size in meta["state_files"].items():
        _open_safetensors(ckpt / name, ckpt, size)
    for rank in range(meta["world_size"]):
        _open_safetensors(ckpt / "rng" / f"rank-{rank:05d}.safetensors", ckpt)
    return meta


# --- loading ----------------------------------------------------------------------------------


class CheckpointState:
    """A checkpoint's training state by parameter name (``engine.protocol.NamedState``), read
    one tensor at a time from the memory-mapped shards::

        state = CheckpointState(ckpt, check_checkpoint(ckpt))
        state.tensor("v_head.weight", "fp32")     # [1, H] float32, the master weight
        state.tensor("v_head.weight", "exp_avg")  # [1, H] float32; "exp_avg_sq" likewise
    """

    def __init__(self, ckpt: Path, meta: Mapping[str, Any]):
        self.ckpt = ckpt
        self.adam_step: int = meta["adam_step"]
        self.loss_scale: float | None = meta["loss_scale"]
        self.files = {name: _open_safetensors(ckpt / name, ckpt) for name in meta["state_files"]}
        self.where = {key: name for name, f in self.files.items() for key in f.keys()}  # "fp32/<name>" -> file
        self.shapes = {key.split("/", 1)[1]: torch.Size(self.files[name].get_slice(key).get_shape())
                       for key, name in self.where.items() if key.startswith("fp32/")}

    def tensor(self, name: str, key: str) -> torch.Tensor:
        where = f"{key}/{name}"
        if key not in STATE_KEYS or where not in self.where:
            raise damaged(self.ckpt / STATE_FILE, self.ckpt, f"its state files hold no {where}")
        return self.files[self.where[where]].get_tensor(where).float()

    def check(self, shapes: Mapping[str, torch.Size]) -> None:
        """The model being resumed has exactly these trainable parameters, of these shapes."""
        saved = {n: s for n, s in self.shapes.items() if f"exp_avg/{n}" in self.where}  # trainable ones
        missing, extra = sorted(set(shapes) - set(saved)), sorted(set(saved) - set(shapes))
        wrong = [f"{n} {tuple(saved[n])} != {tuple(s)}" for n, s in shapes.items()
                 if n in saved and tuple(saved[n]) != tuple(s)]
        if missing or extra or wrong:
            found = "; ".join(f"{what}: {', '.join(names[:5])}" for what, names in
                              (("missing", missing), ("unexpected", extra), ("shape", wrong)) if names)
            raise UserError(self.ckpt, f"does not hold this model's parameters ({found})",
                            "resume with the model config that wrote it (its config.yaml)")

    def weights(self) -> Mapping[str, torch.Tensor]:
        """name -> fp32 master weight, each read on access (convert)."""
        return _Weights(self)


class _Weights(Mapping):
    def __init__(self, state: CheckpointState):
        self.state = state

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.state.tensor(name, "fp32")

    def __iter__(self) -> Iterator[str]:
        return iter(self.state.shapes)

    def __len__(self) -> int:
        return len(self.state.shapes)


def fresh_state(dist: Dist, out: Path, total_steps: int) -> TrainerState:
    """Step 0: a metrics.jsonl left by an earlier run in ``out`` is removed, not appended to."""
    if dist.rank == 0 and (out / METRICS_FILE).exists():
        (out / METRICS_FILE).unlink()
    return TrainerState(total_steps=total_steps)


def load_checkpoint(engine: Engine, dist: Dist, ckpt: Path, out: Path) -> TrainerState:
    """Restore the engine by parameter name (any launch: see the module docstring), this rank's
    RNG and (rank 0) metrics.jsonl; returns the loop's state as saved (its ``total_steps`` is the
    saved run's length: train.py compares it with this run's).
    Later checkpoints of ``out`` (a resume from an earlier step) are removed: training from here
    rewrites those steps, and ``checkpoint.resume=auto`` must not pick the abandoned ones.
    """
    meta = check_checkpoint(ckpt)
    saved = {key: meta[key] for key in launch_of(engine)}
    if saved != launch_of(engine):
        log.info("%s was written by %s; this run has %s: restoring it by parameter name", ckpt,
                 describe_launch(saved), describe_launch(launch_of(engine)))
    engine.load_named_state(CheckpointState(ckpt, meta))
    if dist.rank < meta["world_size"]:
        rng = _open_safetensors(ckpt / "rng" / f"rank-{dist.rank:05d}.safetensors", ckpt)
        set_rng_state({key: rng.get_tensor(key) for key in rng.keys()})
    else:  # a rank the saved run did not have (see the module docstring)
        seed_rng((meta["step"] * 1_000_003 + dist.rank) % 2**32)
    step = meta["step"]
    if dist.rank == 0:
        for later, path in complete_checkpoints(out):
            if later > step and path.resolve() != ckpt.resolve():
                log.warning("resuming from step %d: removing the later checkpoint %s", step, path)
                shutil.rmtree(path)
        metrics = out / METRICS_FILE
        if (ckpt / METRICS_FILE).is_file():
            if (ckpt / METRICS_FILE).resolve() != metrics.resolve():
                shutil.copyfile(ckpt / METRICS_FILE, metrics)  # rows after the checkpoint go
        elif metrics.exists():
            metrics.unlink()
    dist.barrier()
    log.info("resumed from %s (step %d)", ckpt, step)
    return TrainerState(step, meta["total_steps"], meta["bad_in_a_row"], meta["last_train"], meta["last_eval"],
                        meta["eval_report"])
