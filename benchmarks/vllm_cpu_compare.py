"""Offline throughput of pagedllm and vLLM's CPU backend, one after the other, on one machine.

Both engines get the same workload shape (random-token prompts and outputs drawn uniformly
around --input-len / --output-len by --range-ratio, EOS ignored, every request submitted at
once) and the same weights: pagedllm reads the GGUF (or folder) itself, vLLM reads the dense HF
folder transformers writes from it (pagedllm.bench.throughput.dense_hf_folder). vLLM runs from
its own venv (../shared/peers/setup_vllm_cpu.sh makes it) on every core
(VLLM_CPU_OMP_THREADS_BIND), with a 4 GiB KV cache like ours.

    python benchmarks/vllm_cpu_compare.py --dtype bfloat16 --vllm-dtype bfloat16 \\
        --output-json compare.json

Prints one row per engine and the ratio of output tokens/s; --output-json writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from pagedllm.bench.throughput import dense_hf_folder
from pagedllm.model.source import default_model_path
from pagedllm.platform.cpu import cpu_info

DEFAULT_VENV = Path.home() / ".cache" / "peers" / "vllm-venv"

# vllm-cpu's distribution is named vllm-cpu, so vLLM's own version lookup fails without this
# shim; run with -c, so the engine core vLLM spawns does not rerun the CLI.
VLLM_CLI = """
import importlib.metadata as md, sys
_version = md.version
md.version = lambda name: _version("vllm-cpu") if name == "vllm" else _version(name)
from vllm.entrypoints.cli.main import main
sys.argv = ["vllm"] + sys.argv[1:]
sys.exit(main())
"""


def workload_args(args: argparse.Namespace) -> list[str]:
    return ["--num-prompts", str(args.num_prompts), "--seed", str(args.seed)]


def run_pagedllm(args: argparse.Namespace, out: Path) -> dict:
    command = [sys.executable, "-m", "pagedllm.entrypoints.cli", "bench", "throughput",
               *workload_args(args), "--input-len", str(args.input_len),
               "--output-len", str(args.output_len), "--range-ratio", str(args.range_ratio),
               "--dtype", args.dtype, "--kv-cache-memory", "4GiB", "--output-json", str(out)]
    if args.model:
        command += ["--model", args.model]
    subprocess.run(command, check=True)
    result = json.loads(out.read_text())["results"][0]
    return {"engine": f"pagedllm ({args.dtype})", "seconds": result["elapsed_s"],
            "requests_per_s": result["requests_per_s"],
            "output_tokens_per_s": result["output_tokens_per_s"],
            "total_tokens_per_s": result["total_tokens_per_s"]}


def run_vllm(args: argparse.Namespace, folder: Path, out: Path) -> dict:
    python = Path(args.vllm_venv) / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"no vLLM venv at {args.vllm_venv}: run ../shared/peers/setup_vllm_cpu.sh")
    command = [str(python), "-c", VLLM_CLI, "bench", "throughput", "--model", str(folder),
               "--dtype", args.vllm_dtype, "--dataset-name", "random", *workload_args(args),
               "--random-input-len", str(args.input_len),
               "--random-output-len", str(args.output_len),
               "--random-range-ratio", str(args.range_ratio), "--output-json", str(out)]
    env = os.environ | {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "4",
                        "VLLM_CPU_OMP_THREADS_BIND": f"0-{cpu_info().num_cores - 1}"}
    finished = subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    sys.stderr.write(finished.stderr[-4000:])
    report = json.loads(out.read_text())
    # vLLM's report has totals; its printed summary line has the output rate too
    match = re.search(r"([\d.]+) output tokens/s", finished.stdout)
    output_rate = float(match.group(1)) if match else float("nan")
    return {"engine": f"vLLM CPU ({args.vllm_dtype})", "seconds": report["elapsed_time"],
            "requests_per_s": report["requests_per_second"],
            "output_tokens_per_s": output_rate,
            "total_tokens_per_s": report["tokens_per_second"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2)")
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--input-len", type=int, default=272)
    parser.add_argument("--output-len", type=int, default=136)
    parser.add_argument("--range-ratio", type=float, default=0.88)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", help="pagedllm's dtype")
    parser.add_argument("--vllm-dtype", default="bfloat16")
    parser.add_argument("--vllm-venv", default=str(DEFAULT_VENV))
    parser.add_argument("--skip-vllm", action="store_true", help="pagedllm's row alone")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    gguf = Path(args.model) if args.model else default_model_path()
    info = cpu_info()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(run_pagedllm(args, Path(tmp) / "pagedllm.json"))
        if not args.skip_vllm:
            folder = dense_hf_folder(gguf) if gguf.suffix == ".gguf" else gguf
            rows.append(run_vllm(args, folder, Path(tmp) / "vllm.json"))
    report = {"cpu": info.describe(), "rows": rows}
    if len(rows) == 2:
        report["output_ratio"] = rows[0]["output_tokens_per_s"] / rows[1]["output_tokens_per_s"]
    print(f"\n{info.describe()}")
    print(f"{'engine':<26}{'seconds':>9}{'req/s':>8}{'out tok/s':>11}{'total tok/s':>13}")
    for row in rows:
        print(f"{row['engine']:<26}{row['seconds']:>9.1f}{row['requests_per_s']:>8.2f}"
              f"{row['output_tokens_per_s']:>11.1f}{row['total_tokens_per_s']:>13.1f}")
    if "output_ratio" in report:
        print(f"pagedllm / vLLM output tok/s: {report['output_ratio']:.2f}x")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
