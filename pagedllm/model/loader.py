"""From what the user names (HF folder, .gguf file, hub id, or nothing) to a loaded model.

Weights always stream as (HF name, tensor) pairs into the model's own `load_weights`, so every
source fills the same modules and no transformers model class is ever built.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, GenerationConfig, PretrainedConfig

from pagedllm.attention import AttentionBackend
from pagedllm.model.dummy import initialize_dummy_weights
from pagedllm.model.layers.linear import prepare_for_inference
from pagedllm.model.layers.rotary import RotaryEmbedding
from pagedllm.model.registry import GGUF_ARCHITECTURES, resolve_model_class
from pagedllm.model.source import ModelSource, resolve_model_source
from pagedllm.platform.cpu import cpu_info


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

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size


# ---- configuration ---------------------------------------------------------------------------
def load_model_config(model: str | None, dtype: str = "auto", max_model_len: int | None = None,
                      revision: str | None = None, device: str = "cpu") -> ModelConfig:
    source = resolve_model_source(model, revision)
    if source.is_gguf:
        with GGUFFile(source.path) as gguf_file:
            hf_config = gguf_file.hf_config()
    else:
        hf_config = text_model_config(AutoConfig.from_pretrained(source.path))
    resolve_model_class(hf_config.model_type)  # fail early on an unsupported family
    limit = getattr(hf_config, "max_position_embeddings", None) or 2048
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
    model_class, implied = resolve_model_class(config.hf_config.model_type)
    for key, value in implied.items():
        setattr(config.hf_config, key, value)
    with torch.device("meta"):  # no memory and no random init for weights about to be replaced
        model = model_class(config.hf_config, config.max_model_len, backend)
    model = model.to_empty(device=device).to(config.dtype)
    if getattr(model, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.build_cache(device)
    if load_format == "dummy":
        initialize_dummy_weights(model)
    elif config.source.is_gguf:
        with GGUFFile(config.source.path) as gguf_file:
            model.load_weights(gguf_file.weights(config.hf_config))
    else:
        model.load_weights(hf_folder_weights(config.source.path))
    prepare_for_inference(model)
    return model.eval()


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


# GGUF tensor-name pieces -> HF name pieces (llama.cpp's naming for the Llama family)
GGUF_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


QK_NORM_NAMES = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# Gemma 2/3 norm on both sides of attention and of the MLP; llama.cpp's "ffn_norm" is the one
# before the MLP, which HF calls pre_feedforward_layernorm in these families.
GEMMA_SANDWICH_NAMES = {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# per architecture, what differs from the Llama table
GGUF_LAYER_NAME_OVERRIDES = {
    "qwen3": QK_NORM_NAMES,
    "gemma2": GEMMA_SANDWICH_NAMES,
    "gemma3": GEMMA_SANDWICH_NAMES | QK_NORM_NAMES,
}
# Gemma in llama.cpp: the "1 +" of its (1 + w) RMSNorm is folded into the stored weights, and
# queries are scaled by 1/sqrt(head_dim) (the file has no query_pre_attn_scalar).
GGUF_GEMMA_ARCHS = {"gemma2", "gemma3"}


def gguf_to_hf_name(name: str, arch: str = "llama") -> str:
    stem, suffix = name.rsplit(".", 1)
    if stem in GGUF_GLOBAL_NAMES:
        return f"{GGUF_GLOBAL_NAMES[stem]}.{suffix}"
    layer_names = GGUF_LAYER_NAMES | GGUF_LAYER_NAME_OVERRIDES.get(arch, {})
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in layer_names:
        return f"model.layers.{parts[1]}.{layer_names[parts[2]]}.{suffix}"
    raise ValueError(f"unknown GGUF tensor {name!r} for architecture {arch!r}")


def unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order (interleaved rotary pairs) back to HF's half-split order.

    Per head, llama.cpp stores rows as pairs (r0, r_half, r1, r_half+1, ...); HF keeps the first
    half of the head's rows, then the second half.
    """
    rows = weight.shape[0]
    per_head = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return per_head.transpose(1, 2).reshape(weight.shape)


