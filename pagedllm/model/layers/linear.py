"""Linear layers whose checkpoint weights arrive in pieces.

A fused projection (q|k|v, gate|up) is one matmul at run time but several tensors in a
checkpoint; `MergedLinear` knows where each piece goes:

    weight rows:  [ q (heads*dim) | k (kv_heads*dim) | v (kv_heads*dim) ]
"""

from __future__ import annotations

import torch
from torch import nn


class MergedLinear(nn.Linear):
    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = output_sizes
        self.offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]

    def load_shard(self, param_name: str, shard: int, tensor: torch.Tensor) -> None:
        target = getattr(self, param_name)
        start, size = self.offsets[shard], self.output_sizes[shard]
        if tensor.shape[0] != size:
            raise ValueError(f"shard {shard} of {param_name} has {tensor.shape[0]} rows, "
                             f"expected {size}")
        with torch.no_grad():
            target[start : start + size].copy_(tensor)
