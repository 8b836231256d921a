"""Output tokens/s with n-gram speculative decoding against the same engine without it.

    python benchmarks/spec_decode.py --batch-sizes 1,8,32 --max-tokens 48 --repeats 3

Two workloads, each at every batch size, both engines in one process and the arms interleaved
(plain, speculative, plain, ...) so that other work on the machine weighs on both alike:

  copy    the answer copies from the prompt (repeat a passage, re-emit a function with one
          edit): drafts are accepted, speculation should pay
  fresh   open questions whose answers repeat nothing: few drafts, mostly rejected, to bound
          what speculation costs when it does not pay

Greedy, EOS ignored, so every arm makes the same number of tokens; tokens/s is over the sum of
each arm's runs. The CPU-time ratio (this process's CPU seconds, plain over speculative) is the
cost ratio that holds when other work shares the cores, best read with --threads 1. Reports
the acceptance rate and the share of outputs identical to the plain engine's (all of them in
float32). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time

from pagedllm import LLM, SamplingParams

PASSAGES = [
    "The old lighthouse keeper climbed the spiral stairs every evening, lit the great lamp, "
    "and watched the ships pass safely through the narrow channel below the cliffs.",
    "def moving_average(values, window):\n    result = []\n    for i in range(len(values) - "
    "window + 1):\n        chunk = values[i:i + window]\n        result.append(sum(chunk) / "
    "window)\n    return result\n",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon "
    "dioxide to make glucose and oxygen; it takes place mainly in the leaves.",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):"
    "\n        self.items.append(item)\n\n    def pop(self):\n        return self.items.pop()\n",
]
QUESTIONS = [
    "Write a short story about a robot who learns to paint.",
    "Explain why the sky is blue to a five year old.",
    "What are three good habits for staying healthy?",
    "Describe your ideal weekend in a few sentences.",
    "Give me some advice for a job interview.",
    "Why do cats purr?",
    "Invent a new holiday and describe how people celebrate it.",
    "What would you pack for a trip to the mountains?",
]


def copy_prompts(count: int) -> list[str]:
    return [f"Repeat the following text exactly.\n\n{PASSAGES[i % len(PASSAGES)]}\n\n"
            f"Repeated text:\n{PASSAGES[i % len(PASSAGES)][:12]}" for i in range(count)]


def fresh_prompts(count: int) -> list[str]:
    return [QUESTIONS[i % len(QUESTIONS)] for i in range(count)]


def timed(llm: LLM, prompts: list[str], params: SamplingParams) -> tuple[float, float, list]:
    """Wall seconds, this process's CPU seconds, and the outputs' token ids."""
    started, cpu_started = time.perf_counter(), time.process_time()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return (time.perf_counter() - started, time.process_time() - cpu_started,
            [o.outputs[0].token_ids for o in outputs])


def measure(plain: LLM, spec: LLM, prompts: list[str], max_tokens: int, repeats: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    timed(plain, prompts[:1], params)  # warm both (prefix caching is off: no reuse)
    timed(spec, prompts[:1], params)
    times: dict[str, list[float]] = {"plain": [], "spec": []}
    cpu: dict[str, list[float]] = {"plain": [], "spec": []}
    outputs: dict[str, list] = {}
    before = spec.llm_engine.engine_core.stats().spec_decoding.copy()
    arms = [("plain", plain), ("spec", spec)]
    for repeat in range(repeats):
        for name, llm in arms if repeat % 2 == 0 else arms[::-1]:  # alternate who goes first
            seconds, cpu_seconds, outputs[name] = timed(llm, prompts, params)
            times[name].append(seconds)
            cpu[name].append(cpu_seconds)
    after = spec.llm_engine.engine_core.stats().spec_decoding
    drafted = after.num_draft_tokens - before.num_draft_tokens
    accepted = after.num_accepted_tokens - before.num_accepted_tokens
    total = max_tokens * len(prompts) * repeats
    plain_rate, spec_rate = total / sum(times["plain"]), total / sum(times["spec"])
    # float32: identical; bf16: the verify pass computes the same logits through the prefill
    # kernels, whose rounding differs from the decode kernel's, so a near-tie may flip
    same = sum(a == b for a, b in zip(outputs["plain"], outputs["spec"])) / len(prompts)
    cpu_speedup = sum(cpu["plain"]) / sum(cpu["spec"])
    return {"plain_tok_s": plain_rate, "spec_tok_s": spec_rate, "speedup": spec_rate / plain_rate,
            "cpu_speedup": cpu_speedup, "cpu_s": cpu,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "draft_tokens_per_output_token": drafted / total, "identical_outputs": same,
            "times_s": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default); 1 makes the CPU-time ratio "
                             "robust on a machine other work shares (no spinning OpenMP team)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    common = dict(model=args.model, dtype=args.dtype, enable_prefix_caching=False,
                  kv_cache_memory_bytes=1 << 30)
    plain = LLM(**common)
    spec = LLM(**common, speculative_config={
        "method": "ngram", "num_speculative_tokens": args.num_speculative_tokens,
        "prompt_lookup_max": 4, "prompt_lookup_min": 2})
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        for workload, make in (("copy", copy_prompts), ("fresh", fresh_prompts)):
            result = measure(plain, spec, make(batch), args.max_tokens, args.repeats)
            rows.append({"workload": workload, "batch": batch, **result})
            print(f"{workload:5} batch {batch:3}: plain {result['plain_tok_s']:7.1f} tok/s  "
                  f"ngram {result['spec_tok_s']:7.1f} tok/s  x{result['speedup']:.2f} "
                  f"(CPU time x{result['cpu_speedup']:.2f})  "
                  f"acceptance {result['acceptance_rate']:.2f}  "
                  f"identical {result['identical_outputs']:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
