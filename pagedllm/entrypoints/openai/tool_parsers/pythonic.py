"""Pythonic tool calls (Llama 3.2/4, ToolACE): the whole answer is a Python list of calls,
`[get_weather(city="Paris"), get_time(zone="CET")]`, with literal arguments only."""

from __future__ import annotations

import ast
import json

from pagedllm.entrypoints.openai.tool_parsers.base import ToolCallText, WholeAnswerParser

START, END = "<|python_start|>", "<|python_end|>"


class PythonicToolParser(WholeAnswerParser):
    name = "pythonic"
    markers = (START, "[")

    def read_calls(self, answer: str) -> list[ToolCallText] | None:
        return _calls(answer.strip().removeprefix(START).removesuffix(END))


def _calls(body: str) -> list[ToolCallText] | None:
    try:
        tree = ast.parse(body.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = [_call(node) for node in tree.elts]
    return None if any(call is None for call in calls) else calls


def _call(node: ast.expr) -> ToolCallText | None:
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        return None
    try:
        arguments = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    except ValueError:  # a name or an expression, not a literal
        return None
    if None in arguments:  # **kwargs
        return None
    return ToolCallText(node.func.id, json.dumps(arguments, ensure_ascii=False))
