"""POST /v1/completions: one engine request per prompt, merged into one response or stream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response

from pagedllm.engine.async_engine import (
    EngineDeadError,
    EngineStepError,
    NewRequest,
    OutputStream,
)
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
    """One /v1/completions call: its prompts became engine requests `ids[i]` (choice i)."""

    request: CompletionRequest
    id: str
    model: str
    ids: list[str]
    echo: list[str]  # text to put before each choice ("" without echo)
    usage: UsageInfo = field(default_factory=UsageInfo)
    created: int = field(default_factory=lambda: int(time.time()))  # the same in every chunk

    def __post_init__(self) -> None:
        self.index = {request_id: i for i, request_id in enumerate(self.ids)}
        self.num_tokens = [0] * len(self.ids)
        self.text_offset = [len(text) for text in self.echo]

    def response(self, choices: list[CompletionChoice],
                 usage: UsageInfo | None = None) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.model,
                                  choices=choices, usage=usage)

    def choice(self, output: RequestOutput) -> CompletionChoice:
        """The choice for this output (a delta while streaming); consumes the echo text."""
        i = self.index[output.request_id]
        completion = output.outputs[0]
        self.num_tokens[i] += len(completion.token_ids)
        text, self.echo[i] = self.echo[i] + completion.text, ""
        if output.finished:
            self.usage.add(len(output.prompt_token_ids), self.num_tokens[i])
        return CompletionChoice(index=i, text=text, logprobs=self._logprobs(i, completion),
                                finish_reason=completion.finish_reason,
                                stop_reason=completion.stop_reason)

    def _logprobs(self, i: int, completion: CompletionOutput):
        if self.request.logprobs is None:
            return None
        logprobs, self.text_offset[i] = completion_logprobs(
            completion.token_ids, completion.logprobs or [], self.request.logprobs,
            self.text_offset[i])
        return logprobs


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest, raw_request: Request) -> Response:
        model = self.check_request(request)
        prompts = self._prompts(request.prompt)
        params = self.sampling_params(request, request.stream)
        request_id = random_id("cmpl")
        ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        job = _Job(request, request_id, model, ids, self._echo_texts(request, prompts))
        stream = await self.submit([NewRequest(r, p, params) for r, p in zip(ids, prompts)])
        if request.stream:
            return sse_response(self._stream(job, stream))
        return await cancel_on_disconnect(raw_request, self._collect(job, stream))

    def _prompts(self, prompt: str | list) -> list[PromptType]:
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise OpenAIError.bad_request("prompt must not be an empty list", "prompt")
        if isinstance(prompt[0], str):
            return list(prompt)
        token_lists = [prompt] if isinstance(prompt[0], int) else prompt
        for ids in token_lists:
            self.check_token_ids(ids, "prompt")
        return [{"prompt_token_ids": list(ids)} for ids in token_lists]

    def _echo_texts(self, request: CompletionRequest, prompts: list[PromptType]) -> list[str]:
        if not request.echo:
            return [""] * len(prompts)
        if all(isinstance(p, str) for p in prompts):
            return list(prompts)  # type: ignore[arg-type]
        tokenizer = self.require_tokenizer()
        return [p if isinstance(p, str) else tokenizer.decode(p["prompt_token_ids"])
                for p in prompts]

    async def _stream(self, job: _Job, stream: OutputStream) -> AsyncIterator[str]:
        try:
            async for output in stream:
                choice = job.choice(output)
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
        finals: dict[str, RequestOutput] = {}
        try:
            async for output in stream:
                finals[output.request_id] = output
        except (EngineStepError, EngineDeadError) as exc:
            raise OpenAIError(500, str(exc), code="engine_error") from exc
        finally:
            stream.abort()
        choices = [job.choice(finals[request_id]) for request_id in job.ids]
        return json_response(job.response(choices, job.usage))
