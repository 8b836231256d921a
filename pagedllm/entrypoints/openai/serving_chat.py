"""POST /v1/chat/completions: messages -> chat template -> one engine request with n choices."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response

from pagedllm.engine.async_llm import NewRequest, OutputStream
from pagedllm.entrypoints.openai.chat_utils import (
    TemplateOptions,
    check_template_kwargs,
    message_text,
    render_chat,
)
from pagedllm.entrypoints.openai.errors import OpenAIError
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
    NamedToolChoice,
    UsageInfo,
)
from pagedllm.entrypoints.openai.reasoning_parsers import ReasoningParser
from pagedllm.entrypoints.openai.serving_base import OpenAIServing, json_response, random_id
from pagedllm.entrypoints.openai.streaming import cancel_on_disconnect, sse_response
from pagedllm.entrypoints.openai.tool_calls import (
    ChatOutputSplitter,
    StreamedChoice,
    finish_reason,
    visible_content,
    whole_calls,
)
from pagedllm.entrypoints.openai.tool_parsers import ToolParser
from pagedllm.outputs import CompletionOutput, RequestOutput


@dataclass
class _Job:
    """One /v1/chat/completions call: its choice deltas streamed as chunks or added up into
    `whole`."""

    request: ChatCompletionRequest
    id: str  # also the engine's request id, so step records can be matched to responses
    model: str
    # how answers are read into reasoning, content and tool calls; None: all text is content
    splitter: ChatOutputSplitter | None = None
    echo: str = ""  # echo=true: the last message's content, which the answer continues
    whole: dict[int, ChatChoice] = field(default_factory=dict)  # index -> choice so far
    streamed: dict[int, StreamedChoice] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))  # the same in every chunk

    def chunk(self, choices: list[ChatChunkChoice],
              usage: UsageInfo | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                   choices=choices, usage=usage)

    def role_chunks(self) -> list[ChatCompletionChunk]:
        """What a stream starts with: every choice's role (and echo), in one chunk."""
        return [self.chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant",
                                                                         content=self.echo))
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
        choices = [self._finish_whole(self.whole[index]) for index in sorted(self.whole)]
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model,
                                      choices=choices, usage=usage)

    def _finish_whole(self, choice: ChatChoice) -> ChatChoice:
        """The choice's text read into its message (reasoning, content, calls), echo first."""
        message = choice.message
        if self.splitter is not None:
            parts = self.splitter.split(message.content or "")
            message.content = visible_content(parts.content, self.splitter)
            message.reasoning_content = parts.reasoning or None
            message.tool_calls = whole_calls(parts.calls, self.splitter)
            choice.finish_reason = finish_reason(choice.finish_reason, parts)
        if self.echo:
            message.content = self.echo + (message.content or "")
        return choice

    def _chunks(self, completion: CompletionOutput) -> list[ChatCompletionChunk]:
        logprobs = self.logprobs(completion)
        finished = completion.finish_reason is not None
        reason = completion.finish_reason
        if self.splitter is None:
            deltas = [DeltaMessage(content=completion.text)] if completion.text else []
        else:
            streamed = self.streamed.setdefault(completion.index,
                                                StreamedChoice(self.splitter))
            deltas = streamed.feed(completion.text, finished)
            reason = finish_reason(reason, streamed.last)
        if not deltas and logprobs and logprobs.content:
            deltas = [DeltaMessage()]  # tokens that showed no text yet still have logprobs
        chunks = [self.chunk([ChatChunkChoice(index=completion.index, delta=delta,
                                              logprobs=logprobs if i == 0 else None)])
                  for i, delta in enumerate(deltas)]
        if finished:
            chunks.append(self.chunk([ChatChunkChoice(
                index=completion.index, delta=DeltaMessage(), finish_reason=reason,
                stop_reason=completion.stop_reason)]))
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
    def __init__(self, *args, tool_parser: ToolParser | None = None,
                 reasoning_parser: ReasoningParser | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tool_parser = tool_parser  # --enable-auto-tool-choice --tool-call-parser
        self.reasoning_parser = reasoning_parser

    async def create_chat_completion(self, request: ChatCompletionRequest,
                                     raw_request: Request) -> Response:
        job, stream = await self.start(request)
        if request.stream:
            # Per choice: a role delta, content deltas, a finish chunk; then [usage], [DONE].
            usage_chunk = job.usage_chunk if request.include_usage else None
            return sse_response(self.stream(stream, job.chunks, usage_chunk, job.role_chunks()))
        return await cancel_on_disconnect(raw_request, self._collect(job, stream))

    async def start(self, request: ChatCompletionRequest, id_prefix: str = "chatcmpl",
                    always_split: bool = False) -> tuple[_Job, OutputStream]:
        """Check, render and hand the request to the engine (any problem is a 400 here)."""
        model = self.check_request(request)
        splitter = self.output_splitter(request)
        if splitter is None and always_split:
            splitter = ChatOutputSplitter()
        params = self.sampling_params(request)
        if splitter is not None and splitter.tool_parser is not None and \
                splitter.tool_parser.keeps_special_tokens:
            params.skip_special_tokens = False  # its call marker is a special token
        self.require_tokenizer()
        prompt = await render_chat(self.engine, request.messages, self.template_options(request))
        if self.reasoning_parser is not None and params.structured_outputs is not None:
            # the thinking is free; the format (or the forced call) holds after it
            params.structured_outputs.start_after = self.reasoning_parser.constraint_start(
                prompt["prompt"])
        if request.cache_salt is not None:
            prompt["cache_salt"] = request.cache_salt
        job = _Job(request, random_id(id_prefix), model, splitter, self.echo_text(request))
        stream = await self.submit([NewRequest(job.id, prompt, params, request.priority,
                                               self.models.lora_request(model))])
        return job, stream

    def template_options(self, request: ChatCompletionRequest) -> TemplateOptions:
        tools = [tool.model_dump(exclude_none=True) for tool in request.tools or []]
        return TemplateOptions(request.add_generation_prompt, request.continue_final_message,
                               request.chat_template or self.chat_template, tools or None,
                               check_template_kwargs(request.chat_template_kwargs))

    def output_splitter(self, request: ChatCompletionRequest) -> ChatOutputSplitter | None:
        """How this request's answers are read; 400 for tool_choice auto on a server that
        reads no calls."""
        choice = request.effective_tool_choice
        if choice == "auto" and request.tools and self.tool_parser is None:
            raise OpenAIError.bad_request(
                "tool_choice 'auto' (the default when tools are given) needs a server started "
                "with --enable-auto-tool-choice and --tool-call-parser; or ask for "
                "tool_choice 'required' or a named function", "tool_choice")
        forced = choice.function.name if isinstance(choice, NamedToolChoice) else (
            "required" if choice == "required" else None)
        tool_parser = self.tool_parser if choice == "auto" and request.tools else None
        if forced is None and tool_parser is None and self.reasoning_parser is None:
            return None
        return ChatOutputSplitter(self.reasoning_parser, tool_parser, forced,
                                  request.parallel_tool_calls)

    @staticmethod
    def echo_text(request: ChatCompletionRequest) -> str:
        """echo=true: the answer repeats the last message when it is the assistant's own."""
        last = request.messages[-1]
        if not request.echo or last.role != "assistant":
            return ""
        return message_text(last, len(request.messages) - 1)

    async def _collect(self, job: _Job, stream: OutputStream) -> Response:
        usage = await self.collect(stream, job.merge)
        return json_response(job.whole_response(usage))
