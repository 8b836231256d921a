"""POST /v1/responses (OpenAI's Responses API), made by the chat path.

A response is a chat completion of one choice: the request becomes a chat request
(protocol_responses.py), and its reasoning, content and tool calls become output items
(`reasoning`, `message`, `function_call`). Streamed, the chat deltas become the Responses
events (response.created, output_item.added, output_text.delta, ..., response.completed).

previous_response_id continues a stored conversation: a response made with store=true (the
default) keeps its turns (input and output, without instructions) in memory, the newest
MAX_STORED_RESPONSES of them; an older or unknown id is a 404.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from pagedllm.engine.async_llm import OutputStream
from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.protocol import (
    ChatMessage,
    DeltaMessage,
    FunctionCall,
    ToolCall,
    UsageInfo,
)
from pagedllm.entrypoints.openai.protocol_responses import (
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from pagedllm.entrypoints.openai.serving_base import (
    ENGINE_ERRORS,
    count_usage,
    engine_error,
    json_response,
    random_id,
)
from pagedllm.entrypoints.openai.serving_chat import OpenAIServingChat, _Job
from pagedllm.entrypoints.openai.streaming import cancel_on_disconnect, sse_response
from pagedllm.entrypoints.openai.tool_calls import StreamedChoice, finish_reason

MAX_STORED_RESPONSES = 1000  # conversations kept for previous_response_id (oldest dropped)


class ResponseStore:
    """The turns of the newest stored responses, by response id."""

    def __init__(self, capacity: int = MAX_STORED_RESPONSES) -> None:
        self.capacity = capacity
        self._turns: OrderedDict[str, list[ChatMessage]] = OrderedDict()

    def history(self, response_id: str | None) -> list[ChatMessage]:
        if response_id is None:
            return []
        if response_id not in self._turns:
            raise OpenAIError(404, f"previous response {response_id!r} not found (this server "
                                   f"keeps the newest {self.capacity} in memory)",
                              "previous_response_id", "not_found")
        return list(self._turns[response_id])

    def keep(self, response_id: str, turns: list[ChatMessage]) -> None:
        self._turns[response_id] = turns
        while len(self._turns) > self.capacity:
            self._turns.popitem(last=False)


# ---- output items -------------------------------------------------------------------------------
def reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [], "status": "completed",
            "content": [{"type": "reasoning_text", "text": text}]}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, text: str | None, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [] if text is None else [text_part(text)]}


def call_item(item_id: str, call_id: str, name: str, arguments: str,
              status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def output_turns(output: list[dict[str, Any]]) -> list[ChatMessage]:
    """The output items as chat turns, for the next response's history."""
    text = "".join(part["text"] for item in output if item["type"] == "message"
                   for part in item["content"])
    calls = [ToolCall(id=item["call_id"], function=FunctionCall(name=item["name"],
                                                                arguments=item["arguments"]))
             for item in output if item["type"] == "function_call"]
    return [ChatMessage(role="assistant", content=text or None, tool_calls=calls or None)]


class OpenAIServingResponses:
    def __init__(self, chat: OpenAIServingChat,
                 capacity: int = MAX_STORED_RESPONSES) -> None:
        self.chat = chat
        self.store = ResponseStore(capacity)

    async def create_response(self, request: ResponsesRequest, raw_request: Request) -> Response:
        history = self.store.history(request.previous_response_id)
        try:
            chat_request = request.chat_request(history)
        except ValueError as exc:
            raise OpenAIError.bad_request(str(exc), "input") from exc
        job, stream = await self.chat.start(chat_request, "resp", always_split=True)
        response = self._skeleton(request, job)
        turns = history + chat_request.messages[1 if request.instructions else 0:]
        if request.stream:
            return sse_response(self._stream(job, stream, response, turns, request.store))
        return await cancel_on_disconnect(raw_request, self._whole(job, stream, response,
                                                                   turns, request.store))

    @staticmethod
    def _skeleton(request: ResponsesRequest, job: _Job) -> ResponseObject:
        tool_choice = request.tool_choice.model_dump() if hasattr(
            request.tool_choice, "model_dump") else (request.tool_choice or "auto")
        return ResponseObject(
            id=job.id, model=job.model, status="in_progress", instructions=request.instructions,
            max_output_tokens=request.max_output_tokens, temperature=request.temperature,
            top_p=request.top_p, tool_choice=tool_choice,
            tools=[tool.model_dump(exclude_none=True) for tool in request.tools or []],
            parallel_tool_calls=request.parallel_tool_calls,
            text=request.text.model_dump(exclude_none=True, by_alias=True) if request.text
            else {"format": {"type": "text"}},
            previous_response_id=request.previous_response_id,
            metadata=request.metadata or {}, store=request.store)

    def _finish(self, response: ResponseObject, reason: str | None, usage: UsageInfo,
                turns: list[ChatMessage], store: bool) -> None:
        response.status = "incomplete" if reason in ("length", "abort") else "completed"
        if reason == "length":
            response.incomplete_details = {"reason": "max_output_tokens"}
        response.usage = ResponseUsage(input_tokens=usage.prompt_tokens,
                                       output_tokens=usage.completion_tokens,
                                       total_tokens=usage.total_tokens)
        if store:
            self.store.keep(response.id, turns + output_turns(response.output))

    async def _whole(self, job: _Job, stream: OutputStream, response: ResponseObject,
                     turns: list[ChatMessage], store: bool) -> Response:
        usage = await self.chat.collect(stream, job.merge)
        choice = job.whole_response(usage).choices[0]
        message = choice.message
        if message.reasoning_content:
            response.output.append(reasoning_item(random_id("rs"), message.reasoning_content))
        if message.content is not None or not message.tool_calls:
            response.output.append(message_item(random_id("msg"), message.content or ""))
        for call in message.tool_calls:
            response.output.append(call_item(random_id("fc"), call.id, call.function.name,
                                             call.function.arguments))
        self._finish(response, choice.finish_reason, usage, turns, store)
        return json_response(response)

    async def _stream(self, job: _Job, stream: OutputStream, response: ResponseObject,
                      turns: list[ChatMessage], store: bool) -> AsyncIterator[str]:
        events = EventWriter(response)
        usage, reason = UsageInfo(), None
        streamed = StreamedChoice(job.splitter)
        try:
            yield events.emit("response.created", response=response.model_dump())
            yield events.emit("response.in_progress", response=response.model_dump())
            async for output in stream:
                count_usage(usage, output)
                for completion in output.outputs:
                    finished = completion.finish_reason is not None
                    for delta in streamed.feed(completion.text, finished):
                        for event in events.delta(delta):
                            yield event
                    if finished:
                        reason = finish_reason(completion.finish_reason, streamed.last)
            for event in events.close():
                yield event
            if not response.output:  # nothing at all: one empty message, as a whole response
                for event in events.open("message"):
                    yield event
                for event in events.close():
                    yield event
            self._finish(response, reason, usage, turns, store)
            done = "response.completed" if response.status == "completed" else \
                "response.incomplete"
            yield events.emit(done, response=response.model_dump())
        except ENGINE_ERRORS as exc:
            yield events.emit("error", code="engine_error", message=engine_error(exc).body()
                              .error.message, param=None)
        finally:
            stream.abort()


