"""Where an offline run's time goes: wall-clock seconds per kind of work.

    python benchmarks/step_profile.py --num-prompts 200 --input-len 272 --output-len 136 \\
        --range-ratio 0.88

Runs bench throughput's synthetic workload through `LLM.generate` with a timer around each part
of a step: the linear layers, decode and prefill attention, the elementwise kernels, sampling,
and the engine's own Python (scheduling, input building, detokenizing). Timers wrap the methods
in place, so the figures are wall-clock time on the step's thread, nested parts included in
their parents (linear layers are inside the model's forward).
"""

from __future__ import annotations

import argparse
import collections
import time
from collections.abc import Callable

from pagedllm import LLM
from pagedllm.bench.dataset import synthetic_token_workload
from pagedllm.bench.throughput import run_pagedllm
from pagedllm.model.layers import activation, linear, norm, rotary

Timings = collections.Counter


def timed(function: Callable, label: str, timings: Timings) -> Callable:
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            timings[label] += time.perf_counter() - started

    return wrapper


def time_class_method(cls: type, name: str, label: str, timings: Timings) -> None:
    setattr(cls, name, timed(getattr(cls, name), label, timings))


def time_method(obj: object, name: str, label: str, timings: Timings) -> None:
    setattr(obj, name, timed(getattr(obj, name), label, timings))


def instrument(llm: LLM, timings: Timings) -> None:
    engine = llm.llm_engine
    runner = engine.worker.runner
    backend = runner.model.model.layers[0].self_attn.backend  # one backend for all layers
    time_method(engine, "step", "engine step (everything)", timings)
    time_method(runner.model, "forward", "model forward", timings)
    time_method(runner.model, "compute_logits", "lm_head", timings)
    time_method(runner, "sampler", "sampling", timings)
    time_method(runner, "prepare_inputs", "input building", timings)
    time_method(engine.engine_core.scheduler, "schedule", "scheduler", timings)
    time_method(engine.output_processor, "process", "detokenize and stop checks", timings)
    time_method(backend, "_decode", "decode attention", timings)
    time_method(backend, "_prefill", "prefill attention (PyTorch)", timings)
    if hasattr(backend, "_prefill_chunks"):  # the CPU backend's one-call prefill kernel
        time_method(backend, "_prefill_chunks", "prefill attention (C++ kernel)", timings)
    time_method(backend, "write_kv", "K/V write", timings)
    time_class_method(linear.Linear, "forward", "linear layers (incl. lm_head)", timings)
    time_class_method(norm.RMSNorm, "forward", "RMSNorm", timings)
    time_class_method(activation.SiluAndMul, "forward", "SiLU-and-mul", timings)
    time_class_method(rotary.RotaryEmbedding, "forward", "rotary", timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2 GGUF")
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--input-len", type=int, default=272)
    parser.add_argument("--output-len", type=int, default=136)
    parser.add_argument("--range-ratio", type=float, default=0.88)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--kv-cache-memory", default="4GiB")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    llm = LLM(model=args.model, kv_cache_memory_bytes=args.kv_cache_memory,
              max_num_batched_tokens=args.max_num_batched_tokens)
    config = llm.llm_engine.model_config
    work = synthetic_token_workload(args.num_prompts, args.input_len, args.output_len,
                                    args.range_ratio, config.vocab_size, args.seed,
                                    set(llm.get_tokenizer().all_special_ids))
    run_pagedllm(llm, work[:4])  # warm-up
    timings: Timings = collections.Counter()
    instrument(llm, timings)
    result = run_pagedllm(llm, work)
    print(f"{result.output_tokens_per_s:.1f} output tok/s, {result.total_tokens_per_s:.1f} total "
          f"tok/s, {result.elapsed_s:.1f} s")
    for label, seconds in timings.most_common():
        print(f"  {label:<32}{seconds:8.2f} s")


if __name__ == "__main__":
    main()
