"""Read and write POLAR reward models in the Hugging Face checkpoint layout (SPEC 4).

A checkpoint folder holds ``config.json``, the weights (``model.safetensors``, sharded
``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``, or the legacy
``pytorch_model.bin`` [+ index]), the tokenizer files and the remote-code ``*.py`` files.

``save_model`` ALWAYS writes sharded names plus the index, even for one shard
(``model-00001-of-00001.safetensors``): transformers, vLLM, SGLang and LMDeploy all load that
form, and the export looks the same whatever the model size.

An export holds exactly: ``config.json``, the shards and their index, every ``*.py`` and
tokenizer file of the base folder (``SIDE_FILES``), and two additions: ``README.md`` (a model
card: how to load and score, the eval figures when given) and, when given,
``training_config.yaml`` (the resolved training config).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_state_dict_into_shards_factory
from safetensors import safe_open

from polar_train.errors import UserError
from polar_train.files import publish_dir, save_tensors, temporary_name
from polar_train.model.attention import resolve_attention
from polar_train.model.card import MODEL_CARD, REWARD_STATS, TRAINING_CONFIG, model_card, training_config_yaml
from polar_train.model.internlm2 import InternLM2RewardModel, ModelConfig
from polar_train.tokenizer import TOKENIZER_FILE_PATTERNS

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
# Copied from the base folder besides every *.py: the tokenizer's files and the generation defaults.
SIDE_FILES = (*TOKENIZER_FILE_PATTERNS, "generation_config.json")
LM_HEAD = "output.weight"  # InternLM2ForCausalLM's head, ignored when loading an LM as a reward model


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape implied by ``config`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = InternLM2RewardModel(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _names(names: set[str] | list[str], limit: int = 6) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_tensors(found: Mapping[str, tuple[int, ...]], config: ModelConfig, where: str, *,
                  allow_missing_v_head: bool = False) -> None:
    """UserError unless ``found`` (name -> shape) has exactly the tensors ``config`` implies."""
    expected = expected_shapes(config)
    missing = set(expected) - set(found)
    if allow_missing_v_head:
        missing.discard("v_head.weight")
    unexpected = set(found) - set(expected) - ({LM_HEAD} if allow_missing_v_head else set())
    if missing:
        hint = ("this looks like a language-model base without a reward head: pass "
                "allow_missing_v_head=True to start one from random" if missing == {"v_head.weight"}
                else "the checkpoint is incomplete or not an InternLM2ForRewardModel")
        raise UserError(where, f"{len(missing)} tensor(s) missing: {_names(missing)}", hint)
    if unexpected:
        raise UserError(where, f"{len(unexpected)} unexpected tensor(s): {_names(unexpected)}",
                        "expected the InternLM2ForRewardModel layout (no biases, no LM head)")
    for name, shape in found.items():
        if name in expected and tuple(shape) != expected[name]:
            raise UserError(where, f"tensor '{name}' has shape {list(shape)}, config.json implies "
                            f"{list(expected[name])}", "config.json and the weights disagree")


def check_checkpoint_folder(path: str | os.PathLike[str], key: str | None = None) -> ModelConfig:
    """``UserError`` unless ``path`` is a folder with ``config.json``; returns that ``ModelConfig``.

    ``key`` is the config key the path came from (``model.path``): the messages then name it.
    """
    path = Path(path)
    noun, tag = ("model folder", f" ({key})") if key else ("checkpoint folder", "")
    if not path.exists():
        raise UserError(path, f"{noun} not found{tag}", "check the path (a Hugging Face checkpoint folder)")
    if not path.is_dir():
        raise UserError(path, f"is not a folder{tag}", "give the checkpoint folder, not a file inside it")
    if not (path / "config.json").is_file():
        raise UserError(path, f"no config.json in the {noun}{tag}", "expected a Hugging Face checkpoint folder")
    return ModelConfig.from_file(path / "config.json")


def weight_files(path: str | os.PathLike[str]) -> tuple[str, list[Path]]:
    """(``'safetensors'`` | ``'bin'``, weight files) of the checkpoint folder ``path``.

    An index (``model.safetensors.index.json``, then ``pytorch_model.bin.index.json``) wins over a
    single file; every shard it lists must exist.
    """
    path = Path(path)
    for index_name, kind in ((SAFE_INDEX, "safetensors"), (BIN_INDEX, "bin")):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                raise UserError(index, f"is not a valid weight index ({e!r})",
                                "the download may be incomplete: fetch it again, or re-export the checkpoint") from None
            files = sorted({path / f for f in weight_map.values()})
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise UserError(index, f"lists shard(s) that do not exist: {_names(absent)}",
                                "copy the missing shards or re-export the checkpoint")
            return kind, files
    if (path / SAFE_SINGLE).is_file():
        return "safetensors", [path / SAFE_SINGLE]
    if (path / BIN_SINGLE).is_file():
        return "bin", [path / BIN_SINGLE]
    raise UserError(path, "no model weights found",
                    f"expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}")


class WeightReader:
    """Lazy name -> tensor access over a checkpoint's weight files (memory ~ one tensor).

    The files stay open until ``stack`` closes; ``where`` maps each tensor name to its file's handle.

    >>> with ExitStack() as stack:  # doctest: +SKIP
    ...     reader = WeightReader(*weight_files("POLAR-7B-Base"), stack)
    ...     head = reader.get("v_head.weight")  # (1, H)
    """

    def __init__(self, kind: str, files: list[Path], stack: ExitStack) -> None:
        self.where: dict[str, Any] = {}  # name -> open safetensors handle or loaded (mmap'd) dict
        for f in files:
            if kind == "safetensors":
                handle = stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
                keys = list(handle.keys())
            else:
                try:
                    handle = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # legacy (non-zip) format cannot be mmap'd
                    handle = torch.load(f, map_location="cpu", weights_only=True)
                keys = list(handle)
            for k in keys:
                if k in self.where:
                    raise UserError(f, f"tensor '{k}' appears in two weight files", "re-export the checkpoint")
                self.where[k] = handle

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(h.get_slice(k).get_shape() if hasattr(h, "get_slice") else h[k].shape)
                for k, h in self.where.items()}

    def get(self, name: str) -> torch.Tensor:
        h = self.where[name]
        return h.get_tensor(name) if hasattr(h, "get_tensor") else h[name]


def safetensors_shapes(file: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header (8-byte length + JSON), nothing else read."""
    file = Path(file)
    try:
        with file.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a header")
            (size,) = struct.unpack("<Q", head)
            if size > 100_000_000 or size > file.stat().st_size - 8:
                raise ValueError(f"header size {size} does not fit the file")
            header = json.loads(f.read(size))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        tensors = {name: info for name, info in header.items() if name != "__metadata__"}
        expected = 8 + size + max((info["data_offsets"][1] for info in tensors.values()), default=0)
        if file.stat().st_size < expected:  # an interrupted download: the header is whole, the data is not
            raise ValueError(f"{file.stat().st_size} bytes where its header describes {expected}")
        return {name: tuple(info["shape"]) for name, info in tensors.items()}
    except OSError as error:
        raise UserError(file, f"cannot read the weights: {error.strerror or error}",
                        "check the file's permissions") from None
    except (ValueError, KeyError, TypeError) as error:  # json.JSONDecodeError is a ValueError
        raise UserError(file, f"is not a valid safetensors file ({error})",
                        "the download may be incomplete: fetch it again") from None


