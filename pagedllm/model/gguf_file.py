"""GGUF files: llama.cpp's metadata as an HF config, and its tensors under HF names."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, PretrainedConfig

from pagedllm.model.registry import GGUF_ARCHITECTURES

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
    """One open GGUF file: its metadata as an HF config, and its tensors (dequantized, or
    as stored for model/layers/quantization/gguf.py)."""

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

    def tensor_types(self) -> dict[str, int]:
        """HF weight name -> the ggml type id the file stores it in."""
        return {gguf_to_hf_name(t.name, self.arch): int(t.tensor_type) for t in self.reader.tensors}

    def weights(self, config: PretrainedConfig,
                keep_quantized: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor) for every tensor: float32, or with keep_quantized the quantized
        ones as their raw blocks, uint8 [rows, bytes_per_row] (F32/F16/BF16 stay float)."""
        permuted = self.arch == "llama"  # llama.cpp permutes q/k only for this architecture
        for tensor in self.reader.tensors:
            name = gguf_to_hf_name(tensor.name, self.arch)
            weight = self._tensor(tensor, keep_quantized)
            if self.arch in GGUF_GEMMA_ARCHS and name.endswith("norm.weight"):
                weight -= 1.0
            # whole rows move, so the permutation works on rows of packed blocks as well
            if permuted and ".q_proj." in name:
                weight = unpermute_rotary_rows(weight, config.num_attention_heads)
            elif permuted and ".k_proj." in name:
                weight = unpermute_rotary_rows(weight, config.num_key_value_heads)
            yield name, weight

    def _tensor(self, tensor, keep_quantized: bool) -> torch.Tensor:
        quant = self._gguf.GGMLQuantizationType
        if keep_quantized and tensor.tensor_type not in (quant.F32, quant.F16, quant.BF16):
            return torch.from_numpy(np.array(tensor.data, dtype=np.uint8))  # a copy: rows move
        array = self._gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32).copy())