class EventWriter:
    """Chat deltas -> Responses events, opening and closing one output item at a time."""

    def __init__(self, response: ResponseObject) -> None:
        self.response = response
        self.sequence = 0
        self.item: dict[str, Any] | None = None  # the open item
        self.text = ""  # the open item's text or arguments so far

    def emit(self, kind: str, **fields: Any) -> str:
        fields = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(fields, ensure_ascii=False)}\n\n"

    @property
    def index(self) -> int:
        return len(self.response.output)

    def delta(self, delta: DeltaMessage) -> list[str]:
        events = []
        if delta.reasoning_content:
            events += self._text("reasoning", delta.reasoning_content)
        if delta.content:
            events += self._text("message", delta.content)
        for call in delta.tool_calls or []:
            if call.id is not None:
                events += self.close() + self.open("function_call", call.id,
                                                   call.function.name or "")
            if call.function.arguments:
                self.text += call.function.arguments
                events.append(self.emit("response.function_call_arguments.delta",
                                        item_id=self.item["id"], output_index=self.index,
                                        delta=call.function.arguments))
        return events

    def _text(self, kind: str, text: str) -> list[str]:
        events = [] if self.item and self.item["type"] == kind else self.close() + self.open(kind)
        self.text += text
        name = "response.reasoning_text.delta" if kind == "reasoning" else \
            "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        return events + [self.emit(name, item_id=self.item["id"], output_index=self.index,
                                   content_index=0, delta=text, **extra)]

    def open(self, kind: str, call_id: str = "", name: str = "") -> list[str]:
        self.text = ""
        if kind == "function_call":
            self.item = call_item(random_id("fc"), call_id, name, "", "in_progress")
        elif kind == "reasoning":
            self.item = {**reasoning_item(random_id("rs"), ""), "content": []}
        else:
            self.item = message_item(random_id("msg"), None, "in_progress")
        events = [self.emit("response.output_item.added", output_index=self.index,
                            item=self.item)]
        if kind != "function_call":
            part = text_part("") if kind == "message" else {"type": "reasoning_text",
                                                              "text": ""}
            events.append(self.emit("response.content_part.added", item_id=self.item["id"],
                                    output_index=self.index, content_index=0, part=part))
        return events

    def close(self) -> list[str]:
        """Finish the open item: its done events, and it joins the response's output."""
        item, text = self.item, self.text
        if item is None:
            return []
        ids = {"item_id": item["id"], "output_index": self.index}
        if item["type"] == "function_call":
            done = call_item(item["id"], item["call_id"], item["name"], text)
            events = [self.emit("response.function_call_arguments.done", **ids, arguments=text,
                                name=item["name"])]
        elif item["type"] == "reasoning":
            done = reasoning_item(item["id"], text)
            events = [self.emit("response.reasoning_text.done", **ids, content_index=0,
                                text=text),
                      self.emit("response.content_part.done", **ids, content_index=0,
                                part=done["content"][0])]
        else:
            done = message_item(item["id"], text)
            events = [self.emit("response.output_text.done", **ids, content_index=0, text=text,
                                logprobs=[]),
                      self.emit("response.content_part.done", **ids, content_index=0,
                                part=done["content"][0])]
        events.append(self.emit("response.output_item.done", output_index=self.index,
                                item=done))
        self.response.output.append(done)
        self.item, self.text = None, ""
        return events

