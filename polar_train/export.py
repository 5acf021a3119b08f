"""The Hugging Face export: at the end of training (``export_hf``) and from any saved step
(``convert``, ``polar-train convert``): the same folder either way (SPEC 4)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from polar_train.checkpoint import MODEL_FILES, CheckpointState, check_checkpoint, resolve_checkpoint
from polar_train.config import Config, to_dict
from polar_train.engine.protocol import Engine
from polar_train.errors import UserError
from polar_train.model import ModelConfig, save_state_dict
from polar_train.model.build import ModelSource, export_dtype


def export_hf(engine: Engine, source: ModelSource, cfg: Config, out_dir: Path,
              eval_report: Mapping[str, Any] | None = None) -> None:
    """The final HF folder: the fp32 master weights gathered (every rank), written by rank 0."""
    state = engine.full_state_dict()
    if engine.rank == 0 and state is not None:
        save_state_dict(state, source.config, out_dir, base_dir=source.files_dir,
                        dtype=getattr(torch, export_dtype(cfg.train.export_dtype, source.config)),
                        training_config=to_dict(cfg), eval_report=eval_report)


def convert(checkpoint: str | Path, out_dir: str | Path, dtype: str = "auto", max_shard_size: str = "5GB") -> Path:
    """Write the HF folder of a checkpoint (``step-N`` or a run's output_dir = its latest).

    ``dtype`` ``auto`` = the run's ``train.export_dtype``, so the result equals the run's own export.
    Every file is checked (readable, complete, no pickle) before anything is written.
    """
    ckpt = resolve_checkpoint(checkpoint, str(checkpoint))
    meta = check_checkpoint(ckpt)
    files = ckpt / MODEL_FILES
    if not (files / "config.json").is_file():
        raise UserError(files / "config.json", "is missing from the checkpoint",
                        f"it is damaged or still being copied: use another step of {ckpt.parent}")
    config = ModelConfig.from_file(files / "config.json")
    try:
        training_config = yaml.safe_load((ckpt / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(ckpt / "config.yaml", f"cannot be read ({str(e).splitlines()[0]})",
                        f"the checkpoint is damaged: use another step of {ckpt.parent}") from None
    dtype = meta["export_dtype"] if dtype == "auto" else dtype
    return save_state_dict(CheckpointState(ckpt, meta).weights(), config, out_dir, base_dir=files,
                           dtype=getattr(torch, dtype), max_shard_size=max_shard_size,
                           training_config=training_config, eval_report=meta["eval_report"])


def cmd_convert(args: argparse.Namespace) -> int:
    out = convert(args.checkpoint, args.out_dir, args.dtype, args.max_shard_size)
    print(f"wrote {out}")
    return 0
