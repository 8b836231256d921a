"""config.model_type (or GGUF general.architecture) -> the class that implements it."""

from __future__ import annotations

from torch import nn

from pagedllm.model.gemma import Gemma2ForCausalLM, GemmaForCausalLM
from pagedllm.model.gemma3 import Gemma3ForCausalLM
from pagedllm.model.gpt2 import GPT2LMHeadModel
from pagedllm.model.llama import LlamaForCausalLM
from pagedllm.model.opt import OPTForCausalLM
from pagedllm.model.phi3 import Phi3ForCausalLM
from pagedllm.model.qwen3 import Qwen3ForCausalLM

# model_type -> (class, config attributes the family implies)
MODEL_REGISTRY: dict[str, tuple[type[nn.Module], dict]] = {
    "llama": (LlamaForCausalLM, {}),
    "gpt2": (GPT2LMHeadModel, {}),
    "opt": (OPTForCausalLM, {}),
    "mistral": (LlamaForCausalLM, {}),
    "qwen2": (LlamaForCausalLM, {"qkv_bias": True}),
    "qwen3": (Qwen3ForCausalLM, {}),
    "phi3": (Phi3ForCausalLM, {}),
    "gemma": (GemmaForCausalLM, {}),
    "gemma2": (Gemma2ForCausalLM, {}),
    "gemma3_text": (Gemma3ForCausalLM, {}),
}

# GGUF general.architecture -> HF model_type
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
                      "gemma2": "gemma2", "gemma3": "gemma3_text"}


def resolve_model_class(model_type: str) -> tuple[type[nn.Module], dict]:
    if model_type not in MODEL_REGISTRY:
        raise ValueError(f"model type {model_type!r} is not supported; supported types: "
                         f"{', '.join(sorted(MODEL_REGISTRY))}")
    return MODEL_REGISTRY[model_type]
