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


# transformers' activation names -> F.gelu's `approximate`
GELU_APPROXIMATIONS = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu": "none"}


class GeluAndMul(nn.Module):
    """GeGLU on a fused gate_up projection: gelu(gate) * up (Gemma's MLP)."""

    def __init__(self, activation: str = "gelu_pytorch_tanh") -> None:
        super().__init__()
        self.gelu = Gelu(activation)

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.gelu(gate) * up


class Gelu(nn.Module):
    """GELU as transformers names it (an encoder's MLP: BERT)."""

    def __init__(self, activation: str = "gelu") -> None:
        super().__init__()
        if activation not in GELU_APPROXIMATIONS:
            raise ValueError(f"unsupported activation {activation!r}; "
                             f"supported: {', '.join(GELU_APPROXIMATIONS)}")
        self.approximate = GELU_APPROXIMATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)
