"""Tensor and pipeline parallelism on this machine: the same requests on one rank and on
--tp x --pp ranks, and the time the ranks spend in their collectives.

    python -m benchmarks.tensor_parallel --tp 2 --num-prompts 32 --input-len 128 --output-len 64
    python -m benchmarks.tensor_parallel --tp 1 --pp 2

On the CPU the ranks share its cores: one rank runs torch on all of them, each of --tp ranks on
its share (worker.share_cpu_threads), so the comparison is "one process of N threads against
N processes of one thread each" on the same cores, not a speed-up from more hardware. Both
engines stay loaded and the runs take turns, --repeats rounds, the best of each counting. The
collective time is rank 0's wall time inside all-reduce and gather calls (including any wait
for the slower rank), per engine step; with stages, the time the first stage spends handing
its activations on (sends that wait for the next stage to take them) is reported beside it.
Prints JSON and a table.

The bundled model's 9 heads split over 3 ranks only; `--shape smollm2-8-heads` runs its exact
layer sizes with 8 query and 4 KV heads of 72 (random weights, load_format="dummy"), which split
over 2 and 4.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from pagedllm.bench.dataset import synthetic_token_workload
from pagedllm.bench.throughput import ThroughputResult


def timed_generate(llm, work, label: str) -> ThroughputResult:
    from pagedllm import SamplingParams, TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=w.prompt_token_ids) for w in work]
    params = [SamplingParams(temperature=0, max_tokens=w.output_len, ignore_eos=True,
                             detokenize=False) for w in work]
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    return ThroughputResult(label, len(work), elapsed,
                            sum(len(w.prompt_token_ids) for w in work), produced)


def collective_time(llm) -> tuple[float, int]:
    """(seconds rank 0 has spent in collectives and stage hand-overs, engine steps) so far."""
    stats = llm.llm_engine.engine_core.executor.collective_rpc("parallel_stats")[0]
    return stats["collective_seconds"] + stats["pipeline_seconds"], llm.llm_engine.num_steps


def smollm2_with_8_heads(folder: Path) -> Path:
    """config.json of SmolLM2-135M's sizes with 8 query / 4 KV heads of 72 (576 = 8 x 72)."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                num_attention_heads=8, num_key_value_heads=4, vocab_size=49152,
                max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
                rms_norm_eps=1e-5).save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from pagedllm import LLM

    engine = dict(model=args.model, dtype=args.dtype, skip_tokenizer_init=True,
                  kv_cache_memory_bytes=args.kv_cache_memory << 20, quantization=args.quantization)
    if args.shape == "smollm2-8-heads":
        folder = smollm2_with_8_heads(Path(tempfile.mkdtemp(prefix="tp-bench-")))
        engine.update(model=str(folder), load_format="dummy", quantization=None)
    work = synthetic_token_workload(args.num_prompts, args.input_len, args.output_len, 0.0,
                                    args.vocab, 0, set())
    label = f"tp{args.tp}" + (f"xpp{args.pp}" if args.pp > 1 else "")
    engines = {"tp1": LLM(**engine), label: LLM(**engine, tensor_parallel_size=args.tp,
                                                pipeline_parallel_size=args.pp)}
    for label, llm in engines.items():  # warm-up
        timed_generate(llm, work[:2], label)
    best: dict[str, ThroughputResult] = {}
    per_step_ms: list[float] = []
    for _ in range(args.repeats):
        for label, llm in engines.items():
            before = collective_time(llm) if label != "tp1" else None
            result = timed_generate(llm, work, label)
            if before is not None:
                seconds, steps = collective_time(llm)
                per_step_ms.append(1000 * (seconds - before[0]) / max(1, steps - before[1]))
            if label not in best or result.elapsed_s < best[label].elapsed_s:
                best[label] = result
    results = list(best.values())
    report = {"config": vars(args), "results": [r.as_dict() for r in results],
              "tp_over_tp1": results[1].output_tokens_per_s / results[0].output_tokens_per_s,
              "collective_ms_per_step": sorted(per_step_ms)[len(per_step_ms) // 2]}
    print(json.dumps(report, indent=2))
    print(f"{'run':9} {'seconds':>8} {'output tok/s':>13} {'vs tp1':>7}")
    for r in results:
        print(f"{r.engine:9} {r.elapsed_s:8.2f} {r.output_tokens_per_s:13.1f} "
              f"{r.output_tokens_per_s / results[0].output_tokens_per_s:7.2f}")
    print(f"rank 0 in collectives and hand-overs: {report['collective_ms_per_step']:.2f} ms per "
          f"step (median)")
    for llm in engines.values():
        llm.llm_engine.shutdown()
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages")
    parser.add_argument("--shape", choices=["smollm2-8-heads"], default=None,
                        help="random weights of this shape instead of --model (docstring)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantization", default="none",
                        help="none: a GGUF file dequantized, as tensor parallelism needs")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--kv-cache-memory", type=int, default=512, help="MiB per engine")
    parser.add_argument("--vocab", type=int, default=32000, help="prompt token ids drawn below")
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
