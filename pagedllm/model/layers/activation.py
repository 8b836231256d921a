import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.ops.cpu import kernels_for


class SiluAndMul(nn.Module):
    """SwiGLU on a fused gate_up projection: silu(gate) * up (one pass on CPU)."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        ops = kernels_for(gate_up)
        if ops is not None and gate_up.is_contiguous():
            out = gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)
            ops.silu_and_mul(out, gate_up)
            return out
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
