"""The tokenization cache's key: a sha256 of everything that decides the tokenized rows (the data
files' paths and bytes, the tokenizer's files, the length limits, ``data.on_error``, the encoding
version and the tokenizer libraries' versions). ``polar_train.store_build`` keeps a cache entry under it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from polar_train.data import ENCODING_VERSION
from polar_train.tokenizer import TOKENIZER_FILE_PATTERNS


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


def dataset_cache_key(files: Sequence[str], tokenizer_path: str, *, max_length: int, max_response_length: int,
                      on_error: str) -> str:
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
