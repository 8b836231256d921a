"""POST /v1/chat/completions: messages -> chat template -> one engine request."""

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
    num_tokens: int = 0
    created: int = field(default_factory=lambda: int(time.time()))  # the same in every chunk

    def chunk(self, delta: DeltaMessage, logprobs: ChatLogprobs | None = None,
              completion: CompletionOutput | None = None) -> ChatCompletionChunk:
        finish = completion.finish_reason if completion else None
        stop = completion.stop_reason if completion else None
        choice = ChatChunkChoice(index=0, delta=delta, logprobs=logprobs, finish_reason=finish,
                                 stop_reason=stop)
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                   choices=[choice])

    def logprobs(self, completion: CompletionOutput) -> ChatLogprobs | None:
        if not self.request.logprobs:
            return None
        return chat_logprobs(completion.token_ids, completion.logprobs or [],
                             self.request.top_logprobs or 0)

    def count(self, output: RequestOutput) -> None:
        self.num_tokens += len(output.outputs[0].token_ids)
        if output.finished:
            self.usage.add(len(output.prompt_token_ids), self.num_tokens)


class OpenAIServingChat(OpenAIServing):
    async def create_chat_completion(self, request: ChatCompletionRequest,
                                     raw_request: Request) -> Response:
        model = self.check_request(request)
        params = self.sampling_params(request, request.stream)
        prompt = await render_chat(self.require_tokenizer(), request.messages,
                                   request.add_generation_prompt, request.continue_final_message)
        job = _Job(request, random_id("chatcmpl"), model)
        stream = await self.submit([NewRequest(job.id, prompt, params)])
        if request.stream:
            return sse_response(self._stream(job, stream))
        return await cancel_on_disconnect(raw_request, self._collect(job, stream))

    async def _stream(self, job: _Job, stream: OutputStream) -> AsyncIterator[str]:
        """role delta, content deltas, a finish chunk, [usage], [DONE]: what OpenAI sends."""
        try:
            yield sse_event(job.chunk(DeltaMessage(role="assistant", content="")))
            async for output in stream:
                job.count(output)
                completion = output.outputs[0]
                logprobs = job.logprobs(completion)
                if completion.text or logprobs:
                    yield sse_event(job.chunk(DeltaMessage(content=completion.text), logprobs))
                if output.finished:
                    yield sse_event(job.chunk(DeltaMessage(), completion=completion))
            if job.request.include_usage:
                yield sse_event(ChatCompletionChunk(id=job.id, created=job.created,
                                                    model=job.model, choices=[], usage=job.usage))
        except (EngineStepError, EngineDeadError) as exc:
            yield sse_event(error_body(500, str(exc), code="engine_error"))
        finally:
            stream.abort()  # a no-op once finished; frees the KV blocks of a disconnected client
        yield SSE_DONE

    async def _collect(self, job: _Job, stream: OutputStream) -> Response:
        final = None
        try:
            async for output in stream:
                final = output
        except (EngineStepError, EngineDeadError) as exc:
            raise OpenAIError(500, str(exc), code="engine_error") from exc
        finally:
            stream.abort()
        assert final is not None and final.finished
        job.count(final)
        completion = final.outputs[0]
        choice = ChatChoice(index=0, message=ChatResponseMessage(content=completion.text),
                            logprobs=job.logprobs(completion),
                            finish_reason=completion.finish_reason,
                            stop_reason=completion.stop_reason)
        return json_response(ChatCompletionResponse(id=job.id, created=job.created,
                                                    model=job.model, choices=[choice],
                                                    usage=job.usage))
