"""`pagedllm serve` arguments: the engine's options come from EngineArgs, the model is positional."""

from __future__ import annotations

import dataclasses

import pytest

from pagedllm.config import EngineArgs
from pagedllm.entrypoints.cli import SERVE_DEFAULTS, build_parser
from pagedllm.entrypoints.openai.cli_args import API_KEY_ENV, resolve_api_key


def test_serve_takes_model_server_and_engine_options():
    args = build_parser().parse_args([
        "serve", "/models/m.gguf", "--port", "9001", "--served-model-name", "a", "b",
        "--api-key", "k", "--max-model-len", "128", "--kv-cache-memory", "1GiB",
        "--max-num-seqs", "4", "--max-num-batched-tokens", "64", "--dtype", "float32",
        "--shutdown-timeout", "3"])
    assert (args.command, args.host, args.port) == ("serve", "127.0.0.1", 9001)
    assert args.served_model_name == ["a", "b"] and args.api_key == "k"
    assert args.shutdown_timeout == 3.0
    engine_args = EngineArgs.from_cli_args(args)
    assert engine_args.model == "/models/m.gguf"
    assert engine_args.kv_cache_memory_bytes == 1 << 30
    assert (engine_args.max_model_len, engine_args.max_num_seqs) == (128, 4)
    assert (engine_args.max_num_batched_tokens, engine_args.dtype) == (64, "float32")


def test_serve_has_every_engine_option_and_a_default_model():
    parser = build_parser()
    args = parser.parse_args(["serve"])
    assert args.model is None and args.port == 8000 and args.api_key is None
    # One definition: every EngineArgs field is an option of `serve`, with its default (or the
    # server's own, declared in one place).
    for f in dataclasses.fields(EngineArgs):
        assert hasattr(args, f.name), f.name
        if f.name != "model":
            assert getattr(args, f.name) == SERVE_DEFAULTS.get(f.name, f.default), f.name
    assert args.engine_core_process and not EngineArgs().engine_core_process


def test_api_key_from_flag_or_environment(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert resolve_api_key(None) == "from-env"
    assert resolve_api_key("from-flag") == "from-flag"
    monkeypatch.setenv(API_KEY_ENV, "")
    assert resolve_api_key(None) is None
    monkeypatch.delenv(API_KEY_ENV)
    assert resolve_api_key(None) is None


def test_serve_quantization_and_kv_cache_options(capsys):
    args = build_parser().parse_args(["serve", "m.gguf", "--quantization", "gguf",
                                      "--kv-cache-dtype", "fp8", "--calculate-kv-scales"])
    engine_args = EngineArgs.from_cli_args(args)
    assert (engine_args.quantization, engine_args.kv_cache_dtype) == ("gguf", "fp8")
    assert engine_args.calculate_kv_scales
    for flag, value, a_choice in (("--kv-cache-dtype", "int8", "fp8_e5m2"),
                                  ("--quantization", "bitsandbytes", "compressed-tensors")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", flag, value])
        error = capsys.readouterr().err
        assert f"invalid choice: '{value}'" in error and a_choice in error
