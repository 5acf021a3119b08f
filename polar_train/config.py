"""Typed configuration: dataclass sections, YAML files, ``section.key=value`` overrides.

Every field has a one-line doc (the comment beside it) and a declared type; YAML values and
command-line overrides are converted to that type (YAML reads ``1e-5`` as a string). Unknown
keys are reported with their full dotted path and the closest valid key, and every problem in
a config is reported at once in one ``ConfigError``.

Example::

    cfg = load_config("configs/demo.yaml", ["train.lr=1e-4", "data.train_files=my.jsonl"])
    cfg.train.lr  # 0.0001 (a float)
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from polar_train.errors import UserError


class ConfigError(UserError):
    """One or more problems in a config file or its overrides (exit code 2)."""


@dataclass
class FreshModelSection:
    """Shape of a freshly initialised model, used only when ``model.path`` is empty (demo, tests)."""

    tokenizer: str = ""  # tokenizer folder (its vocabulary sizes the embedding)
    hidden_size: int = 64  # H
    num_layers: int = 2  # decoder layers
    num_heads: int = 4  # query heads
    num_kv_heads: int = 2  # key/value heads (GQA groups)
    intermediate_size: int = 160  # MLP width
    max_position_embeddings: int = 4096  # RoPE dynamic-scaling threshold, tokens
    rope_theta: float = 1e6  # RoPE base


@dataclass
class ModelSection:
    path: str = ""  # HF folder (config.json + safetensors + tokenizer); empty = build `fresh`
    attention: str = "auto"  # auto | flash_attn | torch_varlen | sdpa
    gradient_checkpointing: bool = False  # recompute each decoder layer in backward
    fresh: FreshModelSection = field(default_factory=FreshModelSection)


@dataclass
class DataSection:
    train_files: list[str] = field(default_factory=list)  # POLAR-format JSONL files
    eval_files: list[str] = field(default_factory=list)  # held-out JSONL files (may be empty)
    max_length: int = 16384  # tokens per sequence budget (SPEC 3; L = max_length - 4)
    max_response_length: int = 4096  # tokens kept of reference / chosen / rejected
    max_tokens: int = 16384  # micro-batch budget, tokens (whole pairs, no padding)
    shared_prefix: bool = True  # lay chosen+rejected out as [prefix | chosen | rejected]
    on_error: str = "raise"  # raise | skip: what a malformed row does
    cache_dir: str = "~/.cache/polar-train/datasets"  # tokenized-dataset cache; "" = none
    num_proc: int = 1  # tokenizing processes per rank (ranks split the rows when they share cache_dir)


@dataclass
class TrainSection:
    lr: float = 2e-5  # peak learning rate (recipe: 2e-5 for 7B, 1e-5 for 1.8B)
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of lr
    warmup_ratio: float = 0.03  # fraction of steps with linear warm-up
    weight_decay: float = 0.0  # AdamW weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    epochs: int = 1  # passes over train_files (used when max_steps is 0)
    max_steps: int = 0  # optimizer steps; 0 = derived from epochs
    pairs_per_step: int = 320  # pairs per optimizer step (global batch, all ranks)
    eval_steps: int = 0  # evaluate every N steps (and at start and end); 0 = start and end only
    log_steps: int = 1  # write a train metrics line every N steps
    save_steps: int = 0  # checkpoint every N steps; 0 = only the final export
    save_total_limit: int = 2  # checkpoints kept under output_dir/checkpoints
    resume: str = "auto"  # auto (latest complete checkpoint of output_dir) | never | a step-N folder or run dir
    loss: str = "ranking"  # ranking (Bradley-Terry) | focal
    penalty: str = "none"  # none | log_barrier | L2 (on the rewards)
    penalty_weight: float = 0.01  # weight of the penalty when enabled
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 (dynamic loss scale) | fp32
    max_bad_steps: int = 5  # non-finite steps in a row before the run stops
    export_dtype: str = "auto"  # dtype of the final HF export: auto (= base) | float32 | bfloat16 | float16


@dataclass
class DeepSpeedSection:
    enabled: bool = False  # use DeepSpeed (required for more than one process)
    zero_stage: int = 2  # 0 (replicated), 1, 2 (optimizer + gradients sharded) or 3 (parameters too)
    offload_optimizer: bool = False  # optimizer states in CPU memory (DeepSpeedCPUAdam; ZeRO >= 1)
    offload_params: bool = False  # parameters in CPU memory (ZeRO-3)
    timeout_minutes: float = 30.0  # process-group timeout: a rank stuck this long in a collective fails


@dataclass
class Config:
    output_dir: str = "runs/default"  # everything the run writes goes here
    seed: int = 42  # data order, fresh-model init, dropout-free RNG state
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read ``path`` (YAML, may be None), apply ``key.sub=value`` overrides, return a typed Config."""
    where = str(path) if path else "command line"
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(where, "config file not found", "give the path of a YAML file, e.g. configs/demo.yaml")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            loc = f"{where}:{line + 1}" if line is not None else where
            raise ConfigError(loc, f"invalid YAML: {getattr(e, 'problem', e)}", "fix the syntax") from None
        if not isinstance(raw, dict):
            raise ConfigError(where, f"top level is a {type(raw).__name__}", "expected a mapping of sections")
    problems: list[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r}: expected key.sub=value")
            continue
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else "", problems)
    cfg = _build(Config, raw, "", problems)
    problems += _check_values(cfg)
    if len(problems) == 1:  # one line: "configs/x.yaml: train.lrr: unknown key (did you mean train.lr?)"
        raise ConfigError(where, problems[0])
    if problems:
        raise ConfigError(where, f"{len(problems)} problems in the config:\n  " + "\n  ".join(problems))
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


