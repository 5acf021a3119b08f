"""Where the weights come from, training checkpoints (save / resume), the HF export, ``convert``.

A run's output directory::

    output_dir/
      checkpoints/
        step-40/                 one checkpoint; it counts only once COMPLETE exists
          COMPLETE               written last ({"step": 40}); a step-N without it is ignored
          trainer_state.json     step, the launch (engine, ranks, ZeRO stage, precision, offload),
                                 export dtype, metrics to continue
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

Resuming: a run launched like the one that saved (engine, number of ranks, ZeRO stage, precision,
offload) reads back each rank's own files, bitwise. Any other launch (16 GPUs -> 8, ZeRO-2 ->
ZeRO-3, DeepSpeed -> one plain process and back) reads the checkpoint by parameter name
(``PortableState``: ZeRO partitions stitched together on read, nothing extra written at save
time) and sets every fp32 master weight, both AdamW moments and the AdamW step exactly; the LR
schedule comes along. The data position is the step alone: the pairs of a step are a function of
(seed, epoch, step), whatever the number of ranks (``packing.StepPlanner.step_pairs``), so a
step covers the same global pairs on any launch. RNG states are per rank and do not map across
world sizes: rank r restores the state rank r saved, ranks the saved run did not have are seeded
from (step, rank). Nothing in training draws random numbers after the model's init (no dropout),
so this changes no result.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
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
from polar_train.engine import ADAM_MOMENTS, import_deepspeed
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
            kind, files = hf.weight_files(self.path)
            with ExitStack() as stack:
                weights = hf.WeightReader(kind, files, stack)
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
            _write_run_files(tmp, out, state, cfg, source, engine)
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
                     engine) -> None:
    meta = {
        "format": FORMAT_VERSION,
        **asdict(state),
        **engine.launch,  # engine, world_size, zero_stage, precision, offload_optimizer, offload_params
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
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
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


def describe_launch(launch: dict[str, Any]) -> str:
    """``2 rank(s), deepspeed ZeRO-2, bf16, optimizer offload``."""
    what = f"{launch['world_size']} rank(s), {launch['engine']}"
    if launch["engine"] == "deepspeed":
        what += f" ZeRO-{launch['zero_stage']}"
    what += f", {launch['precision']}"
    offload = [k.split("_")[1] for k in ("offload_optimizer", "offload_params") if launch.get(k)]
    return what + (f", {' + '.join(offload)} offload" if offload else "")


def seed_rng(seed: int) -> None:
    import numpy as np

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def fresh_state(dist, out: Path) -> TrainerState:
    """Step 0: a metrics.jsonl left by an earlier run in ``out`` is removed, not appended to."""
    if dist.rank == 0 and (out / METRICS_FILE).exists():
        (out / METRICS_FILE).unlink()
    return TrainerState()


def load_checkpoint(engine, dist, ckpt: Path, out: Path) -> TrainerState:
    """Restore the engine (by parameter name if another launch wrote ``ckpt``: see the module
    docstring), this rank's RNG and (rank 0) metrics.jsonl; returns the loop's state.

    Later checkpoints of ``out`` (a resume from an earlier step) are removed: training from here
    rewrites those steps, and ``train.resume=auto`` must not pick the abandoned ones.
    """
    meta = read_meta(ckpt)
    saved = {key: meta.get(key, False) for key in engine.launch}  # older checkpoints: no offload keys
    if saved == engine.launch:
        engine.load_state(ckpt)  # each rank reads back its own files
    else:
        log.info("%s was written by %s; this run has %s: restoring it by parameter name", ckpt,
                 describe_launch(saved), describe_launch(engine.launch))
        engine.load_portable(read_portable(ckpt, meta))
    if dist.rank < meta["world_size"]:
        set_rng_state(torch.load(ckpt / "rng" / f"rank-{dist.rank:05d}.pt", weights_only=False))
    else:  # a rank the saved run did not have (see the module docstring)
        seed_rng((meta["step"] * 1_000_003 + dist.rank) % 2**32)
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
# Any checkpoint by parameter name (a resume on another launch, convert)
# ---------------------------------------------------------------------------------------------


@dataclass
class PortableState:
    """A checkpoint seen by parameter name, whatever engine, ZeRO stage and number of ranks wrote
    it: each parameter's fp32 master weight and AdamW moments, the AdamW step, the LR schedule and
    (fp16) the loss scale. Files are memory-mapped and each tensor is stitched together from the
    ranks' partitions when asked for, so memory stays about one parameter::

        view = read_portable(ckpt, read_meta(ckpt))
        view.tensor("v_head.weight", "fp32")     # [1, H] float32, the master weight
        view.tensor("v_head.weight", "exp_avg")  # [1, H] float32; "exp_avg_sq" likewise
    """

    shapes: dict[str, torch.Size]  # parameter name -> full shape
    step: int  # AdamW steps taken (its bias correction)
    scheduler: dict[str, Any]  # LambdaLR state
    loss_scale: float | None  # fp16 dynamic loss scale; None for bf16 / fp32
    read: Callable[[str, str], torch.Tensor]  # (name, "fp32" | "exp_avg" | "exp_avg_sq") -> its elements
    ckpt: Path
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # non-parameter tensors (convert)

    def tensor(self, name: str, key: str) -> torch.Tensor:
        return self.read(name, key).reshape(self.shapes[name]).float()

    def check(self, shapes: Mapping[str, torch.Size]) -> None:
        """The model being resumed has exactly these parameters, of these shapes."""
        missing, extra = sorted(set(shapes) - set(self.shapes)), sorted(set(self.shapes) - set(shapes))
        wrong = [f"{n} {tuple(self.shapes[n])} != {tuple(s)}" for n, s in shapes.items()
                 if n in self.shapes and tuple(self.shapes[n]) != tuple(s)]
        if missing or extra or wrong:
            found = "; ".join(f"{what}: {', '.join(names[:5])}" for what, names in
                              (("missing", missing), ("unexpected", extra), ("shape", wrong)) if names)
            raise UserError(self.ckpt, f"does not hold this model's parameters ({found})",
                            "resume with the model config that wrote it (its config.yaml)")

    def weights(self) -> Mapping[str, torch.Tensor]:
        """name -> fp32 master weight (buffers too), each read on access (convert)."""
        return _Weights(self)


class _Weights(Mapping):
    def __init__(self, view: PortableState):
        self.view = view

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.view.buffers:
            return self.view.buffers[name]
        return self.view.tensor(name, "fp32")

    def __iter__(self):
        return iter([*self.view.shapes, *self.view.buffers])

    def __len__(self) -> int:
        return len(self.view.shapes) + len(self.view.buffers)


def read_portable(ckpt: Path, meta: dict[str, Any]) -> PortableState:
    """The ``PortableState`` of any checkpoint (reads headers and indexes; tensors on demand)."""
    if meta["engine"] == "torch":
        view = _read_torch(ckpt)
    else:
        import_deepspeed()  # its files pickle DeepSpeed classes: import it quietly, accelerator named
        scheduler = _load(ckpt / "scheduler.pt")["scheduler"]
        read = _read_replicated if meta["zero_stage"] == 0 else _read_partitioned
        view = read(ckpt, meta, scheduler)
    if meta["precision"] != "fp16":
        view.loss_scale = None
    return view


def _load(path: Path, *, trusted: bool = False) -> Any:
    """A torch file memory-mapped on the CPU. ``trusted``: DeepSpeed's files pickle its own classes."""
    if not path.is_file():
        raise UserError(path, "is missing from the checkpoint", "it is damaged or still being copied: use another step")
    return torch.load(path, map_location="cpu", mmap=True, weights_only=not trusted)


