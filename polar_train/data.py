"""JSONL rows -> validated records -> POLAR token ids (SPEC 2 and 3).

Three steps, each usable alone:

1. ``iter_jsonl_rows`` (a stream) / ``read_jsonl_rows`` / ``read_jsonl_pairs``: parse and
   validate a JSONL file; every mistake is a ``UserError`` whose ``where`` is ``FILE:LINE`` (or
   is collected as a ``SkippedRow``).
2. ``encode_candidates`` / ``encode_pair``: the exact POLAR sequence of one record (SPEC 3).
3. ``polar_train.store_build`` (not here): files -> the tokenized, memory-mapped, cached pair store.

The sequence POLAR scores, for prompt ``p``, reference ``ref`` and one candidate ``out``
(sft wrapper, nothing truncated)::

    <s> p \\n ref <|reward|> p \\n out [UNUSED_TOKEN_130]
    '-- encode(text, add_special_tokens=True) --'  '-- appended id --'
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from transformers import PreTrainedTokenizerBase

from polar_train.errors import UserError

OnError = Literal["raise", "skip"]
RowCheck = Callable[[dict[str, Any]], Any]  # validates a parsed row, raises ValueError
WRAPPERS = ("sft", "pretrain")
PAIR_FIELDS = ("prompt", "reference", "chosen", "rejected")
# Bump when the encoding or the cached columns change: old caches then stop matching.
# 5: POLAR's tokenizer built from tokenizer.model (its remote code under transformers 5 cached other ids)
# 4: ranked lists (a row = sequences + implied pairs); 3: Arrow shards with the length columns
# (polar_train.store); 2: every skipped row listed
ENCODING_VERSION = 5


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


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    names = {str: "string", int: "integer", float: "number", list: "list", dict: "object"}
    return names.get(type(value), type(value).__name__)


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
        raise ValueError(f"field '{field_name}' is of type {json_type(value)}; expected a string or a list of messages")
    contents = []
    for index, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            raise ValueError(f"field '{field_name}': message {index} is of type {json_type(message)}; "
                             "expected an object with a 'content' string")
        if "content" not in message:
            raise ValueError(f"field '{field_name}': message {index} has no 'content'; "
                             "expected an object with a 'content' string")
        if not isinstance(message["content"], str):
            raise ValueError(f"field '{field_name}': message {index} has 'content' of type "
                             f"{json_type(message['content'])}; expected a string")
        contents.append(message["content"])
    return "\n".join(contents)


def parse_json_object(line: str, fields: Sequence[str]) -> dict[str, Any]:
    """One non-blank JSONL line -> its object; ``ValueError`` names what is wrong (``fields``: what
    the object should hold, for the message)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON: {error.msg} at column {error.colno}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"the line is a JSON {json_type(obj)}; expected an object with fields {', '.join(fields)}")
    return obj


def _parse_row(line: str, text_fields: Sequence[str], source: str, check: RowCheck | None = None) -> JsonRow:
    """Validate one non-blank line; ``ValueError`` says what is wrong. ``check(obj)`` validates the
    rest of the row (``polar_train.ranked``: the list fields) and raises ``ValueError`` too."""
    obj = parse_json_object(line, text_fields)
    texts = {}
    for name in text_fields:
        if name not in obj:
            raise ValueError(f"field '{name}' is missing; expected a string or a list of messages")
        texts[name] = flatten_text(obj[name], name)
    wrapper = obj.get("wrapper")
    if wrapper is None:  # absent or null: the default
        wrapper = "sft"
    elif not isinstance(wrapper, str):
        raise ValueError(f"field 'wrapper' is of type {json_type(wrapper)}; expected one of {', '.join(WRAPPERS)}")
    elif wrapper not in WRAPPERS:
        raise ValueError(f"field 'wrapper' is '{wrapper}'; expected one of {', '.join(WRAPPERS)}")
    if check is not None:
        check(obj)
    return JsonRow(source=source, texts=texts, wrapper=wrapper, raw=obj)


