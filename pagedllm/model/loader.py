"""From what the user names (HF folder, .gguf file, hub id, or nothing) to a loaded model.

Weights always stream as (HF name, tensor) pairs into the model's own `load_weights`, so every
source fills the same modules and no transformers model class is ever built.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, GenerationConfig, PretrainedConfig

from pagedllm.attention import AttentionBackend
from pagedllm.model.dummy import initialize_dummy_weights
from pagedllm.model.gguf_file import GGUFFile
from pagedllm.model.layers.linear import attach_shards, prepare_for_inference
from pagedllm.model.layers.quantization import QuantizationMethod, resolve_quantization
from pagedllm.model.layers.rotary import RotaryEmbedding
from pagedllm.model.pipeline import MissingModule
from pagedllm.model.pooling_models import (
    ENCODER_TYPES,
    pooling_model_class,
    pooling_tasks,
    resolve_pooler_config,
    resolve_runner,
    sentence_transformers_max_len,
)
from pagedllm.model.registry import resolve_model_class
from pagedllm.model.source import ModelSource, resolve_model_source
from pagedllm.platform.cpu import cpu_info
from pagedllm.pooling_params import PoolerConfig


@dataclass
class ModelConfig:
    source: ModelSource
    hf_config: PretrainedConfig
    dtype: torch.dtype
    max_model_len: int
    eos_token_ids: list[int] = field(default_factory=list)
    # generation_config.json's max_new_tokens: what the model's authors suggest a reply may
    # take (a server's default when a request sets no max_tokens)
    default_max_tokens: int | None = None
    # the quantized-weight method the model runs with (model/layers/quantization/); None: float
    quantization: QuantizationMethod | None = None
    # enable_lora: each adapter module name (q_proj, ...) -> its (in, out) features, filled by
    # the worker once it has wrapped the model (lora/model.py); the front-end checks adapters
    # against it without torch
    lora_modules: dict[str, tuple[int, int]] = field(default_factory=dict)
    runner: str = "generate"  # or "pooling": requests are pooled, not generated
    pooler_config: PoolerConfig | None = None  # runner "pooling": how the model pools
    pooling_tasks: tuple[str, ...] = ()  # runner "pooling": embed, encode, classify, score
    causal: bool = True  # False for an encoder (BERT): bidirectional attention, no KV

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size


# ---- configuration ---------------------------------------------------------------------------
def load_model_config(model: str | None, dtype: str = "auto", max_model_len: int | None = None,
                      revision: str | None = None, device: str = "cpu",
                      quantization: str | None = None, runner: str = "auto",
                      pooler_overrides: dict | None = None) -> ModelConfig:
    source = resolve_model_source(model, revision)
    if source.is_gguf:
        with GGUFFile(source.path) as gguf_file:
            hf_config = gguf_file.hf_config()
    else:
        hf_config = text_model_config(AutoConfig.from_pretrained(source.path))
    folder = None if source.is_gguf else source.path
    runner = resolve_runner(runner, hf_config, folder)
    if hf_config.model_type not in ENCODER_TYPES:
        resolve_model_class(hf_config.model_type)  # fail early on an unsupported family
    if pooler_overrides and runner != "pooling":
        raise ValueError("pooler_config is set, but the model runs as a generator: pass "
                         "runner='pooling' (--runner pooling)")
    limit = getattr(hf_config, "max_position_embeddings", None) or 2048
    if runner == "pooling":  # the length a sentence-transformers model was trained to embed
        limit = min(limit, sentence_transformers_max_len(folder) or limit)
    generation = _generation_config(source)
    if max_model_len is not None and max_model_len > limit:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's limit of {limit}")
    return ModelConfig(
        source=source,
        hf_config=hf_config,
        dtype=resolve_dtype(dtype, hf_config, device, source.is_gguf),
        max_model_len=max_model_len or limit,
        eos_token_ids=_eos_token_ids(hf_config, generation),
        default_max_tokens=getattr(generation, "max_new_tokens", None),
        quantization=resolve_quantization(quantization, hf_config, source),
        runner=runner,
        pooler_config=(resolve_pooler_config(hf_config, folder, pooler_overrides or {})
                       if runner == "pooling" else None),
        pooling_tasks=pooling_tasks(hf_config) if runner == "pooling" else (),
        causal=hf_config.model_type not in ENCODER_TYPES,
    )


# image-and-text checkpoints whose text model we serve on its own (text prompts only)
MULTIMODAL_WITH_TEXT_MODEL = {"gemma3"}


def text_model_config(hf_config: PretrainedConfig) -> PretrainedConfig:
    if hf_config.model_type not in MULTIMODAL_WITH_TEXT_MODEL:
        return hf_config
    text_config = hf_config.get_text_config()
    if getattr(text_config, "dtype", None) is None:  # the dtype is saved on the outer config
        text_config.dtype = hf_config.dtype
    return text_config


def resolve_dtype(requested: str, hf_config: PretrainedConfig, device: str,
                  is_gguf: bool = False) -> torch.dtype:
    """"auto": the checkpoint's own dtype; for GGUF's quantized blocks, which have none, the
    fastest exact-enough float the device computes natively (bf16 where supported). A CPU whose
    oneDNN cannot run bf16 runs float32: bf16 weights computed in float32 work there but were
    slower end to end (docs/benchmarks.md, "bf16 or float32 by CPU")."""
    if requested != "auto":
        return getattr(torch, requested)
    native_bf16 = bf16_is_native(device)
    if is_gguf or (device == "cpu" and not native_bf16):
        return torch.bfloat16 if native_bf16 else torch.float32
    stored = getattr(hf_config, "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    if stored is None or stored == torch.float32:
        return torch.float32
    if stored == torch.float16 and device == "cpu":
        return torch.bfloat16  # CPUs run bf16 matmuls natively, fp16 mostly not
    return stored


def bf16_is_native(device: str) -> bool:
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    return cpu_info().onednn_bf16 and torch.backends.mkldnn.is_available()


def _generation_config(source: ModelSource) -> GenerationConfig | None:
    if not source.is_gguf and (source.path / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(source.path)
    return None


def _eos_token_ids(hf_config: PretrainedConfig,
                   generation: GenerationConfig | None) -> list[int]:
    ids = _as_list(getattr(hf_config, "eos_token_id", None))
    if generation is not None:
        ids += _as_list(generation.eos_token_id)
    return list(dict.fromkeys(ids))


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


# ---- weights ---------------------------------------------------------------------------------
def load_model(config: ModelConfig, backend: AttentionBackend, device: str,
               load_format: str = "auto") -> torch.nn.Module:
    """load_format "dummy" fills random weights instead of reading any (model/dummy.py)."""
    model_class, implied = model_class_of(config)
    for key, value in implied.items():
        setattr(config.hf_config, key, value)
    with torch.device("meta"):  # no memory and no random init for weights about to be replaced
        model = model_class(config.hf_config, config.max_model_len, backend).to(config.dtype)
        if config.quantization is not None:  # after .to(dtype): packed tensors keep their types
            config.quantization.quantize_model(model, config.dtype)
    model = model.to_empty(device=device)
    if getattr(model, "tie_word_embeddings", False) and not isinstance(model.lm_head,
                                                                       MissingModule):
        model.lm_head.weight = model.model.embed_tokens.weight
    attach_shards(model)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.build_cache(device)
    if load_format == "dummy":
        initialize_dummy_weights(model)
    elif config.source.is_gguf:
        with GGUFFile(config.source.path) as gguf_file:
            model.load_weights(gguf_file.weights(config.hf_config,
                                                 keep_quantized=config.quantization is not None))
    else:
        model.load_weights(hf_folder_weights(config.source.path))
    prepare_for_inference(model)
    model.activation_dtype = config.dtype  # what flows between layers (and pipeline stages)
    return model.eval()


def model_class_of(config: ModelConfig) -> tuple[type[torch.nn.Module], dict]:
    """The class the checkpoint loads as (a pooling model's own, under runner "pooling"), and
    the config attributes its family implies."""
    if config.hf_config.model_type in ENCODER_TYPES:
        return pooling_model_class(config.hf_config, None), {}
    model_class, implied = resolve_model_class(config.hf_config.model_type)
    if config.runner == "pooling":
        model_class = pooling_model_class(config.hf_config, model_class)
    return model_class, implied


def hf_folder_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if files:
        for file in files:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, handle.get_tensor(name)
        return
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise ValueError(f"no *.safetensors or pytorch_model*.bin weights in {folder}")
    for file in bins:
        yield from torch.load(file, map_location="cpu", weights_only=True, mmap=True).items()
