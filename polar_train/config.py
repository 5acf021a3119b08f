"""Typed configuration: one dataclass section per component, YAML files, ``section.key=value`` overrides.

Every field has a one-line doc with its unit (the comment beside it) and a declared type; YAML
values and command-line overrides are converted to that type (YAML reads ``1e-5`` as a string),
choices are ``Literal`` types, and each section checks its own values (``problems``). Unknown keys
are reported with their full dotted path and the closest valid key, and every problem in a config
is reported at once in one ``ConfigError``.

A field marked ``resumable(...)`` may change when a run continues in the same ``output_dir``
(how often things are logged or saved, how fast or in how much memory or on which engine a step
runs); every other field changes what a step trains and must match (rundir.py).

Keys that moved keep their old dotted name as an alias (``ALIASES``): ``train.lr=1e-4`` still
sets ``optimizer.lr`` and logs the new name once. Example::

    cfg = load_config("configs/demo.yaml", ["optimizer.lr=1e-4", "data.train_files=my.jsonl"])
    cfg.optimizer.lr  # 0.0001 (a float)
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from polar_train.adapters import LoraSection
from polar_train.errors import UserError

log = logging.getLogger("polar_train")


class ConfigError(UserError):
    """One or more problems in a config file or its overrides (exit code 2)."""


def resumable(default: Any) -> Any:
    """A field a resume in the same ``output_dir`` may change (see the module doc)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"resumable": True})
    return field(default=default, metadata={"resumable": True})


def _positive(section: Any, *names: str) -> list[str]:
    return [f"{n}: must be > 0, got {getattr(section, n)}" for n in names if getattr(section, n) <= 0]


def _non_negative(section: Any, *names: str) -> list[str]:
    return [f"{n}: must be >= 0, got {getattr(section, n)}" for n in names if getattr(section, n) < 0]


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
    # kernel; auto = best available
    attention: Literal["auto", "flash_attn", "torch_varlen", "sdpa"] = resumable("auto")
    gradient_checkpointing: bool = resumable(False)  # recompute each decoder layer in backward
    # allow the tokenizer code (tokenization_*.py) shipped in model.path to run
    trust_remote_code: bool = resumable(False)
    fresh: FreshModelSection = field(default_factory=FreshModelSection)
    lora: LoraSection = field(default_factory=LoraSection)  # rank 0 (the default) = full fine-tune

    def problems(self) -> list[str]:
        if not self.path and not self.fresh.tokenizer:
            return ["path: no model given (set model.path=HF_FOLDER, or model.fresh.tokenizer for a fresh model)"]
        return []


@dataclass
class DataSection:
    train_files: list[str] = field(default_factory=list)  # POLAR-format JSONL files
    eval_files: list[str] = resumable([])  # held-out JSONL files (may be empty)
    max_length: int = 16384  # tokens per sequence budget (SPEC 3; L = max_length - 4)
    max_response_length: int = 4096  # tokens kept of reference / chosen / rejected
    max_tokens: int = 16384  # micro-batch budget, tokens (whole pairs, no padding; per SP group)
    shared_prefix: bool = True  # lay chosen+rejected out as [prefix | chosen | rejected]
    on_error: Literal["raise", "skip"] = "raise"  # what a malformed row does
    cache_dir: str = resumable("~/.cache/polar-train/datasets")  # tokenized-dataset cache; "" = none
    num_proc: int = resumable(1)  # tokenizing processes per rank (ranks split the rows when they share cache_dir)

    def problems(self) -> list[str]:
        found = _positive(self, "max_length", "max_response_length", "max_tokens", "num_proc")
        if not self.train_files:
            found.append("train_files: no training file given (set data.train_files=FILE.jsonl)")
        return found


@dataclass
class OptimizerSection:
    """AdamW (``engine.build_optimizer``) and gradient clipping."""

    lr: float = 2e-5  # peak learning rate, per step (recipe: 2e-5 for 7B, 1e-5 for 1.8B)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW (beta1, beta2)
    weight_decay: float = 0.0  # AdamW decoupled weight decay, fraction of the weight per step (x lr)
    grad_clip: float = 1.0  # max global gradient L2 norm; 0 = off

    def problems(self) -> list[str]:
        found = _non_negative(self, "lr", "grad_clip", "weight_decay")
        if len(self.betas) != 2:
            found.append(f"betas: expected two numbers, got {self.betas}")
        return found


@dataclass
class ScheduleSection:
    """The LR over the run: linear warm-up, then cosine decay."""

    warmup_ratio: float = 0.03  # fraction of the steps with linear warm-up (0 .. 1)
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of optimizer.lr (0 .. 1)

    def problems(self) -> list[str]:
        return [f"{n}: must be between 0 and 1, got {getattr(self, n)}"
                for n in ("warmup_ratio", "min_lr_ratio") if not 0 <= getattr(self, n) <= 1]