def checkpoint_shapes(path: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the checkpoint folder ``path``, without reading weights.

    Safetensors: the headers only (a few KB per shard); legacy ``.bin`` files are memory-mapped.
    """
    kind, files = weight_files(path)
    if kind != "safetensors":
        with ExitStack() as stack:
            return WeightReader(kind, files, stack).shapes()
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        for name, shape in safetensors_shapes(file).items():
            if name in shapes:
                raise UserError(file, f"tensor '{name}' appears in two weight files", "re-export the checkpoint")
            shapes[name] = shape
    return shapes


def load_model(path: str | Path, attention: str = "sdpa", dtype: torch.dtype | None = torch.float32,
               device: torch.device | str = "cpu", gradient_checkpointing: bool = False, *,
               allow_missing_v_head: bool = False, v_head_seed: int = 0) -> InternLM2RewardModel:
    """Load a POLAR / InternLM2 reward checkpoint folder.

    ``attention`` is resolved with ``resolve_attention`` (``auto`` allowed). ``dtype=None`` keeps
    the stored dtype. With ``allow_missing_v_head`` a checkpoint without ``v_head.weight`` (an
    InternLM2 language model) loads with a fresh head, normal(0, initializer_range) drawn from
    ``v_head_seed``, and its LM head ``output.weight`` is ignored. Tensors are read one at a
    time, cast and moved, so peak memory stays about one model.
    """
    path = Path(path)
    config = check_checkpoint_folder(path)
    device = torch.device(device)
    if dtype is not None:
        attention = resolve_attention(attention, device, dtype)
    kind, files = weight_files(path)
    with ExitStack() as stack:
        tensors = WeightReader(kind, files, stack)
        where = str(files[0].parent / (SAFE_INDEX if len(files) > 1 and kind == "safetensors" else files[0].name))
        check_tensors(tensors.shapes(), config, where, allow_missing_v_head=allow_missing_v_head)
        with torch.device("meta"):
            model = InternLM2RewardModel(config, attention="sdpa", gradient_checkpointing=gradient_checkpointing)
        state: dict[str, torch.Tensor] = {}
        for name in model.state_dict():
            if name in tensors.where:
                state[name] = tensors.get(name).to(device=device, dtype=dtype)
        if "v_head.weight" not in state:  # only reachable with allow_missing_v_head
            gen = torch.Generator().manual_seed(v_head_seed)
            head = torch.empty(1, config.hidden_size).normal_(0.0, config.initializer_range, generator=gen)
            state["v_head.weight"] = head.to(device=device, dtype=dtype or state["model.norm.weight"].dtype)
        model.load_state_dict(state, strict=True, assign=True)
    model.attention = resolve_attention(attention, device, next(model.parameters()).dtype)
    return model


def parse_size(size: int | str) -> int:
    """Bytes in ``"5GB"`` (10^9), ``"2GiB"`` (2^30), ``"500MB"``, ``"64KiB"`` or an int.

    >>> parse_size("5GB"), parse_size("2GiB"), parse_size(1000)
    (5000000000, 2147483648, 1000)
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), flags=re.IGNORECASE)
        if not m:
            raise UserError("max_shard_size", f"cannot read {size!r}", "expected e.g. 5GB, 500MB, 2GiB or bytes")
        unit = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[m.group(2).upper()]
        value = int(float(m.group(1)) * ((1024 if m.group(3) else 1000) ** unit))
    if value <= 0:
        raise UserError("max_shard_size", f"is {size!r}", "expected a positive size")
    return value


