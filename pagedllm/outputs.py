"""What a request gives back: the same shapes vLLM's users already code against."""

from __future__ import annotations

from dataclasses import dataclass, field

# One dict per generated token: token id -> Logprob (the sampled one plus the top-k).
SampleLogprobs = list[dict[int, "Logprob"]]


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: list | None = field(default=None)


@dataclass(slots=True)
class PoolingOutput:
    """A pooling request's result (pooling_params.py): `data` as the task made it, under the
    name vLLM's users read for that task."""

    data: list  # embed: a vector; encode: a vector, or one per token (ALL); classify: probs

    @property
    def embedding(self) -> list:
        return self.data

    @property
    def probs(self) -> list[float]:
        return self.data

    @property
    def num_classes(self) -> int:
        return len(self.data)

    @property
    def score(self) -> float:
        """score: a cross-encoder's relevance, or the cosine similarity of two embeddings."""
        return self.data[0]


@dataclass(slots=True)
class PoolingRequestOutput:
    """What LLM.embed / encode / classify / score give back, one per input (vLLM's shape:
    `outputs.embedding`, `outputs.probs`, `outputs.score`)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: PoolingOutput
    finished: bool = True
    finish_reason: str = "stop"  # "error" or "abort": no result (outputs.data is empty)
    metrics: RequestMetrics | None = None
