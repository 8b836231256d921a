"""Offline latency: batches of `batch_size` random-token prompts through LLMEngine, timing every
step.

Per measured batch it records each request's time to first token (from submitting the batch to
the end of the step that produced the request's first token), the duration of every step in
which all scheduled requests were decoding, and the batch's end-to-end time. Every iteration runs
the same prompts under a fresh cache salt, so no iteration reuses another's prefix-cache blocks
and all of them do the same work.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field

from pagedllm.bench.dataset import synthetic_token_workload
from pagedllm.bench.stats import summary_dict
from pagedllm.config import EngineArgs
from pagedllm.sampling_params import RequestOutputKind, SamplingParams


@dataclass(slots=True)
class DecodeStep:
    """A step in which every scheduled request computed one new token of its output."""

    duration_s: float
    num_seqs: int
    num_tokens: int


@dataclass(slots=True)
class BatchTiming:
    ttft_s: list[float] = field(default_factory=list)  # one per request
    decode_steps: list[DecodeStep] = field(default_factory=list)
    e2e_s: float = 0.0


def run_batch(engine, prompts: list[list[int]], params: SamplingParams, tag: str) -> BatchTiming:
    """Submit the whole batch, then step the engine until it is done, timing each step."""
    from pagedllm.inputs import TokensPrompt

    request_ids = [f"latency-{tag}-{i}" for i in range(len(prompts))]
    timing = BatchTiming()
    first_token: dict[str, float] = {}
    started = time.perf_counter()
    try:
        for request_id, token_ids in zip(request_ids, prompts):
            # A salt of its own per request: no block of an earlier iteration can be a hit.
            engine.add_request(request_id, TokensPrompt(prompt_token_ids=token_ids,
                                                        cache_salt=request_id), params)
        while engine.has_unfinished_requests():
            step = timed_step(engine, started, first_token)
            if step is not None:
                timing.decode_steps.append(step)
    except BaseException:  # Ctrl+C or a bad prompt: leave no request holding KV blocks
        engine.abort_request(request_ids)  # finished or never-added ids are skipped
        raise
    timing.e2e_s = time.perf_counter() - started
    timing.ttft_s = [first_token[r] for r in request_ids]
    return timing


def timed_step(engine, started: float, first_token: dict[str, float]) -> DecodeStep | None:
    """One engine step; notes first tokens, and returns the step if it was decode only."""
    steps_before = engine.num_steps
    step_started = time.perf_counter()
    outputs = engine.step()
    now = time.perf_counter()
    for output in outputs:
        if output.outputs[0].token_ids and output.request_id not in first_token:
            first_token[output.request_id] = now - started
    if engine.num_steps == steps_before:  # nothing was scheduled, so nothing was recorded
        return None
    record = engine.step_records[-1]
    if record.num_prefill_tokens or not record.num_decode_tokens:
        return None  # a prompt chunk rode along: not a decode step
    return DecodeStep(now - step_started, len(record.scheduled), record.num_decode_tokens)


def latency_report(batches: list[BatchTiming]) -> dict:
    """Summaries in milliseconds. A decode step's duration is also each of its sequences' time
    per output token; `decode_ms_per_token` spreads the step over all the tokens it made."""
    steps = [s for batch in batches for s in batch.decode_steps]
    return {
        "ttft_ms": summary_dict([t * 1e3 for batch in batches for t in batch.ttft_s]),
        "decode_step_ms": summary_dict([s.duration_s * 1e3 for s in steps]),
        "decode_ms_per_token": summary_dict([s.duration_s * 1e3 / s.num_tokens for s in steps]),
        "e2e_ms": summary_dict([batch.e2e_s * 1e3 for batch in batches]),
        "num_batches": len(batches),
        "num_decode_steps": len(steps),
        "mean_decode_batch_size": (sum(s.num_seqs for s in steps) / len(steps)) if steps else 0,
    }


def check_args(args: argparse.Namespace) -> None:
    for name in ("batch_size", "input_len", "output_len", "num_iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.num_iters_warmup < 0:
        raise ValueError("--num-iters-warmup must not be negative")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("latency", help="offline TTFT and per-step decode latency")
    parser.add_argument("--batch-size", type=int, default=8, help="requests submitted at once")
    parser.add_argument("--input-len", type=int, default=32, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens per request")
    parser.add_argument("--num-iters", type=int, default=10, help="measured batches")
    parser.add_argument("--num-iters-warmup", type=int, default=2, help="unmeasured batches first")
    parser.add_argument("--output-json", default=None)
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from pagedllm import LLM

    check_args(args)
    llm = LLM(**vars(EngineArgs.from_cli_args(args)))
    engine = llm.llm_engine
    tokenizer = llm.get_tokenizer()
    skip = set(getattr(tokenizer, "all_special_ids", []) or [])
    work = synthetic_token_workload(args.batch_size, args.input_len, args.output_len, 0.0,
                                    engine.model_config.vocab_size, args.seed, skip)
    prompts = [w.prompt_token_ids for w in work]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True,
                            detokenize=tokenizer is not None,
                            output_kind=RequestOutputKind.DELTA)  # only new tokens each step
    for i in range(args.num_iters_warmup):
        run_batch(engine, prompts, params, f"warmup{i}")
    hits_before = engine.kv_cache_stats().prefix_cache_hits
    batches = [run_batch(engine, prompts, params, f"iter{i}") for i in range(args.num_iters)]
    report = {"config": {k: v for k, v in vars(args).items() if k != "handler"},
              **latency_report(batches),
              "prefix_cache_hits": engine.kv_cache_stats().prefix_cache_hits - hits_before}
    print_table(report)
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(report, handle, indent=2, default=str)
    return 0


def print_table(report: dict) -> None:
    rows = [("time to first token", "ttft_ms"), ("decode step", "decode_step_ms"),
            ("decode per token (batch)", "decode_ms_per_token"), ("batch end-to-end", "e2e_ms")]
    print(f"{'ms':<26}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
    for label, key in rows:
        s = report[key]
        if s is None:
            print(f"{label:<26}{'-':>10}")
            continue
        print(f"{label:<26}{s['mean']:>10.1f}{s['p50']:>10.1f}{s['p90']:>10.1f}{s['p99']:>10.1f}")
    print(f"{report['num_batches']} batches, {report['num_decode_steps']} decode steps of "
          f"{report['mean_decode_batch_size']:.1f} sequences on average")