def _one_step(states: list[dict], ckpt: Path) -> int:
    """The AdamW step of the checkpoint: one count shared by every parameter (0 before the first)."""
    steps = {int(s["step"]) for s in states if s}
    if len(steps) > 1:
        raise UserError(ckpt, f"holds parameters at different AdamW steps {sorted(steps)}",
                        "resume with the launch that wrote it (engine, ranks, ZeRO stage, precision)")
    return steps.pop() if steps else 0


def _per_param(names: list[str], masters: Mapping[str, torch.Tensor], optim: dict, ckpt: Path,
               scheduler: dict, loss_scale: float | None, buffers: dict) -> PortableState:
    """Checkpoints whose optimizer holds one state per parameter (a plain AdamW state dict, its
    parameter indices in ``names`` order): TorchEngine and ZeRO-0."""
    order = [i for group in optim["param_groups"] for i in group["params"]]
    if len(order) != len(names):
        raise UserError(ckpt, f"its optimizer holds {len(order)} parameters, its model {len(names)}",
                        "the checkpoint is damaged: use another step")
    state = {name: optim["state"].get(i, {}) for name, i in zip(names, order)}
    shapes = {name: masters[name].shape for name in names}

    def read(name: str, key: str) -> torch.Tensor:
        if key == "fp32":
            return masters[name]
        return state[name][key] if state[name] else torch.zeros(shapes[name])  # no step taken yet

    return PortableState(shapes, _one_step(list(state.values()), ckpt), scheduler, loss_scale, read, ckpt, buffers)