def _side_files(base_dir: Path) -> Iterator[Path]:
    seen: set[Path] = set()
    for pattern in ("*.py", *SIDE_FILES):
        for f in sorted(base_dir.glob(pattern)):
            if f.is_file() and f not in seen:
                seen.add(f)
                yield f


def save_state_dict(state_dict: Mapping[str, torch.Tensor], config: ModelConfig, out_dir: str | Path, *,
                    base_dir: str | Path | None = None, dtype: torch.dtype | None = None,
                    max_shard_size: int | str = "5GB", extra_config: dict[str, Any] | None = None,
                    training_config: Mapping[str, Any] | None = None,
                    eval_report: Mapping[str, Any] | None = None) -> Path:
    """Write a Hugging Face checkpoint folder from a full state dict (see ``save_model``)."""
    out_dir = Path(out_dir)
    check_tensors({k: tuple(v.shape) for k, v in state_dict.items()}, config, f"export to {out_dir}")
    limit = parse_size(max_shard_size)
    if base_dir is not None and not Path(base_dir).is_dir():
        raise UserError(base_dir, "base checkpoint folder not found",
                        "it is where the tokenizer and *.py files come from")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(out_dir, "exists and is not a folder", "choose another output path")

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device="cpu", dtype=dtype or t.dtype).contiguous()

    out_dtype = dtype or next(iter(state_dict.values())).dtype
    # huggingface_hub's split, greedy in state-dict order (a tensor over the limit alone), sized in
    # the export dtype (meta tensors: no memory); the shards are always named -0000k-of-0000n, even one
    planned = {k: torch.empty(v.shape, dtype=dtype or v.dtype, device="meta") for k, v in state_dict.items()}
    split = split_state_dict_into_shards_factory(planned, get_storage_size=lambda t: t.nbytes, max_shard_size=limit,
                                                 filename_pattern="model{suffix}.safetensors")
    shards = list(split.filename_to_tensors.values())
    raw = json.loads(json.dumps(config.raw))  # every original key, deep-copied
    raw["torch_dtype"] = str(out_dtype).removeprefix("torch.")
    if "dtype" in raw:  # transformers 5 writes `dtype`; keep both in step
        raw["dtype"] = raw["torch_dtype"]
    if config.reward_token_id is not None:
        raw["reward_token_id"] = config.reward_token_id
    raw.update(extra_config or {})

    tmp = temporary_name(out_dir)
    try:
        tmp.mkdir(parents=True)
        if base_dir is not None:
            for f in _side_files(Path(base_dir)):
                shutil.copy2(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if training_config is not None:
            (tmp / TRAINING_CONFIG).write_text(training_config_yaml(training_config), encoding="utf-8")
        weight_map: dict[str, str] = {}
        for i, names in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_tensors({n: cast(state_dict[n]) for n in names}, tmp / file, metadata={"format": "pt"})
            weight_map.update((n, file) for n in names)
        index = {"metadata": dict(split.metadata), "weight_map": dict(sorted(weight_map.items()))}
        (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        card = model_card(raw, tmp, name=out_dir.name, base_dir=base_dir, index_name=SAFE_INDEX,
                          num_shards=len(shards),
                          num_parameters=sum(v.numel() for v in state_dict.values()),
                          eval_report=eval_report, has_training_config=training_config is not None)
        (tmp / MODEL_CARD).write_text(card, encoding="utf-8")
        if eval_report is not None and isinstance(eval_report.get("reward_stats"), Mapping):
            stats = json.dumps(dict(eval_report["reward_stats"]), indent=2) + "\n"
            (tmp / REWARD_STATS).write_text(stats, encoding="utf-8")
        publish_dir(tmp, out_dir)  # a crash before this point leaves any previous export untouched
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def save_model(model: InternLM2RewardModel, out_dir: str | Path, *, base_dir: str | Path | None = None,
               dtype: torch.dtype | None = None, max_shard_size: int | str = "5GB",
               extra_config: dict[str, Any] | None = None, training_config: Mapping[str, Any] | None = None,
               eval_report: Mapping[str, Any] | None = None) -> Path:
    """Export ``model`` as a Hugging Face checkpoint that POLAR's serving engines load unchanged.

    Writes ``config.json`` (the model's raw config, every original key kept, ``architectures``
    and ``auto_map`` included, with ``torch_dtype`` and ``reward_token_id`` set, then
    ``extra_config`` on top), safetensors shards of at most ``max_shard_size`` plus
    ``model.safetensors.index.json``, and copies every ``*.py``, tokenizer file and
    ``generation_config.json`` of ``base_dir``. Adds ``README.md`` (a model card; with
    ``eval_report``, a ``pair_report`` dict, it lists the eval figures) and, with
    ``training_config`` (the resolved config as a dict, or a dataclass), ``training_config.yaml``.
    ``dtype`` None keeps the model's. Written to a hidden temporary folder and renamed into place.
    Returns ``out_dir``.

    >>> save_model(model, "runs/demo/hf", base_dir="POLAR-7B-Base", dtype=torch.bfloat16,
    ...            training_config=to_dict(cfg), eval_report=report)  # doctest: +SKIP
    """
    return save_state_dict(model.state_dict(), model.config, out_dir, base_dir=base_dir, dtype=dtype,
                           max_shard_size=max_shard_size, extra_config=extra_config,
                           training_config=training_config, eval_report=eval_report)
