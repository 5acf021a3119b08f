"""The two additions an export makes to a HF folder: ``training_config.yaml`` and ``README.md``,
a model card saying what the model is, how to load it and score with it, and its eval figures."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MODEL_CARD = "README.md"
TRAINING_CONFIG = "training_config.yaml"


def training_config_yaml(config: Mapping[str, Any] | Any) -> str:
    """The training config as YAML; a dataclass is turned into a dict, paths and tuples into
    strings and lists (plain types only, so ``yaml.safe_load`` reads it back)."""
    import dataclasses

    import yaml

    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"training_config must be a dict or a dataclass, not {type(config).__name__}")
    plain = json.loads(json.dumps(config, default=str))
    return "# The resolved training config of this model (polar-train).\n" + yaml.safe_dump(plain, sort_keys=False)


def _count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _number(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


REWARD_STATS = "reward_stats.json"  # {"mean", "std", "candidates"} of the eval candidates' rewards


def _eval_section(report: Mapping[str, Any]) -> list[str]:
    lines = ["## Evaluation", "", "| metric | value |", "|---|---|"]
    for key in ("pairs", "accuracy", "ties", "mean_margin", "ranking_loss", "reward_mean", "reward_std"):
        if key in report:
            lines.append(f"| {key} | {_number(report[key])} |")
    for key, value in report.items():
        if key.startswith("num_") and isinstance(value, int):
            lines.append(f"| {key} | {value} |")
    stats = [k for k in ("chosen", "rejected", "margin") if isinstance(report.get(k), Mapping)]
    if stats:
        columns = [c for c in ("mean", "std", "p5", "p25", "p50", "p75", "p95") if c in report[stats[0]]]
        lines += ["", "| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        lines += [f"| {k} | " + " | ".join(_number(report[k].get(c)) for c in columns) + " |" for k in stats]
    lines += ["", "`reward_mean` / `reward_std` are over all chosen and rejected rewards: use them to "
              "normalise rewards in RL.", ""]
    if isinstance(report.get("reward_stats"), Mapping):  # one reward per eval candidate (ranked lists counted once)
        s = report["reward_stats"]
        lines += [f"Reward statistics of the {s['candidates']} eval candidates (`{REWARD_STATS}`): mean "
                  f"{_number(s['mean'])}, std {_number(s['std'])}; `polar-train score --normalize` applies "
                  "`(reward - mean) / std`.", ""]
    return lines


def model_card(config: Mapping[str, Any], folder: Path, *, name: str, base_dir: str | Path | None = None,
               index_name: str = "model.safetensors.index.json", num_shards: int = 1, num_parameters: int = 0,
               eval_report: Mapping[str, Any] | None = None,
               has_training_config: bool = False) -> str:
    """``README.md`` of an export: what it is, how to load it and score with it, the eval figures.

    ``folder`` is the export being written: remote-code loading is described only when the
    ``*.py`` files that ``auto_map`` names are there.
    """
    auto_map = config.get("auto_map") or {}
    modules = {str(target).split(".")[0] for target in auto_map.values() if isinstance(target, str)}
    remote_code = bool(modules) and all((folder / f"{m}.py").is_file() for m in modules)
    dtype = config.get("torch_dtype", "float32")
    lines = [
        "---",
        "library_name: transformers",
        "tags: [reward-model, polar, internlm2, polar-train]",
        "---",
        f"# {name}",
        "",
        f"A POLAR reward model (`{', '.join(config.get('architectures') or ['InternLM2ForRewardModel'])}`, "
        f"{_count(num_parameters)} parameters, {dtype}) fine-tuned with polar-train"
        + (f" from `{Path(base_dir).name}`." if base_dir is not None else "."),
        f"Weights: {num_shards} safetensors shard(s) with `{index_name}`; tensor names, shapes and "
        "`config.json` keys are those of the base checkpoint, so engines that serve POLAR serve this "
        "folder unchanged."
        + (" The resolved training config is in `training_config.yaml`." if has_training_config else ""),
        "",
        "## Input",
        "",
        "The reward of an output is the value head at the last token of",
        "",
        "    prompt + \"\\n\" + reference + \"<|reward|>\" + prompt + \"\\n\" + output + \"[UNUSED_TOKEN_130]\"",
        "",
        "(the `\\n` is left out with the `pretrain` wrapper and before an empty reference or output).",
        "",
        "## Usage",
        "",
        "Score JSONL rows (`prompt`, `reference`, `output`, or pair rows with `chosen` and `rejected`):",
        "",
        "    polar-train score --model <this folder> --data rows.jsonl --output scored.jsonl",
        "    polar-train eval --model <this folder> --data pairs.jsonl --output-dir eval/",
        "",
        "From Python, with polar-train (works with transformers 4.x and 5.x):",
        "",
        "    from polar_train.scoring import load_scorer, score_rows",
        "    model, tokenizer = load_scorer(\"<this folder>\")",
        "    rows = score_rows(model, tokenizer, [{\"prompt\": ..., \"reference\": ..., \"output\": ...}])",
        "",
    ]
    if remote_code:
        lines += [
            "With transformers and the remote code shipped in this folder (as the official POLAR "
            "models; that code runs with transformers 4.x):",
            "",
            "    from transformers import AutoModel, AutoTokenizer",
            "    model = AutoModel.from_pretrained(\"<this folder>\", trust_remote_code=True)",
            "    tokenizer = AutoTokenizer.from_pretrained(\"<this folder>\", trust_remote_code=True)",
            "",
        ]
    if eval_report is not None:
        lines += _eval_section(eval_report)
    return "\n".join(lines).rstrip("\n") + "\n"
