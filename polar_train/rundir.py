"""The run directory and the checks that run before any heavy work.

``preflight(data, model, deepspeed)`` looks at every input a run needs (data files, model folder, weight headers,
tokenizer) in about a second, so a typo fails before minutes of tokenizing or loading 15 GB
of weights. ``hold_output_dir`` keeps a second run out of a folder in use; ``prepare_output_dir``
refuses an ``output_dir`` that holds a different run and writes ``config.yaml``;
``write_skipped_rows`` lists every row ``data.on_error=skip`` left out.

An output directory after a run::

    output_dir/
      .polar-train.lock    flock-ed by rank 0 while a run lives; says which process held it last
      config.yaml          the resolved config (prepare_output_dir); a resume must match it
      skipped_rows.jsonl   {"split", "source": "FILE:LINE", "reason"} per bad row (only if any)
      train.log, metrics, checkpoints/, hf/   (train.py)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from polar_train.config import ALIASES, DataSection, DeepSpeedSection, ModelSection, resumable_keys
from polar_train.data import SkippedRow
from polar_train.errors import UserError
from polar_train.files import write_text

log = logging.getLogger("polar_train")

CONFIG_FILE = "config.yaml"
SKIPPED_ROWS_FILE = "skipped_rows.jsonl"

LOCK_FILE = ".polar-train.lock"

# Config keys a resume may change: the fields marked ``resumable`` in config.py (how often things
# are logged, evaluated and saved, how fast, in how much memory or on which engine, ZeRO stage,
# precision or number of ranks a step runs, or when the run stops), not what one step trains.
RESUMABLE_KEYS = resumable_keys()


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
    Old key names (``config.ALIASES``: a run folder written before a key moved) count as their
    new names.

    >>> training_differences({"train": {"lr": 1e-5, "log_steps": 1}},
    ...                      {"optimizer": {"lr": 2e-5}, "train": {"log_steps": 9}})
    [('optimizer.lr', 1e-05, 2e-05)]
    """
    old_flat, new_flat = ({ALIASES.get(k, k): v for k, v in flatten(tree).items()} for tree in (old, new))
    both_use_path = bool(old_flat.get("model.path")) and bool(new_flat.get("model.path"))
    diffs = []
    for key in sorted(old_flat.keys() & new_flat.keys(), key=list(new_flat).index):
        if key in RESUMABLE_KEYS or (both_use_path and key.startswith("model.fresh.")):
            continue
        if old_flat[key] != new_flat[key]:
            diffs.append((key, old_flat[key], new_flat[key]))
    return diffs


def prepare_output_dir(out: str | os.PathLike[str], config: Mapping[str, Any]) -> None:
    """Create ``out`` and write ``out/config.yaml`` (``config``: the run's ``config.to_dict``),
    unless ``out`` holds a different run.

    - ``out`` is new or empty: created, ``config.yaml`` written.
    - ``out/config.yaml`` exists and differs only in ``RESUMABLE_KEYS``: the same run (a resume
      or a longer run); ``config.yaml`` is rewritten with the new values.
    - it differs in a key that changes what is trained: ``UserError`` naming the folder and
      every differing key with its old and new value.
    - ``out`` holds other files but no ``config.yaml`` (not a polar-train run: a data folder, a
      checkpoint, a folder of runs): ``UserError``.

    Training calls it on rank 0 only, holding ``hold_output_dir``; the other ranks wait.
    """
    out = Path(out)
    saved = out / CONFIG_FILE
    new = dict(config)
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
        write_text(saved, yaml.safe_dump(new, sort_keys=False))
    except OSError as error:
        raise UserError(getattr(error, "filename", None) or out,
                        f"cannot write the output folder: {error.strerror or error}",
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
    rows = [{"split": split, "source": row.source, "reason": row.reason}
            for split, rows in skipped.items() for row in rows]
    if not rows:
        path.unlink(missing_ok=True)
        return None
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    first = ", ".join(row["source"] for row in rows[:5])
    log.warning("data: %d bad rows skipped (first: %s); all listed in %s", len(rows), first, path)
    return path


@contextlib.contextmanager
def hold_output_dir(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold ``out/.polar-train.lock`` for the life of the block: one run per output folder.

    An exclusive ``fcntl.flock`` on the lock file: the OS releases it when this process ends in
    any way (a crash, SIGKILL, the node rebooting), so no stale lock is ever left behind; the file
    itself stays and only says who held it last (``pid`` and ``host``). A second run on the same
    folder gets a ``UserError`` naming the process that holds it. Creates ``out`` if needed.
    (flock works between processes of one machine, and on most network file systems between
    machines; on one that ignores it the lock never refuses.)
    """
    import fcntl
    import socket

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(out, "output_dir exists and is not a folder", "set output_dir to a new folder")
    path = out / LOCK_FILE
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise UserError(getattr(error, "filename", None) or out,
                        f"cannot write the output folder: {error.strerror or error}",
                        "set output_dir to a folder you can write to") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            raise UserError(out, f"output_dir is in use by another run ({holder})",
                            "wait for that run to end or stop it, or set another output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        yield out
    finally:
        os.close(fd)  # releases the lock


# ---------------------------------------------------------------------------------------------
# Preflight: every input, cheaply, before any heavy work
# ---------------------------------------------------------------------------------------------


def preflight(data: DataSection, model: ModelSection, deepspeed: DeepSpeedSection) -> None:
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

    for key, files in (("data.train_files", data.train_files), ("data.eval_files", data.eval_files)):
        for name in files:
            check_data_file(name, key)
    model_config = check_model_folder(model.path) if model.path else None
    tokenizer_path = model.path or model.fresh.tokenizer
    if not Path(tokenizer_path).is_dir():
        key = "model.path" if model.path else "model.fresh.tokenizer"
        raise UserError(tokenizer_path, f"tokenizer folder not found ({key})",
                        "give the folder that holds tokenizer.json or tokenizer.model")
    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=model.trust_remote_code)
    special_token_ids(tokenizer, model_config.reward_token_id if model_config else None)
    if model_config is not None and len(tokenizer) > model_config.vocab_size:
        raise UserError(tokenizer_path, f"the tokenizer has {len(tokenizer)} tokens but config.json has vocab_size "
                        f"{model_config.vocab_size}", "use the tokenizer that ships with the checkpoint")
    if deepspeed.enabled:
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
        raise UserError(name, f"cannot read the data file: {error.strerror or error}",
                        "check its permissions") from None
    if not first:
        raise UserError(name, "the data file is empty", "the file must hold one JSON object per line")


def check_model_folder(path: str | os.PathLike[str], key: str = "model.path") -> Any:
    """Check a HF checkpoint folder without loading weights; returns its ``ModelConfig``.

    Reads ``config.json``, the weight index and the tensor names and shapes in the safetensors
    headers (a few KB per shard; legacy ``.bin`` files are memory-mapped), checks that each
    shard is as long as its header says (a truncated download), and compares the shapes with
    the ones the config implies. ``key`` names where the path came from (``--model``).
    """
    from polar_train.model.hf import check_checkpoint_folder, check_tensors, checkpoint_shapes, weight_files

    config = check_checkpoint_folder(path, key=key)
    _, files = weight_files(path)
    shapes = checkpoint_shapes(path)
    where = str(files[0] if len(files) == 1 else files[0].parent)
    check_tensors(shapes, config, where)
    return config
