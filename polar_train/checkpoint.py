"""Where the weights come from, training checkpoints (save / resume), the HF export, ``convert``.

A run's output directory::

    output_dir/
      checkpoints/
        step-40/                 one checkpoint; it counts only once COMPLETE exists
          COMPLETE               written last ({"step": 40}); a step-N without it is ignored
          trainer_state.json     step, engine, ranks, ZeRO stage, export dtype, metrics to continue
          config.yaml            the resolved run config
          model_files/           config.json + tokenizer + remote-code *.py: convert needs no base folder
          metrics.jsonl          the run's metrics up to this step (restored on resume)
          rng/rank-00000.pt      RNG states, one file per rank
          model.pt, optimizer.pt             TorchEngine
          deepspeed/, scheduler.pt           DeepSpeedEngine (save_checkpoint: ZeRO partitions per rank)
        .tmp-step-50/            a save in progress (or one a crash interrupted: ignored, removed)
      hf/                        the final export (HF layout, SPEC 4)

Saving writes into ``.tmp-step-N``, fsyncs every file, renames it to ``step-N`` and only then
writes ``COMPLETE``: a crash at any point leaves the previous checkpoint as the latest one.
The data position is the step alone: the step plan is a pure function of (seed, epoch, step).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from polar_train.config import Config, ModelSection, save_config, to_dict
from polar_train.errors import TrainingError, UserError
from polar_train.model import InternLM2RewardModel, ModelConfig, load_model, resolve_attention, save_state_dict
from polar_train.model import hf
from polar_train.tokenizer import load_tokenizer, special_token_ids

log = logging.getLogger("polar_train")

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
MODEL_FILES = "model_files"
METRICS_FILE = "metrics.jsonl"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step-(\d+)")


# ---------------------------------------------------------------------------------------------
# The starting weights
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelSource:
    """The model's config and where its starting weights come from: the base HF folder
    ``model.path``, or a fresh init of ``model.fresh``'s shape drawn from ``seed``."""

    config: ModelConfig
    files_dir: Path  # tokenizer + *.py copied into exports: the base folder or the fresh tokenizer
    path: str = ""  # base HF folder; "" = fresh
    seed: int = 0

    @classmethod
    def from_config(cls, model: ModelSection, seed: int) -> "ModelSource":
        if model.path:
            path = Path(model.path)
            if not (path / "config.json").is_file():
                raise UserError("model.path", f"{path} is not a Hugging Face model folder (no config.json)",
                                "give the folder of a POLAR base checkpoint")
            if model.fresh.tokenizer:
                log.info("model.path is set: the fresh-model shape (model.fresh) is not used")
            return cls(ModelConfig.from_file(path / "config.json"), path, str(path), seed)
        fresh = model.fresh
        tokenizer = load_tokenizer(fresh.tokenizer)
        _, reward_id = special_token_ids(tokenizer, None)
        config = ModelConfig.fresh(
            vocab_size=len(tokenizer), hidden_size=fresh.hidden_size,
            num_hidden_layers=fresh.num_layers, num_attention_heads=fresh.num_heads,
            num_key_value_heads=fresh.num_kv_heads, intermediate_size=fresh.intermediate_size,
            max_position_embeddings=fresh.max_position_embeddings, rope_theta=fresh.rope_theta,
            reward_token_id=reward_id,
        )
        return cls(config, Path(fresh.tokenizer), "", seed)

    def build(self, model: ModelSection, device: torch.device, dtype: torch.dtype, compute_dtype: torch.dtype, *,
              load_weights: bool = True, partitioned: bool = False) -> InternLM2RewardModel:
        """The whole model on ``device`` in ``dtype``. ``load_weights=False``: uninitialised memory
        (a checkpoint overwrites it); ``partitioned``: plain construction inside ``zero.Init``."""
        attention = resolve_attention(model.attention, device, compute_dtype)
        ckpt = model.gradient_checkpointing
        if partitioned:
            return InternLM2RewardModel(self.config, attention, ckpt)
        if not load_weights:
            with torch.device("meta"):
                empty = InternLM2RewardModel(self.config, attention, ckpt)
            return empty.to_empty(device=device).to(dtype)
        if self.path:
            loaded = load_model(self.path, attention="sdpa", dtype=dtype, device=device, gradient_checkpointing=ckpt)
            loaded.attention = attention  # resolved for the compute dtype (autocast), not the storage one
            return loaded
        fresh = InternLM2RewardModel(self.config, attention, ckpt)
        fresh.init_weights(self.seed)
        log.info("fresh model: %.2fM parameters", sum(p.numel() for p in fresh.parameters()) / 1e6)
        return fresh.to(device=device, dtype=dtype)

    @contextlib.contextmanager
    def tensors(self) -> Iterator[Callable[[str], torch.Tensor]]:
        """``get(name) -> tensor``, one tensor at a time (memory ~ one tensor). Opening checks the
        names and shapes against the config (headers only)."""
        if self.path:
            kind, files = hf._weight_files(Path(self.path))
            with ExitStack() as stack:
                weights = hf._Tensors(kind, files, stack)
                hf.check_tensors(weights.shapes(), self.config, self.path)
                yield weights.get
            return
        fresh: dict[str, torch.Tensor] = {}

        def get(name: str) -> torch.Tensor:
            if not fresh:  # fresh models are small (demo, tests): build it whole, once, on first use
                model = InternLM2RewardModel(self.config)
                model.init_weights(self.seed)
                fresh.update(model.state_dict())
            return fresh[name]

        yield get


