"""Policy samples -> POLAR pre-training pairs (SPEC 9): ``polar-train pretrain-pairs``.

POLAR pre-trains with the fine-tuning objective on pairs built from policy samples: the
reference and the chosen answer are two different samples of one policy, the rejected answer
is a sample of another policy (paper App. D.1). Input, one JSON object per line::

    {"prompt": "The history of", "policy": "internlm2-7b-base", "output": " Rome begins", "wrapper": "pretrain"}

``prompt`` and ``output`` are strings or chat-message lists (flattened as SPEC 2: the text the
model sees), ``policy`` names the model that wrote ``output``, ``wrapper`` is optional
(``"sft"`` default, ``"pretrain"`` for base-model continuations). Output rows are the trainer's
pair rows plus two provenance fields it ignores::

    {"prompt", "reference", "chosen", "rejected", "wrapper", "reference_policy", "rejected_policy"}

Which pairs. Samples are grouped by (prompt text, wrapper): the wrapper decides the sequence
(SPEC 3), so reference, chosen and rejected always share it. In a group, for every policy A with
n >= 2 samples, A's samples in a seeded shuffled order s_0 .. s_{n-1} give the n (reference,
chosen) pairs (s_i, s_{(i+1) mod n}): a cycle, so each sample is the reference once and the chosen
once, never both in one pair (n = 2 gives both orders; a line repeated in the input is two
samples, so its two copies can pair). Each pair gets up to ``negatives`` rows, each with a
different policy B != A, drawn at random from the group's other policies; B's sample is the
next one of B's shuffled samples (round robin, so B's samples are used evenly).
Rows per group: sum over A with n_A >= 2 of n_A * min(negatives, policies - 1), linear in the
samples. A group with one policy only, or with no policy that has two samples, gives no row: it
is counted and reported (``PretrainPairStats``).

Memory: two passes over disk. (1) Every input line is read as a stream, validated and appended
to one of up to ``_MAX_BUCKETS`` bucket files next to the output, chosen by a hash of (prompt,
wrapper), so a group never spans two buckets. (2) One bucket at a time is read, grouped in
memory and written out. A bucket larger than ``max_bucket_bytes`` is split again with another
hash first, so the peak holds about max(``max_bucket_bytes``, the largest group), whatever the
size of the input. Input need not be sorted.

Determinism: every group draws from its own generator seeded by ``(seed, prompt, wrapper)``, so
a group's rows depend only on its own samples (in input order) and the seed; groups are written
bucket by bucket, sorted by (prompt, wrapper) within a bucket. Same files and seed: same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from tqdm.auto import tqdm

from polar_train.data import WRAPPERS, decode_line, flatten_text, json_type, parse_json_object
from polar_train.errors import UserError
from polar_train.files import write_atomically

SAMPLE_FIELDS = ("prompt", "policy", "output")
DEFAULT_MAX_BUCKET_BYTES = 32 << 20  # bucket bytes grouped in memory at once (x ~3 in Python objects)
_MAX_BUCKETS = 128  # bucket files open at once when splitting (well under the usual 1024 file limit)
_MAX_SPLIT_DEPTH = 4  # a bucket still too large after this many splits is one huge group: group it as is
_NUM_EXAMPLE_SOURCES = 3  # FILE:LINE examples the summary shows per kind of unpairable prompt
_FIX = "fix or remove this line"


@dataclass(frozen=True)
class Sample:
    """One valid sample row, its prompt and output flattened (SPEC 2)."""

    prompt: str
    wrapper: str  # "sft" or "pretrain"
    policy: str
    output: str
    source: str  # FILE:LINE


@dataclass
class PretrainPairStats:
    """What ``build_pretrain_pairs`` read and wrote; ``summary()`` is the line the command prints."""

    num_samples: int = 0
    num_prompts: int = 0  # groups: distinct (prompt, wrapper)
    num_paired_prompts: int = 0  # groups that gave at least one row
    num_pairs: int = 0  # (reference, chosen) pairs
    num_rows: int = 0  # rows written: pairs x rejected policies
    num_pairs_short: int = 0  # pairs with fewer than `negatives` rows: the prompt has fewer other policies
    num_one_policy: int = 0  # unpairable groups: every sample from one policy
    num_one_policy_samples: int = 0
    one_policy_sources: list[str] = field(default_factory=list)  # FILE:LINE of each one's first sample
    num_no_repeat: int = 0  # unpairable groups: several policies, none with two samples
    num_no_repeat_samples: int = 0
    no_repeat_sources: list[str] = field(default_factory=list)

    def summary(self, output: str = "") -> str:
        """One line: rows written, prompts paired, and every unpairable prompt counted."""
        line = (f"{self.num_rows} rows ({self.num_pairs} reference/chosen pairs) written"
                f"{' to ' + output if output else ''} from {self.num_samples} samples of {self.num_prompts} prompts; "
                f"{self.num_paired_prompts} prompts paired, {self.num_one_policy} with one policy only "
                f"({self.num_one_policy_samples} samples), {self.num_no_repeat} without a policy that has two "
                f"samples ({self.num_no_repeat_samples} samples); {self.num_pairs_short} pairs have fewer than "
                f"--negatives rejected policies")
        for what, sources in (("one policy only", self.one_policy_sources),
                              ("no policy with two samples", self.no_repeat_sources)):
            if sources:
                line += f"; {what}: {', '.join(sources)}"
        return line


# ---------------------------------------------------------------------------------------------
# Reading samples
# ---------------------------------------------------------------------------------------------


def parse_sample(line: str, source: str) -> Sample:
    """Validate one non-blank line; ``ValueError`` says what is wrong (the caller adds FILE:LINE)."""
    obj = parse_json_object(line, SAMPLE_FIELDS)
    for name in SAMPLE_FIELDS:
        if name not in obj:
            expected = "a non-empty string" if name == "policy" else "a non-empty string or list of messages"
            raise ValueError(f"field '{name}' is missing; expected {expected}")
    policy = obj["policy"]
    if not isinstance(policy, str):
        raise ValueError(f"field 'policy' is of type {json_type(policy)}; "
                         "expected a non-empty string naming the model that wrote the output")
    if not policy.strip():
        raise ValueError("field 'policy' is empty; expected the name of the model that wrote the output")
    texts = {}
    for name in ("prompt", "output"):
        texts[name] = flatten_text(obj[name], name)
        if not texts[name]:
            raise ValueError(f"field '{name}' is empty; expected a non-empty string or list of messages")
    if "\\u" in line:  # a JSON escape may spell an unpaired surrogate, which no UTF-8 file can hold
        for name, text in (("policy", policy), *texts.items()):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:
                code = ord(text[error.start])
                raise ValueError(f"field '{name}' holds an unpaired surrogate escape (\\u{code:04x}); "
                                 f"expected valid Unicode text") from None
    wrapper = obj.get("wrapper")
    if wrapper is None:  # absent or null: the default, as for pair rows
        wrapper = "sft"
    elif not isinstance(wrapper, str):
        raise ValueError(f"field 'wrapper' is of type {json_type(wrapper)}; expected one of {', '.join(WRAPPERS)}")
    elif wrapper not in WRAPPERS:
        raise ValueError(f"field 'wrapper' is '{wrapper}'; expected one of {', '.join(WRAPPERS)}")
    return Sample(prompt=texts["prompt"], wrapper=wrapper, policy=policy, output=texts["output"], source=source)


def read_samples(path: str, progress: tqdm | None = None) -> Iterator[Sample]:
    """Stream the samples of one JSONL file, one line in memory at a time.

    Blank lines are skipped; lines count from 1. The first bad line raises
    ``UserError("FILE:LINE", ...)``; ``progress`` advances by the bytes read.
    """
    num_valid = 0
    with open(path, "rb") as f:
        for number, raw_line in enumerate(f, start=1):
            if progress is not None:
                progress.update(len(raw_line))
            source = f"{path}:{number}"
            try:
                line = decode_line(raw_line, number)
                if line is None:
                    continue
                sample = parse_sample(line, source)
            except ValueError as error:
                raise UserError(source, str(error), _FIX) from None
            num_valid += 1
            yield sample
    if not num_valid:
        raise UserError(path, "no samples",
                        "the file must hold one JSON object per line with prompt, policy and output")


# ---------------------------------------------------------------------------------------------
# Pairs of one group
# ---------------------------------------------------------------------------------------------


def plan_group(policies: Sequence[str], negatives: int, rng: random.Random) -> list[tuple[int, int, int]]:
    """The (reference, chosen, rejected) sample indices of one prompt group (rule: module doc).

    ``policies[i]`` is the policy of sample ``i`` (samples in input order). Returns ``[]`` when
    the group cannot form a pair. Reference and chosen are different samples of one policy; the
    rows of one (reference, chosen) pair have different rejected policies.

    >>> plan_group(["a", "a", "b"], negatives=1, rng=random.Random(0))
    [(0, 1, 2), (1, 0, 2)]
    """
    if negatives < 1:
        raise ValueError(f"negatives must be at least 1, not {negatives}")
    by_policy: dict[str, list[int]] = {}
    for index, policy in enumerate(policies):
        by_policy.setdefault(policy, []).append(index)
    names = sorted(by_policy)  # not input order: the draw below depends only on the set of policies
    for name in names:
        rng.shuffle(by_policy[name])
    next_rejected = dict.fromkeys(names, 0)  # round robin over each policy's shuffled samples
    rows = []
    for name in names:
        own = by_policy[name]
        if len(own) < 2:
            continue
        others = [other for other in names if other != name]
        for i, reference in enumerate(own):
            chosen = own[(i + 1) % len(own)]
            for other in rng.sample(others, min(negatives, len(others))):
                pool = by_policy[other]
                rows.append((reference, chosen, pool[next_rejected[other] % len(pool)]))
                next_rejected[other] += 1
    return rows


def _group_rng(seed: int, prompt: str, wrapper: str) -> random.Random:
    # random.Random(str) seeds from the string's sha512: the same in every process (not hash()).
    return random.Random(f"{seed}\0{wrapper}\0{prompt}")


def _pair_rows(group: list[Sample], negatives: int, seed: int, stats: PretrainPairStats) -> list[dict[str, str]]:
    """The output rows of one group; counts it in ``stats``."""
    first = group[0]
    triples = plan_group([s.policy for s in group], negatives, _group_rng(seed, first.prompt, first.wrapper))
    num_policies = len({s.policy for s in group})
    stats.num_prompts += 1
    if not triples:
        if num_policies == 1:
            stats.num_one_policy += 1
            stats.num_one_policy_samples += len(group)
            sources = stats.one_policy_sources
        else:
            stats.num_no_repeat += 1
            stats.num_no_repeat_samples += len(group)
            sources = stats.no_repeat_sources
        if len(sources) < _NUM_EXAMPLE_SOURCES:
            sources.append(first.source)
        return []
    stats.num_paired_prompts += 1
    pairs = {(reference, chosen) for reference, chosen, _ in triples}
    stats.num_pairs += len(pairs)
    stats.num_pairs_short += len(pairs) if num_policies - 1 < negatives else 0
    stats.num_rows += len(triples)
    return [
        {"prompt": first.prompt, "reference": group[r].output, "chosen": group[c].output, "rejected": group[j].output,
         "wrapper": first.wrapper, "reference_policy": group[r].policy, "rejected_policy": group[j].policy}
        for r, c, j in triples
    ]


# ---------------------------------------------------------------------------------------------
# Bucketing on disk (memory bounded by a bucket or the largest group, not the input)
# ---------------------------------------------------------------------------------------------


def _bucket_of(sample_key: str, salt: int, num_buckets: int) -> int:
    digest = hashlib.blake2b(sample_key.encode(), digest_size=8, salt=salt.to_bytes(8, "little"))
    return int.from_bytes(digest.digest(), "little") % num_buckets


def _encode(sample: Sample) -> bytes:
    return (json.dumps([sample.prompt, sample.wrapper, sample.policy, sample.output, sample.source],
                       ensure_ascii=False) + "\n").encode()


def _decode(line: bytes) -> Sample:
    prompt, wrapper, policy, output, source = json.loads(line)
    return Sample(prompt=prompt, wrapper=wrapper, policy=policy, output=output, source=source)


def _split(samples: Iterator[Sample], folder: Path, num_buckets: int, salt: int) -> list[Path]:
    """Append each sample to ``folder/bucket-K`` by the hash of its (prompt, wrapper); input order kept."""
    folder.mkdir(parents=True)
    paths = [folder / f"bucket-{k:03d}" for k in range(num_buckets)]
    files: list[BinaryIO] = []
    try:
        for path in paths:
            files.append(open(path, "wb"))
        for sample in samples:
            files[_bucket_of(sample.wrapper + "\0" + sample.prompt, salt, num_buckets)].write(_encode(sample))
    finally:
        for f in files:
            f.close()
    return paths


def _read_bucket(path: Path) -> Iterator[Sample]:
    with open(path, "rb") as f:
        for line in f:
            yield _decode(line)


def _num_buckets(num_bytes: int, max_bucket_bytes: int) -> int:
    return max(1, min(_MAX_BUCKETS, -(-num_bytes // max_bucket_bytes)))


def _groups(path: Path, max_bucket_bytes: int, depth: int) -> Iterator[list[Sample]]:
    """The prompt groups of one bucket file, splitting it again first when it is too large."""
    size = path.stat().st_size
    if size > max_bucket_bytes and depth < _MAX_SPLIT_DEPTH:
        num_buckets = _num_buckets(size, max_bucket_bytes)
        parts = _split(_read_bucket(path), path.with_name(path.name + ".split"), num_buckets, salt=depth + 1)
        path.unlink()
        # One part as large as the whole: a single huge group (hash collisions of distinct groups
        # at every depth are vanishingly unlikely); group it in memory, it is the bound.
        if not any(part.stat().st_size == size for part in parts):
            for part in parts:
                yield from _groups(part, max_bucket_bytes, depth + 1)
            return
        path = next(part for part in parts if part.stat().st_size == size)
    groups: dict[tuple[str, str], list[Sample]] = {}
    for sample in _read_bucket(path):
        groups.setdefault((sample.prompt, sample.wrapper), []).append(sample)
    path.unlink()
    for key in sorted(groups):
        yield groups.pop(key)


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def build_pretrain_pairs(
    samples: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    negatives: int = 1,
    seed: int = 0,
    max_bucket_bytes: int = DEFAULT_MAX_BUCKET_BYTES,
    progress: bool = False,
) -> PretrainPairStats:
    """Read policy samples, write pre-training pair rows to ``output`` (JSONL); see the module doc.

    Bad sample rows raise ``UserError("FILE:LINE", ...)`` before ``output`` is touched; the
    output appears only complete (written to a temporary file, then renamed). Temporary
    buckets go to a folder next to ``output`` and are removed. No pair at all is a
    ``UserError`` with the counts.

    >>> build_pretrain_pairs(["samples.jsonl"], "pairs.jsonl", negatives=2).num_rows  # doctest: +SKIP
    """
    if negatives < 1:
        raise UserError("--negatives", f"is {negatives}", "give 1 or more rejected policies per reference/chosen pair")
    if not samples:
        raise UserError("--samples", "no samples file given", "give one or more JSONL files")
    names = [str(path) for path in samples]
    out = Path(output)
    for name in names:  # every path checked before minutes of reading
        if not Path(name).is_file():
            what = "is not a file" if Path(name).exists() else "samples file not found"
            raise UserError(name, what, "give JSONL files of samples to --samples")
        if out.exists() and out.resolve() == Path(name).resolve():
            raise UserError(str(out), "the output is also a samples file", "write the pairs to another file")
    total_bytes = sum(Path(name).stat().st_size for name in names)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.buckets-", dir=out.parent))
    stats = PretrainPairStats()
    try:
        with tqdm(total=total_bytes, desc="pretrain-pairs: reading", unit="B", unit_scale=True,
                  disable=not progress, mininterval=1.0) as bar:

            def every_sample() -> Iterator[Sample]:
                for name in names:
                    for sample in read_samples(name, bar):
                        stats.num_samples += 1
                        yield sample

            buckets = _split(every_sample(), work / "top", _num_buckets(total_bytes, max_bucket_bytes), salt=0)

        def write_rows(tmp: Path) -> None:
            with open(tmp, "w", encoding="utf-8", newline="\n") as f, \
                    tqdm(total=stats.num_samples, desc="pretrain-pairs: pairing", unit="sample",
                         disable=not progress, mininterval=1.0) as bar:
                for bucket in buckets:
                    for group in _groups(bucket, max_bucket_bytes, depth=0):
                        for row in _pair_rows(group, negatives, seed, stats):
                            f.write(json.dumps(row, ensure_ascii=False) + "\n")
                        bar.update(len(group))
            if not stats.num_rows:
                raise UserError(", ".join(names), f"no prompt can form a pair ({stats.num_prompts} prompts: "
                                f"{stats.num_one_policy} with one policy only, {stats.num_no_repeat} without a policy "
                                f"that has two samples)",
                                "each prompt needs two samples of one policy and one of another")

        write_atomically(out, write_rows)  # a reader never sees half a file; nothing left when it fails
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return stats
