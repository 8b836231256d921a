"""What every tool-call parser shares: the records it returns, the scan of a model's text into
content and calls, and JSON helpers.

A parser reads the whole text generated so far. With `final=False` (a stream, mid-way) it
returns only what can no longer change: the content before anything that may still become a
call, and the calls already complete. So a stream that parses its text after every delta and
sends what is new sends, in the end, exactly what a whole response holds.
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class ToolCallText:
    """One call as the model wrote it: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


@dataclass(slots=True)
class ParsedText:
    """A model's text split into what the user reads (`content`) and the calls it made."""

    content: str
    calls: list[ToolCallText] = field(default_factory=list)


# A call region's fate when read: its calls and where it ends; MALFORMED (it stays text, up to
# `end`); or None: it has not ended yet (more text may complete it).
@dataclass(frozen=True, slots=True)
class CallRegion:
    calls: list[ToolCallText] | None  # None: malformed, the region is content
    end: int


def tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


class ToolParser(ABC):
    """Turns one model family's tool-call format into calls and the remaining content."""

    name: ClassVar[str]
    # The strings a call region starts with: a stream holds back a text tail that may be the
    # beginning of one.
    markers: ClassVar[tuple[str, ...]]
    # Whether the markers are special tokens, which detokenizing would otherwise drop.
    keeps_special_tokens: ClassVar[bool] = False

    @staticmethod
    def new_call_id() -> str:
        """The id of a call this parser read (a model's template may check the ids it is sent
        back in the history)."""
        return tool_call_id()

    def next_call(self, text: str, pos: int) -> int | None:
        """Where the next call region starts at or after `pos` (None: nowhere yet); by
        default, at the next marker."""
        start = text.find(self.markers[0], pos)
        return None if start < 0 else start

    @abstractmethod
    def read_region(self, text: str, start: int, final: bool) -> CallRegion | None:
        """The calls of the region starting at `start`; None while it may still grow (never
        when `final`)."""

    def parse(self, text: str, final: bool = True) -> ParsedText:
        content: list[str] = []
        calls: list[ToolCallText] = []
        pos = 0
        while True:
            start = self.next_call(text, pos)
            if start is None:
                tail = text[pos:]
                content.append(tail if final else tail[:len(tail) - held_back(tail,
                                                                              self.markers)])
                break
            content.append(text[pos:start])
            region = self.read_region(text, start, final)
            if region is None:  # not complete: nothing from `start` on is settled
                break
            if region.calls is None:
                content.append(text[start:region.end])
            else:
                calls.extend(region.calls)
            pos = region.end
        return ParsedText("".join(content), calls)


class WholeAnswerParser(ToolParser):
    """A format in which the whole answer is the calls, or is text: it is a call region when
    it starts (after whitespace) with one of `markers`, and is settled when the output ends."""

    def next_call(self, text: str, pos: int) -> int | None:
        if pos != 0:
            return None
        start = len(text) - len(text.lstrip())
        return start if text.startswith(self.markers, start) else None

    def read_region(self, text: str, start: int, final: bool) -> CallRegion | None:
        return CallRegion(self.read_calls(text[start:]), len(text)) if final else None

    @abstractmethod
    def read_calls(self, answer: str) -> list[ToolCallText] | None:
        """The calls the answer is; None if it is not only calls (then it is content)."""


def held_back(tail: str, markers: tuple[str, ...]) -> int:
    """The length of the longest end of `tail` that begins one of `markers` (it may become a
    marker once more text comes)."""
    for size in range(min(len(tail), max(map(len, markers)) - 1), 0, -1):
        if any(marker.startswith(tail[-size:]) for marker in markers):
            return size
    return 0


def json_end(text: str, start: int) -> int | None:
    """Where the JSON object or array starting at `text[start]` ends (exclusive), by brackets
    and strings alone; None if the text ends first."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        char = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def load_json(text: str) -> Any:
    """The JSON value, or None if the text is not JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return None


def call_from_object(value: Any) -> ToolCallText | None:
    """{"name": ..., "arguments" (or "parameters"): {...}} -> a call; None if it is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        arguments = load_json(arguments)
    if not isinstance(arguments, dict):
        return None
    return ToolCallText(value["name"], json.dumps(arguments, ensure_ascii=False))


def calls_from_list(values: Any) -> list[ToolCallText] | None:
    """A list of call objects -> calls; None if any is not one."""
    if not isinstance(values, list) or not values:
        return None
    calls = [call_from_object(value) for value in values]
    return None if any(call is None for call in calls) else calls
