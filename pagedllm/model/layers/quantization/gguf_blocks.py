"""llama.cpp's block formats: their sizes, and their values computed in PyTorch.

A weight row of K values is K / block_values blocks, back to back; every block carries its own
fp16 scale (and minimum) and its values as small integers (csrc/gguf_linear.cpp draws each
layout byte by byte). These functions are the device-independent path: a GPU, or a CPU without
the C++ kernels, dequantizes a layer's blocks on every call and runs a float matmul; the
embedding dequantizes only the rows it looks up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class BlockFormat:
    name: str
    values: int  # values per block
    bytes: int  # bytes per block

    def row_bytes(self, values: int) -> int:
        if values % self.values:
            raise ValueError(f"a row of {values} values is not a whole number of "
                             f"{self.values}-value {self.name} blocks")
        return values // self.values * self.bytes


# ggml_type id -> format (ggml.h's enum ggml_type)
BLOCK_FORMATS = {
    2: BlockFormat("Q4_0", 32, 18),
    3: BlockFormat("Q4_1", 32, 20),
    8: BlockFormat("Q8_0", 32, 34),
    12: BlockFormat("Q4_K", 256, 144),
    13: BlockFormat("Q5_K", 256, 176),
    14: BlockFormat("Q6_K", 256, 210),
}
FLOAT_TYPES = {0: "F32", 1: "F16", 30: "BF16"}  # stored as floats: loaded as a float model's


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at byte `start` of every block, as float32 [..., blocks, 1]."""
    return blocks[..., start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Bytes [..., n] -> their low nibbles then their high nibbles, [..., 2, n]."""
    return torch.stack([qs & 0xF, qs >> 4], dim=-2).float()


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    return (_nibbles(b[..., 2:18]).flatten(-2) - 8) * _f16(b, 0)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _nibbles(b[..., 4:20]).flatten(-2) * _f16(b, 0) + _f16(b, 2)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[..., 2:34].contiguous().view(torch.int8).float() * _f16(b, 0)


def _k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins, [..., 8] each.

    bytes 0-3: scale j (low 6 bits) | bytes 4-7: min j (low 6 bits) | bytes 8-11: scale j+4 in
    the low nibble, min j+4 in the high; the top 2 bits of bytes 0-7 are the top 2 bits of
    scale/min j+4."""
    s = packed.int()
    scale = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)], -1)
    low_min = s[..., 4:8] & 63
    high_min = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return scale.float(), torch.cat([low_min, high_min], -1).float()


def _k_quant(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K from their 8 sub-blocks of 32 integers q [..., 8, 32]."""
    scale, minimum = _k_scales(b[..., 4:16])
    d, dmin = _f16(b, 0), _f16(b, 2)
    values = q * (d * scale).unsqueeze(-1) - (dmin * minimum).unsqueeze(-1)
    return values.flatten(-2)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    # bytes 32j..32j+31: sub-block 2j in the low nibbles, 2j+1 in the high
    qs = b[..., 16:144].unflatten(-1, (4, 32))
    return _k_quant(b, _nibbles(qs).flatten(-3, -2))


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    qs = b[..., 48:176].unflatten(-1, (4, 32))
    shifts = torch.arange(8, device=b.device, dtype=torch.int32).unsqueeze(-1)
    fifth = (b[..., 16:48].int().unsqueeze(-2) >> shifts) & 1  # [..., 8, 32]: bit s of byte l
    return _k_quant(b, _nibbles(qs).flatten(-3, -2) + 16 * fifth.float())


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    # per half of 128: ql[l] / ql[l+32] low nibbles are values l / l+32, high nibbles l+64 /
    # l+96; qh[l] bits (2a + 4h, +1) top up the value from nibble h of ql[l + 32a]
    ql = b[..., 0:128].unflatten(-1, (2, 2, 32)).int()  # [..., half, a, l]
    qh = b[..., 128:192].unflatten(-1, (2, 1, 1, 32)).int()  # [..., half, 1, 1, l]
    low = torch.stack([ql & 0xF, ql >> 4], dim=-3)  # [..., half, nibble h, a, l]
    shifts = torch.tensor([[0, 2], [4, 6]], device=b.device, dtype=torch.int32).unsqueeze(-1)
    q = (low | (((qh >> shifts) & 3) << 4)) - 32
    scales = b[..., 192:208].contiguous().view(torch.int8).float().repeat_interleave(16, dim=-1)
    return q.flatten(-4).float() * scales * _f16(b, 208)


DEQUANTIZERS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    2: _q4_0, 3: _q4_1, 8: _q8_0, 12: _q4_k, 13: _q5_k, 14: _q6_k,
}


def dequantize(rows: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """uint8 rows [..., bytes_per_row] of blocks -> float32 [..., values_per_row]."""
    fmt = BLOCK_FORMATS[ggml_type]
    blocks = rows.unflatten(-1, (rows.shape[-1] // fmt.bytes, fmt.bytes))
    return DEQUANTIZERS[ggml_type](blocks).flatten(-2)
