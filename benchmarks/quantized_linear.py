"""Packed integer weights (GPTQ / AWQ / compressed-tensors, csrc/int_linear.cpp) against the
float layouts they replace, on this machine.

For each weight shape and row count (1 = a decode step, 64 = a prefill chunk) it times
x @ W.T through:

- bf16: the Linear layer's own choice for a bf16 weight (oneDNN's packed layout where this CPU
  runs bf16, else bf16_linear), the float baseline;
- int4 / int8: the C++ kernel on 4- / 8-bit codes, group size --group-size, bf16 activations.

    python -m benchmarks.quantized_linear [--shapes 576x1536,4096x4096] [--output-json FILE]

Each figure is the best of --repeats runs; weight bytes and GB/s (bytes of the weight read per
second) are printed beside the times, so the decode rows show how close each layout comes to
streaming its weight.
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.memory_bandwidth import best_seconds
from pagedllm.model.layers.linear import Linear
from pagedllm.model.layers.quantization.int_weight import IntWeight, int_linear, pack_int_weight


def bf16_layer(n: int, k: int) -> Linear:
    layer = Linear(k, n, bias=False).to(torch.bfloat16)
    layer.prepare_for_inference()
    return layer


def int_weight(n: int, k: int, bits: int, group_size: int) -> IntWeight:
    groups = k // group_size
    codes = torch.randint(0, 1 << bits, (n, k))
    return pack_int_weight(codes, torch.rand(n, groups) * 0.01, torch.full((n, groups), 8), bits,
                           group_size)


def measure(n: int, k: int, rows: int, group_size: int, repeats: int) -> list[dict]:
    x = torch.randn(rows, k).bfloat16()
    layer = bf16_layer(n, k)
    candidates = {"bf16": (lambda: layer(x), n * k * 2)}
    for bits in (4, 8):
        weight = int_weight(n, k, bits, group_size)
        candidates[f"int{bits} g{group_size}"] = (
            lambda w=weight: int_linear(x, w, None), weight.nbytes)
    results = []
    with torch.inference_mode():
        for name, (fn, nbytes) in candidates.items():
            seconds = best_seconds(fn, repeats)
            results.append({"shape": f"{n}x{k}", "rows": rows, "layout": name,
                            "ms": seconds * 1e3, "weight_mib": nbytes / 2**20,
                            "gb_per_s": nbytes / seconds / 1e9})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="576x1536,1536x576,4096x4096,11008x4096",
                        help="NxK weight shapes (outputs x inputs), comma separated")
    parser.add_argument("--rows", default="1,64", help="input rows, comma separated")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="default: every core")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        for rows in map(int, args.rows.split(",")):
            results += measure(n, k, rows, args.group_size, args.repeats)
    print(f"{'shape':>12} {'rows':>5} {'layout':>12} {'ms':>9} {'MiB':>8} {'GB/s':>7}")
    for r in results:
        print(f"{r['shape']:>12} {r['rows']:>5} {r['layout']:>12} {r['ms']:9.3f} "
              f"{r['weight_mib']:8.2f} {r['gb_per_s']:7.1f}")
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump({"threads": torch.get_num_threads(), "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