def export_dtype(setting: str, config: ModelConfig) -> str:
    """``train.export_dtype`` resolved: ``auto`` = the base checkpoint's dtype (float32 if fresh)."""
    if setting != "auto":
        return setting
    base = config.raw.get("torch_dtype") or config.raw.get("dtype")
    return base if base in ("float32", "bfloat16", "float16") else "float32"


def export_hf(engine, source: ModelSource, cfg: Config, out_dir: Path, eval_report: dict | None = None) -> None:
    """The final HF folder: the fp32 master weights gathered (every rank), written by rank 0."""
    state = engine.full_state_dict()
    if engine.rank == 0:
        save_state_dict(state, source.config, out_dir, base_dir=source.files_dir,
                        dtype=getattr(torch, export_dtype(cfg.train.export_dtype, source.config)),
                        training_config=to_dict(cfg), eval_report=eval_report)


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainerState:
    """What the loop needs to continue besides the engine: the next step and running figures."""

    step: int = 0  # optimizer steps done
    bad_in_a_row: int = 0  # consecutive non-finite steps
    last_train: dict[str, Any] = field(default_factory=dict)
    last_eval: dict[str, Any] = field(default_factory=dict)
    eval_report: dict[str, Any] | None = None  # evaluate.pair_report of the last eval (the export's model card)


def save_checkpoint(engine, dist, out: Path, state: TrainerState, cfg: Config, source: ModelSource) -> Path:
    """Write ``out/checkpoints/step-N`` (every rank calls this) and prune old ones; returns the path.

    A failed write (disk full, permissions) removes the partial folder and raises a
    ``TrainingError`` naming the checkpoint that stays the latest.
    """
    root = out / CHECKPOINTS
    final, tmp = root / f"step-{state.step}", root / f".tmp-step-{state.step}"
    previous = latest_checkpoint(out)

    def failed(error: BaseException) -> TrainingError:
        if dist.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        keep = f"{previous} is intact and train.resume=auto continues from it" if previous else "no earlier checkpoint exists"
        what = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        return TrainingError(final, f"checkpoint could not be written: {what}",
                             f"free disk space or fix permissions under {root}; {keep}")

    if dist.rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        except OSError as e:
            raise failed(e) from e
    dist.barrier()
    try:
        engine.save_state(tmp)  # DeepSpeed: a collective; a rank failing here stops, torchrun stops the rest
    except OSError as e:
        raise failed(e) from e
    error = None
    try:
        torch.save(rng_state(), tmp / "rng" / f"rank-{dist.rank:05d}.pt")
        if dist.rank == 0:
            _write_run_files(tmp, out, state, cfg, source, engine, dist.world_size)
        dist.barrier()
        if dist.local_rank == 0:  # the page cache is per machine: one rank per machine flushes it
            _fsync_tree(tmp)
    except OSError as e:
        error = e
    if dist.any_rank(error is not None):
        raise failed(error or OSError(errno.EIO, "another rank failed to write its part"))
    if dist.rank == 0:
        try:
            if final.exists():  # an incomplete leftover of an interrupted run
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
            _write_durably(final / COMPLETE, json.dumps({"step": state.step}) + "\n")
            _prune(root, cfg.train.save_total_limit)
        except OSError as e:
            error = e
    if dist.any_rank(error is not None):
        raise failed(error or OSError(errno.EIO, "rank 0 failed to finish the checkpoint"))
    return final


