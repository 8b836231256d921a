"""The one run-time layout of 4- and 8-bit integer weights (GPTQ, AWQ, compressed-tensors
pack-/int-quantized), and the linear product on it: the C++ kernel on CPU, dequantize-then-matmul
anywhere else.

Every format is unpacked once at prepare_for_inference into unsigned codes q [N, K] (N output,
K input channels), per-group scales and zero points, and an optional input-channel order, then
packed here:

    4 bits  qweight uint8 [N, K/2]; every 32 input channels are 16 bytes,
            byte j = channel j (low nibble) | channel 16 + j (high nibble)
    8 bits  qweight uint8 [N, K]
    scales float16, bfloat16 or float32, zeros uint8, both [N, K / group_size];
            w[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g]
            (scales are kept in the narrowest of those types that holds every one exactly:
            checkpoints store fp16 or bf16 scales, and float32 ones would add a bit per weight at
            group_size 32, 13% over a GPTQ file; a zero point is a code, so one byte: 3 bytes
            per group, 0.75 bits a weight at group_size 32)
    perm    int64 [K] or None: desc_act / actorder checkpoints give each input channel a group
            out of order (g_idx); the channels are sorted by group so that every group is
            contiguous, and x's columns are put in the same order at run time (x[:, perm]).

Why the nibble order within a 32-channel block: one widening load of bytes yields whole
vectors of consecutive channels at every ISA level (csrc/int_linear.cpp).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pagedllm.ops.cpu import kernels_for
from pagedllm.platform.cpu import cpu_info

BLOCK = 32  # input channels per 16-byte block of 4-bit codes


@dataclass(slots=True)
class IntWeight:
    qweight: torch.Tensor  # uint8, see the module docstring
    scales: torch.Tensor  # float16 / bfloat16 / float32 [N, groups]
    zeros: torch.Tensor  # uint8 [N, groups]: the code that means 0
    bits: int
    group_size: int  # input channels per group (K for one group per row)
    in_features: int
    perm: torch.Tensor | None = None  # int64 [K]: x[:, perm] lines x up with the codes

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def nbytes(self) -> int:
        tensors = [self.qweight, self.scales, self.zeros]
        if self.perm is not None:
            tensors.append(self.perm)
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def kernel_runs(self) -> bool:
        """Whether csrc/int_linear.cpp takes this layout (blocks never straddle a group)."""
        return self.group_size % BLOCK == 0 and self.in_features % self.group_size == 0


def pack_int_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                    group_size: int, g_idx: torch.Tensor | None = None) -> IntWeight:
    """codes [N, K]: unsigned values below 2**bits; scales, zeros [N, groups]; g_idx [K]: each
    input channel's group where the checkpoint has one (None: channel k is in group
    k // group_size)."""
    if bits not in (4, 8):
        raise ValueError(f"{bits}-bit weights are not supported; 4 and 8 are")
    n_dim, k_dim = codes.shape
    groups = -(-k_dim // group_size)
    if scales.shape != (n_dim, groups) or zeros.shape != (n_dim, groups):
        raise ValueError(f"scales and zeros must be [{n_dim}, {groups}] for group_size "
                         f"{group_size}, got {tuple(scales.shape)} and {tuple(zeros.shape)}")
    if zeros.min() < 0 or zeros.max() > 255:
        raise ValueError(f"zero points must be codes in [0, 255], got {zeros.min().item()} to "
                         f"{zeros.max().item()}")
    perm = group_order(g_idx, k_dim, group_size)
    if perm is not None:
        codes = codes[:, perm]
    return IntWeight(qweight=pack_codes(codes, bits), scales=compact_scales(scales),
                     zeros=zeros.to(torch.uint8).contiguous(), bits=bits, group_size=group_size,
                     in_features=k_dim, perm=perm)


def compact_scales(scales: torch.Tensor) -> torch.Tensor:
    """The scales in the narrowest float type that holds every one of them exactly."""
    for dtype in (torch.float16, torch.bfloat16):
        narrow = scales.to(dtype)
        if torch.equal(narrow.float(), scales.float()):
            return narrow.contiguous()
    return scales.float().contiguous()


def group_order(g_idx: torch.Tensor | None, k_dim: int, group_size: int) -> torch.Tensor | None:
    """The input-channel order that makes each group contiguous, None when it already is."""
    if g_idx is None:
        return None
    g_idx = g_idx.to(torch.int64)
    expected = torch.arange(k_dim, device=g_idx.device) // group_size
    if torch.equal(g_idx, expected):
        return None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], expected):
        raise ValueError(f"g_idx does not put exactly group_size={group_size} input channels "
                         f"in each group")
    return perm


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    n_dim, k_dim = codes.shape
    padded = F.pad(codes, (0, -k_dim % BLOCK)).view(n_dim, -1, 2, BLOCK // 2)
    return (padded[:, :, 0] | (padded[:, :, 1] << 4)).reshape(n_dim, -1).contiguous()


def unpack_codes(weight: IntWeight) -> torch.Tensor:
    """The codes [N, K] as packed (in perm order), uint8."""
    q = weight.qweight
    if weight.bits == 8:
        return q
    blocks = q.view(q.shape[0], -1, BLOCK // 2)
    return torch.cat([blocks & 15, blocks >> 4], dim=-1).reshape(q.shape[0], -1)[
        :, : weight.in_features]


def dequantize(weight: IntWeight, dtype: torch.dtype) -> torch.Tensor:
    """The float weight [N, K] in perm order, computed as the kernel does: (q - zero) * scale in
    float32, rounded to dtype once."""
    k_dim = weight.in_features
    scales = weight.scales.float().repeat_interleave(weight.group_size, dim=1)[:, :k_dim]
    zeros = weight.zeros.float().repeat_interleave(weight.group_size, dim=1)[:, :k_dim]
    return ((unpack_codes(weight).float() - zeros) * scales).to(dtype)


def int_linear(x: torch.Tensor, weight: IntWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T + bias for x [..., K]; the result has x's dtype."""
    if weight.perm is not None:
        x = x.index_select(-1, weight.perm)
    rows = x.reshape(-1, weight.in_features)
    ops = kernels_for(rows) if weight.kernel_runs else None
    if ops is None:  # CUDA, float16, no compiler, or an odd group size: dequantize, matmul
        out = F.linear(rows, dequantize(weight, rows.dtype))
    else:
        rows = rows.contiguous()
        out = rows.new_empty(rows.shape[0], weight.out_features)
        ops.int_linear(out, rows, weight.qweight, weight.scales, weight.zeros, weight.bits,
                       weight.group_size, bf16_gemm=cpu_info().onednn_bf16)
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], weight.out_features)


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Codes packed LSB first into int32 along `dim` (32 // bits per word), as int32."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    shape = [1] * (packed.dim() + 1)
    shape[dim + 1] = -1
    codes = (packed.unsqueeze(dim + 1) >> shifts.view(shape)) & ((1 << bits) - 1)
    return codes.flatten(dim, dim + 1)
