"""JSONL rows -> validated records -> POLAR token ids (SPEC 2 and 3).

Three steps, each usable alone:

1. ``read_jsonl_rows`` / ``read_jsonl_pairs``: parse and validate one JSONL file; every mistake is
   a ``UserError`` whose ``where`` is ``FILE:LINE`` (or is collected as a ``SkippedRow``).
2. ``encode_candidates`` / ``encode_pair``: the exact POLAR sequence of one record (SPEC 3).
3. ``load_pair_dataset``: files -> a ``datasets.Dataset`` of ``chosen_ids`` / ``rejected_ids``,
   tokenized once and cached on disk under a key of everything that decides the ids.

The sequence POLAR scores, for prompt ``p``, reference ``ref`` and one candidate ``out``
(sft wrapper, nothing truncated)::

    <s> p \\n ref <|reward|> p \\n out [UNUSED_TOKEN_130]
    '-- encode(text, add_special_tokens=True) --'  '-- appended id --'
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from polar_train.errors import UserError
from polar_train.files import fsync_tree, temporary_name
from polar_train.tokenizer import TOKENIZER_FILE_PATTERNS, special_token_ids

logger = logging.getLogger("polar_train")

OnError = Literal["raise", "skip"]
WRAPPERS = ("sft", "pretrain")
PAIR_FIELDS = ("prompt", "reference", "chosen", "rejected")
# Bump when the encoding or the cached columns change: old caches then stop matching.
ENCODING_VERSION = 2  # 2: the cached stats list every skipped row, not the first few
_NUM_EXAMPLE_SOURCES = 5  # how many FILE:LINE examples the log and reports show per category


# ---------------------------------------------------------------------------------------------
# 1. Reading and validating rows
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SkippedRow:
    """A row left out with ``on_error="skip"``: where it is and what was wrong with it."""

    source: str  # FILE:LINE
    reason: str


@dataclass(frozen=True)
class JsonRow:
    """One valid JSONL row: its text fields flattened, its wrapper, and the whole parsed object."""

    source: str  # FILE:LINE
    texts: dict[str, str]  # field -> flattened text
    wrapper: str  # "sft" or "pretrain"
    raw: dict[str, Any]  # every field of the row, untouched (a scorer writes them back out)


@dataclass(frozen=True)
class PairRecord:
    """One preference pair with every field flattened to a string (SPEC 2)."""

    prompt: str
    reference: str
    chosen: str
    rejected: str
    wrapper: str
    source: str  # FILE:LINE


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {str: "string", int: "integer", float: "number", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def flatten_text(value: Any, field_name: str) -> str:
    """A string stays as is; a message list becomes its ``content`` values joined by ``"\\n"``.

    Roles are dropped and no chat template is applied (SPEC 2). Raises ``ValueError`` with the
    problem (the caller adds ``FILE:LINE``).

    >>> flatten_text([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "prompt")
    'Be brief.\\nHi'
    """
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError(f"field '{field_name}' is of type {_json_type(value)}; expected a string or a list of messages")
    contents = []
    for index, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            raise ValueError(f"field '{field_name}': message {index} is of type {_json_type(message)}; expected an object with a 'content' string")
        if "content" not in message:
            raise ValueError(f"field '{field_name}': message {index} has no 'content'; expected an object with a 'content' string")
        if not isinstance(message["content"], str):
            raise ValueError(f"field '{field_name}': message {index} has 'content' of type {_json_type(message['content'])}; expected a string")
        contents.append(message["content"])
    return "\n".join(contents)


def _parse_row(line: str, text_fields: Sequence[str], source: str) -> JsonRow:
    """Validate one non-blank line; ``ValueError`` says what is wrong."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON: {error.msg} at column {error.colno}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"the line is a JSON {_json_type(obj)}; expected an object with fields {', '.join(text_fields)}")
    texts = {}
    for name in text_fields:
        if name not in obj:
            raise ValueError(f"field '{name}' is missing; expected a string or a list of messages")
        texts[name] = flatten_text(obj[name], name)
    wrapper = obj.get("wrapper")
    if wrapper is None:  # absent or null: the default
        wrapper = "sft"
    elif not isinstance(wrapper, str):
        raise ValueError(f"field 'wrapper' is of type {_json_type(wrapper)}; expected one of {', '.join(WRAPPERS)}")
    elif wrapper not in WRAPPERS:
        raise ValueError(f"field 'wrapper' is '{wrapper}'; expected one of {', '.join(WRAPPERS)}")
    return JsonRow(source=source, texts=texts, wrapper=wrapper, raw=obj)


def read_jsonl_rows(
    path: str | os.PathLike[str], text_fields: Sequence[str], *, on_error: OnError = "raise"
) -> tuple[list[JsonRow], list[SkippedRow]]:
    """Read a JSONL file whose rows must hold ``text_fields`` (strings or message lists).

    Every other field is kept in ``JsonRow.raw``; ``wrapper`` is optional (default ``"sft"``).
    Blank lines are skipped; line numbers count every line from 1. Each line is decoded as
    UTF-8 on its own so that a bad byte is reported with its line. With ``on_error="raise"``
    the first bad row raises ``UserError("FILE:LINE", ...)``; with ``"skip"`` bad rows are
    returned as ``SkippedRow`` and reading goes on. A file without any row, or whose rows are
    all bad, is a ``UserError`` either way.

    >>> rows, skipped = read_jsonl_rows("scored.jsonl", ["prompt", "reference", "output"])  # doctest: +SKIP
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(name, "data file not found", "check the path in data.train_files / data.eval_files") from None
    except OSError as error:
        raise UserError(name, f"cannot read the data file: {error.strerror or error}") from None
    rows: list[JsonRow] = []
    skipped: list[SkippedRow] = []
    for number, raw_line in enumerate(data.split(b"\n"), start=1):
        source = f"{name}:{number}"
        try:
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"the line is not valid UTF-8 (byte 0x{raw_line[error.start]:02x} at byte {error.start + 1})") from None
            if number == 1:
                line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark
            if not line.strip():
                continue
            rows.append(_parse_row(line, text_fields, source))
        except ValueError as error:
            if on_error == "raise":
                raise UserError(source, str(error), "fix or remove this line, or set data.on_error=skip") from None
            skipped.append(SkippedRow(source, str(error)))
    if not rows:
        if skipped:
            raise UserError(name, f"no valid rows ({len(skipped)} bad rows skipped, first: {skipped[0].source}: {skipped[0].reason})")
        raise UserError(name, "no rows", "the file must hold one JSON object per line")
    return rows, skipped


def read_jsonl_pairs(path: str | os.PathLike[str], on_error: OnError = "raise") -> tuple[list[PairRecord], list[SkippedRow]]:
    """Read preference pairs (SPEC 2): ``prompt``, ``reference``, ``chosen``, ``rejected``, optional ``wrapper``.

    See ``read_jsonl_rows`` for validation. ``reference`` may be ``""``.
    """
    rows, skipped = read_jsonl_rows(path, PAIR_FIELDS, on_error=on_error)
    records = [PairRecord(**row.texts, wrapper=row.wrapper, source=row.source) for row in rows]
    return records, skipped


# ---------------------------------------------------------------------------------------------
# 2. The POLAR sequence (SPEC 3)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedCandidates:
    """The model inputs for one prompt/reference and each of its outputs."""

    input_ids: list[list[int]]  # one per output, each ending with the reward token id
    texts: list[str]  # the text each was encoded from (without the reward token)
    prompt_truncated: bool  # the prompt lost its first tokens
    response_truncated: bool  # the reference or an output was cut to max_response_length


def _join(prompt: str, part: str, wrapper: str) -> str:
    # SPEC 3 step 6. (POLAR's client writes the empty test as `len(r) == ""`, which is never
    # true, so it always puts "\n"; SPEC 3 says no "\n" for an empty part: we follow the SPEC.)
    return prompt + part if wrapper == "pretrain" or part == "" else prompt + "\n" + part


def encode_candidates(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    reference: str,
    outputs: Sequence[str],
    wrapper: str = "sft",
    *,
    max_length: int = 16384,
    max_response_length: int = 4096,
    sep_id: int,
    reward_id: int,
) -> EncodedCandidates | None:
    """Encode ``outputs`` (``[chosen, rejected]`` for a pair, ``[output]`` to score one) exactly as POLAR.

    Returns None when the prompt budget ``P <= 0``: the record does not fit ``max_length``.
    Steps (SPEC 3): each field is encoded alone with BOS; reference and outputs keep their first
    ``max_response_length`` ids; ``P = min_out (max_length - 4 - len(ref) - len(out)) // 2``; a
    longer prompt keeps its last ``P`` ids; every field is decoded back (skipping special
    tokens) and joined per ``wrapper``; ``text = ref_cat + "<|reward|>" + out_cat`` is encoded with
    BOS and the reward id appended.

    The final length is usually within ``max_length`` but can exceed it by a few tokens: text
    re-tokenized across field boundaries may merge differently. POLAR does not cut again and
    neither do we (packing must accept such sequences).

    >>> from polar_train.tokenizer import build_tokenizer
    >>> tok = build_tokenizer(["What is the capital of China?", "Beijing."], vocab_size=300)
    >>> enc = encode_candidates(tok, "What is the capital of China?", "Beijing.", ["Beijing."], sep_id=3, reward_id=4)
    >>> enc.texts[0]
    'What is the capital of China?\\nBeijing.<|reward|>What is the capital of China?\\nBeijing.'
    >>> enc.input_ids[0][0], enc.input_ids[0][-1]
    (1, 4)
    """
    if wrapper not in WRAPPERS:
        raise ValueError(f"wrapper must be one of {WRAPPERS}, not {wrapper!r}")
    if not outputs:
        raise ValueError("outputs must hold at least one candidate")
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=True)
    ref_ids = tokenizer.encode(reference, add_special_tokens=True)
    out_ids = [tokenizer.encode(out, add_special_tokens=True) for out in outputs]
    response_truncated = any(len(ids) > max_response_length for ids in (ref_ids, *out_ids))
    ref_ids = ref_ids[:max_response_length]
    out_ids = [ids[:max_response_length] for ids in out_ids]

    budget = max_length - 4  # room for <|reward|>, two "\n" and the reward token
    prompt_budget = min((budget - len(ref_ids) - len(ids)) // 2 for ids in out_ids)
    if prompt_budget <= 0:
        return None
    prompt_truncated = len(prompt_ids) > prompt_budget
    if prompt_truncated:
        prompt_ids = prompt_ids[-prompt_budget:]

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    prompt_text = decode(prompt_ids)
    ref_cat = _join(prompt_text, decode(ref_ids), wrapper)
    sep = tokenizer.convert_ids_to_tokens(sep_id)
    texts = [ref_cat + sep + _join(prompt_text, decode(ids), wrapper) for ids in out_ids]
    input_ids = [tokenizer.encode(text, add_special_tokens=True) + [reward_id] for text in texts]
    return EncodedCandidates(input_ids, texts, prompt_truncated, response_truncated)


def encode_pair(
    tokenizer: PreTrainedTokenizerBase,
    record: PairRecord,
    *,
    max_length: int = 16384,
    max_response_length: int = 4096,
    sep_id: int,
    reward_id: int,
) -> tuple[list[int], list[int]] | None:
    """``(chosen_ids, rejected_ids)`` of a pair, or None if it does not fit (see ``encode_candidates``)."""
    encoded = encode_candidates(
        tokenizer, record.prompt, record.reference, [record.chosen, record.rejected], record.wrapper,
        max_length=max_length, max_response_length=max_response_length, sep_id=sep_id, reward_id=reward_id,
    )
    return None if encoded is None else (encoded.input_ids[0], encoded.input_ids[1])


# ---------------------------------------------------------------------------------------------
# 3. Files -> a cached datasets.Dataset
# ---------------------------------------------------------------------------------------------


@dataclass
class DataStats:
    """What happened to the rows of a set of files, for the log and the run summary."""

    num_rows: int = 0  # non-blank lines read (valid + skipped)
    num_pairs: int = 0  # pairs kept
    num_tokens: int = 0  # chosen + rejected tokens of the kept pairs
    num_too_long: int = 0  # pairs dropped: prompt budget P <= 0
    too_long_sources: list[str] = field(default_factory=list)  # the first few FILE:LINE
    num_prompt_truncated: int = 0  # kept pairs whose prompt lost its first tokens
    num_response_truncated: int = 0  # kept pairs whose reference or an output was cut
    num_skipped: int = 0  # bad rows left out (on_error=skip)
    skipped: list[SkippedRow] = field(default_factory=list)  # every one (rundir.write_skipped_rows lists them)
    cache_hit: bool = False  # read from the tokenization cache

    def summary(self) -> str:
        """One log line (the first few too-long and skipped rows only)."""
        line = (f"{self.num_pairs} pairs ({self.num_tokens} tokens) from {self.num_rows} rows; "
                f"{self.num_too_long} too long, {self.num_skipped} bad rows skipped; truncated: "
                f"{self.num_prompt_truncated} prompts, {self.num_response_truncated} responses")
        if self.too_long_sources:
            line += f"; too long: {', '.join(self.too_long_sources)}"
        if self.skipped:
            line += "; skipped: " + ", ".join(f"{s.source} ({s.reason})" for s in self.skipped[:_NUM_EXAMPLE_SOURCES])
        return line

    def as_dict(self, max_skipped: int | None = _NUM_EXAMPLE_SOURCES) -> dict[str, Any]:
        """JSON-ready fields, the skipped rows as objects: the first ``max_skipped`` (None = all)."""
        obj = dataclasses.asdict(self)
        obj["skipped"] = obj["skipped"][:max_skipped]
        return obj

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> DataStats:
        obj = dict(obj, skipped=[SkippedRow(**s) for s in obj.get("skipped", [])])
        return cls(**obj)


def _hash_tokenizer_files(digest: Any, tokenizer_path: str) -> None:
    folder = Path(tokenizer_path)
    if not folder.is_dir():
        digest.update(f"tokenizer:{tokenizer_path}".encode())
        return
    # the tokenizer files decide the ids (a checkpoint folder also holds GBs of weights: not hashed)
    files = sorted({p for pattern in TOKENIZER_FILE_PATTERNS for p in folder.glob(pattern) if p.is_file()})
    for path in files:
        digest.update(f"tokenizer-file:{path.name}:".encode())
        digest.update(path.read_bytes())


def dataset_cache_key(files: Sequence[str], tokenizer_path: str, *, max_length: int, max_response_length: int, on_error: str) -> str:
    """sha256 of everything that decides the tokenized dataset (file paths and bytes, tokenizer files, lengths)."""
    import tokenizers
    import transformers

    digest = hashlib.sha256()
    digest.update(json.dumps({
        "version": ENCODING_VERSION, "max_length": max_length, "max_response_length": max_response_length,
        "on_error": on_error, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
    }, sort_keys=True).encode())
    for name in files:
        digest.update(f"file:{name}:".encode())
        file_digest = hashlib.sha256()
        try:
            with open(name, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    file_digest.update(chunk)
            digest.update(file_digest.digest())
        except OSError:
            digest.update(b"<unreadable>")  # reading the file reports it properly
    _hash_tokenizer_files(digest, tokenizer_path)
    return digest.hexdigest()


def _encode_row(row: dict[str, Any], *, tokenizer: PreTrainedTokenizerBase, max_length: int,
                max_response_length: int, sep_id: int, reward_id: int) -> dict[str, Any]:
    """datasets.map function: one PairRecord row -> ids and flags (empty ids when it does not fit)."""
    encoded = encode_candidates(
        tokenizer, row["prompt"], row["reference"], [row["chosen"], row["rejected"]], row["wrapper"],
        max_length=max_length, max_response_length=max_response_length, sep_id=sep_id, reward_id=reward_id,
    )
    if encoded is None:
        return {"chosen_ids": [], "rejected_ids": [], "fits": False, "num_tokens": 0,
                "prompt_truncated": False, "response_truncated": False}
    chosen_ids, rejected_ids = encoded.input_ids
    return {"chosen_ids": chosen_ids, "rejected_ids": rejected_ids, "fits": True,
            "num_tokens": len(chosen_ids) + len(rejected_ids),
            "prompt_truncated": encoded.prompt_truncated, "response_truncated": encoded.response_truncated}


def _features() -> Any:
    import datasets

    ids = datasets.List(datasets.Value("int32")) if hasattr(datasets, "List") else datasets.Sequence(datasets.Value("int32"))
    return datasets.Features({
        "chosen_ids": ids, "rejected_ids": ids, "source": datasets.Value("string"), "fits": datasets.Value("bool"),
        "num_tokens": datasets.Value("int64"), "prompt_truncated": datasets.Value("bool"), "response_truncated": datasets.Value("bool"),
    })


def _save_atomically(dataset: Any, stats: DataStats, final_dir: Path) -> None:
    """Write dataset + stats to a temporary folder, then rename it into place.

    Readers test for ``stats.json`` inside ``final_dir``, which exists only after the rename, so
    they never see half a cache. If another process renamed first, its copy is kept. A cache
    that cannot be written costs only time: it is logged, not raised.
    """
    tmp_dir = temporary_name(final_dir)
    try:
        tmp_dir.mkdir(parents=True)
        dataset.save_to_disk(str(tmp_dir / "dataset"))
        (tmp_dir / "stats.json").write_text(json.dumps(stats.as_dict(max_skipped=None), indent=1))
        fsync_tree(tmp_dir)
        os.rename(tmp_dir, final_dir)
        logger.info("data: tokenized pairs cached in %s", final_dir)
    except OSError as error:
        if not (final_dir / "stats.json").is_file():  # not "another process got there first"
            logger.warning("data: could not write the tokenization cache %s: %s", final_dir, error)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def load_pair_dataset(
    files: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    tokenizer_path: str,
    *,
    max_length: int = 16384,
    max_response_length: int = 4096,
    cache_dir: str | None = None,
    on_error: OnError = "raise",
    num_proc: int = 1,
    reward_token_id: int | None = None,
) -> tuple[Any, DataStats]:
    """Read, validate and tokenize preference files into a ``datasets.Dataset``.

    Columns: ``chosen_ids``, ``rejected_ids`` (lists of int, each ending with the reward token)
    and ``source`` (``FILE:LINE``), in file order; pairs that do not fit are dropped and counted.
    With ``cache_dir``, the result is stored under ``cache_dir/<key>`` (``dataset_cache_key``:
    file bytes, tokenizer files, lengths, ``on_error``, library and code versions) and a later
    call with the same key loads it without reading or tokenizing anything.
    ``reward_token_id`` (from the model config), when given, must match the tokenizer.
    """
    import datasets

    files = [str(f) for f in files]
    if not files:
        raise ValueError("load_pair_dataset needs at least one file")
    sep_id, reward_id = special_token_ids(tokenizer, reward_token_id)
    key = dataset_cache_key(files, tokenizer_path, max_length=max_length, max_response_length=max_response_length, on_error=on_error)
    final_dir = Path(cache_dir).expanduser() / key if cache_dir else None
    if final_dir is not None and (final_dir / "stats.json").is_file():
        dataset = datasets.load_from_disk(str(final_dir / "dataset"))
        stats = DataStats.from_dict(json.loads((final_dir / "stats.json").read_text()))
        stats.cache_hit = True
        logger.info("data: cache hit, tokenized pairs loaded from %s", final_dir)
        logger.info("data: %s", stats.summary())
        return dataset, stats

    stats = DataStats()
    records: list[dict[str, Any]] = []
    all_skipped: list[SkippedRow] = []
    for name in files:
        pairs, skipped = read_jsonl_pairs(name, on_error=on_error)
        records.extend(dataclasses.asdict(p) for p in pairs)
        all_skipped.extend(skipped)
    stats.num_rows = len(records) + len(all_skipped)
    stats.num_skipped, stats.skipped = len(all_skipped), all_skipped
    logger.info("data: tokenizing %d pairs from %d file(s)", len(records), len(files))

    encoded = datasets.Dataset.from_list(records).map(
        _encode_row,
        fn_kwargs=dict(tokenizer=tokenizer, max_length=max_length, max_response_length=max_response_length,
                       sep_id=sep_id, reward_id=reward_id),
        remove_columns=["prompt", "reference", "chosen", "rejected", "wrapper"],
        features=_features(),
        num_proc=num_proc if num_proc > 1 else None,
        new_fingerprint=key[:32],  # skip hashing the tokenizer for datasets' own fingerprint
        desc="tokenizing pairs",
    )
    fits = encoded["fits"]
    too_long = [source for source, ok in zip(encoded["source"], fits) if not ok]
    stats.num_too_long, stats.too_long_sources = len(too_long), too_long[:_NUM_EXAMPLE_SOURCES]
    stats.num_prompt_truncated = sum(encoded["prompt_truncated"])
    stats.num_response_truncated = sum(encoded["response_truncated"])
    dataset = encoded.filter(lambda ok: ok, input_columns="fits") if too_long else encoded
    dataset = dataset.select_columns(["chosen_ids", "rejected_ids", "source"])
    stats.num_pairs = len(dataset)
    stats.num_tokens = sum(encoded["num_tokens"])
    if all_skipped:
        first = ", ".join(s.source for s in all_skipped[:_NUM_EXAMPLE_SOURCES])
        logger.warning("data: skipped %d bad rows (on_error=skip; first: %s; %s: %s)", len(all_skipped), first,
                       all_skipped[0].source, all_skipped[0].reason)
    if too_long:
        logger.warning("data: dropped %d pairs that do not fit max_length=%d (first: %s)", len(too_long), max_length, ", ".join(stats.too_long_sources))
    if not stats.num_pairs:
        raise UserError(
            ", ".join(files), f"no pair fits max_length={max_length}: all {len(too_long)} pairs are too long (first: {too_long[0]})",
            f"raise data.max_length, or lower data.max_response_length (now {max_response_length}) to leave the prompt room",
        )
    if final_dir is not None:
        _save_atomically(dataset, stats, final_dir)
    logger.info("data: %s", stats.summary())
    return dataset, stats