@dataclass
class LossSection:
    """The loss (loss.pair_losses over every implied pair, or loss.plackett_luce over each list; SPEC 5, 10)."""

    # ranking = Bradley-Terry -log sigmoid(r_c - r_r); listwise = Plackett-Luce per list
    kind: Literal["ranking", "focal", "listwise"] = "ranking"
    penalty: Literal["none", "log_barrier", "L2"] = "none"  # a penalty on the rewards' size
    penalty_weight: float = 0.01  # weight of the penalty when enabled (x reward units)

    def problems(self) -> list[str]:
        listwise = ["penalty: applies to the pair losses, not to loss.kind=listwise (set loss.penalty=none)"]
        mixed = self.kind == "listwise" and self.penalty != "none"
        return _non_negative(self, "penalty_weight") + (listwise if mixed else [])


@dataclass
class CheckpointSection:
    """Checkpoints under ``output_dir/checkpoints``, resume, and the final HF export."""

    save_steps: int = resumable(0)  # checkpoint every N optimizer steps; 0 = only the final export
    save_total_limit: int = resumable(2)  # checkpoints kept (the oldest are removed)
    # auto (latest complete checkpoint of output_dir) | never | a step-N folder or run dir
    resume: str = resumable("auto")
    # HF export dtype; auto = the base's
    export_dtype: Literal["auto", "float32", "bfloat16", "float16"] = resumable("auto")
    export_adapter: bool = resumable(False)  # LoRA: also write the adapter alone (peft layout) to output_dir/adapter

    def problems(self) -> list[str]:
        return _non_negative(self, "save_steps") + _positive(self, "save_total_limit")


@dataclass
class TrainSection:
    """The loop: how long, how many pairs a step, how often to log and eval."""

    epochs: int = resumable(1)  # passes over train_files (used when max_steps is 0)
    max_steps: int = resumable(0)  # optimizer steps; 0 = derived from epochs
    pairs_per_step: int = 320  # pairs per optimizer step (global batch, all ranks)
    eval_steps: int = resumable(0)  # evaluate every N steps (and at start and end); 0 = start and end only
    log_steps: int = resumable(1)  # write a train metrics line every N steps
    max_bad_steps: int = resumable(5)  # non-finite steps in a row before the run stops
    sequence_parallel: int = 1  # ranks per sequence-parallel group: each micro-batch split over them (issue 18, README)

    def problems(self) -> list[str]:
        found = _positive(self, "pairs_per_step", "log_steps", "max_bad_steps", "sequence_parallel")
        found += _non_negative(self, "max_steps", "epochs", "eval_steps")
        if self.max_steps == 0 and self.epochs == 0:
            found.append("max_steps: both train.max_steps and train.epochs are 0 (set one of them)")
        return found


@dataclass
class EngineSection:
    """How a step computes (engine.resolve_precision)."""

    # auto = bf16 on a GPU that supports it, else fp32; fp16 = dynamic loss scale
    precision: Literal["auto", "bf16", "fp16", "fp32"] = resumable("auto")


