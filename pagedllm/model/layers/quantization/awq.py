"""AWQ checkpoints (AutoAWQ's GEMM format, as transformers and vLLM load them), served packed.

The tensors of one linear layer, K input and N output channels, 4 bits:

    qweight  int32 [K, N / 8]   eight output channels per word, in AWQ's interleaved order:
                                nibble i (bits 4i..4i+3) of word j holds column 8j + ORDER[i]
    qzeros   int32 [G, N / 8]   group g's zero points, packed the same way (no offset)
    scales   fp16  [G, N]       G = K / group_size
    bias     fp16  [N]          where the original layer had one

    w[n, k] = (q[k, n] - zero[g, n]) * scale[g, n],  g = k // group_size

The GEMV format (qweight [N, K / 8]) and other bit widths are refused at load.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedllm.model.layers.linear import Linear
from pagedllm.model.layers.quantization.base import QuantizationMethod
from pagedllm.model.layers.quantization.gptq import quantization_config
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

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i holds column AWQ_ORDER[i] of its eight
# column c of eight sits in nibble AWQ_NIBBLE[c] (the inverse of AWQ_ORDER)
AWQ_NIBBLE = tuple(AWQ_ORDER.index(c) for c in range(8))
PACK = 8


class AWQQuantization(QuantizationMethod):
    name = "awq"

    def __init__(self, group_size: int, skip: frozenset[str] = frozenset()) -> None:
        self.group_size = group_size
        self.skip = skip

    @classmethod
    def from_checkpoint(cls, hf_config: PretrainedConfig, source: ModelSource) -> AWQQuantization:
        config = quantization_config(hf_config)
        check_bits(int(config.get("bits", config.get("w_bit", 4))), (4,), "AWQ")
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"AWQ version {version!r} is not supported; supported: gemm")
        group_size = int(config.get("group_size", config.get("q_group_size", 128)))
        return cls(group_size, frozenset(config.get("modules_to_not_convert") or ()))

    def quantized_layer(self, prefix: str, layer: Linear, dtype: torch.dtype) -> nn.Module | None:
        if prefix.endswith("lm_head") or any(name in prefix for name in self.skip):
            return None
        return AWQLinear(prefix, layer, dtype, self.group_size)

    def describe(self) -> str:
        return f"awq (4-bit GEMM, group_size {self.group_size})"


class AWQLinear(PackedLinear):
    def __init__(self, prefix: str, layer: Linear, dtype: torch.dtype, group_size: int) -> None:
        super().__init__(prefix, layer, dtype)
        k_dim, n_dim = self.in_features, self.out_features
        self.group_size = group_size if group_size > 0 else k_dim
        groups = group_count(k_dim, group_size)
        if n_dim % PACK:
            raise ValueError(f"{prefix}: {n_dim} outputs do not pack eight to an int32")
        self.add("qweight", torch.empty(k_dim, n_dim // PACK, dtype=torch.int32))
        self.add("qzeros", torch.empty(groups, n_dim // PACK, dtype=torch.int32))
        self.add("scales", torch.empty(groups, n_dim, dtype=torch.float16))

    def output_dim(self, name: str) -> tuple[int, int]:
        if name == "bias":
            return 0, 1
        return 1, (1 if name == "scales" else PACK)

    def describe(self) -> str:
        return f"AWQ 4-bit, group_size {self.group_size}"

    def repack(self) -> IntWeight:
        codes = awq_unpack(self.qweight).t()  # [N, K]
        zeros = awq_unpack(self.qzeros).t()  # [N, G]
        return pack_int_weight(codes, self.scales.t(), zeros.float(), 4,
                               self.group_size)


def awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """[rows, N / 8] AWQ words -> [rows, N] codes in plain column order."""
    nibbles = unpack_int32(packed, 4, dim=1).view(packed.shape[0], -1, PACK)
    order = torch.tensor(AWQ_NIBBLE, device=packed.device)
    return nibbles.index_select(2, order).reshape(packed.shape[0], -1)
