"""InternLM2's tokenizer built from its sentencepiece ``tokenizer.model``, without running the folder's code.

POLAR checkpoints ship ``tokenizer.model`` (a sentencepiece BPE model, vocab 92544) with InternLM's
``tokenization_internlm2*.py``, named by ``tokenizer_config.json``'s ``auto_map``. What that code
builds is a plain ``tokenizers`` pipeline, so we build the same pipeline here from the facts of
its ``InternLM2Converter`` (InternLM2's ``tokenization_internlm2_fast.py``, itself transformers'
``LlamaConverter`` / ``SentencePieceExtractor`` recipe), which does not depend on the transformers
version:

- vocabulary: the model's pieces in id order, ids 0-2 renamed ``<unk>``, ``<s>``, ``</s>``, and every
  id of ``tokenizer_config.json``'s ``added_tokens_decoder`` renamed to its content (POLAR:
  ``[UNUSED_TOKEN_0]`` at 92397 becomes ``<|reward|>``);
- merges: every split ``left + right`` of a piece with both halves in the model, ranked by the
  piece's score, highest first (ties as transformers 4.49 breaks them, see ``_merges``);
- BPE with byte fallback (``<0x0A>`` ...) and fused unknowns; the normalizer turns " " into "▁"
  (and prepends "▁" only when the model sets ``add_dummy_prefix``); no pre-tokenizer;
- the added tokens are special, matched in the raw text before anything else;
- decoding: "▁" -> " ", byte fallback, fuse (and strip the dummy prefix when there is one);
- BOS (and EOS) added per ``add_bos_token`` / ``add_eos_token``.

Under transformers 4.x this equals the remote ``InternLM2TokenizerFast`` (the reference POLAR's
ids were made with); under 5.x the remote class does not convert the model as it did in 4.x, and
plain loading refuses the folder because of its ``auto_map``, so this is the one path on both
(tests/test_tokenizer_real.py checks the fixture's ids).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

from polar_train.errors import UserError

# tokenizer_config.json classes this module reproduces (InternLM2, InternLM2.5 and POLAR use them).
INTERNLM2_CLASSES = ("InternLM2Tokenizer", "InternLM2TokenizerFast")
_BPE = 2  # sentencepiece TrainerSpec.model_type
_NAMED = {0: "<unk>", 1: "<s>", 2: "</s>"}  # InternLM2Converter.vocab


def is_internlm2_folder(folder: Path) -> bool:
    """True when ``folder`` holds a sentencepiece ``tokenizer.model`` whose config names InternLM2's classes."""
    config = _read_config(folder)
    auto = config.get("auto_map")
    auto = auto.get("AutoTokenizer") if isinstance(auto, dict) else None
    named = [config.get("tokenizer_class"), *(auto if isinstance(auto, list) else [auto])]
    return (folder / "tokenizer.model").is_file() and any(
        isinstance(name, str) and name.rsplit(".", 1)[-1] in INTERNLM2_CLASSES for name in named)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as error:
        raise UserError(path, f"cannot read it ({error})", "copy tokenizer_config.json again from the base checkpoint")
    return config if isinstance(config, dict) else {}


