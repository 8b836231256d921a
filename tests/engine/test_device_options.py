"""The CUDA-path options (device, load_format, gpu_memory_utilization, enforce_eager): their
defaults, checks and CLI flags, and that the CPU engine ignores the CUDA-only ones."""

from __future__ import annotations

import pytest
import torch
from worker.helpers import write_config_only_model

from pagedllm import LLM
from pagedllm.config import EngineArgs
from pagedllm.entrypoints.cli import build_parser, main
from pagedllm.worker.worker import resolve_device as _resolve_device


def test_defaults():
    args = EngineArgs()
    assert (args.device, args.load_format, args.gpu_memory_utilization, args.enforce_eager) == (
        "auto", "auto", 0.9, False)
    assert _resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert _resolve_device("cpu") == "cpu"


@pytest.mark.parametrize(("field", "value", "message"), [
    ("device", "gpu", "device must be"),
    ("device", "cuda:x", "device must be"),
    ("load_format", "safetensor", "load_format must be"),
    ("gpu_memory_utilization", 0.0, "gpu_memory_utilization"),
    ("gpu_memory_utilization", 1.2, "gpu_memory_utilization"),
])
def test_bad_values_are_rejected(field, value, message):
    with pytest.raises(ValueError, match=message):
        EngineArgs(**{field: value})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    with pytest.raises(ValueError, match="no CUDA GPU is available"):
        _resolve_device("cuda")
    assert main(["generate", "hi", "--device", "cuda"]) == 2
    assert "no CUDA GPU is available" in capsys.readouterr().err


def test_cli_flags_reach_engine_args():
    args = build_parser().parse_args([
        "generate", "hi", "--device", "cuda:1", "--load-format", "dummy", "--enforce-eager",
        "--gpu-memory-utilization", "0.8"])
    engine_args = EngineArgs.from_cli_args(args)
    assert (engine_args.device, engine_args.load_format, engine_args.enforce_eager,
            engine_args.gpu_memory_utilization) == ("cuda:1", "dummy", True, 0.8)
    plain = EngineArgs.from_cli_args(build_parser().parse_args(["generate", "hi"]))
    assert (plain.device, plain.load_format, plain.enforce_eager) == ("auto", "auto", False)


def test_help_names_the_options(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "throughput", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for piece in ("--device", "cuda when a GPU is available", "--load-format {auto,dummy}",
                  "--enforce-eager", "--gpu-memory-utilization"):
        assert piece in text


def test_cpu_engine_runs_eagerly_without_a_memory_plan(tmp_path):
    folder = write_config_only_model(tmp_path / "tiny")
    engine = LLM(model=str(folder), load_format="dummy", device="cpu", dtype="float32",
                 kv_cache_memory_bytes=4 << 20).llm_engine
    assert engine.worker.cuda_graph_sizes == [] and engine.worker.runner.decode_graphs is None
    assert engine.worker.memory_plan is None and engine.worker.cuda_graph_capture_s == 0.0
