"""Triton kernels for paged attention on CUDA: writing K/V by slot, decode, prefill chunks.

Memory layout (one pair of pools per layer; a token's slot is `block_id * block_size + offset`):

    key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim]

    a sequence's block_table: [7, 2, 9]                      (block_size 4 here)
    positions   0  1  2  3 | 4  5  6  7 | 8  9
    pool block  ---- 7 ----  ---- 2 ----  - 9 -
    each position: [num_kv_heads, head_dim], head_dim contiguous (the unit of a vector load)

Every kernel walks the context in tiles of TILE_N token positions. A tile gathers its tokens'
block ids from the block table (tile and block need not align: a tile of 64 covers four blocks of
16, or a quarter of a block of 256), then loads a [TILE_N, head_dim] slab of K and of V.

GQA without repeating K/V: one program serves every query head of one KV head, so each K/V tile is
read once for the whole group. Query rows are token-major: row r is token r // GROUP, head
kv_head * GROUP + r % GROUP.

Decode (one query token per sequence), split over the context ("flash decoding"):

    context   |<--- partition 0 --->|<--- partition 1 --->|<-- partition 2 ...
    tiles     [TILE_N][TILE_N] ...
    stage 1   grid (seq, kv_head, partition): online softmax over the partition's tiles
              -> part_max, part_sum [seq, head, P] and unnormalised part_acc [seq, head, P, D]
    stage 2   grid (seq, head): M = max_p m_p
              out = sum_p 2^(m_p - M) acc_p / sum_p 2^(m_p - M) l_p

The number of partitions P comes from the block table's width (its shape, never its contents),
so one long sequence still spreads over many programs and the launch is CUDA-graph capturable.
With one partition stage 1 writes the output itself and stage 2 is not launched. Partitions past
a sequence's end write m = -inf, l = 0, which stage 2 weighs by zero; a padded row (seq_len 0)
comes out as zeros.

Prefill (chunks of new tokens whose earlier context is already in the cache): the host cuts every
chunk into tiles of TOKENS_PER_TILE queries (a `PrefillPlan`, built once per step and shared by all
layers); grid (tile, kv_head). A query at chunk index t sits at absolute position
context_len - query_len + t and sees keys j <= position (within the window, if any). Key tiles
wholly below the tile's first query are visible to every row and skip the causal mask.

Scores are kept in base 2 (scaled by log2(e)) so the softmax uses exp2; accumulation is fp32.

An fp8 cache (attention/kv_quant.py) reaches the kernels as its uint8 view with FP8 = 1 (e4m3)
or 2 (e5m2): `_widen_fp8` turns each byte into the value it codes through fp16's bit layout
(exact), the layer's K scale multiplies the scores and its V scale the output, both loaded from a
device tensor (scales_ptr: [k_scale, v_scale]) so a CUDA graph sees scales set after capture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedllm.attention.kv_quant import is_fp8, quantize

DEFAULT_PARTITION_SIZE = 512


@triton.jit
def _tanh(x):
    """tanh from one exp2 of a non-positive argument: stable, and the interpreter has it too."""
    t = tl.exp2(-2.8853900817779268 * tl.abs(x))  # exp(-2|x|) = 2^(-2 log2(e) |x|)
    r = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -r, r)


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation. UPCAST only under the interpreter: Triton 3.9's interpreter
    multiplies bf16 tiles as their raw integer bits. bf16 x bf16 products are exact in fp32, so
    the upcast computes what the GPU's bf16 MMA computes."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _widen_fp8(bits, FP8: tl.constexpr, DTYPE: tl.constexpr):
    """uint8 codes -> values in DTYPE. e5m2 is fp16's top byte; e4m3 (bias 7) moved into fp16's
    fields reads as the value x 2^-8, subnormals included, so one multiply by 256 restores it."""
    wide = bits.to(tl.uint16)
    if FP8 == 2:
        return (wide << 8).to(tl.float16, bitcast=True).to(tl.float32).to(DTYPE)
    half = ((wide & 0x80) << 8) | ((wide & 0x7F) << 7)
    return (half.to(tl.float16, bitcast=True).to(tl.float32) * 256.0).to(DTYPE)


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, H_PAD)[:, None]
    dims = tl.arange(0, D_PAD)[None, :]
    # slot < 0: a padding token. The slot is splatted before the comparison because the
    # interpreter turns `bool tile & bool scalar` into an int32 tile that tl.load rejects.
    real = (tl.full([H_PAD, D_PAD], 0, dtype=tl.int64) + slot) >= 0
    mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM) & real
    k = tl.load(key_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
    tl.store(key_cache_ptr + block * stride_kcb + offset * stride_kct + heads * stride_kch + dims,
             k, mask=mask)
    tl.store(value_cache_ptr + block * stride_vcb + offset * stride_vct + heads * stride_vch + dims,
             v, mask=mask)


@triton.jit
def _attend_tiles(
    q, q_pos, m_i, l_i, acc, lo, hi,
    table_ptr, key_cache_ptr, value_cache_ptr, kv_head,
    scale, soft_cap, sliding_window,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
    CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFT_CAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, FP8: tl.constexpr,
):
    """Online softmax of the query rows `q` over key positions [lo, hi), one tile per step.

    q_pos: each row's absolute position (for the causal and window masks). m_i is in base 2.
    `scale` already carries an fp8 cache's K scale; the caller applies its V scale to acc.
    """
    offs = tl.arange(0, TILE_N)
    dims = tl.arange(0, D_PAD)
    kv_head_offset = kv_head.to(tl.int64)
    for start in tl.range(lo, hi, TILE_N):
        tok = start + offs
        tok_ok = tok < hi
        block = tl.load(table_ptr + tok // BLOCK_SIZE, mask=tok_ok, other=0).to(tl.int64)
        in_block = (tok % BLOCK_SIZE).to(tl.int64)
        # Without padding columns, no column mask: the loads stay fully vectorised.
        kv_mask = tok_ok[:, None] if HEAD_DIM == D_PAD else tok_ok[:, None] & (dims[None, :] < HEAD_DIM)
        k = tl.load(key_cache_ptr + block[:, None] * stride_kb + in_block[:, None] * stride_kt
                    + kv_head_offset * stride_kh + dims[None, :], mask=kv_mask, other=0)
        if FP8:
            k = _widen_fp8(k, FP8, q.dtype)
        s = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST)
        if USE_SOFT_CAP:
            s = soft_cap * _tanh(s * (scale / soft_cap)) * 1.4426950408889634  # log2(e)
        else:
            s = s * (scale * 1.4426950408889634)
        visible = tok_ok[None, :]
        if CAUSAL:
            visible = visible & (tok[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            visible = visible & (tok[None, :] > q_pos[:, None] - sliding_window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet keeps m = -inf; subtract 0 instead so that it
        # gets p = 0 and alpha = 0 rather than NaN from (-inf) - (-inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(value_cache_ptr + block[:, None] * stride_vb + in_block[:, None] * stride_vt
                    + kv_head_offset * stride_vh + dims[None, :], mask=kv_mask, other=0)
        if FP8:
            v = _widen_fp8(v, FP8, q.dtype)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _decode_kernel(
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    q_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, seq_lens_ptr, scales_ptr,
    scale, soft_cap, sliding_window,
    stride_qs, stride_qh, stride_os, stride_oh, stride_bt,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    num_heads, num_partitions,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, PARTITION_SIZE: tl.constexpr,
    SPLIT: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFT_CAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, FP8: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, D_PAD)
    heads = kv_head * GROUP + rows
    mask = (rows < GROUP)[:, None] & (dims < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qs + heads[:, None] * stride_qh + dims[None, :],
                mask=mask, other=0.0)

    lo = part * PARTITION_SIZE
    hi = tl.minimum(lo + PARTITION_SIZE, seq_len)
    if USE_WINDOW:  # skip whole tiles before the window; the mask trims the first one
        first_visible = tl.maximum(seq_len - sliding_window, 0)
        lo = tl.maximum(lo, first_visible // TILE_N * TILE_N)
    q_pos = tl.zeros([GROUP_PAD], dtype=tl.int32) + (seq_len - 1)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], dtype=tl.float32)
    if FP8:
        scale = scale * tl.load(scales_ptr)
    # Decode needs no causal mask: keys stop at hi <= seq_len, the query's own position + 1.
    m_i, l_i, acc = _attend_tiles(
        q, q_pos, m_i, l_i, acc, lo, hi,
        block_tables_ptr + seq.to(tl.int64) * stride_bt, key_cache_ptr, value_cache_ptr, kv_head,
        scale, soft_cap, sliding_window,
        stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        HEAD_DIM, D_PAD, BLOCK_SIZE, TILE_N, False, USE_WINDOW, USE_SOFT_CAP, DOT_PRECISION, UPCAST,
        FP8,
    )
    if FP8:
        acc = acc * tl.load(scales_ptr + 1)
    if SPLIT:
        part_rows = (seq * num_heads + heads).to(tl.int64) * num_partitions + part
        tl.store(part_max_ptr + part_rows, m_i, mask=rows < GROUP)
        tl.store(part_sum_ptr + part_rows, l_i, mask=rows < GROUP)
        tl.store(part_acc_ptr + part_rows[:, None] * HEAD_DIM + dims[None, :], acc, mask=mask)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # seq_len 0 -> zeros, not NaN
        tl.store(out_ptr + seq.to(tl.int64) * stride_os + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decode_reduce_kernel(
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    stride_os, stride_oh, num_partitions,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, P_PAD: tl.constexpr, CHUNK: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    base = (seq * tl.num_programs(1) + head).to(tl.int64) * num_partitions
    parts = tl.arange(0, P_PAD)
    m = tl.load(part_max_ptr + base + parts, mask=parts < num_partitions, other=float("-inf"))
    l = tl.load(part_sum_ptr + base + parts, mask=parts < num_partitions, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every partition empty: a padded row
    total = tl.sum(tl.exp2(m - m_max) * l, 0)
    dims = tl.arange(0, D_PAD)
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    for first in tl.range(0, num_partitions, CHUNK):  # chunks keep [CHUNK, D] in registers
        idx = first + tl.arange(0, CHUNK)
        ok = idx < num_partitions
        weight = tl.exp2(tl.load(part_max_ptr + base + idx, mask=ok, other=float("-inf")) - m_max)
        part = tl.load(part_acc_ptr + (base + idx)[:, None] * HEAD_DIM + dims[None, :],
                       mask=ok[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)
        acc += tl.sum(weight[:, None] * part, 0)
    out = acc / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + seq.to(tl.int64) * stride_os + head * stride_oh + dims,
             out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


@triton.jit
def _prefill_kernel(
    out_ptr, q_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, chunks_ptr, tiles_ptr,
    scales_ptr, scale, soft_cap, sliding_window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, TOKENS_PER_TILE: tl.constexpr, TILE_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFT_CAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, FP8: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    chunk = tl.load(tiles_ptr + 2 * tile)
    first = tl.load(tiles_ptr + 2 * tile + 1)  # the tile's first query, counted in its chunk
    query_start = tl.load(chunks_ptr + 4 * chunk)
    query_len = tl.load(chunks_ptr + 4 * chunk + 1)
    context_len = tl.load(chunks_ptr + 4 * chunk + 2)
    table_offset = tl.load(chunks_ptr + 4 * chunk + 3)
    prefix = context_len - query_len

    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D_PAD)
    tok = first + rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_ok = (rows < TOKENS_PER_TILE * GROUP) & (tok < query_len)
    mask = row_ok[:, None] & (dims < HEAD_DIM)[None, :]
    token_index = (query_start + tok).to(tl.int64)
    q = tl.load(q_ptr + token_index[:, None] * stride_qt + heads[:, None] * stride_qh
                + dims[None, :], mask=mask, other=0.0)
    q_pos = prefix + tok

    hi = prefix + tl.minimum(first + TOKENS_PER_TILE, query_len)  # last query's position + 1
    table_ptr = block_tables_ptr + table_offset
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    if FP8:
        scale = scale * tl.load(scales_ptr)
    if USE_WINDOW:
        lo = tl.maximum(prefix + first - sliding_window + 1, 0) // TILE_N * TILE_N
        m_i, l_i, acc = _attend_tiles(
            q, q_pos, m_i, l_i, acc, lo, hi, table_ptr, key_cache_ptr, value_cache_ptr, kv_head,
            scale, soft_cap, sliding_window,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
            HEAD_DIM, D_PAD, BLOCK_SIZE, TILE_N, True, True, USE_SOFT_CAP, DOT_PRECISION, UPCAST,
            FP8,
        )
    else:
        # Tiles ending at or before the first query's position are visible to all rows.
        diagonal = (prefix + first + 1) // TILE_N * TILE_N
        m_i, l_i, acc = _attend_tiles(
            q, q_pos, m_i, l_i, acc, 0, diagonal, table_ptr, key_cache_ptr, value_cache_ptr,
            kv_head, scale, soft_cap, sliding_window,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
            HEAD_DIM, D_PAD, BLOCK_SIZE, TILE_N, False, False, USE_SOFT_CAP, DOT_PRECISION, UPCAST,
            FP8,
        )
        m_i, l_i, acc = _attend_tiles(
            q, q_pos, m_i, l_i, acc, diagonal, hi, table_ptr, key_cache_ptr, value_cache_ptr,
            kv_head, scale, soft_cap, sliding_window,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
            HEAD_DIM, D_PAD, BLOCK_SIZE, TILE_N, True, False, USE_SOFT_CAP, DOT_PRECISION, UPCAST,
            FP8,
        )
    if FP8:
        acc = acc * tl.load(scales_ptr + 1)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + token_index[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch wrappers


def write_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
             value_cache: torch.Tensor, slot_mapping: torch.Tensor,
             scales: torch.Tensor | None = None) -> None:
    """Store each token's K/V ([T, kv_heads, D]) at its slot; a slot < 0 (padding) is skipped.
    An fp8 cache stores key / scales[0] and value / scales[1], saturated (tensor ops on the
    device: no host sync, so this too can be captured)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if is_fp8(key_cache.dtype):
        key, value = (quantize(x, s, key_cache.dtype).view(torch.uint8)
                      for x, s in ((key, scales[0]), (value, scales[1])))
        key_cache, value_cache = key_cache.view(torch.uint8), value_cache.view(torch.uint8)
    for t in (key, value, key_cache, value_cache):
        _check_last_dim_contiguous(t)
    _write_kv_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        H_PAD=triton.next_power_of_2(num_kv_heads), D_PAD=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=key_cache.shape[1],
    )


