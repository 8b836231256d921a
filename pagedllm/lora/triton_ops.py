"""Triton kernels for the LoRA delta on CUDA: every row of the flat batch at once, each row
reading its own slot's matrices (the slot index per row; -1: the base model, no delta).

    shrink   grid (row, rank tile)    h[row, j]   = sum_k x[row, k] * A[slot[row], j, k]
    expand   grid (row, output tile)  out[row, n] += sum_j h[row, j] * B[slot[row], j, n]

A and B are the LoRA layer's stacked slot tensors (model/layers/lora.py): A [slots, R, in] and
B [slots, R, out], R = pieces * max_rank, rows past what a slot uses are zero, so every slot
reads all R rows and the padding adds nothing. Accumulation is fp32; h is kept in fp32 between
the two launches. A row of the base model returns at once (its h is never read).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_K = 64  # input features per inner step of the shrink
BLOCK_N = 64  # output features per expand program


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, h_ptr, slots_ptr, in_features, rank_rows,
                   stride_x, stride_a_slot, stride_a_row, stride_h,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    slot = tl.load(slots_ptr + row)
    if slot < 0:
        return
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    a_base = a_ptr + slot.to(tl.int64) * stride_a_slot
    for k0 in range(0, in_features, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_x + ks, mask=ks < in_features, other=0.0)
        a = tl.load(a_base + ranks[:, None] * stride_a_row + ks[None, :],
                    mask=(ranks[:, None] < rank_rows) & (ks[None, :] < in_features), other=0.0)
        acc += tl.sum(a.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    tl.store(h_ptr + row * stride_h + ranks, acc, mask=ranks < rank_rows)


@triton.jit
def _expand_kernel(h_ptr, b_ptr, out_ptr, slots_ptr, out_features, rank_rows,
                   stride_h, stride_b_slot, stride_b_row, stride_out,
                   BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    slot = tl.load(slots_ptr + row)
    if slot < 0:
        return
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    b_base = b_ptr + slot.to(tl.int64) * stride_b_slot
    for r0 in range(0, rank_rows, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        h = tl.load(h_ptr + row * stride_h + ranks, mask=ranks < rank_rows, other=0.0)
        b = tl.load(b_base + ranks[:, None] * stride_b_row + cols[None, :],
                    mask=(ranks[:, None] < rank_rows) & (cols[None, :] < out_features), other=0.0)
        acc += tl.sum(b.to(tl.float32) * h[:, None], axis=0)
    mask = cols < out_features
    out = tl.load(out_ptr + row * stride_out + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_out + cols, (out.to(tl.float32) + acc).to(out.dtype),
             mask=mask)


def lora_delta_triton(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                      lora_b: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """out[row] += x[row] @ A[slots[row]].T @ B[slots[row]] in place, for rows with a slot."""
    rows, in_features = x.shape
    rank_rows, out_features = lora_b.shape[1], lora_b.shape[2]
    x, out = x.contiguous(), out if out.is_contiguous() else out.contiguous()
    h = torch.empty(rows, rank_rows, dtype=torch.float32, device=x.device)
    block_r = max(16, triton.next_power_of_2(min(rank_rows, 64)))
    _shrink_kernel[(rows, triton.cdiv(rank_rows, block_r))](
        x, lora_a, h, slots, in_features, rank_rows, x.stride(0), lora_a.stride(0),
        lora_a.stride(1), h.stride(0), BLOCK_R=block_r, BLOCK_K=BLOCK_K)
    _expand_kernel[(rows, triton.cdiv(out_features, BLOCK_N))](
        h, lora_b, out, slots, out_features, rank_rows, h.stride(0), lora_b.stride(0),
        lora_b.stride(1), out.stride(0), BLOCK_R=block_r, BLOCK_N=BLOCK_N)
    return out
