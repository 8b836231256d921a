"""Batch-1 decode latency of pagedllm and llama.cpp, side by side, on one GGUF file and machine.

One request at a time is the case where an engine's per-step cost shows most plainly: each
decode step reads every weight once for one token, so the time per output token is the price of
the matmul kernels, the attention over the context, and whatever the engine adds around them
(scheduling, sampling, Python). llama.cpp is the reference for this case on CPUs. Both engines
read the same file (by default the bundled SmolLM2-135M-Instruct Q4_1 GGUF) with the same number
of threads, and get the same workload:

- a prompt of --prompt-len random token ids (no tokenizer in the timed path), a fresh one for
  every run, the same for both engines, so that neither reuses a cached prefix; pagedllm's
  prefix caching is also off;
- --output-len tokens generated greedily with EOS ignored, so every run makes as many tokens.

Figures per run: prefill (request start to the first token, which the prompt's forward pass
makes) and decode ms/token (the time per output token after the first: last token's time minus
the first's, over the tokens in between). llama.cpp runs through llama-cpp-python's low-level
API (Llama.eval, then a numpy argmax over the last position's logits: greedy, with no sampler
chain around it; the same tokens as its create_completion at temperature 0); pagedllm
through LLMEngine.add_request and step(), timing each step that brings tokens. pagedllm runs
each --configs entry, dtype:quantization, where quantization "none" dequantizes the GGUF to
dtype at load and "gguf" keeps its Q4_1 blocks quantized; a configuration that does not load
(or run) gets an error line rather than ending the benchmark.

Each engine runs in a process of its own (so that two OpenMP runtimes do not compete for the
cores), loads once, makes one warm-up run, and then the runs interleave -- llama.cpp, each
pagedllm configuration, llama.cpp, ... -- --repeats times, so that a slow patch of a shared
machine lands on all of them. The medians are reported, with each pagedllm configuration's
ratio llama.cpp ms/token / ours (above 1: pagedllm is faster).

    pip install --no-deps llama-cpp-python  # builds llama.cpp with -march=native
    # where llama.cpp's AMX kernels die of SIGILL (ggml-org/llama.cpp#26954), build without them:
    CMAKE_ARGS="-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' \\
        -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'" \\
        pip install --no-deps --force-reinstall --no-cache-dir llama-cpp-python
    python -m benchmarks.llama_cpp_compare [--configs bfloat16:none,float32:gguf] \\
        [--repeats 3] [--output-json FILE]

Prints the JSON report, then a markdown table. The report names the CPU (model name, its
AVX-512 and AMX flags), the load average before and after (a busy machine gives noisy figures,
and a parallel region's threads wait for each other at every op, so sharing the cores costs
both engines far more than their share of CPU time), and what llama.cpp's build uses
(llama_print_system_info).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import random
import signal
import statistics
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

DEFAULT_CONFIGS = "bfloat16:none,float32:none,bfloat16:gguf,float32:gguf"
LLAMA_CPP = "llama.cpp"
FIRST_TOKEN_ID = 100  # random prompts stay above SmolLM2's special tokens (ids 0-16)


# ---- what is measured -----------------------------------------------------------------------
@dataclass(frozen=True)
class EngineSpec:
    """One engine to measure: llama.cpp, or pagedllm with a dtype and a quantization."""

    engine: str  # LLAMA_CPP or "pagedllm"
    model: str | None  # a GGUF file; None: the bundled default
    threads: int
    dtype: str = ""
    quantization: str = ""
    n_ctx: int = 512  # llama.cpp's context (its KV cache)
    kv_cache_memory_bytes: int = 256 << 20  # pagedllm's

    @property
    def name(self) -> str:
        if self.engine == LLAMA_CPP:
            return LLAMA_CPP
        return f"pagedllm {self.dtype}:{self.quantization}"


@dataclass(frozen=True)
class RunResult:
    prefill_ms: float  # request start to the first token
    decode_ms_per_token: float  # per output token after the first
    total_ms: float
    output_tokens: int
    token_ids: list[int]


def parse_configs(text: str) -> list[tuple[str, str]]:
    """"bfloat16:none,float32:gguf" -> [("bfloat16", "none"), ("float32", "gguf")]."""
    configs = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        dtype, sep, quantization = item.partition(":")
        if not sep or not dtype or not quantization:
            raise ValueError(f"a configuration is dtype:quantization, got {item!r}")
        configs.append((dtype, quantization))
    if not configs:
        raise ValueError("no configurations given")
    return configs


def random_prompts(count: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """`count` prompts of `length` token ids, none of them a special token."""
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(length)]
            for _ in range(count)]


def timing(started: float, stamps: list[tuple[float, int]]) -> tuple[float, float, float]:
    """(prefill ms, decode ms per token, total ms) from a run's start time and its stamps:
    (time, tokens made so far) each time tokens arrived. Decode ms/token is the time from the
    first token's arrival to the last's over the tokens made in it (nan with one token)."""
    if not stamps:
        raise ValueError("the run made no tokens")
    (first_time, first_count), (last_time, last_count) = stamps[0], stamps[-1]
    decoded = last_count - first_count
    per_token = (last_time - first_time) * 1e3 / decoded if decoded > 0 else float("nan")
    return (first_time - started) * 1e3, per_token, (last_time - started) * 1e3


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy outputs share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def median_summary(runs: list[RunResult]) -> dict[str, float]:
    return {"prefill_ms": statistics.median(r.prefill_ms for r in runs),
            "decode_ms_per_token": statistics.median(r.decode_ms_per_token for r in runs),
            "total_ms": statistics.median(r.total_ms for r in runs),
            "runs": len(runs)}


# ---- the machine ----------------------------------------------------------------------------
def parse_cpuinfo(text: str) -> dict[str, Any]:
    """The model name and the AVX-512 / AMX flags of /proc/cpuinfo's text."""
    model, flags = "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags":
            flags.update(f for f in value.split() if f.startswith(("avx512", "amx")))
    return {"model_name": model,
            "avx512": sorted(f for f in flags if f.startswith("avx512")),
            "amx": sorted(f for f in flags if f.startswith("amx"))}


