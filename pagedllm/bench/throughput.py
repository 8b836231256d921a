"""Offline throughput: pagedllm's LLM.generate against transformers' batched generate.

Both engines get the same token-id prompts and must produce exactly `output_len` tokens each
(EOS ignored), so they do the same work; only requested output tokens are counted. The prompts
are random tokens (`--input-len`, `--output-len`, `--range-ratio`, `--seed`) or a JSONL dataset
(`--dataset`, format in bench/dataset.py).

With `--load-format dummy` the engine has random weights (model/dummy.py), and so does the
transformers baseline, built from the same config with transformers' own random init: the same
shapes and work per token, not the same numbers. The baseline runs on the engine's device.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pagedllm.bench.dataset import (
    WorkItem,
    load_dataset,
    synthetic_token_workload,
    with_token_ids,
)
from pagedllm.config import EngineArgs, cache_dir
from pagedllm.platform.cpu import cpu_info

DEFAULT_NUM_PROMPTS = 64


@dataclass
class ThroughputResult:
    engine: str
    num_requests: int
    elapsed_s: float
    prompt_tokens: int
    output_tokens: int

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.elapsed_s

    def as_dict(self) -> dict:
        return {**asdict(self), "requests_per_s": self.requests_per_s,
                "output_tokens_per_s": self.output_tokens_per_s,
                "total_tokens_per_s": self.total_tokens_per_s}


def run_pagedllm(llm, work: list[WorkItem]) -> ThroughputResult:
    from pagedllm import SamplingParams, TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=w.prompt_token_ids) for w in work]
    params = [SamplingParams(temperature=0, max_tokens=w.output_len, ignore_eos=True,
                             detokenize=llm.get_tokenizer() is not None) for w in work]
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert produced == sum(w.output_len for w in work), "every request must produce its length"
    return ThroughputResult("pagedllm", len(work), elapsed,
                            sum(len(w.prompt_token_ids) for w in work), produced)


def random_transformers_model(config, dtype: torch.dtype, device: str):
    """A transformers model of `config`'s shape with transformers' random init, built on the
    device (initializing billions of weights on the CPU would take minutes)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    config.dtype = dtype
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def load_transformers_model(path: Path, dtype: torch.dtype):
    """An HF folder, or a .gguf file read by transformers' GGUF loader and then rebuilt as a
    plain dense model: left to itself transformers keeps GGUF weights quantized and runs its
    dequantizing kernels, which is not the bf16 baseline users compare against."""
    from transformers import AutoModelForCausalLM

    if path.suffix != ".gguf":
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                  dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    config.dtype = dtype
    dense = type(loaded)(config)
    dense.load_state_dict(loaded.state_dict())
    return dense.to(dtype).eval()


def dense_hf_folder(gguf_path: Path) -> Path:
    """The GGUF model as a plain float32 HF folder (safetensors + tokenizer), written once by
    transformers' own GGUF loader and cached: what another engine (or a test's reference) loads
    when it should see the same weights as ours."""
    from transformers import AutoTokenizer

    stat = gguf_path.stat()
    folder = cache_dir() / "dense-hf" / f"{gguf_path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if not (folder / "config.json").is_file():
        tmp = folder.with_suffix(".tmp")
        load_transformers_model(gguf_path, torch.float32).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(tmp)
        tmp.rename(folder)
    return folder


