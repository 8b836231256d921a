"""Bodies of OpenAI's Responses API (POST /v1/responses), as pydantic models.

A request becomes a chat request (`ResponsesRequest.chat_request`): its input items become chat
messages, its function tools chat tools, `text.format` a response_format. So a response is made
by the same template, sampling, tool-call and reasoning machinery as a chat completion.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import ConfigDict, Field

from pagedllm.entrypoints.openai.limits import LIMIT_KEY
from pagedllm.entrypoints.openai.protocol import (
    TEXT_PART,
    ChatCompletionRequest,
    ChatMessage,
    ChatTool,
    FunctionCall,
    FunctionDefinition,
    JsonSchemaFormat,
    Limit,
    OpenAIBaseModel,
    RequestBody,
    RequestModel,
    ResponseFormat,
    ToolCall,
    document_rules,
    either,
    given,
    max_tokens_field,
    model_field,
    rule,
)


class ResponsesFunctionTool(RequestModel):
    """A Responses tool: the function's fields sit on the tool itself."""

    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def chat_tool(self) -> ChatTool:
        return ChatTool(type="function", function=FunctionDefinition(
            name=self.name, description=self.description, parameters=self.parameters,
            strict=self.strict))


class ResponsesNamedTool(RequestModel):
    type: Literal["function"]
    name: str = Field(min_length=1)


class TextFormat(RequestModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False,
                              populate_by_name=True, json_schema_extra=document_rules)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @classmethod
    def schema_rules(cls) -> list[dict[str, Any]]:
        return [either({"properties": {"type": {"enum": ["text", "json_object"]}}},
                       given("schema", "object"))]


class TextConfig(RequestModel):
    format: TextFormat | None = None


# What each input item may be, for the OpenAPI document (input_message reads them): a message
# (`type` "message" or absent), a function call, a function call's output, or earlier reasoning.
# Every text becomes a chat message, so each is bounded as a message's content is.
BOUNDED_TEXT = {"type": "string", LIMIT_KEY: {"maxLength": "max_prompt_chars"}}
INPUT_ITEM = {"anyOf": [
    {"type": "object", "required": ["role"], "properties": {
        "type": {"const": "message"}, "role": {"type": "string"},
        "content": {"anyOf": [BOUNDED_TEXT, {"type": "array", "items": TEXT_PART},
                              {"type": "null"}]}}},
    {"type": "object", "required": ["type", "call_id", "name", "arguments"], "properties": {
        "type": {"const": "function_call"}, "call_id": {"type": "string"},
        "name": {"type": "string"}, "arguments": {"type": "string"}}},
    {"type": "object", "required": ["type", "call_id", "output"], "properties": {
        "type": {"const": "function_call_output"}, "call_id": {"type": "string"},
        "output": BOUNDED_TEXT}},
    {"type": "object", "required": ["type"], "properties": {"type": {"const": "reasoning"}}},
]}