def _write_run_files(folder: Path, out: Path, state: TrainerState, cfg: Config, source: ModelSource,
                     engine, world_size: int) -> None:
    meta = {
        "format": FORMAT_VERSION,
        **asdict(state),
        "engine": engine.kind,
        "world_size": world_size,
        "zero_stage": getattr(engine, "zero_stage", None),
        "precision": engine.precision,
        "export_dtype": export_dtype(cfg.train.export_dtype, source.config),
        "base_model": source.path or None,
    }
    (folder / STATE_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    save_config(cfg, folder / "config.yaml")
    files = folder / MODEL_FILES
    files.mkdir()
    (files / "config.json").write_text(json.dumps(source.config.raw, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for f in _side_files(source.files_dir):
        shutil.copy2(f, files / f.name)
    if (out / METRICS_FILE).is_file():
        shutil.copy2(out / METRICS_FILE, folder / METRICS_FILE)


def _side_files(folder: Path) -> list[Path]:
    """The files an export copies from the base folder (hf.SIDE_FILES and every ``*.py``)."""
    found = {f for pattern in ("*.py", *hf.SIDE_FILES) for f in folder.glob(pattern) if f.is_file()}
    return sorted(found)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in [*sorted(p for p in folder.rglob("*") if p.is_dir()), folder]:
        _fsync_dir(path)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(path.parent)


def _prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; remove older ones and incomplete leftovers."""
    complete = complete_checkpoints(root.parent)
    for _, path in complete[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    done = {p for _, p in complete}
    for path in root.iterdir():
        if path.is_dir() and path not in done and (path.name.startswith(".tmp-step-") or _STEP_DIR.fullmatch(path.name)):
            shutil.rmtree(path, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


# ---------------------------------------------------------------------------------------------
# Finding and loading
# ---------------------------------------------------------------------------------------------


def complete_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under ``out/checkpoints``, oldest first."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_DIR.fullmatch(path.name)
        if m and (path / COMPLETE).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


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
                            f"use an earlier step-N folder, or the run's output_dir {path.parent.parent} for its latest complete one")
        return path
    if (path / CHECKPOINTS).is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise UserError(where, f"{path / CHECKPOINTS} holds no complete checkpoint", "the run saved none yet (train.save_steps)")
        return latest
    raise UserError(where, f"{path} is not a checkpoint", expected)


def find_resume(cfg: Config) -> Path | None:
    """The checkpoint ``train.resume`` asks for: ``auto`` = the latest complete one (or none)."""
    out = Path(cfg.output_dir)
    if cfg.train.resume == "never":
        earlier = latest_checkpoint(out)
        if earlier is not None:  # a fresh run among them would be pruned first and mixed up on resume
            raise UserError("train.resume", f"is never, but {out / CHECKPOINTS} holds an earlier run's checkpoints "
                            f"(latest {earlier.name})", "continue it with train.resume=auto, delete that folder, "
                            "or choose another output_dir")
        return None
    if cfg.train.resume == "auto":
        return latest_checkpoint(out)
    return resolve_checkpoint(cfg.train.resume, "train.resume")


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        meta = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(ckpt / STATE_FILE, f"cannot be read ({e})", "the checkpoint is damaged: use another step") from None
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(ckpt / STATE_FILE, f"has format {meta.get('format')!r}, expected {FORMAT_VERSION}",
                        "written by another polar-train version")
    return meta


def fresh_state(dist, out: Path) -> TrainerState:
    """Step 0: a metrics.jsonl left by an earlier run in ``out`` is removed, not appended to."""
    if dist.rank == 0 and (out / METRICS_FILE).exists():
        (out / METRICS_FILE).unlink()
    return TrainerState()


def load_checkpoint(engine, dist, ckpt: Path, out: Path) -> TrainerState:
    """Restore the engine, this rank's RNG and (rank 0) metrics.jsonl; returns the loop's state.

    Later checkpoints of ``out`` (a resume from an earlier step) are removed: training from here
    rewrites those steps, and ``train.resume=auto`` must not pick the abandoned ones.
    """
    meta = read_meta(ckpt)
    launch = f"{meta['world_size']} rank(s), engine {meta['engine']}" + (
        f", ZeRO-{meta['zero_stage']}" if meta["engine"] == "deepspeed" else "")
    if (meta["engine"], meta["world_size"], meta["zero_stage"]) != (engine.kind, dist.world_size, getattr(engine, "zero_stage", None)):
        raise UserError(ckpt, f"was written by {launch}; this run has {dist.world_size} rank(s), engine {engine.kind}",
                        f"resume with the same launch, or `polar-train convert {ckpt} DIR` and start a new run from model.path=DIR")
    engine.load_state(ckpt)
    set_rng_state(torch.load(ckpt / "rng" / f"rank-{dist.rank:05d}.pt", weights_only=False))
    if dist.rank == 0:
        for step, path in complete_checkpoints(out):
            if step > meta["step"] and path.resolve() != ckpt.resolve():
                log.warning("resuming from step %d: removing the later checkpoint %s", meta["step"], path)
                shutil.rmtree(path)
        metrics = out / METRICS_FILE
        if (ckpt / METRICS_FILE).is_file():
            if (ckpt / METRICS_FILE).resolve() != metrics.resolve():
                shutil.copyfile(ckpt / METRICS_FILE, metrics)  # rows after the checkpoint go
        elif metrics.exists():
            metrics.unlink()
    dist.barrier()
    log.info("resumed from %s (step %d)", ckpt, meta["step"])
    return TrainerState(meta["step"], meta["bad_in_a_row"], meta["last_train"], meta["last_eval"], meta["eval_report"])


# ---------------------------------------------------------------------------------------------
# convert: any checkpoint -> the HF folder the end of training writes
# ---------------------------------------------------------------------------------------------


class _LazyState(Mapping):
    """name -> tensor, each one materialised on access (ZeRO partitions merged on demand)."""

    def __init__(self, lazy: Mapping[str, Any]):
        self.lazy = lazy

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.lazy[name].contiguous()

    def __iter__(self):
        return iter(self.lazy)

    def __len__(self) -> int:
        return len(self.lazy)


def read_weights(ckpt: Path, meta: dict[str, Any]) -> Mapping[str, torch.Tensor]:
    """The fp32 master weights of any checkpoint, whatever engine and number of ranks wrote it."""
    if meta["engine"] == "torch":
        return torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True, mmap=True)
    if meta["zero_stage"] == 0:  # no ZeRO partitions: the module's own weights
        states = torch.load(ckpt / "deepspeed" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return states["module"]
    from polar_train.engine import import_deepspeed

    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="deepspeed", lazy_mode=True)
    return _LazyState(lazy)


def convert(checkpoint: str | Path, out_dir: str | Path, dtype: str = "auto", max_shard_size: str = "5GB") -> Path:
    """Write the HF folder of a checkpoint (``step-N`` or a run's output_dir = its latest).

    ``dtype`` ``auto`` = the run's ``train.export_dtype``, so the result equals the run's own export.
    """
    ckpt = resolve_checkpoint(checkpoint, str(checkpoint))
    meta = read_meta(ckpt)
    files = ckpt / MODEL_FILES
    config = ModelConfig.from_file(files / "config.json")
    dtype = meta["export_dtype"] if dtype == "auto" else dtype
    training_config = yaml.safe_load((ckpt / "config.yaml").read_text(encoding="utf-8"))
    return save_state_dict(read_weights(ckpt, meta), config, out_dir, base_dir=files, dtype=getattr(torch, dtype),
                           max_shard_size=max_shard_size, training_config=training_config, eval_report=meta["eval_report"])


def cmd_convert(args) -> int:
    out = convert(args.checkpoint, args.out_dir, args.dtype, args.max_shard_size)
    print(f"wrote {out}")
    return 0