def decode_attention(
    out: torch.Tensor,  # [num_seqs, num_heads, head_dim], may be a view (e.g. out[:n])
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks], padded
    seq_lens: torch.Tensor,  # [num_seqs]; 0 marks a padded row
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    partition_size: int | None = None,
    tile_n: int | None = None,
    scales: torch.Tensor | None = None,  # an fp8 cache's [k_scale, v_scale] (float32)
) -> torch.Tensor:
    """Paged attention of one query token per sequence. No host syncs: the launch depends only
    on shapes, so it can be captured in a CUDA graph. partition_size: context positions per
    stage-1 program (a power of two; by default chosen from the shapes)."""
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    if num_seqs == 0:
        return out
    for t in (out, query, key_cache, value_cache):
        _check_last_dim_contiguous(t)
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    group = num_heads // num_kv_heads
    tile_n = tile_n or _default_tile_n(head_dim, query.dtype)
    max_context = block_tables.shape[1] * key_cache.shape[1]
    partition_size = _partition_size(partition_size, num_seqs * num_kv_heads, max_context, tile_n)
    num_partitions = max(triton.cdiv(max_context, partition_size), 1)
    split = num_partitions > 1
    if split:
        part_acc = query.new_empty(num_seqs, num_heads, num_partitions, head_dim, dtype=torch.float32)
        part_max = query.new_empty(num_seqs, num_heads, num_partitions, dtype=torch.float32)
        part_sum = torch.empty_like(part_max)
    else:  # stage 1 writes `out` directly; these arguments go unused
        part_acc = part_max = part_sum = out
    fp8 = _fp8_mode(key_cache.dtype)
    key_cache, value_cache, scales = _kernel_caches(key_cache, value_cache, scales)
    _decode_kernel[(num_seqs, num_kv_heads, num_partitions)](
        out, part_acc, part_max, part_sum,
        query, key_cache, value_cache, block_tables, seq_lens, scales,
        scale, soft_cap or 0.0, sliding_window or 0,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        *_cache_strides(key_cache, value_cache),
        num_heads, num_partitions,
        GROUP=group,
        # tl.dot wants M >= 16: the group's rows are padded with zero queries. Decode is bound
        # by memory, so the padded rows' tensor-core work is free, whereas a broadcast-multiply
        # over [group, TILE_N, D] would need that many registers per tile and spill from a
        # group of 4 up.
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, D_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=key_cache.shape[1], TILE_N=tile_n, PARTITION_SIZE=partition_size,
        SPLIT=split, USE_WINDOW=bool(sliding_window), USE_SOFT_CAP=bool(soft_cap),
        DOT_PRECISION=_dot_precision(query.dtype), UPCAST=_interpreting_bf16(query.dtype),
        FP8=fp8, num_warps=4, num_stages=3 if head_dim <= 128 else 2,
    )
    if split:
        p_pad = triton.next_power_of_2(num_partitions)
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out, part_acc, part_max, part_sum, out.stride(0), out.stride(1), num_partitions,
            HEAD_DIM=head_dim, D_PAD=triton.next_power_of_2(head_dim), P_PAD=p_pad,
            CHUNK=min(p_pad, 16), num_warps=4,
        )
    return out