def _read_torch(ckpt: Path) -> PortableState:
    model = _load(ckpt / "model.pt")
    saved = _load(ckpt / "optimizer.pt")
    names = saved.get("param_names") or list(model)  # written before param_names: no buffers then
    scale = saved["scaler"]["scale"] if saved.get("scaler") else None
    buffers = {k: v for k, v in model.items() if k not in names}
    return _per_param(names, model, saved["optimizer"], ckpt, saved["scheduler"], scale, buffers)


def _read_replicated(ckpt: Path, meta: dict, scheduler: dict) -> PortableState:
    """ZeRO-0: every rank held everything, rank 0 wrote it. fp32: the module is the master and the
    optimizer a plain AdamW; bf16 / fp16: FP16_UnfusedOptimizer keeps per-parameter fp32 copies."""
    folder = ckpt / "deepspeed"
    states = _load(folder / "mp_rank_00_model_states.pt", trusted=True)
    module, optim = states["module"], states["optimizer"]
    buffer_names = set(states.get("buffer_names") or [])
    names = [k for k in module if k not in buffer_names]
    buffers = {k: module[k] for k in buffer_names}
    if "fp32_groups_flat" in optim:  # FP16_Optimizer, only with a fused optimizer: not one we build
        raise UserError(folder, "holds DeepSpeed's fused FP16_Optimizer state, which cannot be read by parameter name",
                        "resume with the launch that wrote it (engine, ranks, ZeRO stage, precision)")
    if "fp32_groups" in optim:
        masters = dict(zip(names, [t for group in optim["fp32_groups"] for t in group]))
        return _per_param(names, masters, optim["optimizer_state_dict"], ckpt, scheduler, optim.get("cur_scale"), buffers)
    return _per_param(names, module, optim, ckpt, scheduler, None, buffers)


