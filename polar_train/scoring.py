"""``polar-train score`` and ``polar-train eval``: JSONL rows -> rewards, pairs and lists -> a report.

Two row formats, detected per row:

- client rows (POLAR's client format): ``prompt``, ``reference``, ``output``, optional
  ``wrapper`` -> gets ``reward``;
- pair rows: ``prompt``, ``reference``, ``chosen``, ``rejected``, optional ``wrapper`` -> gets
  ``chosen_reward`` and ``rejected_reward``;
- list rows: ``prompt``, ``reference``, ``candidates`` (a list), optional ``wrapper`` -> gets
  ``rewards``, one per candidate in order, each candidate encoded alone (its own prompt budget).

Every input field is written back unchanged and in its order; these fields are added after
them (an input field of the same name is overwritten where it stands):

    reward | chosen_reward, rejected_reward   float, or null when the row does not fit
    prompt_truncated     bool: the prompt lost its first tokens to fit max_length (SPEC 3 step 4)
    response_truncated   bool: the reference or an output was cut to max_response_length (step 3)
    skip_reason          null, or why the row got no reward (then both flags are null too)

The flow: each row is encoded alone exactly as in training (SPEC 3, its own prompt budget;
the two outputs of a pair row share one budget, as in training); the candidates of rows with
the same prompt, reference and wrapper form one group whose common token prefix runs once;
groups are packed best-fit decreasing into forwards of ``max_tokens`` tokens
(``evaluate.group_rewards``). Rewards equal those of each sequence run alone.

Python use::

    model, tokenizer = load_scorer("runs/demo/hf")
    rows = score_rows(model, tokenizer, [{"prompt": "What is 7 + 5?", "reference": "12", "output": "12."}])
    rows[0]["reward"]
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from polar_train.data import (WRAPPERS, EncodedCandidates, JsonRow, check_rows_read, encode_candidates, flatten_text,
                              iter_jsonl_rows, read_jsonl_rows)
from polar_train.engine.protocol import DTYPES, resolve_precision
from polar_train.errors import UserError
from polar_train.evaluate import (InferenceStats, autocast_to, build_report, group_rewards, implied_pairs,
                                  normalize_rewards, write_report)
from polar_train.files import write_text
from polar_train.model import InternLM2RewardModel, load_model
from polar_train.ranked import EncodedPreference, Preference, check_preference, encode_preference, preference_of
from polar_train.tokenizer import load_tokenizer, special_token_ids

logger = logging.getLogger("polar_train")

RowKind = Literal["client", "pair", "list"]
OUTPUT_FIELDS: dict[str, tuple[str, ...]] = {"client": ("output",), "pair": ("chosen", "rejected"),
                                             "list": ("candidates",)}
REWARD_FIELDS: dict[str, tuple[str, ...]] = {"client": ("reward",), "pair": ("chosen_reward", "rejected_reward"),
                                             "list": ("rewards",)}
SCORED_FILE = "scored.jsonl"  # eval's per-pair rewards, next to report.json
_NUM_EXAMPLE_SOURCES = 5


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreItem:
    """One validated row: its kind, flattened texts and the untouched parsed object."""

    source: str  # FILE:LINE, or "row N" for rows given in Python
    kind: RowKind
    prompt: str
    reference: str
    outputs: tuple[str, ...]  # (output,) or (chosen, rejected)
    wrapper: str
    raw: Mapping[str, Any]


def row_kind(obj: Mapping[str, Any], source: str) -> RowKind:
    """``"client"`` for a row with ``output``, ``"pair"`` for one with ``chosen`` and ``rejected``,
    ``"list"`` for one with ``candidates``."""
    has_output, has_chosen, has_rejected = "output" in obj, "chosen" in obj, "rejected" in obj
    if "candidates" in obj and not (has_output or has_chosen or has_rejected):
        return "list"
    if has_output and (has_chosen or has_rejected):
        raise UserError(source, "the row has 'output' (a client row) and 'chosen'/'rejected' (a pair row)",
                        "keep one format per row")
    if has_output:
        return "client"
    if has_chosen and has_rejected:
        return "pair"
    half = (" (it has 'chosen' but no 'rejected')" if has_chosen
            else " (it has 'rejected' but no 'chosen')" if has_rejected else "")
    raise UserError(source, "the row is neither a client row (prompt, reference, output) nor a pair row "
                    f"(prompt, reference, chosen, rejected){half}", "add the missing field or remove the row")


def _text(obj: Mapping[str, Any], name: str, source: str) -> str:
    if name not in obj:
        raise UserError(source, f"field '{name}' is missing; expected a string or a list of messages",
                        "fix or remove this row")
    try:
        return flatten_text(obj[name], name)
    except ValueError as error:
        raise UserError(source, str(error), "fix or remove this row") from None


def to_item(row: JsonRow | Mapping[str, Any], source: str = "row") -> ScoreItem:
    """Validate one row (a ``JsonRow`` from ``read_jsonl_rows`` or a plain dict) -> ``ScoreItem``."""
    if isinstance(row, JsonRow):
        obj, source, wrapper = row.raw, row.source, row.wrapper
    elif isinstance(row, Mapping):
        obj = row
        wrapper = obj.get("wrapper")
        if wrapper is None:
            wrapper = "sft"
        elif wrapper not in WRAPPERS:
            raise UserError(source, f"field 'wrapper' is {wrapper!r}", f"expected one of {', '.join(WRAPPERS)}")
    else:
        raise UserError(source, f"the row is a {type(row).__name__}",
                        "expected a dict with prompt, reference and outputs")
    kind = row_kind(obj, source)
    if kind == "list":
        if not isinstance(obj["candidates"], list) or not obj["candidates"]:
            raise UserError(source, "field 'candidates' is not a non-empty list", "give a list of candidate outputs")
        outputs = tuple(_text({f"candidates[{k}]": c}, f"candidates[{k}]", source)
                        for k, c in enumerate(obj["candidates"]))
    else:
        outputs = tuple(_text(obj, name, source) for name in OUTPUT_FIELDS[kind])
    return ScoreItem(source=source, kind=kind, prompt=_text(obj, "prompt", source),
                     reference=_text(obj, "reference", source), outputs=outputs, wrapper=wrapper, raw=obj)


def read_rows(path: str | os.PathLike[str], expect: RowKind | None = None) -> list[ScoreItem]:
    """Read and validate a JSONL file of client and/or pair rows; ``expect`` allows only one kind."""
    try:
        rows, _ = read_jsonl_rows(path, ("prompt", "reference"), on_error="raise")
    except UserError as error:  # same message; the hint about the training config made fit for the CLI
        fix = error.fix
        if "data.on_error" in fix:
            fix = "fix or remove this line"
        elif "data.train_files" in fix:
            fix = "check the --data path"
        raise UserError(error.where, error.what, fix) from None
    items = [to_item(row) for row in rows]
    for item in items:
        if expect is not None and item.kind != expect:
            fields = "prompt, reference, " + ", ".join(OUTPUT_FIELDS[expect])
            raise UserError(item.source, f"a {item.kind} row where {expect} rows are expected",
                            f"every row needs {fields}")
    return items


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


@dataclass
class ScoreStats:
    """What happened to the rows of one ``score_rows`` call."""

    num_rows: int = 0
    num_client_rows: int = 0
    num_pair_rows: int = 0
    num_scored: int = 0  # rows that got rewards
    num_unfit: int = 0  # rows that do not fit max_length: null rewards and a skip_reason
    unfit_sources: list[str] = field(default_factory=list)  # the first few
    num_prompt_truncated: int = 0  # scored rows whose prompt lost its first tokens
    num_response_truncated: int = 0  # scored rows whose reference or an output was cut
    inference: InferenceStats = field(default_factory=InferenceStats)
    seconds: float = 0.0

    def summary(self) -> str:
        """One log line."""
        inf = self.inference
        saved = 1 - inf.num_packed_tokens / inf.num_sequence_tokens if inf.num_sequence_tokens else 0.0
        rate = self.num_rows / self.seconds if self.seconds else 0.0
        return (f"scored {self.num_scored} of {self.num_rows} rows ({self.num_client_rows} client, "
                f"{self.num_pair_rows} pair) in {self.seconds:.1f} s ({rate:.1f} rows/s); {self.num_unfit} do not "
                f"fit (null reward); truncated: {self.num_prompt_truncated} prompts, {self.num_response_truncated} "
                f"responses; {inf.num_sequences} sequences, {inf.num_packed_tokens} tokens in {inf.num_forwards} "
                f"forwards (shared prefixes saved {saved:.0%}); {inf.num_over_budget} sequences over max_tokens "
                "ran alone")


def _unfit_reason(tokenizer: PreTrainedTokenizerBase, item: ScoreItem, max_length: int,
                  max_response_length: int) -> str:
    lengths = [min(len(tokenizer.encode(t, add_special_tokens=True)), max_response_length)
               for t in (item.reference, *item.outputs)]
    parts = " + ".join(f"{name} {n}" for name, n in zip(("reference", *OUTPUT_FIELDS[item.kind]), lengths))
    return (f"does not fit max_length={max_length}: {parts} tokens (each at most max_response_length="
            f"{max_response_length}) leave no room for the prompt")


def score_rows(
    model: InternLM2RewardModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Iterable[JsonRow | ScoreItem | Mapping[str, Any]],
    *,
    max_length: int = 16384,
    max_response_length: int = 4096,
    max_tokens: int = 16384,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    stats: ScoreStats | None = None,
) -> list[dict[str, Any]]:
    """Score client rows and pair rows; returns new dicts in input order (see the module doc).

    ``rows``: dicts (validated here; errors name ``row N``, counted from 1), ``JsonRow`` or
    ``ScoreItem``. ``device`` defaults to the model's; ``autocast_dtype`` runs the forwards
    under autocast (a trainer's fp32 weights in bf16). ``progress`` shows a tqdm bar in rows/s.
    ``stats``, when given, is filled in.
    """
    if max_length <= 4 or max_response_length < 1 or max_tokens < 1:
        raise ValueError(f"need max_length > 4, max_response_length >= 1, max_tokens >= 1; got {max_length}, "
                         f"{max_response_length}, {max_tokens}")
    start = time.perf_counter()
    stats = stats if stats is not None else ScoreStats()
    items = [row if isinstance(row, ScoreItem) else to_item(row, f"row {i}") for i, row in enumerate(rows, start=1)]
    config = getattr(model, "config", None)
    sep_id, reward_id = special_token_ids(tokenizer, getattr(config, "reward_token_id", None))
    share_max_len = config.share_max_len if config is not None else None

    out = [dict(item.raw) for item in items]
    groups: list[list[list[int]]] = []  # group -> its sequences' ids
    members: list[list[tuple[int, int]]] = []  # group -> (row, output slot) of each sequence
    group_of: dict[tuple[str, str, str], int] = {}
    for r, item in enumerate(items):
        stats.num_rows += 1
        stats.num_client_rows += item.kind == "client"
        stats.num_pair_rows += item.kind == "pair"
        # a pair's two outputs share one prompt budget (as in training); a list's candidates are each scored alone
        alone = [(out_text,) for out_text in item.outputs] if item.kind == "list" else [item.outputs]
        parts = [encode_candidates(tokenizer, item.prompt, item.reference, texts, item.wrapper, max_length=max_length,
                                   max_response_length=max_response_length, sep_id=sep_id, reward_id=reward_id)
                 for texts in alone]
        encoded = None if any(p is None for p in parts) else EncodedCandidates(
            [ids for p in parts for ids in p.input_ids], [t for p in parts for t in p.texts],
            any(p.prompt_truncated for p in parts), any(p.response_truncated for p in parts))
        row = out[r]
        for name in REWARD_FIELDS[item.kind]:
            row[name] = None
        if encoded is None:
            row.update(prompt_truncated=None, response_truncated=None,
                       skip_reason=_unfit_reason(tokenizer, item, max_length, max_response_length))
            stats.num_unfit += 1
            if len(stats.unfit_sources) < _NUM_EXAMPLE_SOURCES:
                stats.unfit_sources.append(item.source)
            continue
        row.update(prompt_truncated=encoded.prompt_truncated, response_truncated=encoded.response_truncated,
                   skip_reason=None)
        stats.num_scored += 1
        stats.num_prompt_truncated += encoded.prompt_truncated
        stats.num_response_truncated += encoded.response_truncated
        g = group_of.setdefault((item.prompt, item.reference, item.wrapper), len(groups))
        if g == len(groups):
            groups.append([])
            members.append([])
        for slot, ids in enumerate(encoded.input_ids):
            groups[g].append(ids)
            members[g].append((r, slot))

    bar = tqdm(total=len(items), desc="score", unit="row", disable=not progress, dynamic_ncols=True)
    bar.update(stats.num_unfit)
    remaining = [len(item.outputs) for item in items]

    def advance(done: list[tuple[int, int]]) -> None:
        finished = 0
        for g, k in done:
            r = members[g][k][0]
            remaining[r] -= 1
            finished += remaining[r] == 0
        bar.update(finished)

    try:
        device = torch.device(device) if device is not None else next(model.parameters()).device
        rewards = group_rewards(model, groups, max_tokens=max_tokens, share_max_len=share_max_len, device=device,
                                autocast=autocast_to(autocast_dtype, device), on_forward=advance, stats=stats.inference)
    finally:
        bar.close()
    for g, values in enumerate(rewards):
        for (r, slot), value in zip(members[g], values, strict=True):
            if items[r].kind == "list":  # one reward per candidate, in order
                out[r]["rewards"] = (out[r]["rewards"] or []) + [value]
            else:
                out[r][REWARD_FIELDS[items[r].kind][slot]] = value
    stats.seconds += time.perf_counter() - start
    if stats.num_unfit:
        logger.warning("score: %d rows do not fit max_length=%d and got a null reward (first: %s)",
                       stats.num_unfit, max_length, ", ".join(stats.unfit_sources))
    return out


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """One JSON object per line (UTF-8, non-ASCII kept), written to a temporary name and renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_text(path, text)
    return path


def score_file(model: InternLM2RewardModel, tokenizer: PreTrainedTokenizerBase, data: str | os.PathLike[str],
               output: str | os.PathLike[str], *, progress: bool = True, normalize: tuple[float, float] | None = None,
               **options: Any) -> ScoreStats:
    """Score the rows of ``data`` into ``output`` (see ``score_rows`` for ``options``); logs the counts.
    ``normalize``: ``(mean, std)`` to write ``(reward - mean) / std`` (``read_reward_stats``)."""
    items = read_rows(data)
    stats = ScoreStats()
    scored = score_rows(model, tokenizer, items, progress=progress, stats=stats, **options)
    if normalize is not None:
        scored = [normalize_rewards(row, *normalize) for row in scored]
    write_jsonl(scored, output)
    logger.info("score: %s", stats.summary())
    logger.info("score: wrote %s", output)
    return stats


def read_preferences(path: str | os.PathLike[str]) -> list[tuple[dict[str, Any], Preference]]:
    """The pair rows and ranked lists of an eval file (each parsed row and its ``Preference``), read
    and validated as training reads them."""
    try:
        rows = list(iter_jsonl_rows(path, ("prompt",), on_error="raise", check=check_preference))
        check_rows_read(str(path), len(rows), [], 0)
    except UserError as error:  # same message; the hint about the training config made fit for the CLI
        fix = "fix or remove this line" if "data.on_error" in error.fix else error.fix
        raise UserError(error.where, error.what, fix.replace("check the path in data.train_files / data.eval_files",
                                                              "check the --data path")) from None
    return [(row.raw, preference_of(row)) for row in rows]


def eval_file(model: InternLM2RewardModel, tokenizer: PreTrainedTokenizerBase, data: str | os.PathLike[str],
              out_dir: str | os.PathLike[str], *, plots: bool = True, progress: bool = True,
              settings: Mapping[str, Any] | None = None, max_length: int = 16384, max_response_length: int = 4096,
              max_tokens: int = 16384) -> dict[str, Any]:
    """Evaluate the pair rows and ranked lists of ``data`` exactly as training's eval does (each row
    encoded by ``ranked.encode_preference``, one group per row, ``evaluate.build_report``):
    ``report.json``, ``rewards.png``, ``margin.png`` and the per-row rewards ``scored.jsonl`` in
    ``out_dir``. Returns the report, plus ``settings``: the data file and the options, with
    ``settings`` given here on top."""
    rows = read_preferences(data)
    config = getattr(model, "config", None)
    sep_id, reward_id = special_token_ids(tokenizer, getattr(config, "reward_token_id", None))
    encoded = [encode_preference(tokenizer, pref, max_length=max_length, max_response_length=max_response_length,
                                 sep_id=sep_id, reward_id=reward_id) for _, pref in rows]
    kept = [e for e in encoded if e is not None]
    if not kept:
        raise UserError(data, f"no pair fits max_length ({len(encoded)} rows do not fit)", "raise --max-length")
    bar = tqdm(total=sum(len(e.seqs) for e in kept), desc="eval", unit="seq", disable=not progress, dynamic_ncols=True)
    try:
        rewards = group_rewards(model, [e.seqs for e in kept], max_tokens=max_tokens,
                                share_max_len=config.share_max_len if config is not None else None,
                                on_forward=lambda done: bar.update(len(done)))
    finally:
        bar.close()
    counts = {"num_dropped": len(encoded) - len(kept), "num_prompt_truncated": sum(e.prompt_truncated for e in kept),
              "num_response_truncated": sum(e.response_truncated for e in kept)}
    report = build_report(rewards, kept, **counts)  # the same builder as training's eval
    options = {"max_length": max_length, "max_response_length": max_response_length, "max_tokens": max_tokens}
    report["settings"] = {"data": str(data), **options, **(settings or {})}
    write_jsonl(_scored_rows(rows, encoded, iter(rewards), max_length), Path(out_dir) / SCORED_FILE)
    chosen, rejected = implied_pairs(rewards, kept)
    written = write_report(report, out_dir, chosen, rejected, plots=plots)
    logger.info("eval: %d rows, %d do not fit max_length; truncated: %d prompts, %d responses", len(encoded),
                counts["num_dropped"], counts["num_prompt_truncated"], counts["num_response_truncated"])
    logger.info("eval: %d pairs, accuracy %.4f, mean margin %.4f, reward mean %.4f std %.4f -> %s",
                report["pairs"], report["accuracy"], report["mean_margin"], report["reward_mean"],
                report["reward_std"], ", ".join(str(p) for p in written.values()))
    return report


def _scored_rows(rows: Sequence[tuple[dict[str, Any], Preference]], encoded: Sequence[EncodedPreference | None],
                 rewards: Iterator[list[float]], max_length: int) -> Iterator[dict[str, Any]]:
    """eval's ``scored.jsonl`` rows: a pair row gets ``chosen_reward`` / ``rejected_reward``, a list
    ``ranked_rewards`` (its candidates' rewards, best first); a row that does not fit nulls."""
    for (raw, pref), e in zip(rows, encoded):
        row = dict(raw)
        values = next(rewards) if e is not None else None
        if not pref.is_list:
            row["chosen_reward"] = values[e.better[0]] if values else None
            row["rejected_reward"] = values[e.worse[0]] if values else None
        else:
            row["ranked_rewards"] = [values[k] for k in e.order] if values else None
        row.update(prompt_truncated=e.prompt_truncated if e else None,
                   response_truncated=e.response_truncated if e else None,
                   skip_reason=None if e else f"does not fit max_length={max_length}: no implied pair leaves room "
                                              "for the prompt")
        yield row


# ---------------------------------------------------------------------------------------------
# Loading (the two commands are in cli.py)
# ---------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA if there is one, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError("--device", f"cannot use {name!r}", "expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device", f"{name} asked for, but this machine has no usable CUDA device",
                            "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError("--device", f"{name} asked for, but there are {torch.cuda.device_count()} CUDA devices",
                            f"use cuda:0 ... cuda:{torch.cuda.device_count() - 1}")
    return device


DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # --dtype -> engine.precision's names


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a CUDA device that supports it, else float32 (``resolve_precision``)."""
    if name != "auto" and name not in DTYPE_NAMES:
        raise UserError("--dtype", f"unknown dtype {name!r}", "expected auto, float32, bfloat16 or float16")
    return DTYPES[resolve_precision(DTYPE_NAMES.get(name, name), device, key="--dtype")]


def load_scorer(model_dir: str | os.PathLike[str], *, device: str = "auto", dtype: str = "auto",
                attention: str = "auto",
                trust_remote_code: bool = False) -> tuple[InternLM2RewardModel, PreTrainedTokenizerBase]:
    """The reward model (weights in ``dtype``, on ``device``) and the tokenizer of a checkpoint folder
    (``trust_remote_code``: allow the folder's tokenizer code to run, see ``load_tokenizer``)."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    # before the weights
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code, opt_in="--trust-remote-code")
    model = load_model(model_dir, attention=attention, dtype=torch_dtype, device=torch_device)
    special_token_ids(tokenizer, model.config.reward_token_id)  # fail early on a mismatched tokenizer
    logger.info("model %s on %s in %s, attention %s", model_dir, torch_device, str(torch_dtype).removeprefix("torch."),
                model.attention)
    return model, tokenizer