@dataclass(slots=True)
class PrefillPlan:
    """A step's prefill chunks cut into query tiles: built once on the host, used by every layer."""

    chunks: torch.Tensor  # [num_chunks, 4] int32: query_start, query_len, context_len, table start
    tiles: torch.Tensor  # [num_tiles, 2] int32: chunk index, the tile's first query in the chunk
    block_tables: torch.Tensor  # every chunk's block table, concatenated
    block_m: int  # query rows per program (tokens x group heads)
    tokens_per_tile: int


def plan_prefill(
    query_starts: list[int],
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[torch.Tensor],
    group: int,
    head_dim: int,
    dtype: torch.dtype,
    block_m: int | None = None,
) -> PrefillPlan:
    """Host-side bookkeeping only (Python ints), shipped to the device in one copy."""
    block_m = block_m or (128 if _row_bytes(head_dim, dtype) <= 256 else 64)
    block_m = max(block_m, triton.next_power_of_2(group))
    tokens_per_tile = block_m // group
    rows: list[int] = []
    offset = 0
    for start, length, context, table in zip(query_starts, query_lens, context_lens, block_tables):
        rows += [start, length, context, offset]
        offset += table.shape[0]
    tiles: list[int] = []
    # Last tiles first: a chunk's later queries see the most context, so the longest programs
    # start first and the short ones fill in behind them.
    for index in reversed(range(len(query_lens))):
        for first in reversed(range(0, query_lens[index], tokens_per_tile)):
            tiles += [index, first]
    device = block_tables[0].device
    packed = torch.tensor(rows + tiles, dtype=torch.int32).to(device)
    return PrefillPlan(
        chunks=packed[: len(rows)].view(-1, 4),
        tiles=packed[len(rows):].view(-1, 2),
        block_tables=torch.cat(block_tables),
        block_m=block_m,
        tokens_per_tile=tokens_per_tile,
    )


