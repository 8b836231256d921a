"""pagedllm: high-throughput LLM inference and serving on PagedAttention.

The public names are imported on first use (PEP 562), so that importing a light module such as
pagedllm.core.scheduler does not pull in torch through LLM.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "LLM": "pagedllm.entrypoints.llm",
    "BeamSearchOutput": "pagedllm.engine.beam_ranking",
    "BeamSearchParams": "pagedllm.engine.beam_ranking",
    "BeamSearchSequence": "pagedllm.engine.beam_ranking",
    "CompletionOutput": "pagedllm.outputs",
    "EngineArgs": "pagedllm.config",
    "Logprob": "pagedllm.outputs",
    "PoolingOutput": "pagedllm.outputs",
    "PoolingParams": "pagedllm.pooling_params",
    "PoolingRequestOutput": "pagedllm.outputs",
    "RequestOutput": "pagedllm.outputs",
    "RequestOutputKind": "pagedllm.sampling_params",
    "SamplingParams": "pagedllm.sampling_params",
    "StructuredOutputsParams": "pagedllm.sampling_params",
    "TextPrompt": "pagedllm.inputs",
    "TokensPrompt": "pagedllm.inputs",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'pagedllm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
