"""Benchmark workloads: the requests a benchmark sends, from a JSONL file or made up.

A dataset file holds one JSON object per line:

    {"prompt": "Tell me about the sea.", "output_len": 64}
    {"prompt_token_ids": [1, 415, 2936], "output_len": 32}

`prompt` is text (tokenized by whoever runs it), `prompt_token_ids` a list of token ids; a line
may carry both. `output_len` is how many tokens the request must produce (EOS ignored). Other
keys are ignored, so a file can keep its own metadata. Blank lines are skipped.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Common English words: almost every tokenizer has each as one or two tokens, so a prompt of
# N of them is about N tokens on any server, whose usage then reports the exact count.
_WORD_LIST = """the of and to in is was for on that with as by at from his it an were are which
this be or has had not first one their its new after but who they have her she two been other
when there all during into school time may years more most only over city some world would
where later up such used many can state about national out known university united then made
between three people year under part team water house light sea river tree stone music book
garden road field morning evening simple small large old young long short green blue red
white black early late high low open close write read think find give tell ask work call
try leave keep begin show hear play run move live believe hold bring happen"""
WORDS = _WORD_LIST.split()


@dataclass(slots=True)
class WorkItem:
    """One request: its prompt as text, as token ids, or both, and the number of tokens it must
    produce. Offline benchmarks need the ids; `bench serve` needs the text."""

    output_len: int
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None


# ---- JSONL datasets ---------------------------------------------------------------------------
def load_dataset(path: str | Path, num_prompts: int | None = None) -> list[WorkItem]:
    """The file's requests in order (the first `num_prompts` of them when given); a ValueError
    names the file, the line and what is wrong with it."""
    items: list[WorkItem] = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if num_prompts is not None and len(items) == num_prompts:
                break
            if not line.strip():
                continue
            try:
                items.append(parse_entry(line))
            except ValueError as exc:
                raise ValueError(f"{path}, line {line_number}: {exc}") from None
    if not items:
        raise ValueError(f"{path}: the dataset holds no request")
    if num_prompts is not None and len(items) < num_prompts:
        raise ValueError(f"{path}: --num-prompts asks for {num_prompts} requests, the dataset "
                         f"holds {len(items)}")
    return items


def parse_entry(line: str) -> WorkItem:
    """One dataset line -> WorkItem; a ValueError says why the line is not one."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(entry, dict):
        raise ValueError(f"expected a JSON object, got {type(entry).__name__}")
    if "prompt" not in entry and "prompt_token_ids" not in entry:
        raise ValueError("needs \"prompt\" (text) or \"prompt_token_ids\" (list of ints)")
    return WorkItem(output_len=_output_len(entry), prompt=_prompt_text(entry),
                    prompt_token_ids=_prompt_token_ids(entry))


def _output_len(entry: dict[str, Any]) -> int:
    value = entry.get("output_len")
    if not _is_int(value) or value < 1:
        raise ValueError(f"\"output_len\" must be a positive integer, got {value!r}")
    return value


def _prompt_text(entry: dict[str, Any]) -> str | None:
    text = entry.get("prompt")
    if text is not None and (not isinstance(text, str) or not text):
        raise ValueError(f"\"prompt\" must be non-empty text, got {text!r}")
    return text


def _prompt_token_ids(entry: dict[str, Any]) -> list[int] | None:
    ids = entry.get("prompt_token_ids")
    if ids is None:
        return None
    if not isinstance(ids, list) or not ids:
        raise ValueError("\"prompt_token_ids\" must be a non-empty list of token ids")
    bad = next((t for t in ids if not _is_int(t) or t < 0), None)
    if bad is not None:
        raise ValueError(f"\"prompt_token_ids\" must hold non-negative integers, found {bad!r}")
    return ids


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not 1 here


def with_token_ids(items: Iterable[WorkItem], tokenizer) -> list[WorkItem]:
    """Every item with prompt token ids: text-only prompts are encoded with the engine's
    tokenizer (special tokens added, as the engine does for a text prompt)."""
    result = []
    for index, item in enumerate(items):
        if item.prompt_token_ids is None:
            if tokenizer is None:
                raise ValueError(f"dataset entry {index + 1} has only prompt text, and the engine "
                                 "has no tokenizer (--skip-tokenizer-init): give prompt_token_ids")
            item = WorkItem(item.output_len, item.prompt, tokenizer.encode(item.prompt))
        result.append(item)
    return result


def require_text(items: Iterable[WorkItem]) -> list[WorkItem]:
    """An HTTP benchmark sends text: every item must have it."""
    items = list(items)
    missing = next((i for i, item in enumerate(items) if item.prompt is None), None)
    if missing is not None:
        raise ValueError(f"dataset entry {missing + 1} has no \"prompt\" text; bench serve sends "
                         "text, since only the server knows its tokenizer")
    return items


# ---- synthetic workloads ----------------------------------------------------------------------
def check_range_ratio(range_ratio: float) -> None:
    if not 0 <= range_ratio <= 1:
        raise ValueError(f"--range-ratio must be in [0, 1], got {range_ratio}")


def sample_length(rng: random.Random, mean: int, range_ratio: float) -> int:
    """A length uniform in [mean * (1 - ratio), mean * (1 + ratio)], at least 1."""
    return max(1, rng.randint(int(mean * (1 - range_ratio)), int(mean * (1 + range_ratio))))


def synthetic_token_workload(num_prompts: int, input_len: int, output_len: int,
                             range_ratio: float, vocab_size: int, seed: int,
                             skip_ids: set[int]) -> list[WorkItem]:
    """Random token prompts, special tokens left out (a stray EOS or chat marker is not what a
    real prompt looks like). The id cap and the order of the draws are those of the first
    version, so that a seed still gives the prompts behind the figures in docs/."""
    check_range_ratio(range_ratio)
    rng = random.Random(seed)
    allowed = [t for t in range(min(vocab_size, 32000)) if t not in skip_ids]

    def item() -> WorkItem:
        ids = [rng.choice(allowed) for _ in range(sample_length(rng, input_len, range_ratio))]
        return WorkItem(sample_length(rng, output_len, range_ratio), prompt_token_ids=ids)

    return [item() for _ in range(num_prompts)]


def synthetic_text_workload(num_prompts: int, input_len: int, output_len: int,
                            range_ratio: float, seed: int) -> list[WorkItem]:
    """Prompts of `input_len` random common words (about that many tokens on any tokenizer);
    random, so that no two requests share a prefix-cache entry."""
    check_range_ratio(range_ratio)
    rng = random.Random(seed)

    def item() -> WorkItem:
        words = rng.choices(WORDS, k=sample_length(rng, input_len, range_ratio))
        return WorkItem(sample_length(rng, output_len, range_ratio), prompt=" ".join(words))

    return [item() for _ in range(num_prompts)]
