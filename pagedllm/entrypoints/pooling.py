"""Scoring and reranking on top of pooling requests, shared by LLM.score and the server.

    cross-encoder (a classifier with one label)   each (query, document) pair is one input:
                                                  the tokenizer's pair encoding, with BERT's
                                                  token types; its score is the head's sigmoid
    embedder                                      every text is embedded once; a pair's score
                                                  is the cosine similarity of its embeddings
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pagedllm.inputs import PromptType, TokensPrompt
from pagedllm.pooling_params import PoolingParams

ScoreInput = str | Sequence[str]


def score_pairs(data_1: ScoreInput, data_2: ScoreInput) -> list[tuple[str, str]]:
    """vLLM's pairing: one text against each of several, or two lists of equal length pair by
    position."""
    first = [data_1] if isinstance(data_1, str) else list(data_1)
    second = [data_2] if isinstance(data_2, str) else list(data_2)
    if not first or not second:
        raise ValueError("score needs at least one text on each side")
    for text in first + second:
        if not isinstance(text, str):
            raise ValueError(f"score takes texts, got {type(text).__name__}")
    if len(first) == 1:
        return [(first[0], text) for text in second]
    if len(first) != len(second):
        raise ValueError(f"score pairs texts by position: got {len(first)} and "
                         f"{len(second)} texts (give one query, or lists of equal length)")
    return list(zip(first, second))


@dataclass(slots=True)
class PairInput:
    """A cross-encoder's input for one pair: the prompt and its params (with token types)."""

    prompt: PromptType
    params: PoolingParams


def cross_encoder_input(tokenizer, query: str, document: str,
                        params: PoolingParams | None = None) -> PairInput:
    if tokenizer is None:
        raise ValueError("scoring text pairs needs a tokenizer (the engine has "
                         "skip_tokenizer_init=True)")
    if not query or not document:
        raise ValueError("score: a query or document is empty")
    encoded = tokenizer(query, document)
    ids = list(encoded["input_ids"])
    params = (params or PoolingParams(task="score")).clone()
    params.task = "score"
    types = encoded.get("token_type_ids")
    params.token_type_ids = list(types) if types is not None else None
    return PairInput(TokensPrompt(prompt_token_ids=ids, prompt=f"{query}\n{document}"), params)


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def is_cross_encoder(tasks: Sequence[str]) -> bool:
    """A model whose score comes from its classifier head (else from embeddings)."""
    return "classify" in tasks and "score" in tasks
