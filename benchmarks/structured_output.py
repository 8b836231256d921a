"""Structured outputs under batching: N concurrent JSON-schema requests against N unconstrained.

    python benchmarks/structured_output.py --num-requests 32 --max-tokens 64 [engine flags]

Both runs use the same prompts, sampling settings and max_tokens through `LLM.generate`. To make
the work equal, every request must produce exactly max_tokens tokens: the unconstrained ones
ignore EOS; the constrained ones cannot (a grammar decides where EOS is legal), so their schema
asks for an array of at least 1000 records, which no request can finish within max_tokens. Each
record has an integer, a bounded string and an enum array, so the matcher does real work on
every token. The grammar is compiled in a warm-up request first (a server caches it the same
way); its compile time is reported on its own.

Runs alternate (unconstrained, constrained, ...) `--repeats` times to spread machine noise over
both; the report gives output tokens/s of each (best run), the ratio of the best runs and of
the means, and the time the grammar hooks took on the engine thread per step (mask_logits:
waiting for the fill that overlapped the forward pass, then the apply; accept_tokens).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pagedllm import LLM, SamplingParams, StructuredOutputsParams
from pagedllm.config import EngineArgs
from pagedllm.structured_output.bitmask import GrammarBitmask

RECORDS_SCHEMA = {
    "type": "array",
    "minItems": 1000,  # never finished within max_tokens: every request runs to the limit
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 99999},
            "name": {"type": "string", "minLength": 1, "maxLength": 12},
            "tags": {"type": "array", "items": {"enum": ["new", "sale", "eco", "used"]},
                     "maxItems": 3},
        },
        "required": ["id", "name", "tags"],
    },
}


@dataclass
class GrammarTimer:
    """Wall time spent in the engine's structured-output hooks, summed over calls."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
                self.calls[name] = self.calls.get(name, 0) + 1
        return timed

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def make_params(args: argparse.Namespace, constrained: bool) -> list[SamplingParams]:
    structured = StructuredOutputsParams(json=RECORDS_SCHEMA) if constrained else None
    return [SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=i,
                           ignore_eos=not constrained, structured_outputs=structured)
            for i in range(args.num_requests)]


def run(llm: LLM, prompts: list[dict], params: list[SamplingParams]) -> dict:
    steps = llm.llm_engine.num_steps
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"seconds": seconds, "output_tokens": tokens, "output_tok_s": tokens / seconds,
            "steps": llm.llm_engine.num_steps - steps,
            "finish_reasons": sorted({c.finish_reason for o in outputs for c in o.outputs})}


def chat_prompts(llm: LLM, count: int) -> list[dict]:
    tokenizer = llm.get_tokenizer()
    return [{"prompt": tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Shop {i}: list your products as JSON records."}],
        tokenize=False, add_generation_prompt=True)} for i in range(count)]


def instrument(llm: LLM) -> GrammarTimer:
    timer = GrammarTimer()
    engine = llm.llm_engine
    manager = engine.engine_core.structured_output
    # the worker's side: wait for the step's fill, then mask the logits (was mask_logits)
    GrammarBitmask.apply = timer.wrap("mask_logits", GrammarBitmask.apply)
    manager.accept_tokens = timer.wrap("accept_tokens", manager.accept_tokens)
    return timer


def measure(args: argparse.Namespace) -> dict:
    engine_args = EngineArgs.from_cli_args(args)
    llm = LLM(**vars(engine_args))
    timer = instrument(llm)
    prompts = chat_prompts(llm, args.num_requests)
    started = time.perf_counter()
    warm = SamplingParams(max_tokens=1, structured_outputs=StructuredOutputsParams(
        json=RECORDS_SCHEMA))
    llm.generate(prompts[:1], warm, use_tqdm=False)  # compiles (and caches) the grammar
    compile_s = time.perf_counter() - started
    llm.generate(prompts[:1], SamplingParams(max_tokens=1), use_tqdm=False)
    runs: dict[str, list[dict]] = {"unconstrained": [], "constrained": []}
    for _ in range(args.repeats):
        for mode in runs:
            timer.reset()
            result = run(llm, prompts, make_params(args, mode == "constrained"))
            steps = max(result["steps"], 1)
            result["grammar_ms_per_step"] = {name: 1000 * s / steps
                                             for name, s in timer.seconds.items()}
            runs[mode].append(result)
    best = {mode: max(results, key=lambda r: r["output_tok_s"]) for mode, results in runs.items()}
    mean = {mode: statistics.fmean(r["output_tok_s"] for r in results)
            for mode, results in runs.items()}
    return {"first_request_with_compile_s": compile_s, "runs": runs, "best": best,
            "constrained_over_unconstrained": (best["constrained"]["output_tok_s"]
                                               / best["unconstrained"]["output_tok_s"]),
            "mean_constrained_over_unconstrained": mean["constrained"] / mean["unconstrained"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output-json", default=None)
    EngineArgs.add_cli_args(parser)
    args = parser.parse_args()
    report = {"config": vars(args), **measure(args)}
    print(f"{'requests':<16}{'output tok/s':>14}{'seconds':>10}{'steps':>8}"
          f"{'grammar ms/step':>18}")
    for mode, result in report["best"].items():
        grammar_ms = sum(result["grammar_ms_per_step"].values())
        print(f"{mode:<16}{result['output_tok_s']:>14.1f}{result['seconds']:>10.2f}"
              f"{result['steps']:>8}{grammar_ms:>18.2f}")
    print(f"constrained / unconstrained tokens/s: best runs "
          f"{report['constrained_over_unconstrained']:.3f}, means "
          f"{report['mean_constrained_over_unconstrained']:.3f} (first constrained request, "
          f"compile included: {report['first_request_with_compile_s']:.2f} s)")
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
