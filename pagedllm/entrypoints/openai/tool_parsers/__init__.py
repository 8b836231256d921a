"""Tool-call parsers for tool_choice "auto" (`--tool-call-parser NAME`): each turns one model
family's way of writing calls into OpenAI `tool_calls` and the remaining content."""

from __future__ import annotations

from pagedllm.entrypoints.openai.tool_parsers.base import ParsedText, ToolCallText, ToolParser
from pagedllm.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from pagedllm.entrypoints.openai.tool_parsers.llama3_json import Llama3JsonToolParser
from pagedllm.entrypoints.openai.tool_parsers.mistral import MistralToolParser
from pagedllm.entrypoints.openai.tool_parsers.pythonic import PythonicToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesToolParser, Llama3JsonToolParser,
                                       MistralToolParser, PythonicToolParser)}


def get_tool_parser(name: str) -> ToolParser:
    """The parser called `name`; ValueError listing the choices for any other name."""
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of "
                         f"{', '.join(sorted(TOOL_PARSERS))}")
    return TOOL_PARSERS[name]()


__all__ = ["TOOL_PARSERS", "ParsedText", "ToolCallText", "ToolParser", "get_tool_parser"]
