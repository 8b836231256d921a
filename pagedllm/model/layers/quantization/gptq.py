"""GPTQ checkpoints (AutoGPTQ / GPTQModel / optimum), 4 or 8 bits, served packed.

The tensors of one linear layer, K input and N output channels, pack = 32 // bits:

    qweight  int32 [K / pack, N]   input channel k of column n in word k // pack at bits
                                   (k % pack) * bits, least significant first
    qzeros   int32 [G, N / pack]   group g's zero point of column n, packed the same way along N
    scales   fp16  [G, N]          G = ceil(K / group_size), or 1 with group_size -1
    g_idx    int32 [K]             the group of each input channel: k // group_size, or with
                                   desc_act (act-order) the order GPTQ quantized them in
    bias     fp16  [N]             where the original layer had one

    w[n, k] = (q[k, n] - zero[g, n]) * scale[g, n],  g = g_idx[k]

checkpoint_format "gptq" (v1, AutoGPTQ's) stores every zero point minus one (the kernels add
it back), "gptq_v2" stores it as is. sym only says every zero is 2**(bits - 1): the stored
qzeros are used either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedllm.model.layers.linear import Linear
from pagedllm.model.layers.quantization.base import QuantizationMethod
from pagedllm.model.layers.quantization.int_weight import (
    IntWeight,
    pack_int_weight,
    unpack_int32,
)
from pagedllm.model.layers.quantization.packed_linear import (
    PackedLinear,
    check_bits,
    group_count,
)
from pagedllm.model.source import ModelSource


@dataclass(frozen=True, slots=True)
class GPTQSettings:
    bits: int
    group_size: int  # -1: one group per row
    desc_act: bool
    sym: bool
    zero_offset: int  # added to every stored zero point: 1 for the v1 format, 0 for v2


class GPTQQuantization(QuantizationMethod):
    name = "gptq"

    def __init__(self, settings: GPTQSettings, skip: frozenset[str] = frozenset()) -> None:
        self.settings = settings
        self.skip = skip  # module names the checkpoint left float

    @classmethod
    def from_checkpoint(cls, hf_config: PretrainedConfig, source: ModelSource) -> GPTQQuantization:
        config = quantization_config(hf_config)
        checkpoint_format = str(config.get("checkpoint_format", "gptq")).lower()
        if config.get("is_marlin_format"):  # AutoGPTQ's older flag for the same thing
            checkpoint_format = "marlin"
        if checkpoint_format not in ("gptq", "gptq_v2"):
            raise ValueError(f"GPTQ checkpoint_format {checkpoint_format!r} is not supported; "
                             f"supported: gptq (v1), gptq_v2")
        settings = GPTQSettings(
            bits=check_bits(int(config.get("bits", 4)), (4, 8), "GPTQ"),
            group_size=int(config.get("group_size", 128)),
            desc_act=bool(config.get("desc_act", False)),
            sym=bool(config.get("sym", True)),
            zero_offset=1 if checkpoint_format == "gptq" else 0,
        )
        skip = frozenset(config.get("modules_not_to_convert") or ())
        return cls(settings, skip)

    def quantized_layer(self, prefix: str, layer: Linear, dtype: torch.dtype) -> nn.Module | None:
        if prefix.endswith("lm_head") or prefix.rpartition(".")[2] in self.skip:
            return None
        return GPTQLinear(prefix, layer, dtype, self.settings)

    def describe(self) -> str:
        s = self.settings
        return (f"gptq ({s.bits}-bit, group_size {s.group_size}, desc_act {s.desc_act}, "
                f"sym {s.sym}, {'v1' if s.zero_offset else 'v2'} zero points)")


def quantization_config(hf_config: PretrainedConfig) -> dict:
    config = hf_config.quantization_config
    return config if isinstance(config, dict) else config.to_dict()


class GPTQLinear(PackedLinear):
    def __init__(self, prefix: str, layer: Linear, dtype: torch.dtype,
                 settings: GPTQSettings) -> None:
        super().__init__(prefix, layer, dtype)
        self.settings = settings
        pack = 32 // settings.bits
        k_dim, n_dim = self.in_features, self.out_features
        groups = group_count(k_dim, settings.group_size)
        if k_dim % pack or n_dim % pack:
            raise ValueError(f"{prefix}: {k_dim}x{n_dim} does not pack into {settings.bits}-bit "
                             f"int32 words")
        self.add("qweight", torch.empty(k_dim // pack, n_dim, dtype=torch.int32))
        self.add("qzeros", torch.empty(groups, n_dim // pack, dtype=torch.int32))
        self.add("scales", torch.empty(groups, n_dim, dtype=torch.float16))
        self.add("g_idx", torch.empty(k_dim, dtype=torch.int32))
        self.g_idx_shards: set[int] = set()

    def output_dim(self, name: str) -> tuple[int, int]:
        if name == "bias":
            return 0, 1
        return 1, (32 // self.settings.bits if name == "qzeros" else 1)

    def load_shard(self, param_name: str, shard: int, tensor: torch.Tensor) -> None:
        if param_name != "g_idx":
            return super().load_shard(param_name, shard, tensor)
        # every shard of a fused layer reads the same input, so must order it the same way
        self.check_shape("g_idx", tensor, tuple(self.g_idx.shape), shard)
        if self.g_idx_shards and not torch.equal(self.g_idx, tensor.to(self.g_idx.dtype)):
            raise ValueError(f"{self.prefix}: the fused projections' g_idx differ; one act "
                             f"order per input is required")
        with torch.no_grad():
            self.g_idx.copy_(tensor)
        self.g_idx_shards.add(shard)
        return None

    def describe(self) -> str:
        s = self.settings
        return f"GPTQ {s.bits}-bit, group_size {s.group_size}"

    def repack(self) -> IntWeight:
        bits, k_dim = self.settings.bits, self.in_features
        codes = unpack_int32(self.qweight, bits, dim=0).t()  # [N, K]
        zeros = unpack_int32(self.qzeros, bits, dim=1).t() + self.settings.zero_offset
        group_size = self.settings.group_size if self.settings.group_size > 0 else k_dim
        return pack_int_weight(codes, self.scales.t(), zeros.float(), bits, group_size,
                               g_idx=self.g_idx)
