"""A chat answer's text -> reasoning, content and tool calls, whole or as stream deltas.

Three ways a call comes out:
- tool_choice "required": the output is constrained (structured outputs) to a JSON list of
  `{"name": ..., "parameters": {...}}`, each item valid against its tool's parameter schema.
- a named function: the output is constrained to that function's arguments, so the text *is*
  the arguments (streamed as argument fragments as it comes).
- "auto": the model writes calls in its own format and the server's --tool-call-parser finds
  them; a call is sent once its end is seen, as one id-and-name delta and one arguments delta.
With a --reasoning-parser, calls and content are read from the text after the reasoning.

`ChatOutputSplitter.split(text, final)` gives one choice's parts; with `final=False` (a stream
mid-way) only what can no longer change, so `StreamedChoice` sends each new piece as a delta
and what a stream sends adds up to what the whole response holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pagedllm.entrypoints.openai.protocol import (
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    NamedToolChoice,
    ToolCall,
)
from pagedllm.entrypoints.openai.tool_parsers.base import (
    ToolCallText,
    json_end,
    load_json,
    tool_call_id,
)
from pagedllm.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest, ChatTool
    from pagedllm.entrypoints.openai.reasoning_parsers import ReasoningParser
    from pagedllm.entrypoints.openai.tool_parsers import ToolParser

NO_ARGUMENTS = {"type": "object", "properties": {}}


def parameters_schema(tool: ChatTool) -> dict[str, Any]:
    return tool.function.parameters or NO_ARGUMENTS


def forced_tool_constraint(request: ChatCompletionRequest) -> StructuredOutputsParams | None:
    """The structured-output constraint that tool_choice 'required' or a named function puts
    on the output; None for 'none' and 'auto'."""
    choice, tools = request.tool_choice, request.tools or []
    if isinstance(choice, NamedToolChoice):
        tool = next(t for t in tools if t.function.name == choice.function.name)
        return StructuredOutputsParams(json=parameters_schema(tool))
    if choice != "required":
        return None
    items = [{"type": "object", "additionalProperties": False,
              "required": ["name", "parameters"],
              "properties": {"name": {"const": tool.function.name},
                             "parameters": parameters_schema(tool)}} for tool in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if not request.parallel_tool_calls:
        schema["maxItems"] = 1
    return StructuredOutputsParams(json=schema)


def required_calls(text: str) -> list[ToolCallText]:
    """The complete items of a 'required' answer, `[{"name": ..., "parameters": ...}, ...]`,
    read one by one (a stream sees each call as soon as its item closes)."""
    calls, pos = [], text.find("{")
    while pos >= 0:
        end = json_end(text, pos)
        item = load_json(text[pos:end]) if end is not None else None
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            break
        calls.append(ToolCallText(item["name"], json.dumps(item.get("parameters", {}),
                                                           ensure_ascii=False)))
        pos = text.find("{", end)
    return calls


@dataclass(slots=True)
class ChatParts:
    reasoning: str = ""
    content: str = ""
    calls: list[ToolCallText] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ChatOutputSplitter:
    """How this request's answers are read (the same for each of its choices)."""

    reasoning: ReasoningParser | None = None
    tool_parser: ToolParser | None = None  # tool_choice auto
    forced: str | None = None  # "required", or the name of the forced function
    parallel_tool_calls: bool = True

    def split(self, text: str, final: bool = True) -> ChatParts:
        parts = ChatParts()
        if self.reasoning is not None:
            split = self.reasoning.split(text, final)
            parts.reasoning, text = split.reasoning, split.content
            if not split.ended:
                return parts
        if self.forced == "required":
            parts.calls = required_calls(text)
        elif self.forced is not None:
            parts.calls = [ToolCallText(self.forced, text)] if text else []
        elif self.tool_parser is not None:
            parsed = self.tool_parser.parse(text, final)
            parts.content, parts.calls = parsed.content, parsed.calls
        else:
            parts.content = text
        if not self.parallel_tool_calls:
            parts.calls = parts.calls[:1]
        return parts

    def new_call_id(self) -> str:
        return self.tool_parser.new_call_id() if self.tool_parser else tool_call_id()

    @property
    def reads_calls(self) -> bool:
        return self.forced is not None or self.tool_parser is not None


def finish_reason(reason: str | None, parts: ChatParts) -> str | None:
    """A generation that stopped after making calls finished for tool_calls (OpenAI's)."""
    return "tool_calls" if reason == "stop" and parts.calls else reason


def whole_calls(calls: list[ToolCallText], splitter: ChatOutputSplitter) -> list[ToolCall]:
    return [ToolCall(id=splitter.new_call_id(),
                     function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]


def visible_content(content: str, splitter: ChatOutputSplitter) -> str | None:
    """What goes in `content`: the text, but none when calls were read and only whitespace
    (the newlines around a call) is left."""
    if splitter.reads_calls and not content.strip():
        return None
    return content


@dataclass(slots=True)
class StreamedChoice:
    """One streamed choice: its text so far and what of its split was sent already."""

    splitter: ChatOutputSplitter
    text: str = ""
    sent_reasoning: int = 0
    sent_content: int = 0
    sent_arguments: list[int] = field(default_factory=list)  # per call sent: its arguments'
    last: ChatParts = field(default_factory=ChatParts)

    def feed(self, delta: str, final: bool) -> list[DeltaMessage]:
        """The deltas to send for `delta` (more text of this choice)."""
        self.text += delta
        parts = self.last = self.splitter.split(self.text, final)
        messages = []
        reasoning, content = parts.reasoning[self.sent_reasoning:], self._new_content(parts)
        if reasoning or content:
            messages.append(DeltaMessage(reasoning_content=reasoning or None,
                                         content=content or None))
        self.sent_reasoning = len(parts.reasoning)
        messages.extend(self._call_deltas(parts.calls))
        return messages

    def _new_content(self, parts: ChatParts) -> str:
        if visible_content(parts.content, self.splitter) is None:
            return ""  # whitespace only so far: it may stay so (content null)
        new = parts.content[self.sent_content:]
        self.sent_content = len(parts.content)
        return new

    def _call_deltas(self, calls: list[ToolCallText]) -> list[DeltaMessage]:
        """A new call's id and name, then argument text not sent yet."""
        heads, fragments = [], []
        for index, call in enumerate(calls):
            if index == len(self.sent_arguments):
                heads.append(DeltaToolCall(index=index, id=self.splitter.new_call_id(), type="function",
                                           function=DeltaFunctionCall(name=call.name,
                                                                      arguments="")))
                self.sent_arguments.append(0)
            new = call.arguments[self.sent_arguments[index]:]
            if new:
                fragments.append(DeltaToolCall(index=index,
                                               function=DeltaFunctionCall(arguments=new)))
                self.sent_arguments[index] = len(call.arguments)
        return [DeltaMessage(tool_calls=group) for group in (heads, fragments) if group]
