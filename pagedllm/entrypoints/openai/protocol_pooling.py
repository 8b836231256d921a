"""Request and response bodies of the pooling routes: /v1/embeddings (OpenAI's shape), /pooling,
/classify, /score, and /rerank (the Jina/Cohere shape vLLM serves)."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import Field

from pagedllm.entrypoints.openai.protocol import OpenAIBaseModel, RequestBody

# a text, texts, one input's token ids, or token ids per input (OpenAI's `input`)
PoolingInput = str | list[str] | list[int] | list[list[int]]


class PoolingUsage(OpenAIBaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0


class PoolingListResponse(OpenAIBaseModel):
    """What every list-shaped pooling answer carries besides its `data`."""

    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    usage: PoolingUsage


class EmbeddingRequest(RequestBody):
    model: str | None = None
    input: PoolingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="Matryoshka models only")
    user: str | None = None
    normalize: bool | None = None  # vLLM's extra: None is the model's default


class EmbeddingData(OpenAIBaseModel):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingResponse(PoolingListResponse):
    data: list[EmbeddingData]


class PoolingRequest(RequestBody):
    model: str | None = None
    input: PoolingInput
    encoding_format: Literal["float", "base64"] = "float"
    pooling_type: Literal["CLS", "MEAN", "LAST", "ALL"] | None = None


class PoolingData(OpenAIBaseModel):
    index: int
    object: Literal["pooling"] = "pooling"
    data: list[float] | list[list[float]] | str


class PoolingResponse(PoolingListResponse):
    data: list[PoolingData]


class ClassificationRequest(RequestBody):
    model: str | None = None
    input: PoolingInput


class ClassificationData(OpenAIBaseModel):
    index: int
    label: str | None
    probs: list[float]
    num_classes: int


class ClassificationResponse(PoolingListResponse):
    data: list[ClassificationData]


class ScoreRequest(RequestBody):
    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]


class ScoreData(OpenAIBaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(PoolingListResponse):
    data: list[ScoreData]


class RerankRequest(RequestBody):
    model: str | None = None
    query: str
    documents: list[str]
    top_n: int | None = Field(None, ge=0, description="0 or absent: every document")
    return_documents: bool = True


class RerankDocument(OpenAIBaseModel):
    text: str


class RerankResult(OpenAIBaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankUsage(OpenAIBaseModel):
    total_tokens: int = 0


class RerankResponse(OpenAIBaseModel):
    id: str
    model: str
    results: list[RerankResult]
    usage: RerankUsage
