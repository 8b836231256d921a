"""POST /v1/chat/completions: messages -> chat template -> one engine request with n choices."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response

from pagedllm.engine.async_llm import NewRequest, OutputStream
from pagedllm.entrypoints.openai.chat_utils import render_chat
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
from pagedllm.entrypoints.openai.streaming import cancel_on_disconnect, sse_response
from pagedllm.outputs import CompletionOutput, RequestOutput


@dataclass
class _Job:
    """One /v1/chat/completions call: its choice deltas streamed as chunks or added up into
    `whole`."""

    request: ChatCompletionRequest
    id: str  # also the engine's request id, so step records can be matched to responses
    model: str
    whole: dict[int, ChatChoice] = field(default_factory=dict)  # index -> choice so far
    created: int = field(default_factory=lambda: int(time.time()))  # the same in every chunk

    def chunk(self, choices: list[ChatChunkChoice],
              usage: UsageInfo | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                   choices=choices, usage=usage)

    def role_chunks(self) -> list[ChatCompletionChunk]:
        """What a stream starts with: every choice's role, in one chunk."""
        return [self.chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant",
                                                                         content=""))
                            for i in range(self.request.n)])]

    def chunks(self, output: RequestOutput) -> list[ChatCompletionChunk]:
        """Per choice delta: a content chunk if it has content, a finish chunk if it ends."""
        return [chunk for completion in output.outputs for chunk in self._chunks(completion)]

    def usage_chunk(self, usage: UsageInfo) -> ChatCompletionChunk:
        return self.chunk([], usage)

    def merge(self, output: RequestOutput) -> None:
        for completion in output.outputs:
            merge_choice(self.whole, completion, self.logprobs(completion))

    def whole_response(self, usage: UsageInfo) -> ChatCompletionResponse:
        choices = [self.whole[index] for index in sorted(self.whole)]
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model,
                                      choices=choices, usage=usage)

    def _chunks(self, completion: CompletionOutput) -> list[ChatCompletionChunk]:
        chunks = []
        logprobs = self.logprobs(completion)
        if completion.text or (logprobs and logprobs.content):
            delta = DeltaMessage(content=completion.text)
            chunks.append(self.chunk([ChatChunkChoice(index=completion.index, delta=delta,
                                                      logprobs=logprobs)]))
        if completion.finish_reason is not None:
            chunks.append(self.chunk([ChatChunkChoice(
                index=completion.index, delta=DeltaMessage(),
                finish_reason=completion.finish_reason, stop_reason=completion.stop_reason)]))
        return chunks

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
        self.require_tokenizer()
        prompt = await render_chat(self.engine, request.messages, request.add_generation_prompt,
                                   request.continue_final_message)
        if request.cache_salt is not None:
            prompt["cache_salt"] = request.cache_salt
        job = _Job(request, random_id("chatcmpl"), model)
        stream = await self.submit([NewRequest(job.id, prompt, params, request.priority,
                                                       self.models.lora_request(model))])
        if request.stream:
            # Per choice: a role delta, content deltas, a finish chunk; then [usage], [DONE].
            usage_chunk = job.usage_chunk if request.include_usage else None
            return sse_response(self.stream(stream, job.chunks, usage_chunk, job.role_chunks()))
        return await cancel_on_disconnect(raw_request, self._collect(job, stream))

    async def _collect(self, job: _Job, stream: OutputStream) -> Response:
        usage = await self.collect(stream, job.merge)
        return json_response(job.whole_response(usage))