def prefill_attention(
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim]: the flat batch
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    plan: PrefillPlan,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    tile_n: int | None = None,
    scales: torch.Tensor | None = None,  # an fp8 cache's [k_scale, v_scale] (float32)
) -> torch.Tensor:
    """Causal attention of each chunk's queries over its whole context, read through its block
    table (the chunk's own K/V must already be written). Rows outside the chunks are untouched."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = key_cache.shape[2]
    num_tiles = plan.tiles.shape[0]
    if num_tiles == 0:
        return out
    for t in (out, query, key_cache, value_cache):
        _check_last_dim_contiguous(t)
    group = num_heads // num_kv_heads
    fp8 = _fp8_mode(key_cache.dtype)
    key_cache, value_cache, scales = _kernel_caches(key_cache, value_cache, scales)
    _prefill_kernel[(num_tiles, num_kv_heads)](
        out, query, key_cache, value_cache, plan.block_tables, plan.chunks, plan.tiles,
        scales, scale, soft_cap or 0.0, sliding_window or 0,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        *_cache_strides(key_cache, value_cache),
        GROUP=group, HEAD_DIM=head_dim, D_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=key_cache.shape[1], BLOCK_M=plan.block_m, TOKENS_PER_TILE=plan.tokens_per_tile,
        TILE_N=tile_n or _default_tile_n(head_dim, query.dtype),
        USE_WINDOW=bool(sliding_window), USE_SOFT_CAP=bool(soft_cap),
        DOT_PRECISION=_dot_precision(query.dtype), UPCAST=_interpreting_bf16(query.dtype),
        FP8=fp8, num_warps=8 if plan.block_m * head_dim >= 64 * 128 else 4,
        num_stages=3 if head_dim <= 128 else 2,
    )
    return out


def _fp8_mode(dtype: torch.dtype) -> int:
    """The kernels' FP8 switch: 0 a float cache, 1 e4m3, 2 e5m2."""
    return {torch.float8_e4m3fn: 1, torch.float8_e5m2: 2}.get(dtype, 0)


