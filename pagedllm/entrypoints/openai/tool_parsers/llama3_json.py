"""Llama 3.x JSON tool calls: the whole answer is `{"name": ..., "parameters": {...}}` (after an
optional `<|python_tag|>`), several separated by `;`. Text that starts otherwise is content."""

from __future__ import annotations

import json

from pagedllm.entrypoints.openai.tool_parsers.base import (
    CallRegion,
    ToolCallText,
    ToolParser,
    call_from_object,
)

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    markers = (PYTHON_TAG, "{")

    def next_call(self, text: str, pos: int) -> int | None:
        if pos != 0:
            return None
        start = len(text) - len(text.lstrip())
        return start if text.startswith((PYTHON_TAG, "{"), start) else None

    def read_region(self, text: str, start: int, final: bool) -> CallRegion | None:
        if not final:  # the answer is one region: it is settled when the output ends
            return None
        body = text[start:].removeprefix(PYTHON_TAG)
        return CallRegion(_calls(body), len(text))


def _calls(body: str) -> list[ToolCallText] | None:
    """`{...}; {...}` -> calls; None unless the whole body is such calls."""
    decoder, calls, pos = json.JSONDecoder(), [], 0
    while True:
        pos = len(body) - len(body[pos:].lstrip())
        try:
            value, pos = decoder.raw_decode(body, pos)
        except ValueError:
            return None
        call = call_from_object(value)
        if call is None:
            return None
        calls.append(call)
        rest = body[pos:].lstrip()
        if not rest:
            return calls
        if not rest.startswith(";"):
            return None
        pos = len(body) - len(rest) + 1
