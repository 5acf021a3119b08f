"""Tokenizers: load a checkpoint's tokenizer, find POLAR's two special tokens, build tiny ones.

POLAR (SPEC 3) needs two tokens from the tokenizer, both looked up by string so that any
tokenizer works (the real 92k-token InternLM2 one, the tiny ones used by the demo and tests):

- ``<|reward|>`` (id 92397 in POLAR): written into the text between the reference part and the
  candidate part; call it the *separator*.
- ``[UNUSED_TOKEN_130]`` (id 92527 in POLAR, ``reward_token_id`` in ``config.json``): appended as
  the last id of every sequence; the reward is read at that position.

>>> tok = build_tokenizer(["What is 7 + 5?", "12"], vocab_size=300)
>>> sep_id, reward_id = special_token_ids(tok, None)
>>> tok.convert_ids_to_tokens([1, sep_id, reward_id])
['<s>', '<|reward|>', '[UNUSED_TOKEN_130]']
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from polar_train.errors import UserError
from polar_train.internlm2_tokenizer import build_internlm2_tokenizer, is_internlm2_folder

logger = logging.getLogger("polar_train")

SEP_TOKEN = "<|reward|>"
REWARD_TOKEN = "[UNUSED_TOKEN_130]"
# InternLM2's first ids; build_tokenizer puts them at the same places.
UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<unk>", "<s>", "</s>"

# A folder holds a tokenizer when it has one of these (fast json, sentencepiece, BPE/WordPiece vocab).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
# Every file that makes up a folder's tokenizer: the data cache hashes them, an export copies them.
# (tokenizer*.json covers tokenizer.json and tokenizer_config.json.)
TOKENIZER_FILE_PATTERNS = ("tokenizer*.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
                           "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "*.tiktoken",
                           "chat_template.jinja", "tokenization_*.py")
# Tokenizer code a folder may ship (tokenizer_config.json auto_map); POLAR's own is never run (load_tokenizer).
REMOTE_TOKENIZER_GLOB = "tokenization_*.py"


def load_tokenizer(path: str | os.PathLike[str], *, trust_remote_code: bool = False,
                   opt_in: str = "model.trust_remote_code=true") -> PreTrainedTokenizerBase:
    """Load the tokenizer stored in the folder ``path`` (a checkpoint or a tokenizer-only folder).

    Which path runs (the same on transformers 4.x and 5.x):

    1. InternLM2's sentencepiece tokenizer (``tokenizer.model`` with ``tokenizer_config.json``
       naming ``InternLM2Tokenizer``: every POLAR checkpoint) is built by
       ``internlm2_tokenizer.build_internlm2_tokenizer`` from ``tokenizer.model``; the folder's
       ``tokenization_internlm2*.py`` never runs, whatever ``trust_remote_code`` says. (Under
       transformers 5 that code no longer gives the reference ids, and plain loading refuses
       the folder because of its ``auto_map``.)
    2. Anything else: plain ``AutoTokenizer`` (``trust_remote_code=False`` explicitly, so
       transformers never stops to ask on a terminal).
    3. If that fails and the folder ships tokenizer code (``tokenization_*.py``), running it is
       the user's explicit choice, as in Hugging Face's own convention: with ``trust_remote_code``
       it runs; without it a ``UserError`` names the file that would run and ``opt_in``, the
       setting that allows it (``model.trust_remote_code=true`` in a config, ``--trust-remote-code``
       on the command line). The model itself never runs remote code.

    Raises ``UserError`` when the folder does not exist, holds no tokenizer, fails to load, or
    needs a Python package that is not installed (named, with its pip command).
    """
    folder = Path(path)
    where = str(path)
    if not folder.is_dir():
        raise UserError(where, "tokenizer folder not found",
                        "give the checkpoint folder that holds tokenizer.json or tokenizer.model")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES) and not list(folder.glob("*.tiktoken")):
        present = ", ".join(sorted(p.name for p in folder.iterdir())[:12]) or "nothing"
        raise UserError(
            where,
            f"no tokenizer in this folder (found: {present})",
            "copy tokenizer.json or tokenizer.model, tokenizer_config.json and tokenization_*.py "
            "from the base checkpoint into it",
        )
    if is_internlm2_folder(folder):
        tokenizer = build_internlm2_tokenizer(folder)
        logger.info("tokenizer: InternLM2's tokenizer built from %s (its tokenization_*.py code is not run)",
                    folder / "tokenizer.model")
        return tokenizer
    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as plain_error:  # transformers raises ValueError, OSError, ImportError, ...
        remote_files = sorted(folder.glob(REMOTE_TOKENIZER_GLOB))
        if not remote_files:
            _raise_if_missing_package(where, plain_error)
            raise UserError(where, f"could not load the tokenizer: {plain_error}",
                            "check the tokenizer files in this folder") from plain_error
        if not trust_remote_code:
            raise UserError(remote_files[0], "the tokenizer is Python code shipped with the model, and loading it runs "
                            "this file", f"if you trust this folder, allow it with {opt_in}") from None
        try:
            with _quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
        except Exception as remote_error:
            _raise_if_missing_package(where, remote_error)
            raise UserError(
                where,
                f"could not load the tokenizer: plain loading failed ({plain_error}); "
                f"with its remote code ({remote_files[0].name}) it failed too ({remote_error})",
                "check that the tokenizer files come from the same release",
            ) from remote_error
        logger.info("tokenizer: loaded %s with its own code (%s)", type(tokenizer).__name__, remote_files[0].name)
        return tokenizer


# Import names whose pip package has another name.
_PIP_NAMES = {"google": "protobuf", "sentencepiece": "sentencepiece", "tiktoken": "tiktoken"}
_MISSING_PATTERNS = (re.compile(r"No module named '([\w.]+)'"), re.compile(r"\b(\w+) is required\b"),
                     re.compile(r"requires the (\w+) library"),
                     re.compile(r"requires the following packages that were not found in your environment: ([\w.-]+)"))


def _raise_if_missing_package(where: str, error: BaseException) -> None:
    """A load that failed for want of a Python package: one line naming it and its pip command."""
    name = error.name if isinstance(error, ModuleNotFoundError) else None
    for pattern in _MISSING_PATTERNS:
        found = pattern.search(str(error)) if name is None else None
        name = name or (found.group(1) if found else None)
    if name:
        package = _PIP_NAMES.get(name.split(".")[0].lower(), name.split(".")[0])
        raise UserError(where, f"loading this tokenizer needs the Python package '{package}', which is not installed "
                        f"({error})", f"install it: pip install {package}") from None


@contextlib.contextmanager
def _quiet_transformers():
    """AutoTokenizer reads a checkpoint's config.json and warns that transformers has no
    ``internlm2`` model type and no ``rope_scaling`` attribute: true, and irrelevant to a
    tokenizer (our model reads config.json itself). Under transformers 5, a folder's
    ``configuration_internlm2.py`` (run with the tokenizer's remote code) assigns
    ``self.rope_scaling``, which transformers 5 answers with a FutureWarning on every command:
    that one warning, and only while the tokenizer loads, is ignored. Errors still surface."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`rope_scaling` is deprecated", category=FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """``[tokenizer.encode(t, add_special_tokens=True) for t in texts]``, id for id, in one batch call.

    A fast tokenizer's backend ``encode_batch`` (the call ``tokenizer(texts)`` makes, without its
    attention masks and offsets) runs the batch in Rust, over the cores it may use. Tokenizing is
    most of the cost of building the store (docs/benchmarks.md). Truncation and padding stay off, as
    ``encode`` leaves them. A slow (Python) tokenizer is called text by text.
    """
    if not texts:
        return []
    if not getattr(tokenizer, "is_fast", False):
        return [tokenizer.encode(text, add_special_tokens=True) for text in texts]
    backend = tokenizer.backend_tokenizer
    if backend.truncation is not None or backend.padding is not None:  # left by a caller: what encode would undo
        backend.no_truncation()
        backend.no_padding()
    return [encoding.ids for encoding in backend.encode_batch(list(texts), add_special_tokens=True)]


def _tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or "<tokenizer>")