def _kernel_caches(key_cache: torch.Tensor, value_cache: torch.Tensor,
                   scales: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the kernels take: an fp8 cache as its uint8 view, and a scales tensor always (the
    query pointer stands in for a float cache, whose kernels never load it)."""
    if not is_fp8(key_cache.dtype):
        return key_cache, value_cache, key_cache
    if scales is None:
        raise ValueError("an fp8 KV cache needs its [k_scale, v_scale] tensor")
    return key_cache.view(torch.uint8), value_cache.view(torch.uint8), scales


def _partition_size(requested: int | None, programs_per_partition: int, max_context: int,
                    tile_n: int) -> int:
    """A whole number of tiles (both are powers of two). By default 512 positions, halved down to
    128 while the grid would have fewer than ~2 programs per SM of an H100 (small batches)."""
    if requested:
        return max(requested, tile_n)
    size = DEFAULT_PARTITION_SIZE
    floor = max(128, tile_n)
    while size > floor and programs_per_partition * triton.cdiv(max_context, size) < 256:
        size //= 2
    return size


def _row_bytes(head_dim: int, dtype: torch.dtype) -> int:
    return triton.next_power_of_2(head_dim) * dtype.itemsize


def _default_tile_n(head_dim: int, dtype: torch.dtype) -> int:
    """Key positions per tile: 64 rows of up to 256 bytes keep K and V tiles (and their pipeline
    copies in shared memory) small enough for two or more programs per SM; wider rows get 32."""
    return 64 if _row_bytes(head_dim, dtype) <= 256 else 32


def _cache_strides(key_cache: torch.Tensor, value_cache: torch.Tensor) -> tuple[int, ...]:
    return (key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            value_cache.stride(0), value_cache.stride(1), value_cache.stride(2))


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 models get exact fp32 products (tf32 would lose ~3 digits); 16-bit inputs ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _interpreting_bf16(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and bool(triton.knobs.runtime.interpret)


def _check_last_dim_contiguous(t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"the head dimension must be contiguous, got strides {t.stride()}")
