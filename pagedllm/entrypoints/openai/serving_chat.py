"""POST /v1/chat/completions: messages -> chat template -> one engine request with n choices."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response

from pagedllm.engine.async_llm import (
    EngineDeadError,
    EngineStepError,
    NewRequest,
    OutputStream,
)
from pagedllm.entrypoints.openai.chat_utils import render_chat
from pagedllm.entrypoints.openai.errors import OpenAIError, error_body
from pagedllm.entrypoints.openai.logprobs import chat_logprobs
from pagedllm.entrypoints.openai.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    DeltaMessage,
    UsageInfo,
)
from pagedllm.entrypoints.openai.serving_base import OpenAIServing, json_response, random_id
from pagedllm.entrypoints.openai.streaming import (
    SSE_DONE,
    cancel_on_disconnect,
    sse_event,
    sse_response,
)
from pagedllm.outputs import CompletionOutput, RequestOutput


@dataclass
class _Job:
    request: ChatCompletionRequest
    id: str  # also the engine's request id, so step records can be matched to responses
    model: str
    usage: UsageInfo = field(default_factory=UsageInfo)
    created: int = field(default_factory=lambda: int(time.time()))  # the same in every chunk

    def chunk(self, choices: list[ChatChunkChoice],
              usage: UsageInfo | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                   choices=choices, usage=usage)

    def take(self, output: RequestOutput) -> list[CompletionOutput]:
        """The output's choice deltas; counts its tokens into the usage."""
        prompt_tokens = len(output.prompt_token_ids) if output.finished else 0
        self.usage.add(prompt_tokens, sum(len(c.token_ids) for c in output.outputs))
        return output.outputs

    def logprobs(self, completion: CompletionOutput) -> ChatLogprobs | None:
        if not self.request.logprobs:
            return None
        return chat_logprobs(completion.token_ids, completion.logprobs or [],
                             self.request.top_logprobs or 0)


def merge_choice(whole: dict[int, ChatChoice], delta: CompletionOutput,
                 logprobs: ChatLogprobs | None) -> None:
    """Add one choice delta to the whole response's choices."""
    choice = whole.setdefault(delta.index, ChatChoice(
        index=delta.index, message=ChatResponseMessage(content=""),
        logprobs=ChatLogprobs(content=[]) if logprobs is not None else None))
    choice.message.content += delta.text
    if logprobs is not None:
        choice.logprobs.content.extend(logprobs.content or [])
    if delta.finish_reason is not None:
        choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason


class OpenAIServingChat(OpenAIServing):
    async def create_chat_completion(self, request: ChatCompletionRequest,
                                     raw_request: Request) -> Response:
        model = self.check_request(request)
        params = self.sampling_params(request)
        prompt = await render_chat(self.require_tokenizer(), request.messages,
                                   request.add_generation_prompt, request.continue_final_message)
        if request.cache_salt is not None:
            prompt["cache_salt"] = request.cache_salt
        job = _Job(request, random_id("chatcmpl"), model)
        stream = await self.submit([NewRequest(job.id, prompt, params, request.priority)])
        if request.stream:
            return sse_response(self._stream(job, stream))
        return await cancel_on_disconnect(raw_request, self._collect(job, stream))

    async def _stream(self, job: _Job, stream: OutputStream) -> AsyncIterator[str]:
        """Per choice: a role delta, content deltas, a finish chunk; then [usage], [DONE]."""
        try:
            roles = [ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                     for i in range(job.request.n)]
            yield sse_event(job.chunk(roles))
            async for output in stream:
                for completion in job.take(output):
                    for chunk in self._chunks(job, completion):
                        yield sse_event(chunk)
            if job.request.include_usage:
                yield sse_event(job.chunk([], job.usage))
        except (EngineStepError, EngineDeadError) as exc:
            yield sse_event(error_body(500, str(exc), code="engine_error"))
        finally:
            stream.abort()  # a no-op once finished; frees the KV blocks of a disconnected client
        yield SSE_DONE

    @staticmethod
    def _chunks(job: _Job, completion: CompletionOutput) -> list[ChatCompletionChunk]:
        chunks = []
        logprobs = job.logprobs(completion)
        if completion.text or (logprobs and logprobs.content):
            delta = DeltaMessage(content=completion.text)
            chunks.append(job.chunk([ChatChunkChoice(index=completion.index, delta=delta,
                                                     logprobs=logprobs)]))
        if completion.finish_reason is not None:
            chunks.append(job.chunk([ChatChunkChoice(
                index=completion.index, delta=DeltaMessage(),
                finish_reason=completion.finish_reason, stop_reason=completion.stop_reason)]))
        return chunks

    async def _collect(self, job: _Job, stream: OutputStream) -> Response:
        whole: dict[int, ChatChoice] = {}
        try:
            async for output in stream:
                for completion in job.take(output):
                    merge_choice(whole, completion, job.logprobs(completion))
        except (EngineStepError, EngineDeadError) as exc:
            raise OpenAIError(500, str(exc), code="engine_error") from exc
        finally:
            stream.abort()
        choices = [whole[index] for index in sorted(whole)]
        return json_response(ChatCompletionResponse(id=job.id, created=job.created,
                                                    model=job.model, choices=choices,
                                                    usage=job.usage))
