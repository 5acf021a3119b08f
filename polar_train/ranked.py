"""Preference rows of every kind -> one ``Preference`` -> the sequences and implied pairs of a row (SPEC 2, 3, 10).

A row is a pair or a ranked list; one file may mix them. A pair is the K=2 list::

    {"prompt", "reference", "chosen", "rejected"}                  pair: chosen > rejected
    {"prompt", "reference", "ranked": [best, ..., worst]}          K candidates, K(K-1)/2 pairs
    {"prompt", "ranked": [ref, best, ..., worst]}                  the first is the reference (POLAR's recipe)
    {"prompt", "reference"?, "candidates": [...], "scores": [...]} higher is better; equal scores
                                                                   imply no pair; without reference
                                                                   the best-scored one is it

Encoding (``encode_preference``): every implied pair (i better than j) is encoded exactly as
its expanded pair row would be (SPEC 3): the prompt budget of the pair is
``P_ij = min(P_i, P_j)`` with ``P_i = (max_length - 4 - len(ref) - len(out_i)) // 2``. When the
prompt fits every budget (the usual case) each candidate has one sequence and all K share the
prompt; when it does not, a candidate gets one sequence per distinct truncated prompt it meets
(deduplicated), so each pair still sees exactly its expanded row's ids, and the layout shares
only the prefix all sequences really have in common. A pair with ``P_ij <= 0`` does not fit
and is dropped (counted); a row none of whose pairs fits is dropped as too long.

``order`` lists, best first, one sequence per candidate that is in a kept pair (the one with
the most prompt kept, when its prompt truncates differently across pairs: no sequence is
added for it): the Plackett-Luce loss (``loss.kind=listwise``) and the list metrics use it.
Equal scores are ordered as in the row. Without any truncation every candidate has exactly one
sequence, the one ``polar-train score`` gives it alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from polar_train.data import JsonRow, json_type, flatten_text, polar_text
from polar_train.tokenizer import encode_texts

LIST_FIELDS = ("ranked", "candidates")


@dataclass(frozen=True)
class Preference:
    """One row's prompt, reference and candidates, and which candidate beats which."""

    prompt: str
    reference: str
    candidates: list[str]
    pairs: list[tuple[int, int]]  # (better, worse) candidate indices
    order: list[int]  # candidate indices, best first (ties in row order)
    wrapper: str
    source: str  # FILE:LINE

    @property
    def is_list(self) -> bool:
        """Any row that is not a plain chosen/rejected pair."""
        return len(self.candidates) != 2 or self.pairs != [(0, 1)]


def _texts(obj: dict[str, Any], name: str) -> list[str]:
    value = obj[name]
    if not isinstance(value, list):
        raise ValueError(f"field '{name}' is of type {json_type(value)}; expected a list of candidates")
    return [flatten_text(item, f"{name}[{k}]") for k, item in enumerate(value)]


def _scores(obj: dict[str, Any], count: int) -> list[float]:
    if "scores" not in obj:
        raise ValueError("field 'scores' is missing; "
                         "a 'candidates' row needs one score per candidate (higher is better)")
    scores = obj["scores"]
    if not isinstance(scores, list):
        raise ValueError(f"field 'scores' is of type {json_type(scores)}; expected a list of numbers")
    if len(scores) != count:
        raise ValueError(f"field 'scores' has {len(scores)} values for {count} candidates; "
                         "expected one score per candidate")
    for k, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise ValueError(f"field 'scores[{k}]' is {json_value(s)}; expected a finite number")
    return [float(s) for s in scores]


def json_value(value: Any) -> str:
    """How a bad value reads in a message: its JSON type, or the number itself (NaN, inf)."""
    return repr(value) if isinstance(value, float) else f"of type {json_type(value)}"


def parse_preference(obj: dict[str, Any], source: str = "row", wrapper: str = "sft") -> Preference:
    """The ``Preference`` of a parsed row of any kind; ``ValueError`` names the wrong field.

    >>> parse_preference({"prompt": "p", "ranked": ["A", "B", "C"]}).pairs
    [(0, 1)]
    >>> parse_preference({"prompt": "p", "candidates": ["x", "y", "z"], "scores": [1, 3, 1]}).candidates
    ['x', 'z']
    """
    kinds = [name for name in LIST_FIELDS if name in obj]
    if len(kinds) == 2:
        raise ValueError("the row has both 'ranked' and 'candidates'; expected one of them")
    if "prompt" not in obj:
        raise ValueError("field 'prompt' is missing; expected a string or a list of messages")
    prompt = flatten_text(obj["prompt"], "prompt")
    reference = flatten_text(obj["reference"], "reference") if "reference" in obj else None
    if not kinds:  # a pair row
        for name in ("reference", "chosen", "rejected"):
            if name not in obj:
                raise ValueError(f"field '{name}' is missing; expected a string or a list of messages "
                                 f"(or a list row with 'ranked' or 'candidates')")
        texts = [flatten_text(obj["chosen"], "chosen"), flatten_text(obj["rejected"], "rejected")]
        return Preference(prompt, reference, texts, [(0, 1)], [0, 1], wrapper, source)
    name = kinds[0]
    texts = _texts(obj, name)
    if name == "ranked":
        if reference is None:  # POLAR's recipe: the best output is the reference
            if not texts:
                raise ValueError("field 'ranked' is empty; expected the reference and at least 2 candidates")
            reference, texts = texts[0], texts[1:]
        scores = [-float(k) for k in range(len(texts))]
    else:
        scores = _scores(obj, len(texts))
        if reference is None:
            best = max(scores) if scores else 0.0
            tied = [k for k, s in enumerate(scores) if s == best]
            if len(tied) > 1:
                raise ValueError(f"no 'reference' and candidates {tied} tie for the best score {best:g}; "
                                 f"expected one best-scored candidate to serve as the reference")
            if tied:
                reference = texts[tied[0]]
                del texts[tied[0]], scores[tied[0]]
    if len(texts) < 2:
        raise ValueError(f"field '{name}' has {len(texts)} candidate(s) besides the reference; expected at least 2")
    pairs = [(i, j) for i in range(len(texts)) for j in range(len(texts)) if scores[i] > scores[j]]
    order = sorted(range(len(texts)), key=lambda k: -scores[k])  # stable: ties keep row order
    return Preference(prompt, reference, texts, pairs, order, wrapper, source)