def _token_content(value: Any) -> str | None:
    """A special token in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _load_model_proto(path: Path) -> Any:
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as error:  # both are dependencies (pyproject.toml); the proto module needs protobuf
        package = "protobuf" if "google" in str(error) else "sentencepiece"
        raise UserError(path, f"reading this sentencepiece model needs the Python package '{package}', which is not "
                        f"installed ({error})", f"install it: pip install {package}") from None
    except Exception as error:  # protobuf's VersionError: sentencepiece's generated module needs a newer runtime
        raise UserError(path, f"sentencepiece cannot read its model with this protobuf ({error})", "install the "
                        "tested pair: pip install 'sentencepiece>=0.2.3,<0.3' 'protobuf>=7.36.1,<8'") from None
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as error:  # protobuf's DecodeError, OSError
        raise UserError(path, f"not a readable sentencepiece model ({error})",
                        "copy tokenizer.model again from the base checkpoint") from None
    if proto.trainer_spec.model_type != _BPE:
        raise UserError(path, f"sentencepiece model_type {proto.trainer_spec.model_type} is not BPE ({_BPE})",
                        "InternLM2's tokenizer is a BPE model: use the tokenizer.model of the POLAR checkpoint")
    return proto


def _merges(pieces: list[str], vocab: list[tuple[str, float]]) -> list[tuple[str, str]]:
    """BPE merges of a sentencepiece BPE model: each split of a piece into two pieces of the model.

    Ranked as transformers 4.49's ``generate_merges`` ranks them (the reference POLAR's ids were
    made with): the merged piece's score, highest first; then the longer left half, the longer
    right half; then the merged piece's id and the halves' ids (its sort is stable over that order).
    """
    piece_id = {piece: i for i, piece in enumerate(pieces)}  # the model's own pieces (the halves must be in it)
    scores = dict(vocab)  # as the reference: a repeated name keeps its first place and its last score
    ranked = []
    for merged_id, (merged, score) in enumerate(scores.items()):
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in piece_id and right in piece_id:
                key = (-score, -len(left), -len(right), merged_id, piece_id[left], piece_id[right])
                ranked.append((key, left, right))
    ranked.sort(key=lambda m: m[0])
    return [(left, right) for _, left, right in ranked]


def _added_tokens(folder: Path, config: dict[str, Any], num_pieces: int) -> list[tuple[int, Any]]:
    """``tokenizer_config.json``'s ``added_tokens_decoder`` as ``(id, AddedToken)`` in id order, every
    one special (the converter registers them all with ``add_special_tokens``)."""
    from tokenizers import AddedToken

    entries = config.get("added_tokens_decoder", {})
    where = folder / "tokenizer_config.json"
    if not isinstance(entries, dict):
        raise UserError(where, f"added_tokens_decoder is {entries!r}", "expected an object of id -> token")
    added = []
    for key, entry in entries.items():
        content = _token_content(entry)
        if not str(key).isdigit() or content is None:
            raise UserError(where, f"added_tokens_decoder entry {key!r} is {entry!r}",
                            "expected a numeric id and a token with a 'content' string")
        flags = {k: bool(entry.get(k, default)) for k, default in
                 (("lstrip", False), ("rstrip", False), ("single_word", False), ("normalized", False))
                 } if isinstance(entry, dict) else {}
        added.append((int(key), AddedToken(content, special=True, **flags)))
    return sorted(added, key=lambda item: item[0])


def build_internlm2_tokenizer(folder: str | Path) -> PreTrainedTokenizerFast:
    """The fast tokenizer of an InternLM2 folder (``tokenizer.model`` + ``tokenizer_config.json``), no remote code."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors

    folder = Path(folder)
    config = _read_config(folder)
    proto = _load_model_proto(folder / "tokenizer.model")
    pieces = [p.piece for p in proto.pieces]
    vocab = [(_NAMED.get(i, p.piece), p.score) for i, p in enumerate(proto.pieces)]
    added = _added_tokens(folder, config, len(vocab))
    for token_id, token in added:  # as InternLM2Converter: the model's piece at that id takes the token's name
        if token_id < len(vocab):
            vocab[token_id] = (token.content, vocab[token_id][1])

    backend = Tokenizer(models.BPE({piece: i for i, (piece, _) in enumerate(vocab)}, _merges(pieces, vocab),
                                   unk_token=proto.trainer_spec.unk_piece, fuse_unk=True, byte_fallback=True))
    for token_id, token in added:  # in id order: one past the model's pieces gets the next id
        backend.add_special_tokens([token])
        if backend.token_to_id(token.content) != token_id:
            raise UserError(folder / "tokenizer_config.json", f"added token {token.content!r} should have id "
                            f"{token_id} but gets {backend.token_to_id(token.content)}",
                            "number added_tokens_decoder's ids past the sentencepiece model one after the other")
    dummy_prefix = proto.normalizer_spec.add_dummy_prefix
    backend.normalizer = normalizers.Sequence(
        [*([normalizers.Prepend("▁")] if dummy_prefix else []), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         *([decoders.Strip(" ", 1, 0)] if dummy_prefix else [])])
    bos, eos = (_token_content(config.get(k)) or d for k, d in (("bos_token", "<s>"), ("eos_token", "</s>")))
    add_bos, add_eos = bool(config.get("add_bos_token", True)), bool(config.get("add_eos_token", False))
    single = " ".join([*([f"{bos}:0"] if add_bos else []), "$A:0", *([f"{eos}:0"] if add_eos else [])])
    pair = " ".join([single, *([f"{bos}:1"] if add_bos else []), "$B:1", *([f"{eos}:1"] if add_eos else [])])
    used = [t for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, backend.token_to_id(t)) for t in used])
    named = {bos, eos, _token_content(config.get("unk_token")), _token_content(config.get("pad_token"))}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, name_or_path=str(folder), bos_token=bos, eos_token=eos,
        unk_token=_token_content(config.get("unk_token")) or "<unk>",
        pad_token=_token_content(config.get("pad_token")) or eos,
        additional_special_tokens=[t.content for _, t in added if t.content not in named],
        clean_up_tokenization_spaces=False, model_max_length=int(config.get("model_max_length", 10**30)),
    )