def iter_jsonl_rows(
    path: str | os.PathLike[str], text_fields: Sequence[str], *, on_error: OnError = "raise",
    lines: tuple[int, int] | None = None, check: RowCheck | None = None,
) -> Iterator[JsonRow | SkippedRow]:
    """Stream a JSONL file one line at a time: each valid row as a ``JsonRow``, each bad one as a
    ``SkippedRow`` (``on_error="skip"``) or a ``UserError("FILE:LINE", ...)`` (``"raise"``).

    Memory is one line, whatever the file's size. ``lines=(first, end)`` keeps the 1-based line
    numbers ``first <= n < end`` (a shard of the file); the others are only counted. Blank lines
    are skipped; each line is decoded as UTF-8 on its own so that a bad byte is reported with its
    line. Use ``read_jsonl_rows`` for the whole file at once and its "no rows" checks.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    name = str(path)
    first, end = lines if lines is not None else (1, None)
    try:
        file = open(path, "rb")
    except FileNotFoundError:
        raise UserError(name, "data file not found", "check the path in data.train_files / data.eval_files") from None
    except OSError as error:
        raise UserError(name, f"cannot read the data file: {error.strerror or error}") from None
    with file:
        for number, raw_line in enumerate(file, start=1):
            if number < first:
                continue
            if end is not None and number >= end:
                break
            source = f"{name}:{number}"
            try:
                row = _parse_line(raw_line.removesuffix(b"\n"), number, text_fields, source, check)
            except ValueError as error:
                if on_error == "raise":
                    raise UserError(source, str(error), "fix or remove this line, or set data.on_error=skip") from None
                yield SkippedRow(source, str(error))
                continue
            if row is not None:
                yield row


def decode_line(raw_line: bytes, number: int) -> str | None:
    """One JSONL line's bytes -> its text, or None for a blank line (line ``number`` counts from 1:
    the first may start with a UTF-8 byte-order mark); ``ValueError`` for bytes that are not UTF-8."""
    try:
        line = raw_line.decode("utf-8")
    except UnicodeDecodeError as error:
        byte = raw_line[error.start]
        raise ValueError(f"the line is not valid UTF-8 (byte 0x{byte:02x} at byte {error.start + 1})") from None
    if number == 1:
        line = line.removeprefix("\ufeff")
    return line if line.strip() else None


def _parse_line(raw_line: bytes, number: int, text_fields: Sequence[str], source: str,
                check: RowCheck | None = None) -> JsonRow | None:
    """One line's bytes -> a ``JsonRow``, or None for a blank line; ``ValueError`` says what is wrong."""
    line = decode_line(raw_line, number)
    return None if line is None else _parse_row(line, text_fields, source, check)


def read_jsonl_rows(
    path: str | os.PathLike[str], text_fields: Sequence[str], *, on_error: OnError = "raise"
) -> tuple[list[JsonRow], list[SkippedRow]]:
    """Read a JSONL file whose rows must hold ``text_fields`` (strings or message lists).

    Every other field is kept in ``JsonRow.raw``; ``wrapper`` is optional (default ``"sft"``).
    Blank lines are skipped; line numbers count every line from 1. With ``on_error="raise"``
    the first bad row raises ``UserError("FILE:LINE", ...)``; with ``"skip"`` bad rows are
    returned as ``SkippedRow`` and reading goes on (see ``iter_jsonl_rows``). A file without any
    row, or whose rows are all bad, is a ``UserError`` either way.

    >>> rows, skipped = read_jsonl_rows("scored.jsonl", ["prompt", "reference", "output"])  # doctest: +SKIP
    """
    rows: list[JsonRow] = []
    skipped: list[SkippedRow] = []
    for item in iter_jsonl_rows(path, text_fields, on_error=on_error):
        (skipped if isinstance(item, SkippedRow) else rows).append(item)
    check_rows_read(str(path), len(rows), skipped[:1], len(skipped))
    return rows, skipped


def check_rows_read(name: str, num_rows: int, first_skipped: Sequence[SkippedRow], num_skipped: int) -> None:
    """A file without any row, or whose rows were all bad, is a ``UserError``."""
    if num_rows:
        return
    if num_skipped:
        first = first_skipped[0]
        raise UserError(name, f"no valid rows ({num_skipped} bad rows skipped, first: {first.source}: {first.reason})")
    raise UserError(name, "no rows", "the file must hold one JSON object per line")


def read_jsonl_pairs(path: str | os.PathLike[str],
                     on_error: OnError = "raise") -> tuple[list[PairRecord], list[SkippedRow]]:
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

    texts = [polar_text(tokenizer, prompt_ids, ref_ids, ids, wrapper, sep_id) for ids in out_ids]
    input_ids = [tokenizer.encode(text, add_special_tokens=True) + [reward_id] for text in texts]
    return EncodedCandidates(input_ids, texts, prompt_truncated, response_truncated)


def polar_text(tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[int], ref_ids: Sequence[int],
               out_ids: Sequence[int], wrapper: str, sep_id: int) -> str:
    """SPEC 3 steps 5-7 on already truncated field ids: ``ref_cat + "<|reward|>" + out_cat``
    (encode it with BOS and append the reward id)."""

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    prompt_text = decode(prompt_ids)
    sep = tokenizer.convert_ids_to_tokens(sep_id)
    return _join(prompt_text, decode(ref_ids), wrapper) + sep + _join(prompt_text, decode(out_ids), wrapper)


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
# 3. What a set of files gave, and the key of its tokenization (the store builds and caches it)
# ---------------------------------------------------------------------------------------------


