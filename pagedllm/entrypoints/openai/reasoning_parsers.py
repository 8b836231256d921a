"""Reasoning parsers (`--reasoning-parser NAME`): split a reasoning model's text into its
thinking (`reasoning_content`) and its answer (`content`).

Both formats put the thinking between `<think>` and `</think>`. They differ in what a missing
end tag means: DeepSeek-R1's template opens the think block in the prompt, so its output may
lack `<think>` and, cut off, lack `</think>` too: everything before `</think>` is reasoning.
Qwen3 writes `<think>` itself when it thinks (and not at all with enable_thinking=False), so
text without `<think>` at its start is the answer.

As the tool parsers do, a split of a stream's text so far (`final=False`) holds back what may
still change (a tail that may begin `</think>`), so streamed deltas add up to the whole split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pagedllm.entrypoints.openai.tool_parsers.base import held_back

THINK, END_THINK = "<think>", "</think>"


@dataclass(frozen=True, slots=True)
class ReasoningSplit:
    reasoning: str
    content: str
    ended: bool  # the reasoning is over: what follows is the answer


class ReasoningParser:
    name: ClassVar[str] = "deepseek_r1"
    needs_start_tag: ClassVar[bool] = False  # Qwen3: no <think> at the start, no reasoning

    def split(self, text: str, final: bool = True) -> ReasoningSplit:
        body = text.lstrip()
        if not final and THINK.startswith(body):  # may still become <think>
            return ReasoningSplit("", "", False)
        started = body.startswith(THINK)
        if self.needs_start_tag and not started:
            return ReasoningSplit("", text, True)
        body = body.removeprefix(THINK)
        head, sep, tail = body.partition(END_THINK)
        if sep:
            return ReasoningSplit(head, tail.lstrip(), True)
        if not final:
            head = head[:len(head) - held_back(head, (END_THINK,))]
        return ReasoningSplit(head, "", False)

    @staticmethod
    def constraint_start(prompt: str) -> str | None:
        """The text after which a structured-output constraint holds: the end of the thinking,
        or None (from the first token) when the prompt has closed the thinking itself, as
        Qwen3's template does for enable_thinking=False with an empty think block."""
        return None if prompt.rstrip().endswith(END_THINK) else END_THINK


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"
    needs_start_tag = True


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    parser.name: parser for parser in (ReasoningParser, Qwen3ReasoningParser)}


def get_reasoning_parser(name: str) -> ReasoningParser:
    if name not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of "
                         f"{', '.join(sorted(REASONING_PARSERS))}")
    return REASONING_PARSERS[name]()
