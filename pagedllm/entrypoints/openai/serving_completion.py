"""POST /v1/completions: one engine request per prompt (n choices each), merged into one
response or one stream. Choice i*n + j is the j-th completion of prompt i, as in vLLM."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from pagedllm.engine.async_llm import (
    EngineDeadError,
    EngineStepError,
    NewRequest,
    OutputStream,
)
from pagedllm.engine.beam_ranking import BeamSearchParams
from pagedllm.entrypoints.openai.errors import OpenAIError, error_body
from pagedllm.entrypoints.openai.logprobs import completion_logprobs
from pagedllm.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from pagedllm.entrypoints.openai.serving_base import OpenAIServing, json_response, random_id
from pagedllm.entrypoints.openai.streaming import (
    SSE_DONE,
    cancel_on_disconnect,
    sse_event,
    sse_response,
)
from pagedllm.inputs import PromptType
from pagedllm.outputs import CompletionOutput, RequestOutput


@dataclass
class _Job:
    """One /v1/completions call. Its prompts became engine requests `ids[i]`; every output
    delta becomes one choice delta, streamed as it is or added up into the whole response."""

    request: CompletionRequest
    id: str
    model: str
    ids: list[str]
    echo: list[str]  # the text to put before each of prompt i's choices ("" without echo)
    tokenizer: Any
    usage: UsageInfo = field(default_factory=UsageInfo)
    created: int = field(default_factory=lambda: int(time.time()))  # the same in every chunk

    def __post_init__(self) -> None:
        self.prompt_index = {request_id: i for i, request_id in enumerate(self.ids)}
        self.echoed: set[int] = set()  # choices whose echo went out already
        self.text_offset: dict[int, int] = {}  # choice -> where its next logprob token starts

    def response(self, choices: list[CompletionChoice],
                 usage: UsageInfo | None = None) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.model,
                                  choices=choices, usage=usage)

    def take(self, output: RequestOutput) -> list[CompletionChoice]:
        """The choice deltas of one engine output; counts its tokens into the usage."""
        prompt_tokens = len(output.prompt_token_ids) if output.finished else 0
        self.usage.add(prompt_tokens, sum(len(c.token_ids) for c in output.outputs))
        return [self._choice(output, completion) for completion in output.outputs]

    def _choice(self, output: RequestOutput, completion: CompletionOutput) -> CompletionChoice:
        prompt = self.prompt_index[output.request_id]
        index = prompt * self.request.n + completion.index
        echo = self.request.echo and index not in self.echoed
        self.echoed.add(index)
        text = (self.echo[prompt] if echo else "") + completion.text
        return CompletionChoice(index=index, text=text,
                                logprobs=self._logprobs(index, output, completion, echo),
                                finish_reason=completion.finish_reason,
                                stop_reason=completion.stop_reason)

    def _logprobs(self, index: int, output: RequestOutput, completion: CompletionOutput,
                  echo: bool):
        if self.request.logprobs is None:
            return None
        token_ids, entries = list(completion.token_ids), list(completion.logprobs or [])
        if echo:  # the prompt's tokens come first, the first of them without a logprob
            prompt_entries = output.prompt_logprobs or [None] * len(output.prompt_token_ids)
            token_ids = output.prompt_token_ids + token_ids
            entries = list(prompt_entries) + entries
        logprobs, self.text_offset[index] = completion_logprobs(
            token_ids, entries, self.request.logprobs, self.text_offset.get(index, 0),
            self.tokenizer)
        return logprobs


def merge_choice(whole: dict[int, CompletionChoice], delta: CompletionChoice) -> None:
    """Add one choice delta to the whole response's choices."""
    choice = whole.setdefault(delta.index, CompletionChoice(index=delta.index, text=""))
    choice.text += delta.text
    if delta.logprobs is not None:
        if choice.logprobs is None:
            choice.logprobs = delta.logprobs.model_copy(deep=True)
        else:
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(choice.logprobs, name).extend(getattr(delta.logprobs, name))
    if delta.finish_reason is not None:
        choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest, raw_request: Request) -> Response:
        model = self.check_request(request)
        prompts = self._prompts(request.prompt, request.cache_salt)
        params = self.sampling_params(request)
        request_id = random_id("cmpl")
        if request.use_beam_search:
            work = self._beam_search(request, request_id, model, prompts)
            return await cancel_on_disconnect(raw_request, work)
        ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        job = _Job(request, request_id, model, ids, self._echo_texts(request, prompts),
                   self.tokenizer)
        stream = await self.submit([NewRequest(r, p, params, request.priority)
                                    for r, p in zip(ids, prompts)])
        if request.stream:
            return sse_response(self._stream(job, stream))
        return await cancel_on_disconnect(raw_request, self._collect(job, stream))

    async def _beam_search(self, request: CompletionRequest, request_id: str, model: str,
                           prompts: list[PromptType]) -> Response:
        """One engine beam search per prompt (engine/beam_search.py); its n best beams are the
        choices."""
        try:
            params = BeamSearchParams(beam_width=max(request.n, request.best_of or 1),
                                      max_tokens=request.max_tokens or 16,
                                      ignore_eos=request.ignore_eos,
                                      length_penalty=request.length_penalty,
                                      include_stop_str_in_output=request.include_stop_str_in_output)
        except ValueError as exc:
            raise OpenAIError.bad_request(str(exc)) from exc
        ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        stream = await self.submit([NewRequest(r, p, params, request.priority)
                                    for r, p in zip(ids, prompts)])
        finals: dict[str, RequestOutput] = {}
        try:
            async for output in stream:
                finals[output.request_id] = output
        finally:
            stream.abort()
        choices, usage = [], UsageInfo()
        for i, request_key in enumerate(ids):
            output = finals[request_key]
            best = output.outputs[: request.n]
            usage.add(len(output.prompt_token_ids), sum(len(c.token_ids) for c in best))
            choices += [CompletionChoice(index=i * request.n + j, text=c.text,
                                         finish_reason=c.finish_reason)
                        for j, c in enumerate(best)]
        return json_response(CompletionResponse(id=request_id, created=int(time.time()),
                                                model=model, choices=choices, usage=usage))

    def _prompts(self, prompt: str | list, cache_salt: str | None) -> list[PromptType]:
        extra = {"cache_salt": cache_salt} if cache_salt is not None else {}
        if isinstance(prompt, str):
            return [{"prompt": prompt, **extra}]
        if not prompt:
            raise OpenAIError.bad_request("prompt must not be an empty list", "prompt")
        if isinstance(prompt[0], str):
            return [{"prompt": p, **extra} for p in prompt]
        token_lists = [prompt] if isinstance(prompt[0], int) else prompt
        for ids in token_lists:
            self.check_token_ids(ids, "prompt")
        return [{"prompt_token_ids": list(ids), **extra} for ids in token_lists]

    def _echo_texts(self, request: CompletionRequest, prompts: list[PromptType]) -> list[str]:
        if not request.echo:
            return [""] * len(prompts)
        if all("prompt" in p for p in prompts):
            return [p["prompt"] for p in prompts]
        tokenizer = self.require_tokenizer()
        return [tokenizer.decode(p["prompt_token_ids"]) for p in prompts]

    async def _stream(self, job: _Job, stream: OutputStream) -> AsyncIterator[str]:
        try:
            async for output in stream:
                for choice in job.take(output):
                    if choice.text or choice.logprobs or choice.finish_reason:
                        yield sse_event(job.response([choice]))
            if job.request.include_usage:
                yield sse_event(job.response([], job.usage))
        except (EngineStepError, EngineDeadError) as exc:
            yield sse_event(error_body(500, str(exc), code="engine_error"))
        finally:
            stream.abort()  # a no-op once finished; frees the KV blocks of a disconnected client
        yield SSE_DONE

    async def _collect(self, job: _Job, stream: OutputStream) -> Response:
        whole: dict[int, CompletionChoice] = {}
        try:
            async for output in stream:
                for choice in job.take(output):
                    merge_choice(whole, choice)
        except (EngineStepError, EngineDeadError) as exc:
            raise OpenAIError(500, str(exc), code="engine_error") from exc
        finally:
            stream.abort()
        choices = [whole[index] for index in sorted(whole)]
        return json_response(job.response(choices, job.usage))