def _lookup_token(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    """Id of ``token`` if it is really in the vocabulary (not mapped to unk), else None."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int):
        return None
    if token_id == tokenizer.unk_token_id and token != tokenizer.unk_token:
        return None
    if tokenizer.convert_ids_to_tokens(token_id) != token:
        return None
    return token_id


def special_token_ids(tokenizer: PreTrainedTokenizerBase, reward_token_id_from_config: int | None) -> tuple[int, int]:
    """Return ``(sep_id, reward_id)``: the ids of ``<|reward|>`` and ``[UNUSED_TOKEN_130]``.

    Both are looked up by string. The separator is written into the text (SPEC 3 step 7), so it
    must also come out of ``encode`` as that one id. ``reward_token_id_from_config`` (the model's
    ``config.json``), when given, must equal the tokenizer's id for ``[UNUSED_TOKEN_130]``.

    >>> tok = build_tokenizer(["a b c"], vocab_size=270)
    >>> special_token_ids(tok, None)
    (3, 4)
    >>> special_token_ids(tok, 99)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    polar_train.errors.UserError: <tokenizer>: the tokenizer maps '[UNUSED_TOKEN_130]' to id 4 but ...
    """
    name = _tokenizer_name(tokenizer)
    ids: list[int] = []
    for token in (SEP_TOKEN, REWARD_TOKEN):
        token_id = _lookup_token(tokenizer, token)
        if token_id is None:
            raise UserError(
                name,
                f"the tokenizer has no token '{token}' (POLAR needs '{SEP_TOKEN}' and '{REWARD_TOKEN}')",
                f"use the POLAR tokenizer, or add it: tokenizer.add_special_tokens("
                f"{{'additional_special_tokens': ['{token}']}}) and save the tokenizer again",
            )
        ids.append(token_id)
    sep_id, reward_id = ids
    if sep_id not in tokenizer.encode(f"a{SEP_TOKEN}b", add_special_tokens=False):
        raise UserError(
            name,
            f"'{SEP_TOKEN}' is in the vocabulary (id {sep_id}) but text containing it does not encode to that id",
            "register it as a special token: tokenizer.add_special_tokens(...) and save the tokenizer again",
        )
    tail = tokenizer.encode(f"a{REWARD_TOKEN}", add_special_tokens=False)[-1:]
    if tail != [reward_id]:
        # Training appends the id directly, so this only matters for POLAR's own client, which
        # appends the token as text at inference (SPEC 3).
        logger.warning("tokenizer: text ending in %s does not encode to id %d; POLAR's client would score differently",
                       REWARD_TOKEN, reward_id)
    if reward_token_id_from_config is not None and reward_token_id_from_config != reward_id:
        raise UserError(
            name,
            f"the tokenizer maps '{REWARD_TOKEN}' to id {reward_id} "
            f"but the model config has reward_token_id {reward_token_id_from_config}",
            "use the tokenizer that ships with the checkpoint",
        )
    return sep_id, reward_id


def build_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    extra_special_tokens: Sequence[str] = (SEP_TOKEN, REWARD_TOKEN),
) -> PreTrainedTokenizerFast:
    """Train a tiny byte-level BPE tokenizer on ``texts`` that behaves like InternLM2's where it matters.

    Ids 0, 1, 2 are ``<unk>``, ``<s>``, ``</s>``, then ``extra_special_tokens`` (by default
    ``<|reward|>`` = 3 and ``[UNUSED_TOKEN_130]`` = 4), then the 256 byte symbols and the merges.
    ``encode(t, add_special_tokens=True)`` prepends ``<s>`` (like InternLM2; no EOS), and byte-level
    decoding makes ``decode(encode(t), skip_special_tokens=True) == t`` for every string.
    ``vocab_size`` counts everything (minimum 261 with the defaults).

    >>> tok = build_tokenizer(["What is 7 + 5?", "12"], vocab_size=300)
    >>> ids = tok.encode("What is 7 + 5?\\n12")
    >>> ids[0], tok.decode(ids, skip_special_tokens=True)
    (1, 'What is 7 + 5?\\n12')
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, *extra_special_tokens]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(specials) + len(alphabet):
        num_fixed = len(specials) + len(alphabet)
        raise ValueError(f"vocab_size {vocab_size} is below the {num_fixed} specials and byte symbols")
    backend = Tokenizer(models.BPE())
    # Spaces are tokens of their own, so a word has one id whether a space precedes it or not:
    # the demo's reference "37" and candidate "It is 37." then share the id of "37".
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(" ", behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(texts, trainer)
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,  # InternLM2: pad = eos = 2
        additional_special_tokens=list(extra_special_tokens),
        clean_up_tokenization_spaces=False,  # keep decode exact
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: str | os.PathLike[str]) -> None:
    """``save_pretrained`` with a ``tokenizer_config.json`` that transformers 4.x reads too.

    transformers 5 writes ``tokenizer_class: TokenizersBackend`` and a list under
    ``extra_special_tokens``, which 4.x does not know; ``PreTrainedTokenizerFast`` and
    ``additional_special_tokens`` load the same tokenizer in both.
    """
    tokenizer.save_pretrained(str(folder))
    config_path = Path(folder) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        config["additional_special_tokens"] = extra
    config.pop("backend", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
