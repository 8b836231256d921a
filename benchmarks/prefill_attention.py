"""Prefill attention on CPU: the C++ kernel against the PyTorch backend (SDPA), in GFLOP/s.

    python benchmarks/prefill_attention.py [--tokens 512] [--prefix 0] [--level avx2]

One chunk of `--tokens` queries after `--prefix` cached tokens, SmolLM2's attention shape by
default (9 heads, 3 kv heads, head_dim 64), float32 and bfloat16. FLOPs count only the visible
(causal) scores: 4 * head_dim per query head and visible key (q.k and p*v, a multiply-add each).
`--level` runs a lower kernel build than the CPU's own (every build computes in float32).
"""

from __future__ import annotations

import argparse
import time

import torch

from pagedllm.attention.backend import PrefillChunk
from pagedllm.attention.torch_backend import TorchAttentionBackend
from pagedllm.ops.cpu import cpu_ops

BLOCK_SIZE = 16


def seconds_per_call(function, repeats: int) -> float:
    function()  # warm-up: first-touch allocations, thread pool start
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def visible_pairs(tokens: int, prefix: int) -> int:
    """(query, key) pairs a causal chunk computes: query i sees prefix + i + 1 keys."""
    return tokens * prefix + tokens * (tokens + 1) // 2


def bench(args, dtype: torch.dtype, ops) -> None:
    heads, kv_heads, dim = args.heads, args.kv_heads, args.head_dim
    context = args.prefix + args.tokens
    blocks = -(-context // BLOCK_SIZE)
    key_cache = torch.randn(blocks, BLOCK_SIZE, kv_heads, dim).to(dtype)
    value_cache = torch.randn(blocks, BLOCK_SIZE, kv_heads, dim).to(dtype)
    table = torch.randperm(blocks)
    query = torch.randn(args.tokens, heads, dim).to(dtype)
    # the chunk's own K/V, as the backend has them (already written to the cache)
    new_slots = torch.tensor([int(table[p // BLOCK_SIZE]) * BLOCK_SIZE + p % BLOCK_SIZE
                              for p in range(args.prefix, context)])
    key, value = (cache.view(-1, kv_heads, dim)[new_slots] for cache in (key_cache, value_cache))
    chunk = PrefillChunk(0, args.tokens, context, table)
    scale = dim**-0.5

    out = torch.empty_like(query)
    chunk_rows = torch.tensor([[0, args.tokens, context]])
    tables = table[None].contiguous()

    def kernel():
        ops.paged_prefill_attention(out, query, key_cache, value_cache, chunk_rows, tables, scale,
                                    0, 0.0)

    def torch_path():
        TorchAttentionBackend()._prefill(query, key, value, (key_cache, value_cache), chunk, scale)

    flops = 4 * dim * heads * visible_pairs(args.tokens, args.prefix)
    for name, function in ((f"kernel ({ops.level})", kernel), ("PyTorch backend", torch_path)):
        seconds = seconds_per_call(function, args.repeats)
        print(f"{str(dtype):15} {name:22} {seconds * 1e3:8.2f} ms  "
              f"{flops / seconds / 1e9:7.1f} GFLOP/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--prefix", type=int, default=0, help="cached tokens before the chunk")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--level", default=None, help="kernel build (default: the CPU's)")
    args = parser.parse_args()
    ops = cpu_ops(args.level)
    if ops is None:
        raise SystemExit("the C++ kernels cannot be built here")
    print(f"{args.tokens} tokens after {args.prefix} cached, {args.heads} heads, "
          f"{args.kv_heads} kv heads, head_dim {args.head_dim}, {torch.get_num_threads()} threads")
    for dtype in (torch.float32, torch.bfloat16):
        bench(args, dtype, ops)


if __name__ == "__main__":
    main()