def _set_dotted(raw: dict, key: str, value: Any, problems: list[str]) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            problems.append(f"{key}: {part} is a value, not a section")
            return
        node = nxt
    node[parts[-1]] = value


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hint):
            keys += _all_keys(hint, prefix + f.name + ".")
    return keys


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a section (mapping), got {raw!r}")
        raw = {}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            dotted = prefix + str(key)
            close = difflib.get_close_matches(dotted, _all_keys(Config), n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]}?)" if close else f" (valid keys here: {', '.join(sorted(names))})"
            problems.append(f"{dotted}: unknown key{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        hint, value, dotted = hints[f.name], raw[f.name], prefix + f.name
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, value, dotted + ".", problems)
        else:
            try:
                kwargs[f.name] = _convert(value, hint)
            except (TypeError, ValueError) as e:
                problems.append(f"{dotted}: {e}")
    return cls(**kwargs)


def _convert(value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _convert(value, args[0])
    if origin is list:
        (item,) = typing.get_args(hint)
        if value is None:
            return []
        items = value if isinstance(value, list) else [value]
        return [_convert(v, item) for v in items]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit())):
            raise ValueError(f"expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"expected a string, got {value!r}")
        return "" if value is None else str(value)
    raise TypeError(f"unsupported config type {hint}")


_CHOICES = {
    "model.attention": ("auto", "flash_attn", "torch_varlen", "sdpa"),
    "data.on_error": ("raise", "skip"),
    "train.loss": ("ranking", "focal"),
    "train.penalty": ("none", "log_barrier", "L2"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
    "train.export_dtype": ("auto", "float32", "bfloat16", "float16"),
}


def _check_values(cfg: Config) -> list[str]:
    problems = []
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            problems.append(f"{key}: {value!r} is not one of {', '.join(choices)}")
    positive = {
        "data.max_length": cfg.data.max_length,
        "data.max_response_length": cfg.data.max_response_length,
        "data.max_tokens": cfg.data.max_tokens,
        "train.pairs_per_step": cfg.train.pairs_per_step,
        "train.log_steps": cfg.train.log_steps,
        "train.save_total_limit": cfg.train.save_total_limit,
        "train.max_bad_steps": cfg.train.max_bad_steps,
    }
    problems += [f"{k}: must be > 0, got {v}" for k, v in positive.items() if v <= 0]
    non_negative = {
        "train.max_steps": cfg.train.max_steps,
        "train.epochs": cfg.train.epochs,
        "train.eval_steps": cfg.train.eval_steps,
        "train.save_steps": cfg.train.save_steps,
        "train.lr": cfg.train.lr,
        "train.grad_clip": cfg.train.grad_clip,
    }
    problems += [f"{k}: must be >= 0, got {v}" for k, v in non_negative.items() if v < 0]
    if cfg.train.max_steps == 0 and cfg.train.epochs == 0:
        problems.append("train.max_steps: both train.max_steps and train.epochs are 0 (set one of them)")
    if len(cfg.train.betas) != 2:
        problems.append(f"train.betas: expected two numbers, got {cfg.train.betas}")
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        problems.append(f"deepspeed.zero_stage: {cfg.deepspeed.zero_stage} is not one of 0, 1, 2, 3")
    if cfg.deepspeed.offload_params and cfg.deepspeed.zero_stage != 3:
        problems.append("deepspeed.offload_params: parameter offload needs deepspeed.zero_stage=3")
    if cfg.deepspeed.offload_optimizer and cfg.deepspeed.zero_stage == 0:
        problems.append("deepspeed.offload_optimizer: optimizer offload needs deepspeed.zero_stage 1, 2 or 3")
    if cfg.deepspeed.timeout_minutes <= 0:
        problems.append(f"deepspeed.timeout_minutes: must be > 0, got {cfg.deepspeed.timeout_minutes}")
    if not cfg.data.train_files:
        problems.append("data.train_files: no training file given (set data.train_files=FILE.jsonl)")
    if not cfg.model.path and not cfg.model.fresh.tokenizer:
        problems.append("model.path: no model given (set model.path=HF_FOLDER, or model.fresh.tokenizer for a fresh model)")
    return problems
