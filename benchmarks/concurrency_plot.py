"""Output tokens/s against the number of sequences decoded together, pagedllm vs transformers.

    python benchmarks/concurrency_plot.py --levels 1,8,32,128 --png docs/throughput_vs_concurrency.png

At each level N, both engines get the same 2N random-token prompts (at least 8), EOS ignored:
pagedllm with `max_num_seqs=N` (continuous batching, so N sequences are in flight at once) and
transformers' `generate` with batch size N (bench throughput's baseline: left-padded, sorted by
length). Writes the figures as JSON and draws the plot with matplotlib.
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

from pagedllm.bench.dataset import synthetic_token_workload
from pagedllm.bench.throughput import load_transformers_model, run_pagedllm, run_transformers


def measure_level(args: argparse.Namespace, level: int) -> dict:
    from pagedllm import LLM

    llm = LLM(model=args.model, dtype=args.dtype, max_num_seqs=level,
              kv_cache_memory_bytes=args.kv_cache_memory, enable_prefix_caching=False)
    tokenizer, config = llm.get_tokenizer(), llm.llm_engine.model_config
    work = synthetic_token_workload(max(2 * level, 8), args.input_len, args.output_len, 0.0,
                                    config.vocab_size, args.seed, set(tokenizer.all_special_ids))
    ours = run_pagedllm(llm, work)
    hf_path, dtype = Path(args.hf_model) if args.hf_model else config.source.path, config.dtype
    del llm
    gc.collect()
    theirs = run_transformers(load_transformers_model(hf_path, dtype), work, level)
    print(f"N={level:<4} pagedllm {ours.output_tokens_per_s:7.1f} out tok/s   "
          f"transformers {theirs.output_tokens_per_s:7.1f} out tok/s")
    return {"concurrency": level, "pagedllm": ours.as_dict(), "transformers": theirs.as_dict()}


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [r["concurrency"] for r in rows]
    figure, axes = plt.subplots(figsize=(6, 4))
    for engine in ("pagedllm", "transformers"):
        axes.plot(levels, [r[engine]["output_tokens_per_s"] for r in rows], marker="o",
                  label=engine)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("concurrent sequences (max_num_seqs / generate batch size)")
    axes.set_ylabel("output tokens/s")
    axes.set_title("SmolLM2-135M, bf16, 2 CPU cores")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2 GGUF")
    parser.add_argument("--hf-model", default=None, help="transformers' copy (default: --model)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--levels", default="1,8,32,128")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--kv-cache-memory", default="2GiB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--png", default=None, help="draw the plot here")
    args = parser.parse_args()
    rows = [measure_level(args, int(level)) for level in args.levels.split(",")]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.png:
        plot(rows, args.png)


if __name__ == "__main__":
    main()
