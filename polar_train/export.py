"""The Hugging Face export: at the end of training (``export_hf``) and from any saved step
(``convert``, ``polar-train convert``): the same folder either way (SPEC 4). A LoRA run exports
its adapters merged into the base (the layout of a full fine-tune) and, on request, the adapter
alone in peft's layout."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from polar_train.adapters import LoraSection, peft_config, peft_name
from polar_train.checkpoint import MODEL_FILES, CheckpointState, check_checkpoint, latest_checkpoint, resolve_checkpoint
from polar_train.config import CheckpointSection
from polar_train.engine.protocol import Engine
from polar_train.errors import TrainingError, UserError
from polar_train.files import publish_dir, save_tensors, space_message, temporary_name
from polar_train.model import ModelConfig, save_state_dict
from polar_train.model.build import ModelSource, export_dtype
from polar_train.model.hf import expected_shapes
from polar_train.model.lora import MergedWeights

ADAPTER_DIR = "adapter"  # output_dir/adapter: checkpoint.export_adapter's peft folder, next to output_dir/hf


def export_hf(engine: Engine, source: ModelSource, out_dir: Path, *, checkpoint: CheckpointSection,
              lora: LoraSection, config: Mapping[str, Any], eval_report: Mapping[str, Any] | None = None) -> None:
    """The final HF folder: the fp32 master weights gathered (every rank), written by rank 0. A
    LoRA run's adapters are merged into the base (``export_weights``); with
    ``checkpoint.export_adapter`` the adapter alone also goes to ``out_dir/../adapter``.
    ``config``: the run's config as a plain mapping (``config.to_dict``), the folder's training config."""
    state = engine.full_state_dict()
    if engine.rank != 0 or state is None:
        return
    dtype = getattr(torch, export_dtype(checkpoint.export_dtype, source.config))
    try:
        with export_weights(source, state, lora) as weights:
            save_state_dict(weights, source.config, out_dir, base_dir=source.files_dir, dtype=dtype,
                            training_config=config, eval_report=eval_report)
        if lora.enabled and checkpoint.export_adapter:
            save_adapter(state, lora, out_dir.parent / ADAPTER_DIR, base_model=source.path or None)
    except OSError as error:  # disk full, permissions: save_state_dict removed its partial folder
        needed = sum(math.prod(shape) for shape in expected_shapes(source.config).values()) * dtype.itemsize
        latest = latest_checkpoint(out_dir.parent)
        then = (f"then write it from the last checkpoint: polar-train convert {latest} {out_dir}" if latest
                else "then train again (no checkpoint was saved: checkpoint.save_steps=0)")
        raise TrainingError(out_dir, f"the export could not be written: {error.strerror or error}; "
                            f"{space_message(out_dir.parent, needed)}",
                            f"free disk space or fix permissions, {then}") from None


@contextlib.contextmanager
def export_weights(source: ModelSource, trained: Mapping[str, torch.Tensor],
                   lora: LoraSection) -> Iterator[Mapping[str, torch.Tensor]]:
    """The HF state dict of a run whose trainable parameters are ``trained``: themselves in a full
    fine-tune; with LoRA the base read again from ``source`` with the adapters merged in (the
    same names, shapes and config as a full fine-tune; untouched tensors bitwise the base's)."""
    if not lora.enabled:
        yield trained
        return
    with source.tensors() as base:
        yield MergedWeights(base, list(expected_shapes(source.config)), trained, lora.scale)


def save_adapter(trained: Mapping[str, torch.Tensor], lora: LoraSection, out_dir: Path, base_model: str | None) -> Path:
    """The adapter alone in peft's layout: ``adapter_config.json`` + ``adapter_model.safetensors``
    (fp32; peft's key names, v_head as a module to save: adapters.py)."""
    tmp = temporary_name(out_dir)
    try:
        tmp.mkdir(parents=True)
        tensors = {peft_name(name): t.detach().float().cpu().contiguous() for name, t in trained.items()}
        save_tensors(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        config = json.dumps(peft_config(lora, base_model), indent=2) + "\n"
        (tmp / "adapter_config.json").write_text(config, encoding="utf-8")
        return publish_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; a failed write's partial folder


def convert(checkpoint: str | Path, out_dir: str | Path, dtype: str = "auto", max_shard_size: str = "5GB") -> Path:
    """Write the HF folder of a checkpoint (``step-N`` or a run's output_dir = its latest).

    ``dtype`` ``auto`` = the run's ``checkpoint.export_dtype``, so the result equals the run's own export.
    Every file is checked (readable, complete, no pickle) before anything is written. A LoRA
    checkpoint is merged into its base (``model.path`` of the run, or the fresh init of its seed).
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
    lora = LoraSection(**meta["lora"]) if meta.get("lora") else LoraSection()
    base = meta.get("base_model") or ""
    if lora.enabled and base and not (Path(base) / "config.json").is_file():
        raise UserError(ckpt, f"is a LoRA checkpoint whose base model {base} is not found",
                        "the adapters are merged into that base: put the base folder back at that path")
    source = ModelSource(config, files, base, int(training_config.get("seed", 0)))
    with export_weights(source, CheckpointState(ckpt, meta).weights(), lora) as weights:
        return save_state_dict(weights, config, out_dir, base_dir=files, dtype=getattr(torch, dtype),
                               max_shard_size=max_shard_size, training_config=training_config,
                               eval_report=meta["eval_report"])
