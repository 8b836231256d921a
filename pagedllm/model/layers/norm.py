import torch
from torch import nn

from pagedllm.ops.cpu import kernels_for


class RMSNorm(nn.Module):
    """y = x / rms(x) * w, computed in float32 like transformers, then cast back.

    With `residual`, it is the decoder's "add, then normalize": residual + x becomes the new
    residual and its norm the output, fused into one pass on CPU (x and residual are updated in
    place there).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        ops = kernels_for(x, self.weight)
        if ops is not None and x.is_contiguous():
            if residual is None:
                out = torch.empty_like(x)
                ops.rms_norm(out, x, self.weight, self.eps)
                return out
            ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
            return x, residual
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)
