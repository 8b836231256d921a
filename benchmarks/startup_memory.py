"""Start-up time and resident weight bytes of one checkpoint, beside its file size.

    python -m benchmarks.startup_memory MODEL [--quantization Q] [--dtype bfloat16]

MODEL is an HF folder, a .gguf file, or "default" (the bundled GGUF). Resident bytes are what
the start-up line prints: parameters, buffers and quantized layers' packed layouts
(worker/kv_cache.weight_bytes). Start-up is `LLM(...)` until ready; run each checkpoint in a
process of its own, with the kernels already built, for figures that compare.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pagedllm import LLM
from pagedllm.model.source import default_model_path
from pagedllm.worker.kv_cache import weight_bytes


def checkpoint_bytes(model: str | None) -> int:
    path = default_model_path() if model is None else Path(model)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    return sum(file.stat().st_size for file in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    model = None if args.model == "default" else args.model
    started = time.perf_counter()
    llm = LLM(model=model, dtype=args.dtype, quantization=args.quantization,
              kv_cache_memory_bytes=64 << 20)
    report = {"model": args.model, "quantization": args.quantization, "dtype": args.dtype,
              "startup_s": time.perf_counter() - started,
              "file_mib": checkpoint_bytes(model) / 2**20,
              "resident_weights_mib": weight_bytes(llm.llm_engine.worker.model) / 2**20}
    print(json.dumps(report))
    print(f"| {args.model} | {report['file_mib']:.1f} | {report['resident_weights_mib']:.1f} | "
          f"{report['startup_s']:.1f} |")


if __name__ == "__main__":
    main()