def run_transformers(model, work: list[WorkItem], batch_size: int) -> ThroughputResult:
    """Batched, left-padded, sorted by length; each batch runs to its longest output and only the
    requested tokens are counted."""
    device = model.device
    order = sorted(work, key=lambda w: len(w.prompt_token_ids))
    started = time.perf_counter()
    for i in range(0, len(order), batch_size):
        batch = order[i : i + batch_size]
        width = max(len(w.prompt_token_ids) for w in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, item in enumerate(batch):
            n = len(item.prompt_token_ids)
            ids[row, width - n :] = torch.tensor(item.prompt_token_ids)
            mask[row, width - n :] = 1
        new = max(w.output_len for w in batch)
        with torch.inference_mode():
            model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0)
    synchronize(device)
    elapsed = time.perf_counter() - started
    return ThroughputResult(f"transformers(bs={batch_size})", len(work), elapsed,
                            sum(len(w.prompt_token_ids) for w in work),
                            sum(w.output_len for w in work))


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work, so that a timer reads what it did (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(dtype: torch.dtype, device: str = "cpu", size: int = 2048,
                       repeats: int = 5) -> float:
    """What a large square matmul reaches on the device: the arithmetic ceiling for the ratio
    below. In the dtype the linear layers compute in: float32 for bf16 weights on a CPU whose
    oneDNN cannot run bf16 (model/layers/linear.py), where a bf16 matmul would crawl."""
    if device == "cpu" and dtype == torch.bfloat16 and not cpu_info().onednn_bf16:
        dtype = torch.float32
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    torch.matmul(a, b)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("throughput", help="offline throughput, optionally vs transformers")
    parser.add_argument("--num-prompts", type=int, default=None,
                        help=f"requests to run (default: {DEFAULT_NUM_PROMPTS}, or the whole "
                             "--dataset)")
    parser.add_argument("--dataset", default=None,
                        help="JSONL file of {prompt | prompt_token_ids, output_len} per line "
                             "(default: random token prompts)")
    parser.add_argument("--input-len", type=int, default=200, help="synthetic prompt length")
    parser.add_argument("--output-len", type=int, default=128, help="synthetic output length")
    parser.add_argument("--range-ratio", type=float, default=0.0,
                        help="synthetic lengths vary uniformly by this fraction either way")
    parser.add_argument("--baseline", choices=["none", "hf"], default="none")
    parser.add_argument("--hf-batch-sizes", type=lambda s: [int(x) for x in s.split(",")],
                        default=[16, 64], help="transformers batch sizes to try; the best counts")
    parser.add_argument("--hf-model", default=None,
                        help="HF folder or .gguf for the baseline (default: the engine's model; "
                             "with --load-format dummy, only its config is read)")
    parser.add_argument("--output-json", default=None)
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from pagedllm import LLM

    # A bad dataset line should fail in a second, not after the model has loaded.
    dataset = load_dataset(args.dataset, args.num_prompts) if args.dataset else None
    started = time.perf_counter()
    llm = LLM(**vars(EngineArgs.from_cli_args(args)))
    startup = time.perf_counter() - started
    engine = llm.llm_engine
    work = build_workload(args, llm, dataset)
    first_step = engine.num_steps
    results = [run_pagedllm(llm, work)]
    kv_cache = kv_cache_report(engine, first_step)
    model_config = engine.model_config
    device, capture_s = worker_device(engine)
    if args.baseline == "hf":
        # On a GPU the engine holds most of the memory (KV cache): release it first.
        del llm, engine
        release_device_memory(device)
        model = transformers_baseline(args, model_config, device)
        results += [run_transformers(model, work, bs) for bs in args.hf_batch_sizes]
        del model
    report = {
        "config": {k: v for k, v in vars(args).items() if k != "handler"},
        "weights": args.load_format if args.load_format == "dummy" else "checkpoint",
        "device": device,
        "startup_s": startup,
        "cuda_graph_capture_s": capture_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "matmul_peak_gflops": matmul_peak_gflops(model_config.dtype, device),
        "results": [r.as_dict() for r in results],
        "kv_cache": kv_cache,
    }
    best_hf = max((r for r in results[1:]), key=lambda r: r.output_tokens_per_s, default=None)
    if best_hf is not None:
        report["speedup_vs_transformers"] = (results[0].output_tokens_per_s
                                             / best_hf.output_tokens_per_s)
    print_table(report)
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(report, handle, indent=2, default=str)
    return 0


def release_device_memory(device: str) -> None:
    """Collect what was dropped (the engine has reference cycles) and hand the allocator's
    cached blocks back to the GPU."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def transformers_baseline(args: argparse.Namespace, model_config, device: str):
    """The baseline model on the engine's device: the checkpoint, or with dummy weights a
    random model of the same config."""
    from pagedllm.model.loader import load_model_config

    dtype = model_config.dtype
    if args.load_format == "dummy":
        config = model_config.hf_config
        if args.hf_model:
            config = load_model_config(args.hf_model, args.dtype, device=device).hf_config
        return random_transformers_model(config, dtype, device)
    hf_path = Path(args.hf_model) if args.hf_model else model_config.source.path
    return load_transformers_model(hf_path, dtype).to(device)


def build_workload(args: argparse.Namespace, llm,
                   dataset: list[WorkItem] | None) -> list[WorkItem]:
    """The dataset's requests with token ids (both engines run on ids), or random prompts."""
    tokenizer = llm.get_tokenizer()
    if dataset is not None:
        return with_token_ids(dataset, tokenizer)
    skip = set(getattr(tokenizer, "all_special_ids", []) or [])
    return synthetic_token_workload(args.num_prompts or DEFAULT_NUM_PROMPTS, args.input_len,
                                    args.output_len, args.range_ratio,
                                    llm.llm_engine.model_config.vocab_size, args.seed, skip)


def worker_device(engine) -> tuple[str, float]:
    """The worker's device and CUDA-graph capture seconds. A worker in another process (executor
    "mp", or a core process) is not reachable from here: its device is what the options resolve
    to, and its capture time is not reported (0)."""
    if engine.args.distributed_executor_backend == "uni" and not engine.args.engine_core_process:
        return engine.worker.device, engine.worker.cuda_graph_capture_s
    from pagedllm.worker.worker import resolve_device

    return resolve_device(engine.args.device), 0.0


def kv_cache_report(engine, first_step: int) -> dict:
    """The KV cache over the run: waste (allocated slots holding no token) sampled after every
    step, as the mean of the per-step fractions and as total empty / total allocated slots, the
    peak block usage, and the engine's counters (prefix-cache hits, preemptions, swaps)."""
    records = [r for r in engine.step_records if r.step > first_step and r.num_allocated_slots]
    empty = sum(r.num_empty_slots for r in records)
    allocated = sum(r.num_allocated_slots for r in records)
    num_blocks = engine.cache_config.num_blocks
    return {
        "mean_waste_fraction": (sum(r.waste_fraction for r in records) / len(records)
                                if records else 0.0),
        "slot_weighted_waste_fraction": empty / allocated if allocated else 0.0,
        "peak_usage": max((1 - r.num_free_blocks / num_blocks for r in records), default=0.0),
        "counters": engine.kv_cache_stats().as_dict(),
    }


def print_table(report: dict) -> None:
    if report["weights"] == "dummy":
        print("weights: random (load format dummy); the transformers baseline has random weights "
              "of its own: the same shapes and work per token, not the same values")
    print(f"{'engine':<22}{'req/s':>9}{'out tok/s':>12}{'total tok/s':>13}{'seconds':>10}")
    for r in report["results"]:
        print(f"{r['engine']:<22}{r['requests_per_s']:>9.2f}{r['output_tokens_per_s']:>12.1f}"
              f"{r['total_tokens_per_s']:>13.1f}{r['elapsed_s']:>10.1f}")
    if "speedup_vs_transformers" in report:
        print(f"pagedllm / best transformers: {report['speedup_vs_transformers']:.2f}x")
    kv = report["kv_cache"]
    print(f"KV cache: waste {kv['mean_waste_fraction']:.2%} of allocated slots (mean over "
          f"steps), peak usage {kv['peak_usage']:.0%}, prefix-cache hit rate "
          f"{kv['counters']['prefix_cache_hit_rate']:.0%}, preemptions "
          f"{kv['counters']['num_preemptions']}")
    print(f"start-up {report['startup_s']:.1f} s, peak RSS {report['peak_rss_mib']:.0f} MiB, "
          f"matmul peak {report['matmul_peak_gflops']:.0f} GFLOP/s")
