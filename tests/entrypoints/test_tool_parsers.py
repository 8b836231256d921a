"""Tool-call and reasoning parsers on recorded model outputs in each family's format: several
calls, malformed JSON, text around the calls; streamed in random chunk sizes, the deltas add up
to the whole (non-streamed) answer."""

from __future__ import annotations

import json
import random
import re

import pytest

from pagedllm.entrypoints.openai.reasoning_parsers import get_reasoning_parser
from pagedllm.entrypoints.openai.tool_calls import (
    ChatOutputSplitter,
    StreamedChoice,
    visible_content,
    whole_calls,
)
from pagedllm.entrypoints.openai.tool_parsers import TOOL_PARSERS, get_tool_parser

WEATHER = ("get_weather", {"city": "Paris", "unit": "celsius"})
TIME = ("get_time", {"zone": "Europe/Paris"})
ODD = ("quote", {"text": "a \"}\" </tool_call> [TOOL_CALLS] é"})  # markers inside strings


def hermes(name, args):
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": args})}\n</tool_call>'


# parser -> [(recorded output, expected content, expected calls)]
RECORDED = {
    "hermes": [
        (hermes(*WEATHER), None, [WEATHER]),
        ("Let me check.\n" + hermes(*WEATHER) + "\n" + hermes(*TIME) + "\nDone.",
         "Let me check.\n\n\nDone.", [WEATHER, TIME]),
        (hermes(*ODD), None, [ODD]),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call> ok',
         '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call> ok', []),
        ("No tools needed: 2 < 3.", "No tools needed: 2 < 3.", []),
        ('<tool_call>\n{"name": "get_time", "arguments": {"zone": "Europe/Paris"}}',
         None, [TIME]),  # cut off before the closing tag, but its JSON is whole
    ],
    "llama3_json": [
        (json.dumps({"name": WEATHER[0], "parameters": WEATHER[1]}), None, [WEATHER]),
        ("<|python_tag|>" + json.dumps({"name": TIME[0], "parameters": TIME[1]}) + "; "
         + json.dumps({"name": WEATHER[0], "parameters": WEATHER[1]}), None, [TIME, WEATHER]),
        ('{"name": "get_weather", "parameters": {"city": "Paris"',
         '{"name": "get_weather", "parameters": {"city": "Paris"', []),
        ("The weather is fine {really}.", "The weather is fine {really}.", []),
    ],
    "mistral": [
        ("[TOOL_CALLS]" + json.dumps([{"name": WEATHER[0], "arguments": WEATHER[1]},
                                      {"name": TIME[0], "arguments": TIME[1]}]),
         None, [WEATHER, TIME]),
        ("Sure. [TOOL_CALLS]get_time[ARGS]" + json.dumps(TIME[1]), "Sure. ", [TIME]),
        ("[TOOL_CALLS][" + json.dumps({"name": ODD[0], "arguments": ODD[1]}) + "]",
         None, [ODD]),
        ('[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": }}] after',
         '[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": }}] after', []),
        ("Plain [text] answer.", "Plain [text] answer.", []),
    ],
    "pythonic": [
        ('[get_weather(city="Paris", unit="celsius"), get_time(zone="Europe/Paris")]',
         None, [WEATHER, TIME]),
        ('<|python_start|>[quote(text=' + json.dumps(ODD[1]["text"]) + ')]<|python_end|>',
         None, [ODD]),
        ("[get_weather(city=Paris)]", "[get_weather(city=Paris)]", []),  # not a literal
        ("[1, 2] are numbers", "[1, 2] are numbers", []),
        ("Hello there.", "Hello there.", []),
    ],
}
CASES = [(name, *case) for name, cases in RECORDED.items() for case in cases]


def as_pairs(calls):
    return [(call.name, json.loads(call.arguments)) for call in calls]


def stream(splitter: ChatOutputSplitter, text: str, rng: random.Random) -> dict:
    """Feed `text` in random chunk sizes; add up what the deltas carry."""
    choice, pos = StreamedChoice(splitter), 0
    reasoning, content, calls = "", "", {}
    while pos < len(text):
        size = rng.randint(1, 7)
        chunk, pos = text[pos:pos + size], pos + size
        for delta in choice.feed(chunk, final=pos >= len(text)):
            reasoning += delta.reasoning_content or ""
            content += delta.content or ""
            for call in delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"name": None, "arguments": ""})
                if call.id is not None:
                    assert entry["name"] is None and call.function.name  # id and name first
                    entry["name"] = call.function.name
                entry["arguments"] += call.function.arguments or ""
    return {"reasoning": reasoning, "content": content or None,
            "calls": [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]}


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES)
def test_parser_reads_recorded_output(parser, text, content, calls):
    splitter = ChatOutputSplitter(tool_parser=get_tool_parser(parser))
    whole = splitter.split(text)
    assert visible_content(whole.content, splitter) == content
    assert as_pairs(whole.calls) == [(name, args) for name, args in calls]
    for seed in range(5):  # random chunkings: the same as the whole
        streamed = stream(splitter, text, random.Random(seed))
        assert streamed["content"] == content
        assert streamed["calls"] == as_pairs(whole.calls)


