"""How close the memory-bound kernels come to the machine's streaming bandwidth.

Decode is bound by bytes: every step reads each weight once (the batch-1 GEMV) and every running
sequence's K/V (decode attention). This measures, on this machine, with all its cores:

- stream: the read bandwidth of a sum over a 1 GiB tensor (ATen's vectorized reduction), with
  every core and with one;
- gemv: one row times a 128 MiB bf16 weight, through oneDNN's packed layout (where this CPU runs
  bf16) and through bf16_linear (bf16 weights, float32 arithmetic);
- decode attention: the C++ kernel over --seqs sequences of --context tokens (SmolLM2's shape:
  9 heads, 3 kv heads, head_dim 64), bytes = the K and V it must read; with bf16, float32 and
  fp8 (e4m3, kv_cache_dtype="fp8") caches, and the time of one call for each, since an fp8
  cache's point is reading half the bytes of bf16 in less time.

    python benchmarks/memory_bandwidth.py [--level avx2] [--output-json FILE]

Each figure is the best of --repeats runs, in GB/s (1e9 bytes per second).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from pagedllm.ops.cpu import cpu_ops
from pagedllm.platform.cpu import cpu_info


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: page faults, first-touch, kernel build
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def stream_gbps(threads: int, repeats: int) -> float:
    data = torch.ones(1 << 28)  # 1 GiB of float32
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return data.numel() * 4 / best_seconds(data.sum, repeats) / 1e9
    finally:
        torch.set_num_threads(previous)


def gemv_gbps(ops, repeats: int) -> dict[str, float]:
    weight = torch.randn(8192, 8192).bfloat16()  # 128 MiB
    x = torch.randn(1, 8192).bfloat16()
    results = {}
    out = torch.empty(1, 8192, dtype=torch.bfloat16)
    results["gemv bf16_linear"] = weight.numel() * 2 / best_seconds(
        lambda: ops.bf16_linear(out, x, weight, None), repeats) / 1e9
    if cpu_info().onednn_bf16 and torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 128)
        results["gemv oneDNN packed"] = weight.numel() * 2 / best_seconds(
            lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
            repeats) / 1e9
    return results


def decode_attention(ops, seqs: int, context: int, dtype: torch.dtype, cache_dtype: torch.dtype,
                     repeats: int) -> tuple[float, float]:
    """(GB/s of K/V read, seconds per call); queries in `dtype`, the cache in `cache_dtype`."""
    block_size, heads, kv_heads, dim = 16, 9, 3, 64
    blocks_per_seq = -(-context // block_size)
    num_blocks = seqs * blocks_per_seq
    shape = (num_blocks, block_size, kv_heads, dim)
    key_cache, value_cache = (torch.randn(shape).to(cache_dtype) for _ in range(2))
    tables = torch.randperm(num_blocks).view(seqs, blocks_per_seq).contiguous()
    lens = torch.full((seqs,), context, dtype=torch.long)
    query = torch.randn(seqs, heads, dim).to(dtype)
    out = torch.empty_like(query)
    seconds = best_seconds(lambda: ops.paged_decode_attention(
        out, query, key_cache, value_cache, tables, lens, dim**-0.5, 0, 0.0, 1.0, 1.0), repeats)
    bytes_read = 2 * seqs * context * kv_heads * dim * key_cache.element_size()
    return bytes_read / seconds / 1e9, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--level", default=None, help="kernel level (default: the probe's)")
    parser.add_argument("--seqs", type=int, default=200)
    parser.add_argument("--context", type=int, default=340)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    ops = cpu_ops(args.level)
    if ops is None:
        raise SystemExit("the C++ kernels cannot be built here")
    cores = cpu_info().num_cores
    report = {"cpu": cpu_info().describe(), "kernel level": ops.level,
              f"stream, {cores} threads": stream_gbps(cores, args.repeats),
              "stream, 1 thread": stream_gbps(1, args.repeats),
              **gemv_gbps(ops, args.repeats)}
    caches = {"bfloat16": (torch.bfloat16, torch.bfloat16), "float32": (torch.float32,) * 2,
              "fp8 (bf16 queries)": (torch.bfloat16, torch.float8_e4m3fn)}
    call_ms = {}
    for name, (dtype, cache_dtype) in caches.items():
        gbps, seconds = decode_attention(ops, args.seqs, args.context, dtype, cache_dtype,
                                         args.repeats)
        report[f"decode attention {name}"] = gbps
        call_ms[name] = seconds * 1e3
    report["decode attention ms per call"] = call_ms
    print(report["cpu"], "| kernels:", ops.level)
    for name, value in report.items():
        if isinstance(value, float):
            print(f"  {name:<32}{value:8.1f} GB/s")
    for name, ms in call_ms.items():
        print(f"  decode attention {name:<18} {ms:8.2f} ms per call")
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
