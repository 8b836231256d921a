"""What the server's front-end tracks per request: where its outputs go, what the caller has been
told so far (so that an abort can end every choice properly), and the figures /metrics wants
when it ends. Owned by AsyncLLM's engine thread."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedllm.engine.beam_ranking import BeamSearchParams
from pagedllm.outputs import CompletionOutput, PoolingRequestOutput, RequestOutput
from pagedllm.pooling_params import PoolingParams
from pagedllm.sampling_params import RequestOutputKind, SamplingParams

if TYPE_CHECKING:
    from pagedllm.engine.async_llm import OutputStream


@dataclass(slots=True)
class RequestStats:
    """One finished (or aborted) request, for metrics. Times are time.monotonic()."""

    request_id: str
    finish_reason: str
    num_prompt_tokens: int
    num_generation_tokens: int
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float


def tracking_params(params: SamplingParams | BeamSearchParams | PoolingParams
                    ) -> SamplingParams:
    """A beam search answers once, at the end, with beam_width choices: track it as that (and
    a pooling request as one choice, answered once)."""
    if isinstance(params, PoolingParams):
        return SamplingParams(n=1, output_kind=RequestOutputKind.FINAL_ONLY)
    if isinstance(params, BeamSearchParams):
        return SamplingParams(n=params.beam_width, temperature=1.0,
                              output_kind=RequestOutputKind.FINAL_ONLY)
    return params


@dataclass(slots=True, eq=False)
class TrackedRequest:
    """Engine-thread bookkeeping for one request: where its outputs go, what it has been told."""

    stream: OutputStream
    params: SamplingParams
    arrival_time: float
    first_scheduled_time: float | None = None
    num_tokens: dict[int, int] = field(default_factory=dict)  # choice index -> tokens so far
    finished_choices: set[int] = field(default_factory=set)
    last: RequestOutput | None = None

    @property
    def num_output_tokens(self) -> int:
        return sum(self.num_tokens.values())

    def observe(self, output: RequestOutput) -> None:
        delta = self.params.output_kind == RequestOutputKind.DELTA
        if isinstance(output, PoolingRequestOutput):  # one answer, no tokens
            self.finished_choices.add(0)
            self.last = output
            return
        for completion in output.outputs:
            count = len(completion.token_ids)
            self.num_tokens[completion.index] = count + (
                self.num_tokens.get(completion.index, 0) if delta else 0)
            if completion.finish_reason is not None:
                self.finished_choices.add(completion.index)
        self.last = output

    def aborted(self, request_id: str, prompt: str | None,
                prompt_token_ids: list[int]) -> RequestOutput:
        """The final output of an aborted request: every choice not yet finished ends with
        reason 'abort'. A CUMULATIVE caller keeps the text it had; a DELTA caller gets empty
        deltas (at most some held-back text is lost); a FINAL_ONLY caller never had any."""
        cumulative = self.params.output_kind == RequestOutputKind.CUMULATIVE
        had = ({c.index: c for c in self.last.outputs}
               if cumulative and isinstance(self.last, RequestOutput) else {})
        completions = []
        for index in range(self.params.n):
            if index not in self.finished_choices:
                completions.append(ended_by_abort(had.get(index), index))
            elif index in had:  # a cumulative output repeats the choices that ended before
                completions.append(had[index])
        metrics = self.last.metrics if self.last is not None else None
        return RequestOutput(request_id, prompt, prompt_token_ids, completions, finished=True,
                             metrics=metrics)

    def error_stats(self, request_id: str) -> RequestStats:
        """The figures of a request that a failed step (or a stopped engine) ended."""
        prompt_len = len(self.last.prompt_token_ids) if self.last is not None else 0
        return RequestStats(request_id=request_id, finish_reason="error",
                            num_prompt_tokens=prompt_len,
                            num_generation_tokens=self.num_output_tokens,
                            arrival_time=self.arrival_time,
                            first_scheduled_time=self.first_scheduled_time,
                            first_token_time=None, finished_time=time.monotonic())

    def request_stats(self, output: RequestOutput) -> RequestStats:
        metrics = output.metrics
        reasons = ([output.finish_reason] if isinstance(output, PoolingRequestOutput) else
                   [c.finish_reason for c in output.outputs if c.finish_reason])
        return RequestStats(
            request_id=output.request_id,
            finish_reason=request_finish_reason(reasons),
            num_prompt_tokens=len(output.prompt_token_ids),
            num_generation_tokens=self.num_output_tokens,
            arrival_time=self.arrival_time,
            first_scheduled_time=self.first_scheduled_time,
            first_token_time=metrics.first_token_time if metrics else None,
            finished_time=(metrics.finished_time if metrics else None) or time.monotonic(),
        )


def request_finish_reason(choice_reasons: list[str]) -> str:
    """One reason per request: an error wins, then an abort, then the first choice's."""
    for reason in ("error", "abort"):
        if reason in choice_reasons:
            return reason
    return choice_reasons[0] if choice_reasons else "abort"


def ended_by_abort(before: CompletionOutput | None, index: int) -> CompletionOutput:
    if before is None:
        return CompletionOutput(index, "", [], finish_reason="abort")
    return dataclasses.replace(before, finish_reason="abort")