@pytest.mark.parametrize(("parser", "pattern"), [("mistral", r"[A-Za-z0-9]{9}"),
                                                  ("hermes", r"chatcmpl-tool-[0-9a-f]{32}")])
def test_call_ids_take_the_form_the_model_s_template_accepts(parser, pattern):
    """Mistral's templates refuse a tool_call_id that is not nine letters or digits."""
    splitter = ChatOutputSplitter(tool_parser=get_tool_parser(parser))
    text = next(t for p, t, _, calls in CASES if p == parser and len(calls) > 1)
    whole = whole_calls(splitter.split(text).calls, splitter)
    streamed = [call.id for delta in StreamedChoice(splitter).feed(text, final=True)
                for call in delta.tool_calls or [] if call.id is not None]
    ids = [call.id for call in whole] + streamed
    assert ids and all(re.fullmatch(pattern, i) for i in ids), ids
    assert len(set(ids)) == len(ids)


def test_unknown_parser_names_the_choices():
    with pytest.raises(ValueError, match="hermes, llama3_json, mistral, pythonic"):
        get_tool_parser("nope")
    assert {"hermes", "llama3_json", "mistral", "pythonic"} <= set(TOOL_PARSERS)


REASONING = [
    ("deepseek_r1", "<think>Paris is in France.</think>\n\nIt is sunny.",
     "Paris is in France.", "It is sunny."),
    ("deepseek_r1", "The prompt opened the block. 1 < 2</think>Yes.",
     "The prompt opened the block. 1 < 2", "Yes."),
    ("deepseek_r1", "cut off while still thinking", "cut off while still thinking", None),
    ("qwen3", "<think>\nLet me see.\n</think>\n\nFour.", "\nLet me see.\n", "Four."),
    ("qwen3", "Four, without thinking.", "", "Four, without thinking."),
]


@pytest.mark.parametrize(("parser", "text", "reasoning", "content"), REASONING)
def test_reasoning_parser_on_scripted_output(parser, text, reasoning, content):
    splitter = ChatOutputSplitter(reasoning=get_reasoning_parser(parser))
    whole = splitter.split(text)
    assert (whole.reasoning, whole.content or None) == (reasoning, content)
    for seed in range(5):
        streamed = stream(splitter, text, random.Random(seed))
        assert (streamed["reasoning"], streamed["content"]) == (reasoning, content)


def test_reasoning_then_tool_call():
    text = "<think>I need the weather.</think>\n" + hermes(*WEATHER)
    splitter = ChatOutputSplitter(reasoning=get_reasoning_parser("qwen3"),
                                  tool_parser=get_tool_parser("hermes"))
    whole = splitter.split(text)
    assert whole.reasoning == "I need the weather."
    assert as_pairs(whole.calls) == [WEATHER]
    streamed = stream(splitter, text, random.Random(0))
    assert streamed["reasoning"] == whole.reasoning and streamed["calls"] == [WEATHER]
    assert streamed["content"] is None


def test_forced_calls_stream_argument_fragments():
    args = json.dumps(WEATHER[1])
    named = ChatOutputSplitter(forced="get_weather")
    assert stream(named, args, random.Random(1))["calls"] == [WEATHER]
    required = ChatOutputSplitter(forced="required")
    text = json.dumps([{"name": n, "parameters": a} for n, a in (WEATHER, TIME)])
    assert as_pairs(required.split(text).calls) == [WEATHER, TIME]
    assert stream(required, text, random.Random(2))["calls"] == [WEATHER, TIME]
    single = ChatOutputSplitter(forced="required", parallel_tool_calls=False)
    assert as_pairs(single.split(text).calls) == [WEATHER]


@pytest.mark.parametrize("parser", ["deepseek_r1", "qwen3"])
def test_a_constraint_starts_after_the_thinking_unless_the_prompt_closed_it(parser):
    reasoning = get_reasoning_parser(parser)
    # DeepSeek-R1's template opens the block; Qwen3's (thinking on) leaves it to the model
    assert reasoning.constraint_start("<|User|>hi<|Assistant|><think>\n") == "</think>"
    assert reasoning.constraint_start("<|im_start|>assistant\n") == "</think>"
    # Qwen3 with enable_thinking=False writes an empty block: constrained from the first token
    assert reasoning.constraint_start("<|im_start|>assistant\n<think>\n\n</think>\n\n") is None
