"""`speculative_config`: validated once, at engine start, into a SpeculativeConfig.

Pure Python (EngineArgs and the scheduler read it; neither may import torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagedllm.utils import json_object_option

METHODS = ("ngram", "draft_model")
# every key a speculative_config may hold, vLLM's names
KEYS = ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "model")
MAX_SPECULATIVE_TOKENS = 16  # more drafts than this only burn compute: acceptance decays fast


@dataclass(slots=True, frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int  # n-gram: the longest suffix matched first
    prompt_lookup_min: int  # n-gram: the shortest suffix tried before giving up
    model: str | None = None  # draft_model: the draft (HF folder, .gguf file or hub id)

    @classmethod
    def parse(cls, value: dict[str, Any] | str | SpeculativeConfig | None) -> SpeculativeConfig | None:
        """From a dict (LLM(speculative_config=...)) or its JSON text (--speculative-config);
        ValueError naming the problem for anything it cannot serve."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        value = json_object_option(value, "speculative_config")
        unknown = sorted(set(value) - set(KEYS))
        if unknown:
            raise ValueError(f"speculative_config: unknown keys {unknown} (known: {list(KEYS)})")
        return cls._from_dict(dict(value))

    @classmethod
    def _from_dict(cls, value: dict[str, Any]) -> SpeculativeConfig:
        model = value.get("model")
        method = value.get("method") or ("draft_model" if model is not None else None)
        if method not in METHODS:
            raise ValueError(f"speculative_config: unknown method {method!r} (supported: "
                             f"{list(METHODS)})")
        if (method == "draft_model") != (model is not None):
            raise ValueError("speculative_config: a draft model needs 'model' (and 'model' "
                             "needs the draft_model method)")
        if model is not None and not isinstance(model, str):
            raise ValueError(f"speculative_config: model must be a path or hub id, got {model!r}")
        k = _int(value, "num_speculative_tokens", None)
        if not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_config: num_speculative_tokens must be in [1, "
                             f"{MAX_SPECULATIVE_TOKENS}], got {k}")
        lookup_max = _int(value, "prompt_lookup_max", None)
        lookup_min = _int(value, "prompt_lookup_min", None)
        # vLLM: either one given alone sets both; neither: 5 down to 1... we choose 4 and 2
        lookup_max = lookup_max if lookup_max is not None else (lookup_min or 4)
        lookup_min = lookup_min if lookup_min is not None else min(2, lookup_max)
        if not 1 <= lookup_min <= lookup_max:
            raise ValueError(f"speculative_config: need 1 <= prompt_lookup_min <= "
                             f"prompt_lookup_max, got {lookup_min} and {lookup_max}")
        return cls(method, k, lookup_max, lookup_min, model)

    @property
    def num_lookahead_tokens(self) -> int:
        """Slots past a sampling chunk the scheduler holds: a draft model writes the K/V of its
        k proposal steps there; prompt lookup writes nothing."""
        return self.num_speculative_tokens if self.model is not None else 0

    def describe(self) -> str:
        """The start-up log's line."""
        how = (f"draft model {self.model}" if self.model is not None else
               f"ngram, prompt lookup of {self.prompt_lookup_max} down to "
               f"{self.prompt_lookup_min} tokens")
        return f"speculative decoding: {how}, {self.num_speculative_tokens} tokens per step"


def _int(value: dict[str, Any], name: str, default: int | None) -> int | None:
    number = value.get(name, default)
    if number is None and default is None and name == "num_speculative_tokens":
        raise ValueError("speculative_config: num_speculative_tokens is required")
    if number is not None and (isinstance(number, bool) or not isinstance(number, int)):
        raise ValueError(f"speculative_config: {name} must be an integer, got {number!r}")
    return number
