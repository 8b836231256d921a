"""Small helpers shared across layers; this module imports nothing from pagedllm (and no torch),
so any layer may use it."""

from __future__ import annotations

from typing import Any

GiB = 2**30


def cdiv(a: int, b: int) -> int:
    """Ceiling division: how many blocks of `b` hold `a` items."""
    return -(-a // b)


def head_dim_of(config: Any) -> int:
    """The attention head size of a transformers config: `head_dim` where the family sets one
    (Gemma, Qwen3), else hidden_size / num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
