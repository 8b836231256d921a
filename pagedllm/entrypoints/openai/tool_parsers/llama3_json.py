"""Llama 3.x JSON tool calls: the whole answer is `{"name": ..., "parameters": {...}}` (after an
optional `<|python_tag|>`), several separated by `;`. Text that starts otherwise is content."""

from __future__ import annotations

import json

from pagedllm.entrypoints.openai.tool_parsers.base import (
    ToolCallText,
    WholeAnswerParser,
    call_from_object,
)

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(WholeAnswerParser):
    name = "llama3_json"
    markers = (PYTHON_TAG, "{")

    def read_calls(self, answer: str) -> list[ToolCallText] | None:
        return _calls(answer.removeprefix(PYTHON_TAG))


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
