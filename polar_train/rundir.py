"""The run directory and the checks that run before any heavy work.

``preflight(cfg)`` looks at every input a run needs (data files, model folder, weight headers,
tokenizer) in about a second, so a typo fails before minutes of tokenizing or loading 15 GB
of weights. ``prepare_output_dir`` refuses an ``output_dir`` that holds a different run and
writes ``config.yaml``; ``write_skipped_rows`` lists every row ``data.on_error=skip`` left out.

An output directory after a run::

    output_dir/
      config.yaml          the resolved config (prepare_output_dir); a resume must match it
      skipped_rows.jsonl   {"split", "source": "FILE:LINE", "reason"} per bad row (only if any)
      train.log, metrics, checkpoints/, hf/   (train.py)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from polar_train.config import Config, to_dict
from polar_train.data import SkippedRow
from polar_train.errors import UserError

log = logging.getLogger("polar_train")

CONFIG_FILE = "config.yaml"
SKIPPED_ROWS_FILE = "skipped_rows.jsonl"

# Config keys a resume may change: they decide how often things are logged, evaluated and saved,
# how fast or in how much memory it runs, or when it stops, but not what one step trains.
# Every other key (model, data files, lengths, seed, loss, lr, pairs_per_step, ZeRO stage, ...)
# must match the run already in the directory. A new config key counts as one that matters
# until it is listed here.
RESUMABLE_KEYS = frozenset({
    "output_dir",  # the same folder, maybe spelled differently
    "model.attention",
    "model.gradient_checkpointing",
    "data.eval_files",
    "data.cache_dir",
    "train.epochs",
    "train.max_steps",
    "train.eval_steps",
    "train.log_steps",
    "train.save_steps",
    "train.save_total_limit",
    "train.resume",
    "train.max_bad_steps",
    "train.export_dtype",
    "deepspeed.offload_optimizer",
    "deepspeed.offload_params",
    "deepspeed.timeout_minutes",
})


# ---------------------------------------------------------------------------------------------
# The output directory
# ---------------------------------------------------------------------------------------------


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections -> ``{"data.max_length": 512, ...}``.

    >>> flatten({"seed": 1, "train": {"lr": 0.1}})
    {'seed': 1, 'train.lr': 0.1}
    """
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def training_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for each key that changes what is trained.

    Keys in ``RESUMABLE_KEYS`` are ignored, and so are keys only one side has (a config saved by
    an older or newer polar-train). ``model.fresh.*`` is ignored when both use ``model.path``.

    >>> training_differences({"train": {"lr": 1e-5, "log_steps": 1}}, {"train": {"lr": 2e-5, "log_steps": 9}})
    [('train.lr', 1e-05, 2e-05)]
    """
    old_flat, new_flat = flatten(old), flatten(new)
    both_use_path = bool(old_flat.get("model.path")) and bool(new_flat.get("model.path"))
    diffs = []
    for key in sorted(old_flat.keys() & new_flat.keys(), key=list(new_flat).index):
        if key in RESUMABLE_KEYS or (both_use_path and key.startswith("model.fresh.")):
            continue
        if old_flat[key] != new_flat[key]:
            diffs.append((key, old_flat[key], new_flat[key]))
    return diffs


def prepare_output_dir(out: str | os.PathLike[str], cfg: Config) -> None:
    """Create ``out`` and write ``out/config.yaml``, unless ``out`` holds a different run.

    - ``out`` is new or empty: created, ``config.yaml`` written.
    - ``out/config.yaml`` exists and differs only in ``RESUMABLE_KEYS``: the same run (a resume
      or a longer run); ``config.yaml`` is rewritten with the new values.
    - it differs in a key that changes what is trained: ``UserError`` naming the folder and
      every differing key with its old and new value.
    - ``out`` holds other files but no ``config.yaml`` (not a polar-train run: a data folder, a
      checkpoint, a folder of runs): ``UserError``.

    Safe to call from every rank at once: the check only reads, and the write is atomic.
    """
    out = Path(out)
    saved = out / CONFIG_FILE
    new = to_dict(cfg)
    if out.exists() and not out.is_dir():
        raise UserError(out, "output_dir exists and is not a folder", "set output_dir to a new folder")
    try:  # listed before looking for config.yaml: another rank may be writing this very run
        others = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []
    except OSError as error:
        raise UserError(out, f"cannot read the output folder: {error.strerror or error}",
                        "set output_dir to a folder you can write to") from None
    if saved.is_file():
        try:
            old = yaml.safe_load(saved.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise UserError(saved, f"cannot read the config of the run in this folder ({error})",
                            "use a new output_dir, or delete this folder if the run is not needed") from None
        if not isinstance(old, Mapping):
            raise UserError(saved, "is not a polar-train config (not a mapping)", "use a new output_dir")
        diffs = training_differences(old, new)
        if diffs:
            changes = "; ".join(f"{key}: {old_value!r} -> {new_value!r}" for key, old_value, new_value in diffs)
            raise UserError(out, f"output_dir holds a different run ({changes})",
                            "use a new output_dir or restore the old value")
        log.info("output_dir %s holds this run already: resuming or continuing it", out)
    elif others:
        shown = ", ".join(others[:6]) + (f" and {len(others) - 6} more" if len(others) > 6 else "")
        raise UserError(out, f"output_dir is not empty and holds no {CONFIG_FILE} (found: {shown})",
                        "set output_dir to a new or empty folder: a run writes hf/ and checkpoints/ into it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_atomically(saved, yaml.safe_dump(new, sort_keys=False))
    except OSError as error:
        raise UserError(getattr(error, "filename", None) or out, f"cannot write the output folder: {error.strerror or error}",
                        "set output_dir to a folder you can write to") from None


def write_skipped_rows(out: str | os.PathLike[str], skipped: Mapping[str, Sequence[SkippedRow]]) -> Path | None:
    """List every skipped row in ``out/skipped_rows.jsonl``, one JSON object per row; log the count.

    ``skipped`` maps a split (``"train"``, ``"eval"``) to its ``DataStats.skipped``. Each line
    reads ``{"split": "train", "source": "data/train.jsonl:7", "reason": "field 'chosen' is missing; ..."}``.
    With nothing skipped, a file left by an earlier attempt is removed and None returned.

    >>> write_skipped_rows(tmp, {"train": [SkippedRow("a.jsonl:3", "invalid JSON")]})  # doctest: +SKIP
    PosixPath('.../skipped_rows.jsonl')
    """
    path = Path(out) / SKIPPED_ROWS_FILE
    rows = [{"split": split, "source": row.source, "reason": row.reason} for split, rows in skipped.items() for row in rows]
    if not rows:
        path.unlink(missing_ok=True)
        return None
    _write_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    first = ", ".join(row["source"] for row in rows[:5])
    log.warning("data: %d bad rows skipped (first: %s); all listed in %s", len(rows), first, path)
    return path


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Preflight: every input, cheaply, before any heavy work
# ---------------------------------------------------------------------------------------------


def preflight(cfg: Config) -> None:
    """Check the run's inputs up front; the first problem is a ``UserError``.

    - every ``data.train_files`` / ``data.eval_files`` entry is a readable, non-empty file;
    - ``model.path`` (when set) holds ``config.json`` and weights whose tensor names and shapes
      (read from the safetensors headers, no weights loaded) match that config;
    - the tokenizer (``model.path`` or ``model.fresh.tokenizer``) loads, has ``<|reward|>`` and
      ``[UNUSED_TOKEN_130]``, agrees with the config's ``reward_token_id`` and fits its vocabulary;
    - ``deepspeed.enabled`` has DeepSpeed installed.

    Rows are not validated here (reading the data validates them, before tokenizing).
    """
    from polar_train.tokenizer import load_tokenizer, special_token_ids

    for key, files in (("data.train_files", cfg.data.train_files), ("data.eval_files", cfg.data.eval_files)):
        for name in files:
            check_data_file(name, key)
    model_config = check_model_folder(cfg.model.path) if cfg.model.path else None
    tokenizer_path = cfg.model.path or cfg.model.fresh.tokenizer
    if not Path(tokenizer_path).is_dir():
        key = "model.path" if cfg.model.path else "model.fresh.tokenizer"
        raise UserError(tokenizer_path, f"tokenizer folder not found ({key})", "give the folder that holds tokenizer.json or tokenizer.model")
    tokenizer = load_tokenizer(tokenizer_path)
    special_token_ids(tokenizer, model_config.reward_token_id if model_config else None)
    if model_config is not None and len(tokenizer) > model_config.vocab_size:
        raise UserError(tokenizer_path, f"the tokenizer has {len(tokenizer)} tokens but config.json has vocab_size "
                        f"{model_config.vocab_size}", "use the tokenizer that ships with the checkpoint")
    if cfg.deepspeed.enabled:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise UserError("deepspeed.enabled", "is true but DeepSpeed is not installed",
                            "pip install deepspeed, or set deepspeed.enabled=false for one process")


def check_data_file(name: str, key: str = "data.train_files") -> None:
    """``UserError`` unless ``name`` is a readable, non-empty file (``key`` names its config key)."""
    path = Path(name)
    if not path.exists():
        raise UserError(name, f"data file not found ({key})", f"check the path in {key}")
    if not path.is_file():
        raise UserError(name, f"is not a file ({key})", "give a JSONL file, one JSON object per line")
    try:
        with path.open("rb") as f:
            first = f.read(1)
    except OSError as error:
        raise UserError(name, f"cannot read the data file: {error.strerror or error}", "check its permissions") from None
    if not first:
        raise UserError(name, "the data file is empty", "the file must hold one JSON object per line")


def check_model_folder(path: str | os.PathLike[str]) -> Any:
    """Check a HF checkpoint folder without loading weights; returns its ``ModelConfig``.

    Reads ``config.json`` and the tensor names and shapes in the safetensors headers (a few
    KB per shard; legacy ``.bin`` files are memory-mapped), and compares them with the shapes the
    config implies.
    """
    from polar_train.model.hf import check_checkpoint_folder, check_tensors, checkpoint_shapes, weight_files

    config = check_checkpoint_folder(path, key="model.path")
    _, files = weight_files(path)
    shapes = checkpoint_shapes(path)
    where = str(files[0] if len(files) == 1 else files[0].parent)
    check_tensors(shapes, config, where)
    return config
