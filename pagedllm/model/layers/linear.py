"""Linear layers: the run-time layout of weights, and fused projections loaded in pieces.

A fused projection (q|k|v, gate|up) is one matmul at run time but several tensors in a
checkpoint; `MergedLinear` knows where each piece goes:

    weight rows:  [ q (heads*dim) | k (kv_heads*dim) | v (kv_heads*dim) ]

After loading, `Linear.prepare_for_inference()` may repack the weight into oneDNN's blocked
layout on CPU (bfloat16): the same numbers, tiled for the matmul kernel, which then skips the
per-call reorder. That is worth most at decode sizes: a one-row product runs several times
faster than from the plain row-major weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACK_BATCH_HINT = 128  # rows oneDNN tunes the packed layout for; any row count works


class Linear(nn.Linear):
    packed_weight: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is not None and x.dtype == self.packed_weight.dtype:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none",
                                                      [], "")
        return F.linear(x, self.weight, self.bias)

    def prepare_for_inference(self) -> None:
        """Pack the weight for oneDNN where that is available (CPU, bfloat16)."""
        weight = self.weight
        if weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
            return
        if not torch.backends.mkldnn.is_available():
            return
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(),
                                                                    PACK_BATCH_HINT)


class MergedLinear(Linear):
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


def prepare_for_inference(model: nn.Module) -> None:
    """Run-time weight layouts, once every weight is loaded."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.prepare_for_inference()