def machine_description() -> dict[str, Any]:
    try:
        cpu = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        cpu = parse_cpuinfo("")
    cpu["logical_cpus"] = os.cpu_count()
    cpu["load_average_at_start"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return cpu


# ---- the engines, each in a process of its own ----------------------------------------------
class Runner(Protocol):
    info: dict[str, Any]

    def run(self, prompt: list[int], max_tokens: int) -> RunResult: ...

    def close(self) -> None: ...


class LlamaCppRunner:
    """llama.cpp through llama-cpp-python's low-level API: eval the prompt in one batch, then
    one token per eval, each the argmax of the last logits (greedy; EOS is never looked at)."""

    def __init__(self, spec: EngineSpec) -> None:
        import llama_cpp
        import numpy as np

        self._llama_cpp, self._np = llama_cpp, np
        self.llm = llama_cpp.Llama(model_path=spec.model or _default_model(),
                                   n_threads=spec.threads, n_threads_batch=spec.threads,
                                   n_ctx=spec.n_ctx, n_batch=512, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.info = {"vocab_size": self.n_vocab, "llama_cpp_python": llama_cpp.__version__,
                     "system_info": llama_cpp.llama_print_system_info().decode().strip()}

    def _greedy(self) -> int:
        logits = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(self._np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())

    def close(self) -> None:
        self.llm.close()  # before interpreter exit, when its __del__ finds the library gone

    def run(self, prompt: list[int], max_tokens: int) -> RunResult:
        llm = self.llm
        llm.reset()  # the next eval drops the KV cache from position 0
        tokens: list[int] = []
        stamps: list[tuple[float, int]] = []
        started = time.perf_counter()
        llm.eval(prompt)
        while True:
            tokens.append(self._greedy())
            stamps.append((time.perf_counter(), len(tokens)))
            if len(tokens) == max_tokens:
                break
            llm.eval(tokens[-1:])
        return RunResult(*timing(started, stamps), len(tokens), tokens)


class PagedLLMRunner:
    """pagedllm's offline engine, stepped by hand: one request, timing each step that brings
    tokens (DELTA outputs, so a step's output holds only its new tokens)."""

    def __init__(self, spec: EngineSpec) -> None:
        from pagedllm import LLM

        self.llm = LLM(model=spec.model, dtype=spec.dtype, quantization=spec.quantization,
                       kv_cache_memory_bytes=spec.kv_cache_memory_bytes,
                       enable_prefix_caching=False)
        engine = self.llm.llm_engine
        self.info = {"vocab_size": engine.model_config.vocab_size,
                     "dtype": str(engine.model_config.dtype).removeprefix("torch."),
                     "load_seconds": round(engine.startup_seconds, 2)}
        self._count = 0

    def close(self) -> None:
        self.llm.llm_engine.shutdown()

    def run(self, prompt: list[int], max_tokens: int) -> RunResult:
        from pagedllm import SamplingParams
        from pagedllm.sampling_params import RequestOutputKind

        engine = self.llm.llm_engine
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        params.output_kind = RequestOutputKind.DELTA
        request_id = f"bench-{self._count}"
        self._count += 1
        tokens: list[int] = []
        stamps: list[tuple[float, int]] = []
        started = time.perf_counter()
        engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
        while engine.has_unfinished_requests():
            outputs = engine.step()
            now = time.perf_counter()
            new = [t for o in outputs if o.request_id == request_id
                   for t in o.outputs[0].token_ids]
            if new:
                tokens += new
                stamps.append((now, len(tokens)))
        return RunResult(*timing(started, stamps), len(tokens), tokens)


def _default_model() -> str:
    from pagedllm.model.source import default_model_path

    return str(default_model_path())


def make_runner(spec: EngineSpec) -> Runner:
    if spec.engine == LLAMA_CPP:
        return LlamaCppRunner(spec)
    return PagedLLMRunner(spec)


def serve(conn: Connection, spec: EngineSpec) -> None:
    """A worker process: load the engine, answer ("run", prompt, max_tokens) until "stop".
    Every answer is ("ok", payload) or ("error", one line)."""
    # before torch or llama.cpp loads an OpenMP runtime (this module imports neither at the top)
    os.environ["OMP_NUM_THREADS"] = str(spec.threads)
    try:
        runner = make_runner(spec)
        conn.send(("ok", runner.info))
    except BaseException as error:  # report, don't crash: the other engines still run
        conn.send(("error", f"{type(error).__name__}: {error}"))
        return
    while True:
        message = conn.recv()
        if message[0] == "stop":
            runner.close()
            return
        _, prompt, max_tokens = message
        try:
            conn.send(("ok", runner.run(prompt, max_tokens)))
        except Exception as error:
            traceback.print_exc()
            conn.send(("error", f"{type(error).__name__}: {error}"))


class Worker:
    """The parent's handle on one engine process."""

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.error: str | None = None
        self.info: dict[str, Any] = {}
        self.runs: list[RunResult] = []
        context = multiprocessing.get_context("spawn")  # no forked torch or OpenMP state
        self.conn, child = context.Pipe()
        self.process = context.Process(target=serve, args=(child, spec), daemon=True)
        self.process.start()
        child.close()

    def _ask(self, message: tuple | None) -> Any:
        if self.error is not None:
            return None
        try:
            if message is not None:
                self.conn.send(message)
            status, payload = self.conn.recv()
        except (EOFError, OSError):
            status, payload = "error", self._death()
        if status == "error":
            self.error = payload
            return None
        return payload

    def _death(self) -> str:
        """Why the worker's pipe closed: its exit status, named when a signal killed it (SIGILL
        is an instruction this CPU or its OS does not allow: a build for another machine)."""
        self.process.join(timeout=10)
        code = self.process.exitcode
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                return f"the worker process was killed by {signal.Signals(-code).name}"
        return f"the worker process died (exit status {code})"

    def wait_loaded(self) -> None:
        self.info = self._ask(None) or {}

    def run(self, prompt: list[int], max_tokens: int, record: bool = True) -> None:
        result = self._ask(("run", prompt, max_tokens))
        if result is not None and record:
            self.runs.append(result)

    def stop(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send(("stop",))
            self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()


# ---- the report -----------------------------------------------------------------------------
def engine_row(worker: Worker, reference: Worker | None) -> dict[str, Any]:
    """One engine's medians, and (for pagedllm) how it compares with llama.cpp's."""
    row: dict[str, Any] = {"engine": worker.spec.name, **worker.info}
    if worker.error is not None:
        row["error"] = worker.error
    if not worker.runs:
        return row
    row.update(median_summary(worker.runs))
    row["decode_tokens_per_s"] = 1e3 / row["decode_ms_per_token"]
    row["decode_ms_per_token_runs"] = [r.decode_ms_per_token for r in worker.runs]
    row["prefill_ms_runs"] = [r.prefill_ms for r in worker.runs]
    row["output_tokens"] = worker.runs[-1].output_tokens
    if reference is not None and reference is not worker and reference.runs:
        base = median_summary(reference.runs)
        row["speed_ratio_vs_llama_cpp"] = base["decode_ms_per_token"] / row["decode_ms_per_token"]
        row["prefill_ratio_vs_llama_cpp"] = base["prefill_ms"] / row["prefill_ms"]
        # the greedy tokens of the last run (same prompt) that agree from the start: a check
        # that both ran the same model, not a score (float32 vs Q4_1 arithmetic drifts apart)
        row["greedy_tokens_matching_llama_cpp"] = common_prefix_len(
            worker.runs[-1].token_ids, reference.runs[-1].token_ids)
    return row


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| engine | prefill ms | decode ms/token | decode tok/s "
             "| llama.cpp ms/token / ours | greedy tokens = llama.cpp |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "decode_ms_per_token" not in row:
            lines.append(f"| {row['engine']} | error: {row.get('error', 'no runs')} | | | | |")
            continue
        ratio = row.get("speed_ratio_vs_llama_cpp")
        ratio_text = f"{ratio:.2f}x" if ratio is not None else (
            "reference" if row["engine"] == LLAMA_CPP else "")
        match = row.get("greedy_tokens_matching_llama_cpp")
        match_text = "" if match is None else f"{match}/{row['output_tokens']}"
        lines.append(f"| {row['engine']} | {row['prefill_ms']:.1f} "
                     f"| {row['decode_ms_per_token']:.2f} | {row['decode_tokens_per_s']:.1f} "
                     f"| {ratio_text} | {match_text} |")
    return "\n".join(lines)


def start_workers(specs: list[EngineSpec]) -> list[Worker]:
    """One process per engine, each loaded before the next starts (loads compete for the
    cores too). A worker that fails to load stays in the list with its error."""
    workers = []
    try:
        for spec in specs:
            print(f"loading {spec.name} ...", flush=True)
            workers.append(Worker(spec))
            workers[-1].wait_loaded()
            if workers[-1].error:
                print(f"  {spec.name}: {workers[-1].error}", flush=True)
    except BaseException:
        for worker in workers:
            worker.stop()
        raise
    return workers


def run_interleaved(workers: list[Worker], args: argparse.Namespace) -> None:
    """Warm each engine up on a prompt of its own, then run the prompts round-robin over the
    engines, every engine getting the same prompt in a round."""
    vocab_size = min((w.info["vocab_size"] for w in workers if "vocab_size" in w.info),
                     default=None)
    if vocab_size is None:
        return
    warmup, *prompts = random_prompts(args.repeats + 1, args.prompt_len, vocab_size, args.seed)
    for worker in workers:
        if worker.error is None:
            worker.run(warmup, min(8, args.output_len), record=False)
            if worker.error:
                print(f"  {worker.spec.name} (warm-up): {worker.error}", flush=True)
    for repeat, prompt in enumerate(prompts, 1):
        for worker in workers:
            worker.run(prompt, args.output_len)
            if len(worker.runs) == repeat:
                print(f"  run {repeat}/{args.repeats} {worker.spec.name}: "
                      f"{worker.runs[-1].decode_ms_per_token:.2f} ms/token, "
                      f"prefill {worker.runs[-1].prefill_ms:.0f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2)")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help="pagedllm's dtype:quantization pairs, comma-separated")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-llama-cpp", action="store_true", help="pagedllm's rows alone")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    if args.prompt_len < 1 or args.output_len < 2 or args.repeats < 1:
        parser.error("--prompt-len and --repeats must be at least 1, --output-len at least 2")
    configs = parse_configs(args.configs)
    n_ctx = max(512, args.prompt_len + args.output_len)
    machine = machine_description()  # the load average before we add ours

    specs = [] if args.skip_llama_cpp else [
        EngineSpec(LLAMA_CPP, args.model, args.threads, n_ctx=n_ctx)]
    specs += [EngineSpec("pagedllm", args.model, args.threads, dtype, quantization)
              for dtype, quantization in configs]
    workers = start_workers(specs)
    try:
        run_interleaved(workers, args)
    finally:
        for worker in workers:
            worker.stop()

    if hasattr(os, "getloadavg"):
        machine["load_average_at_end"] = list(os.getloadavg())
    reference = None if args.skip_llama_cpp else workers[0]
    rows = [engine_row(worker, reference) for worker in workers]
    report = {"model": args.model or _default_model(), "machine": machine,
              "threads": args.threads, "prompt_len": args.prompt_len,
              "output_len": args.output_len, "repeats": args.repeats, "rows": rows}
    print(json.dumps(report, indent=2))
    print()
    print(markdown_table(rows))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