def check_preference(obj: dict[str, Any]) -> None:
    """``data.iter_jsonl_rows``' ``check``: the row must be a valid pair or list."""
    parse_preference(obj)


def preference_of(row: JsonRow) -> Preference:
    """The ``Preference`` of a row ``iter_jsonl_rows(..., check=check_preference)`` returned."""
    return parse_preference(row.raw, row.source, row.wrapper)


@dataclass(frozen=True)
class EncodedPreference:
    """A row's distinct sequences and its pairs as indices into them."""

    seqs: list[list[int]]  # each ends with the reward token id
    better: list[int]  # [P] sequence index of the better candidate of each kept pair
    worse: list[int]  # [P]
    order: list[int]  # sequence index per candidate in a kept pair, best first
    num_pairs_too_long: int  # implied pairs whose budget P_ij <= 0 (dropped)
    prompt_truncated: bool
    response_truncated: bool


def encode_preference(
    tokenizer: PreTrainedTokenizerBase, pref: Preference, *, max_length: int = 16384,
    max_response_length: int = 4096, sep_id: int, reward_id: int,
) -> EncodedPreference | None:
    """The sequences of a row (see the module doc); None when no implied pair fits ``max_length``.

    For a pair row this is ``data.encode_candidates(..., [chosen, rejected])``, id for id.
    """
    return encode_preferences(tokenizer, [pref], max_length=max_length, max_response_length=max_response_length,
                              sep_id=sep_id, reward_id=reward_id)[0]


def encode_preferences(
    tokenizer: PreTrainedTokenizerBase, prefs: Sequence[Preference], *, max_length: int = 16384,
    max_response_length: int = 4096, sep_id: int, reward_id: int,
) -> list[EncodedPreference | None]:
    """``encode_preference`` of each row, id for id, with two batched tokenizer calls for all of them.

    The fields of every row are encoded in one call, then every row's SPEC 3 texts in another
    (``tokenizer.encode_texts``): what the store build spends most of its time on.
    """
    fields = encode_texts(tokenizer, [t for pref in prefs for t in (pref.prompt, pref.reference, *pref.candidates)])
    plans, texts, start = [], [], 0
    for pref in prefs:
        ids = fields[start : start + 2 + len(pref.candidates)]
        start += len(ids)
        plan = _plan(tokenizer, pref, ids[0], ids[1], ids[2:], max_length, max_response_length, sep_id)
        plans.append(plan)
        texts.extend(plan[0] if plan is not None else [])
    seqs = iter(encode_texts(tokenizer, texts))
    encoded: list[EncodedPreference | None] = []
    for plan in plans:
        if plan is None:
            encoded.append(None)
            continue
        plan_texts, better, worse, order, too_long, truncated, response_truncated = plan
        encoded.append(EncodedPreference([next(seqs) + [reward_id] for _ in plan_texts], better, worse, order, too_long,
                                         truncated, response_truncated))
    return encoded


def _plan(tokenizer: PreTrainedTokenizerBase, pref: Preference, prompt_ids: list[int], ref_ids: list[int],
          out_ids: list[list[int]], max_length: int, max_response_length: int, sep_id: int) -> tuple[Any, ...] | None:
    """One row's SPEC 3 texts (each to be encoded with BOS, then the reward id appended) and its
    pairs and order as indices into them; None when no implied pair fits."""
    response_truncated = any(len(ids) > max_response_length for ids in (ref_ids, *out_ids))
    ref_ids = ref_ids[:max_response_length]
    out_ids = [ids[:max_response_length] for ids in out_ids]
    budget = max_length - 4  # room for <|reward|>, two "\n" and the reward token (SPEC 3 step 4)
    own = [(budget - len(ref_ids) - len(ids)) // 2 for ids in out_ids]  # P_i

    texts: list[str] = []
    index: dict[tuple[int, int], int] = {}  # (candidate, prompt tokens kept) -> sequence

    listed: dict[int, tuple[int, int]] = {}  # candidate -> (prompt tokens kept, sequence) for ``order``

    def sequence(k: int, prompt_budget: int) -> int:
        kept = min(prompt_budget, len(prompt_ids))  # every budget >= the prompt keeps all of it
        if (k, kept) not in index:
            index[k, kept] = len(texts)
            kept_prompt = prompt_ids[len(prompt_ids) - kept:]
            texts.append(polar_text(tokenizer, kept_prompt, ref_ids, out_ids[k], pref.wrapper, sep_id))
        listed[k] = max(listed.get(k, (-1, 0)), (kept, index[k, kept]))
        return index[k, kept]

    better, worse, too_long, truncated = [], [], 0, False
    for i, j in pref.pairs:
        p = min(own[i], own[j])  # the pair's budget, as its expanded row computes it
        if p <= 0:
            too_long += 1
            continue
        truncated |= p < len(prompt_ids)
        better.append(sequence(i, p))
        worse.append(sequence(j, p))
    if not better:
        return None
    order = [listed[k][1] for k in pref.order if k in listed]
    return texts, better, worse, order, too_long, truncated, response_truncated
