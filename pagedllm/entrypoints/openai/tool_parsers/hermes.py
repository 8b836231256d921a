"""Hermes / Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one call per
pair of tags, text allowed around them."""

from __future__ import annotations

from pagedllm.entrypoints.openai.tool_parsers.base import (
    CallRegion,
    ToolParser,
    call_from_object,
    json_end,
    load_json,
)

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"
    markers = (OPEN,)

    def read_region(self, text: str, start: int, final: bool) -> CallRegion | None:
        body = start + len(OPEN)
        while body < len(text) and text[body].isspace():
            body += 1
        # The object's end by its brackets, so that a "</tool_call>" inside a string is text.
        end = json_end(text, body) if text.startswith("{", body) else None
        if end is None:
            if not final and (body == len(text) or text[body] == "{"):
                return None
            return self._malformed(text, body)
        rest = text[end:]
        if not final and CLOSE.startswith(rest.strip()):  # the closing tag may still come
            return None
        after = rest.lstrip()
        if after and not after.startswith(CLOSE):
            return self._malformed(text, body)
        call = call_from_object(load_json(text[body:end]))
        region_end = len(text) - len(after) + (len(CLOSE) if after else 0)
        return CallRegion(None if call is None else [call], region_end)

    @staticmethod
    def _malformed(text: str, body: int) -> CallRegion:
        """Text up to the closing tag (or the end) stays content."""
        close = text.find(CLOSE, body)
        return CallRegion(None, len(text) if close < 0 else close + len(CLOSE))
