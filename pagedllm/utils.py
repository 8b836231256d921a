"""Small helpers shared across layers; this module imports nothing from pagedllm (and no torch),
so any layer may use it."""

from __future__ import annotations

import json
from typing import Any

GiB = 2**30


def cdiv(a: int, b: int) -> int:
    """Ceiling division: how many blocks of `b` hold `a` items."""
    return -(-a // b)


def head_dim_of(config: Any) -> int:
    """The attention head size of a transformers config: `head_dim` where the family sets one
    (Gemma, Qwen3), else hidden_size / num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def json_object_option(value: str | dict, name: str) -> dict:
    """An option given as a dict (Python) or as its JSON text (a CLI flag), as a dict; a
    ValueError naming the option otherwise."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name} is not valid JSON (it must be a JSON object): {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object (a dict in Python), got {type(value).__name__}")
    return dict(value)
