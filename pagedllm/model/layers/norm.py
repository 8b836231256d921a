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


class GemmaRMSNorm(RMSNorm):
    """Gemma's y = x / rms(x) * (1 + w), with the + 1 folded into the weight at load.

    Checkpoints store w (zero-centred); the model keeps `fold(w)` = 1 + w, so at run time this
    is a plain RMSNorm and takes the same fused add+norm kernel. transformers computes it all in
    float32 and rounds once: (x / rms * (1 + w.float())).to(dtype). In a float32 model the fold
    is exactly that (1 + w is formed in float32 either way). In bfloat16 the kernel rounds x / rms
    before multiplying by a rounded 1 + w: about a third of the outputs land an ulp or two from
    transformers'. On tiny random bfloat16 Gemma models that was invisible end to end (the worst
    logprob gap to transformers stayed ~0.03 with an exact float32 norm swapped in: matmul
    rounding sets it), so we keep the one fused pass instead of a slower float32 norm.
    """

    @staticmethod
    def fold(checkpoint_weight: torch.Tensor) -> torch.Tensor:
        """The weight to keep for a checkpoint's w: 1 + w, formed in float32."""
        return checkpoint_weight.float() + 1.0

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # The PyTorch path multiplies in float32 before rounding, as transformers does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)
