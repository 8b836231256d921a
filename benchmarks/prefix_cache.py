"""Prefix caching: time to first token for requests that share a long system prompt.

    python benchmarks/prefix_cache.py --num-requests 32 --prefix-len 400 [engine flags]

Runs the same requests through two engines, prefix caching on and off, in two arrival patterns:
`burst` (all requests queued at once, as an offline batch) and `sequential` (each request
arrives when the previous one has finished, as a chat server sees turns). Prints JSON and a table
with TTFT (arrival to first token) per engine and pattern and the prefix-cache hit rate.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from pagedllm.config import EngineArgs
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.sampling_params import RequestOutputKind, SamplingParams


def make_prompts(num_requests: int, prefix_len: int, suffix_len: int, vocab: int,
                 seed: int) -> list[list[int]]:
    """Token-id prompts: one shared prefix, then a distinct suffix each."""
    rng = random.Random(seed)
    prefix = [rng.randrange(100, vocab) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(100, vocab) for _ in range(suffix_len)]
            for _ in range(num_requests)]


def run(engine: LLMEngine, prompts: list[list[int]], max_tokens: int, burst: bool,
        tag: str) -> list[float]:
    """TTFT of every request, in seconds."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                            detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY)
    pending = [(f"{tag}-{i}", ids) for i, ids in enumerate(prompts)]
    ttfts: list[float] = []
    while pending or engine.has_unfinished_requests():
        if pending and (burst or not engine.has_unfinished_requests()):
            batch, pending = (pending, []) if burst else (pending[:1], pending[1:])
            for request_id, ids in batch:
                engine.add_request(request_id, {"prompt_token_ids": ids}, params,
                                   arrival_time=time.monotonic())
        for output in engine.step():
            if output.finished:
                ttfts.append(output.metrics.first_token_time - output.metrics.arrival_time)
    return ttfts


def summarize(ttfts: list[float]) -> dict[str, float]:
    ordered = sorted(ttfts)
    return {"mean_ttft_s": statistics.fmean(ordered), "median_ttft_s": statistics.median(ordered),
            "p90_ttft_s": ordered[int(0.9 * (len(ordered) - 1))], "max_ttft_s": ordered[-1]}


def measure(args: argparse.Namespace, caching: bool) -> dict:
    engine_args = EngineArgs.from_cli_args(args)
    engine_args.enable_prefix_caching = caching
    engine_args.skip_tokenizer_init = True
    engine = LLMEngine(engine_args)
    prompts = make_prompts(args.num_requests, args.prefix_len, args.suffix_len,
                           engine.model_config.vocab_size, args.seed)
    run(engine, prompts[:1], 1, burst=True, tag="warmup")  # one-time costs
    engine.abort_request([])
    result = {"prefix_caching": caching}
    for pattern in ("burst", "sequential"):
        # a different shared prefix per pattern, so the second starts from a cold cache too
        prompts = make_prompts(args.num_requests, args.prefix_len, args.suffix_len,
                               engine.model_config.vocab_size, args.seed + len(pattern))
        before = engine.kv_cache_stats()
        ttfts = run(engine, prompts, args.max_tokens, pattern == "burst", pattern)
        after = engine.kv_cache_stats()
        queries = after.prefix_cache_queries - before.prefix_cache_queries
        hits = after.prefix_cache_hits - before.prefix_cache_hits
        result[pattern] = {**summarize(ttfts), "hit_rate": hits / queries if queries else 0.0}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--prefix-len", type=int, default=400)
    parser.add_argument("--suffix-len", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--output-json", default=None)
    EngineArgs.add_cli_args(parser, skip=("enable_prefix_caching",))
    args = parser.parse_args()
    report = {"config": vars(args), "runs": [measure(args, True), measure(args, False)]}
    print(f"{'prefix caching':<16}{'pattern':<12}{'mean TTFT s':>12}{'p90 TTFT s':>12}"
          f"{'hit rate':>10}")
    for run_report in report["runs"]:
        for pattern in ("burst", "sequential"):
            r = run_report[pattern]
            print(f"{'on' if run_report['prefix_caching'] else 'off':<16}{pattern:<12}"
                  f"{r['mean_ttft_s']:>12.3f}{r['p90_ttft_s']:>12.3f}{r['hit_rate']:>10.1%}")
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
