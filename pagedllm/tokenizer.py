"""Tokenizers come from transformers; a GGUF file's is converted once and cached on disk.

Converting a GGUF vocabulary to a fast tokenizer takes transformers ~10 s; the result is saved
under $PAGEDLLM_CACHE_DIR (default ~/.cache/pagedllm) keyed by the file's path, size and mtime,
so later starts load it in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pagedllm.config import cache_dir
from pagedllm.model.source import ModelSource


def load_tokenizer(source: ModelSource, tokenizer: str | None = None,
                   revision: str | None = None) -> PreTrainedTokenizerBase:
    try:
        if tokenizer is not None:
            return AutoTokenizer.from_pretrained(tokenizer, revision=revision)
        if source.is_gguf:
            return _gguf_tokenizer(source.path)
        return AutoTokenizer.from_pretrained(source.path)
    except (OSError, KeyError) as exc:
        raise ValueError(f"cannot load a tokenizer for {tokenizer or source.path}: {exc}") from exc


def _gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}"
    cached = cache_dir() / "tokenizers" / hashlib.sha256(key.encode()).hexdigest()[:20]
    if cached.is_dir():
        return AutoTokenizer.from_pretrained(cached)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cached.parent))
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(cached)  # atomic: a concurrent start sees all of it or none
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return tokenizer