def _span(flats: list[torch.Tensor], start: int, length: int) -> torch.Tensor:
    """Elements [start, start + length) of the concatenation of the 1-D ``flats``, without building it."""
    pieces, pos = [], 0
    for flat in flats:
        lo, hi = max(start, pos), min(start + length, pos + flat.numel())
        if lo < hi:
            pieces.append(flat[lo - pos : hi - pos])
        pos += flat.numel()
    assert sum(p.numel() for p in pieces) == length, (start, length, pos)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _read_partitioned(ckpt: Path, meta: dict, scheduler: dict) -> PortableState:
    """ZeRO-1/2/3: each rank wrote its partition of the flat fp32 masters and of the AdamW state of
    those flat tensors (``zero_pp_rank_R_*``; ``bf16_zero_pp_rank_R_*`` from bf16 ZeRO-1).

    ZeRO-1/2, per parameter group: the parameters (``param_shapes`` order, each followed by its
    alignment padding) laid end to end, then cut into one equal slice per rank::

        flat group  [ p0 | p1 | p2 ...... | pad ]   rank 0 = first slice, rank 1 = the next, ...

    ZeRO-3: every parameter is cut into one equal piece per rank (the last one padded); rank r's
    file holds its piece of every parameter, end to end (over sub-groups)::

        rank r      [ p0[r] | p1[r] | p2[r] ... ]   p = cat(p[0], p[1], ...)[:numel]
    """
    folder, stage3, ranks = ckpt / "deepspeed", meta["zero_stage"] == 3, range(meta["world_size"])
    model_file = "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage3 else "mp_rank_00_model_states.pt"
    param_shapes = _load(folder / model_file, trusted=True)["param_shapes"]
    prefix = "bf16_" if (folder / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file() else ""
    optim = [_load(folder / f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt", trusted=True)["optimizer_state_dict"]
             for r in ranks]
    base_key = "optimizer_state_dict" if stage3 else "base_optimizer_state"
    if not all(isinstance(o[base_key], dict) for o in optim):  # zero_optimization.elastic_checkpoint
        raise UserError(folder, "holds an elastic ZeRO checkpoint, which cannot be read by parameter name",
                        "resume with the launch that wrote it (engine, ranks, ZeRO stage, precision)")

    # flats[key][rank][group]: the 1-D partitions of the fp32 masters and of each moment
    flats = {"fp32": [o["fp32_flat_groups" if stage3 else "single_partition_of_fp32_groups"] for o in optim]}
    states = []
    for o, fp32 in zip(optim, flats["fp32"]):
        base = o[base_key]
        order = [i for group in base["param_groups"] for i in group["params"]]  # index -> flat group
        states.append([base["state"].get(i, {}) for i in order])
        assert len(order) == len(fp32), (len(order), len(fp32))
    for key in ADAM_MOMENTS:
        flats[key] = [[s[key] if s else torch.zeros_like(f) for s, f in zip(st, fp32)]
                      for st, fp32 in zip(states, flats["fp32"])]
    step = _one_step([s for st in states for s in st], ckpt)
    scaler = optim[0].get("loss_scaler")
    loss_scale = getattr(scaler, "cur_scale", None) if meta["precision"] == "fp16" else None

    paddings = optim[0].get("param_alignment_paddings")  # ZeRO-1/2: zeros after each parameter, if any
    shapes: dict[str, torch.Size] = {}
    where: dict[str, tuple[int, int, int]] = {}  # name -> (group, offset, numel) in the flats
    offset = 0
    for g, group in enumerate(param_shapes):
        offset = offset if stage3 else 0  # ZeRO-3: a rank's pieces run on over its sub-groups
        for i, (name, shape) in enumerate(group.items()):
            shapes[name] = torch.Size(shape)
            numel = math.ceil(shapes[name].numel() / len(ranks)) if stage3 else shapes[name].numel()
            where[name] = (g, offset, numel)
            offset += numel + (paddings[g][i] if paddings else 0)
    held = sum(f.numel() for f in flats["fp32"][0])
    if stage3 and offset != held:
        raise UserError(folder, f"its ZeRO-3 partitions hold {held} elements per rank, its parameters need {offset}",
                        "the checkpoint is damaged: use another step")

    def read(name: str, key: str) -> torch.Tensor:
        g, off, numel = where[name]
        if stage3:
            return torch.cat([_span(flats[key][r], off, numel) for r in ranks])[: shapes[name].numel()]
        return _span([flats[key][r][g] for r in ranks], off, numel)

    return PortableState(shapes, step, scheduler, loss_scale, read, ckpt)


# ---------------------------------------------------------------------------------------------
# convert: any checkpoint -> the HF folder the end of training writes
# ---------------------------------------------------------------------------------------------


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
    return save_state_dict(read_portable(ckpt, meta).weights(), config, out_dir, base_dir=files, dtype=getattr(torch, dtype),
                           max_shard_size=max_shard_size, training_config=training_config, eval_report=meta["eval_report"])


def cmd_convert(args) -> int:
    out = convert(args.checkpoint, args.out_dir, args.dtype, args.max_shard_size)
    print(f"wrote {out}")
    return 0
