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

from pagedllm.config import EngineArgs, cache_dir
from pagedllm.logger import init_logger
from pagedllm.model.source import ModelSource

logger = init_logger(__name__)

# apply_chat_template's own arguments, which chat_template_kwargs may not set
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


def reserved_template_kwargs(kwargs: dict | None) -> list[str]:
    """The names in chat_template_kwargs that apply_chat_template takes itself."""
    return sorted(RESERVED_TEMPLATE_KWARGS & set(kwargs or {}))


# Any of these next to config.json means the folder has a tokenizer of its own.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_engine_tokenizer(args: EngineArgs, source: ModelSource) -> PreTrainedTokenizerBase | None:
    """The engine's tokenizer as its options ask: none with skip_tokenizer_init (or for random
    weights of a folder that has none: a warning, then token ids only), else the model's own or
    the one named by `tokenizer`."""
    if args.skip_tokenizer_init:
        return None
    if args.load_format == "dummy" and args.tokenizer is None and not has_tokenizer(source):
        logger.warning("%s has no tokenizer: running on token ids only, as with "
                       "skip_tokenizer_init (give one with tokenizer=...)", source.path)
        return None
    return load_tokenizer(source, args.tokenizer, args.revision)


def has_tokenizer(source: ModelSource) -> bool:
    """A GGUF file carries its vocabulary; a folder needs tokenizer files of its own."""
    return source.is_gguf or any((source.path / name).is_file() for name in TOKENIZER_FILES)


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


# A normalizer may merge characters before tokenizing (NFC turns "e" + U+0301 into one "é";
# Hangul jamo compose three into one), so with one a token can stand for this many more.
NORMALIZER_SLACK = 3


def max_chars_per_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """An upper bound on the characters of text one token can cover, so that a prompt's length
    in characters bounds its length in tokens from below without tokenizing it.

    A vocabulary entry is at least as long as the text it decodes to (byte-level BPE spells
    each byte as one character; SentencePiece's "<0x0A>" is one byte), so the longest entry
    bounds a token's text, times NORMALIZER_SLACK when a normalizer rewrites the text first.
    """
    longest = max((len(piece) for piece in tokenizer.get_vocab()), default=1)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    plain = backend is not None and backend.normalizer is None
    return longest if plain else longest * NORMALIZER_SLACK