class ResponsesRequest(RequestBody):
    model: str | None = model_field()
    # a text (one user message), or items: messages, function calls and their outputs
    input: str | list[dict[str, Any]] = Field(json_schema_extra=rule(
        minItems=1, items=INPUT_ITEM, maxLength=Limit("max_prompt_chars")))
    # a system message first (not carried over to the next turn)
    instructions: str | None = Field(None, json_schema_extra=rule(
        maxLength=Limit("max_prompt_chars")))
    max_output_tokens: int | None = max_tokens_field(None)
    temperature: float | None = Field(None, json_schema_extra=rule(minimum=0))
    top_p: float | None = Field(None, json_schema_extra=rule(exclusiveMinimum=0, maximum=1))
    tools: list[ResponsesFunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponsesNamedTool | None = Field(
        None, description="as on /v1/chat/completions: required and a named function need "
                          "tools (the name one of them) and no text.format; auto needs the "
                          "server's --enable-auto-tool-choice")
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    stream: bool = False
    previous_response_id: str | None = None
    store: bool = True  # kept in memory (bounded) for previous_response_id
    metadata: dict[str, str] | None = None
    user: str | None = None
    seed: int | None = None  # vLLM's extras
    top_k: int | None = None

    def chat_request(self, history: list[ChatMessage]) -> ChatCompletionRequest:
        """The chat request this response is made by, after `history` (the earlier turns of
        previous_response_id)."""
        messages = ([ChatMessage(role="system", content=self.instructions)]
                    if self.instructions else []) + history + self.input_messages()
        choice: Any = self.tool_choice
        if isinstance(choice, ResponsesNamedTool):
            choice = {"type": "function", "function": {"name": choice.name}}
        fmt = self.response_format()
        fields: dict[str, Any] = {
            "model": self.model, "max_tokens": self.max_output_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
            "top_k": self.top_k, "tool_choice": choice,
            "parallel_tool_calls": self.parallel_tool_calls,
            "tools": [tool.chat_tool().model_dump(exclude_none=True) for tool in self.tools]
            if self.tools else None,
            "response_format": fmt.model_dump(exclude_none=True, by_alias=True) if fmt else None,
            "messages": [m.model_dump(exclude_none=True) for m in messages]}
        return ChatCompletionRequest.model_validate(
            {key: value for key, value in fields.items() if value is not None})

    def response_format(self) -> ResponseFormat | None:
        fmt = self.text.format if self.text else None
        if fmt is None or fmt.type == "text":
            return None
        schema = None if fmt.type == "json_object" else JsonSchemaFormat(
            name=fmt.name, json_schema=fmt.schema_, strict=fmt.strict)
        return ResponseFormat(type=fmt.type, json_schema=schema)

    def input_messages(self) -> list[ChatMessage]:
        if isinstance(self.input, str):
            return [ChatMessage(role="user", content=self.input)]
        messages: list[ChatMessage] = []
        for index, item in enumerate(self.input):
            input_message(item, index, messages)
        if not messages:
            raise ValueError("input has no message, function call or function call output to "
                             "answer (only reasoning items)")
        return messages


def input_message(item: dict[str, Any], index: int, messages: list[ChatMessage]) -> None:
    """One input item onto the chat messages; consecutive function calls share one assistant
    message. ValueError (a 400) naming the item for a kind this server does not take."""
    kind = item.get("type", "message")
    if kind == "message":
        messages.append(ChatMessage(role=_text(item, "role", index), content=item.get("content")))
    elif kind == "function_call":
        call = ToolCall(id=_text(item, "call_id", index), function=FunctionCall(
            name=_text(item, "name", index), arguments=_text(item, "arguments", index)))
        last = messages[-1] if messages else None
        if last is not None and last.role == "assistant" and last.tool_calls:
            last.tool_calls.append(call)
        else:
            messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
    elif kind == "function_call_output":
        messages.append(ChatMessage(role="tool", tool_call_id=_text(item, "call_id", index),
                                    content=_text(item, "output", index)))
    elif kind != "reasoning":  # earlier reasoning is not shown to the model again (as chat)
        raise ValueError(f"input[{index}]: items of type {kind!r} are not supported; give "
                         "message, function_call or function_call_output items")


def _text(item: dict[str, Any], key: str, index: int) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise ValueError(f"input[{index}]: a {item.get('type', 'message')} item needs {key!r} "
                         "as a string")
    return value


class ResponseUsage(OpenAIBaseModel):
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    input_tokens_details: dict[str, int] = Field(default_factory=lambda: {"cached_tokens": 0})
    output_tokens_details: dict[str, int] = Field(
        default_factory=lambda: {"reasoning_tokens": 0})


class ResponseObject(OpenAIBaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["completed", "incomplete", "in_progress", "failed"] = "completed"
    model: str
    output: list[dict[str, Any]] = Field(default_factory=list)
    usage: ResponseUsage | None = None
    incomplete_details: dict[str, str] | None = None
    error: dict[str, Any] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    store: bool = True