@dataclass
class DeepSpeedSection:
    enabled: bool = resumable(False)  # use DeepSpeed (required for more than one process)
    # 0 replicated, 1, 2 (optimizer + gradients sharded), 3 (parameters too)
    zero_stage: Literal[0, 1, 2, 3] = resumable(2)
    offload_optimizer: bool = resumable(False)  # optimizer states in CPU memory (DeepSpeedCPUAdam; ZeRO >= 1)
    offload_params: bool = resumable(False)  # parameters in CPU memory (ZeRO-3)
    max_live_parameters: int = resumable(10**9)  # ZeRO-3: gathered parameters a rank keeps (stage3_max_live_parameters)
    # process-group timeout, minutes: a rank stuck this long in a collective fails
    timeout_minutes: float = resumable(30.0)

    def problems(self) -> list[str]:
        found = _positive(self, "timeout_minutes", "max_live_parameters")
        if self.offload_params and self.zero_stage != 3:
            found.append("offload_params: parameter offload needs deepspeed.zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            found.append("offload_optimizer: optimizer offload needs deepspeed.zero_stage 1, 2 or 3")
        return found


@dataclass
class Config:
    output_dir: str = resumable("runs/default")  # everything the run writes goes here
    seed: int = 42  # data order, fresh-model init, dropout-free RNG state
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    loss: LossSection = field(default_factory=LossSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    engine: EngineSection = field(default_factory=EngineSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)


# Old dotted key -> its place now. Each still works in YAML and overrides (one log line names the
# new key) and in a run folder's saved config.yaml.
ALIASES: dict[str, str] = {
    "train.lr": "optimizer.lr",
    "train.betas": "optimizer.betas",
    "train.weight_decay": "optimizer.weight_decay",
    "train.grad_clip": "optimizer.grad_clip",
    "train.warmup_ratio": "schedule.warmup_ratio",
    "train.min_lr_ratio": "schedule.min_lr_ratio",
    "train.loss": "loss.kind",
    "train.penalty": "loss.penalty",
    "train.penalty_weight": "loss.penalty_weight",
    "train.save_steps": "checkpoint.save_steps",
    "train.save_total_limit": "checkpoint.save_total_limit",
    "train.resume": "checkpoint.resume",
    "train.export_dtype": "checkpoint.export_dtype",
    "train.export_adapter": "checkpoint.export_adapter",
    "train.precision": "engine.precision",
}


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
    old_names: list[str] = []
    raw = rename_aliases(raw, problems, old_names)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r}: expected key.sub=value")
            continue
        _set_dotted(raw, _new_name(key.strip(), old_names), yaml.safe_load(value) if value.strip() else "", problems)
    cfg = _build(Config, raw, "", problems)
    _announce(old_names)
    for old in old_names:  # a problem with a value given under an old name names that name
        problems = [f"{old} (now {ALIASES[old]}){p[len(ALIASES[old]):]}" if p.startswith(ALIASES[old] + ":") else p
                    for p in problems]
    if len(problems) == 1:  # one line: "configs/x.yaml: train.lrr: unknown key (did you mean train.lr?)"
        raise ConfigError(where, problems[0])
    if problems:
        raise ConfigError(where, f"{len(problems)} problems in the config:\n  " + "\n  ".join(problems))
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config | Mapping[str, Any], path: str | Path) -> None:
    """``config.yaml``: a Config, or its plain snapshot (``to_dict``) as a component receives it."""
    tree = cfg if isinstance(cfg, Mapping) else to_dict(cfg)
    Path(path).write_text(yaml.safe_dump(dict(tree), sort_keys=False), encoding="utf-8")


def resumable_keys(cls: type = Config, prefix: str = "") -> frozenset[str]:
    """Dotted keys of the fields marked ``resumable`` (a resume in the same output_dir may change them)."""
    keys: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= resumable_keys(hints[f.name], f"{prefix}{f.name}.")
        elif f.metadata.get("resumable"):
            keys.add(prefix + f.name)
    return frozenset(keys)


_announced: set[str] = set()  # old names already logged by this process


def _new_name(key: str, old_names: list[str] | None = None) -> str:
    """The current name of a dotted key: itself, or the new place of an old alias (noted in ``old_names``)."""
    new = ALIASES.get(key)
    if new is None:
        return key
    if old_names is not None:
        old_names.append(key)
    return new


def _announce(old_names: list[str]) -> None:
    """One log line naming the new keys of the old ones used, once per process and name."""
    fresh = sorted(set(old_names) - _announced)
    _announced.update(fresh)
    if fresh:
        renames = ", ".join(f"{old} -> {ALIASES[old]}" for old in fresh)
        log.warning("config: renamed keys (the old names still work): %s", renames)


def rename_aliases(tree: dict[str, Any], problems: list[str] | None = None,
                   old_names: list[str] | None = None) -> dict[str, Any]:
    """A copy of a nested config mapping with old keys moved to their new places.

    >>> rename_aliases({"train": {"lr": 0.1, "epochs": 2}})
    {'train': {'epochs': 2}, 'optimizer': {'lr': 0.1}}
    """
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    for old, new in ALIASES.items():
        section, key = old.split(".")
        if not isinstance(out.get(section), dict) or key not in out[section]:
            continue
        value = out[section].pop(key)
        new_section, new_key = _new_name(old, old_names).split(".")
        target = out.setdefault(new_section, {})
        if not isinstance(target, dict):
            continue  # _build reports the section that is not a mapping
        if new_key in target and problems is not None:
            problems.append(f"{old}: set twice, also as its new name {new} (keep {new})")
        target.setdefault(new_key, value)
    return out


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
    """``cls`` from the mapping ``raw``; every problem (unknown key, wrong type, a section's own
    ``problems()``) is appended to ``problems`` with its full dotted key."""
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a section (mapping), got {raw!r}")
        raw = {}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            dotted = prefix + str(key)
            close = difflib.get_close_matches(dotted, _all_keys(Config) + list(ALIASES), n=1, cutoff=0.5)
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
    section = cls(**kwargs)
    if hasattr(section, "problems"):
        problems += [prefix + problem for problem in section.problems()]
    return section


def _convert(value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        value = _convert(value, type(choices[0]))
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(map(str, choices))}")
        return value
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
        digits = isinstance(value, str) and value.strip().lstrip("-").isdigit()
        if isinstance(value, bool) or not (isinstance(value, int) or digits):
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
