"""Linear layers: the run-time layout of weights, and fused projections loaded in pieces.

A fused projection (q|k|v, gate|up) is one matmul at run time but several tensors in a
checkpoint; `MergedLinear` knows where each piece goes:

    weight rows:  [ q (heads*dim) | k (kv_heads*dim) | v (kv_heads*dim) ]

After loading, `Linear.prepare_for_inference()` picks how a bfloat16 weight runs on CPU:

- oneDNN can run bf16 here (AVX-512 BW/VL/DQ or AVX-NE-CONVERT; see platform/cpu.py): the
  weight is repacked into oneDNN's blocked layout, the same numbers tiled for its matmul kernel,
  which then skips the per-call reorder. That is worth most at decode sizes: a one-row product
  runs several times faster than from the plain row-major weight.
- it cannot (AVX2-only CPUs): the weight stays bf16 and the C++ `bf16_linear` computes in
  float32 (csrc/linear.cpp): half the bytes of a float32 weight, float32 FMAs. A bf16 matmul
  there would run at under 1 GFLOP/s, and oneDNN's repack raises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.logger import init_logger
from pagedllm.ops.cpu import cpu_ops
from pagedllm.platform.cpu import cpu_info

logger = init_logger(__name__)

PACK_BATCH_HINT = 128  # rows oneDNN tunes the packed layout for; any row count works


class Linear(nn.Linear):
    packed_weight: torch.Tensor | None = None  # oneDNN's blocked layout of a bf16 weight
    float32_compute: bool = False  # bf16 weight, float32 arithmetic (CPUs without oneDNN bf16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is not None and x.dtype == self.packed_weight.dtype:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none",
                                                      [], "")
        if self.float32_compute and x.dtype == torch.bfloat16:
            return bf16_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def prepare_for_inference(self) -> None:
        """Choose how a CPU bf16 weight runs: oneDNN's packed layout where this CPU runs bf16,
        else float32 arithmetic on the bf16 weight (see the module docstring)."""
        weight = self.weight
        if weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
            return
        if cpu_info().onednn_bf16 and torch.backends.mkldnn.is_available():
            try:
                self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(),
                                                                            PACK_BATCH_HINT)
                return
            except RuntimeError as exc:  # the probe said yes, oneDNN says no: never crash
                logger.warning("oneDNN cannot pack bf16 weights here (%s); computing in "
                               "float32", exc)
        self.float32_compute = True


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias for bf16 x and weight, in float32 arithmetic, rounded to bf16 once."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    ops = cpu_ops()
    if ops is None:  # no compiler here: the same numbers from PyTorch's float32 matmul
        out = F.linear(rows.float(), weight.float(), None if bias is None else bias.float())
        return out.to(torch.bfloat16).view(*x.shape[:-1], weight.shape[0])
    out = rows.new_empty(rows.shape[0], weight.shape[0])
    ops.bf16_linear(out, rows, weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


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
    """Run-time weight layouts, once every weight is loaded: float Linear layers and the
    quantized layers that replace them (model/layers/quantization/) each know their own."""
    for module in model.modules():
        prepare = getattr(module, "prepare_for_inference", None)
        if callable(prepare) and module is not model:
            prepare()