@dataclass
class DataStats:
    """What happened to the rows of a set of files, for the log and the run summary."""

    num_rows: int = 0  # non-blank lines read (valid + skipped)
    num_pairs: int = 0  # rows kept: pair rows and lists (polar_train.ranked)
    num_tokens: int = 0  # tokens of every sequence of the kept rows (a pair: chosen + rejected)
    num_too_long: int = 0  # rows dropped: prompt budget P <= 0 for every implied pair
    too_long_sources: list[str] = field(default_factory=list)  # the first few FILE:LINE
    num_prompt_truncated: int = 0  # kept pairs whose prompt lost its first tokens
    num_response_truncated: int = 0  # kept pairs whose reference or an output was cut
    num_skipped: int = 0  # bad rows left out (on_error=skip)
    skipped: list[SkippedRow] = field(default_factory=list)  # every one (rundir.write_skipped_rows lists them)
    tokenize_seconds: float = 0.0  # wall time of the tokenization that built the set (all ranks)
    tokens_per_s: float = 0.0  # num_tokens / tokenize_seconds
    cache_hit: bool = False  # read from the tokenization cache
    num_lists: int = 0  # kept rows that are ranked lists (not a chosen/rejected pair)
    num_implied_pairs: int = 0  # pairs all kept rows imply (a pair row: 1; K ranked: K(K-1)/2)
    num_pairs_too_long: int = 0  # implied pairs of kept lists dropped: their budget P <= 0
    num_identical_pairs: int = 0  # implied pairs whose chosen and rejected encode to the same ids (teach nothing)
    tokens_as_lists: int = 0  # tokens the kept rows cost with the shared prefix (a list: prefix + K suffixes)
    tokens_as_pairs: int = 0  # tokens they would cost expanded into pair rows, each with its shared prefix

    LIST_COUNTS: ClassVar[tuple[str, ...]] = ("num_lists", "num_implied_pairs", "num_pairs_too_long",
                                              "num_identical_pairs",
                                              "tokens_as_lists", "tokens_as_pairs")

    def count_row(self, is_list: bool, encoded: Any) -> None:
        """Add one kept row (a ``ranked.EncodedPreference``) to the counts."""
        from polar_train.packing import group_cost, pair_cost  # here only: packing pulls in torch

        seqs = encoded.seqs
        self.num_prompt_truncated += encoded.prompt_truncated
        self.num_response_truncated += encoded.response_truncated
        self.num_tokens += sum(len(s) for s in seqs)
        self.num_lists += is_list
        self.num_implied_pairs += len(encoded.better)
        self.num_pairs_too_long += encoded.num_pairs_too_long
        self.num_identical_pairs += sum(seqs[b] == seqs[w] for b, w in zip(encoded.better, encoded.worse))
        self.tokens_as_lists += group_cost(seqs, True)
        self.tokens_as_pairs += sum(pair_cost(seqs[b], seqs[w], True) for b, w in zip(encoded.better, encoded.worse))

    NUM_EXAMPLES: ClassVar[int] = 5  # how many FILE:LINE examples the log and reports show per category

    def summary(self) -> str:
        """One log line (the first few too-long and skipped rows only)."""
        lists = (f" ({self.num_lists} ranked lists, {self.num_implied_pairs} implied pairs, "
                 f"{self.tokens_as_lists} tokens "
                 f"vs {self.tokens_as_pairs} as pair rows)" if self.num_lists else "")
        line = (f"{self.num_pairs} pairs{lists} ({self.num_tokens} tokens) from {self.num_rows} rows; "
                f"{self.num_too_long} too long, {self.num_skipped} bad rows skipped; truncated: "
                f"{self.num_prompt_truncated} prompts, {self.num_response_truncated} responses")
        if self.too_long_sources:
            line += f"; too long: {', '.join(self.too_long_sources)}"
        if self.skipped:
            line += "; skipped: " + ", ".join(f"{s.source} ({s.reason})" for s in self.skipped[: self.NUM_EXAMPLES])
        return line

    def as_dict(self, max_skipped: int | None = NUM_EXAMPLES) -> dict[str, Any]:
        """JSON-ready fields, the skipped rows as objects: the first ``max_skipped`` (None = all)."""
        obj = dataclasses.asdict(self)
        obj["skipped"] = obj["skipped"][:max_skipped]
        return obj

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> DataStats:
        obj = dict(obj, skipped=[SkippedRow(**s) for s in obj.get("skipped", [])])
        return cls(**obj)
