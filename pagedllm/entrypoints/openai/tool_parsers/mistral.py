"""Mistral: `[TOOL_CALLS]` (a special token) then a JSON list of {"name", "arguments"}
objects, or (newer tokenizers) `[TOOL_CALLS]name[ARGS]{...}` per call."""

from __future__ import annotations

import re
import secrets
import string

from pagedllm.entrypoints.openai.tool_parsers.base import (
    CallRegion,
    ToolCallText,
    ToolParser,
    call_from_object,
    calls_from_list,
    json_end,
    load_json,
)

MARKER, ARGS = "[TOOL_CALLS]", "[ARGS]"
ID_ALPHABET = string.ascii_letters + string.digits
NAMED = re.compile(r"\s*([A-Za-z0-9_.\-]+)(?:\[ARGS\])?\s*")


class MistralToolParser(ToolParser):
    name = "mistral"
    markers = (MARKER,)
    keeps_special_tokens = True

    @staticmethod
    def new_call_id() -> str:
        """Nine letters or digits: Mistral's chat templates refuse any other tool_call_id
        when the call comes back in the history."""
        return "".join(secrets.choice(ID_ALPHABET) for _ in range(9))

    def read_region(self, text: str, start: int, final: bool) -> CallRegion | None:
        body = start + len(MARKER)
        while body < len(text) and text[body].isspace():
            body += 1
        if body < len(text) and text[body] in "[{":
            return self._json_calls(text, body, final)
        named = NAMED.match(text, body)
        if named is None or named.end() == len(text):
            return None if not final else CallRegion(None, len(text))
        if text[named.end()] != "{":
            if not final and ARGS.startswith(text[named.end():]):  # `[ARGS]` still coming
                return None
            return CallRegion(None, named.end())
        region = self._json_calls(text, named.end(), final)
        if region is None or region.calls is None or len(region.calls) != 1:
            return region
        return CallRegion([ToolCallText(named[1], region.calls[0].arguments)], region.end)

    @staticmethod
    def _json_calls(text: str, body: int, final: bool) -> CallRegion | None:
        end = json_end(text, body)
        if end is None:
            return None if not final else CallRegion(None, len(text))
        value = load_json(text[body:end])
        if isinstance(value, dict):
            if "name" not in value:  # `name[ARGS]{...}`: the object is the arguments
                value = {"name": "", "arguments": value}
            call = call_from_object(value)
            return CallRegion(None if call is None else [call], end)
        return CallRegion(calls_from_list(value), end)