@functools.lru_cache(maxsize=1)
def _open_gguf(path: Path, mtime_ns: int):
    """GGUFReader parses every metadata array up front (seconds for a 49k vocabulary), and
    start-up reads the file twice (config, then weights): keep the last one open."""
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as exc:
        raise ValueError(f"cannot read GGUF file {path}: {exc}") from exc


class GGUFFile:
    """One open GGUF file: its metadata as an HF config, and its tensors dequantized."""

    def __init__(self, path: Path) -> None:
        import gguf

        self._gguf = gguf
        self.reader = _open_gguf(path, path.stat().st_mtime_ns)
        self.arch = self.field("general.architecture")

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        del self.reader

    def field(self, key: str, default=None):
        entry = self.reader.fields.get(key)
        return default if entry is None else entry.contents()

    def hf_config(self) -> PretrainedConfig:
        if self.arch not in GGUF_ARCHITECTURES:
            raise ValueError(f"GGUF architecture {self.arch!r} is not supported; supported: "
                             f"{', '.join(sorted(GGUF_ARCHITECTURES))}")
        a = self.arch
        heads = self.field(f"{a}.attention.head_count")
        hidden = self.field(f"{a}.embedding_length")
        names = {t.name for t in self.reader.tensors}
        kwargs = dict(
            num_hidden_layers=self.field(f"{a}.block_count"),
            max_position_embeddings=self.field(f"{a}.context_length"),
            hidden_size=hidden,
            intermediate_size=self.field(f"{a}.feed_forward_length"),
            num_attention_heads=heads,
            num_key_value_heads=self.field(f"{a}.attention.head_count_kv", heads),
            head_dim=self.field(f"{a}.attention.key_length", hidden // heads),
            rms_norm_eps=self.field(f"{a}.attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=self.field(f"{a}.rope.freq_base", 10000.0),
            vocab_size=self.field(f"{a}.vocab_size") or len(self.field("tokenizer.ggml.tokens")),
            tie_word_embeddings="output.weight" not in names,
            bos_token_id=self.field("tokenizer.ggml.bos_token_id"),
            eos_token_id=self.field("tokenizer.ggml.eos_token_id"),
        )
        kwargs |= self._optional_fields(a)
        scaling = self.field(f"{a}.rope.scaling.type")
        if scaling and scaling != "none":
            kwargs["rope_scaling"] = {
                "rope_type": scaling,
                "factor": self.field(f"{a}.rope.scaling.factor"),
                "original_max_position_embeddings":
                    self.field(f"{a}.rope.scaling.original_context_length"),
            }
        return AutoConfig.for_model(GGUF_ARCHITECTURES[a], **kwargs)

    def _optional_fields(self, a: str) -> dict:
        """Keys only some architectures write; what GGUF leaves out (Gemma 3's layer pattern,
        local rope base, query scale) takes the HF config class's defaults, as transformers'
        own GGUF loader does."""
        optional = {
            "sliding_window": f"{a}.attention.sliding_window",
            "attn_logit_softcapping": f"{a}.attn_logit_softcapping",
            "final_logit_softcapping": f"{a}.final_logit_softcapping",
        }
        found = {key: value for key, field in optional.items()
                 if (value := self.field(field)) is not None}
        if a in GGUF_GEMMA_ARCHS:
            found["query_pre_attn_scalar"] = self.field(f"{a}.attention.key_length")
        return found

    def weights(self, config: PretrainedConfig) -> Iterator[tuple[str, torch.Tensor]]:
        permuted = self.arch == "llama"  # llama.cpp permutes q/k only for this architecture
        for tensor in self.reader.tensors:
            name = gguf_to_hf_name(tensor.name, self.arch)
            array = self._gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            weight = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32).copy())
            if self.arch in GGUF_GEMMA_ARCHS and name.endswith("norm.weight"):
                weight -= 1.0
            if permuted and ".q_proj." in name:
                weight = unpermute_rotary_rows(weight, config.num_attention_heads)
            elif permuted and ".k_proj." in name:
                weight = unpermute_rotary_rows(weight, config.num_key_value_heads)
            yield name, weight
