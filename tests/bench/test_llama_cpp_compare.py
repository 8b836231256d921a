"""benchmarks/llama_cpp_compare.py: its pure helpers (no engine), and its llama.cpp runner on
the bundled GGUF where llama-cpp-python is installed (skipped otherwise)."""

from __future__ import annotations

import math

import pytest

from benchmarks.llama_cpp_compare import (
    LLAMA_CPP,
    EngineSpec,
    RunResult,
    common_prefix_len,
    markdown_table,
    median_summary,
    parse_configs,
    parse_cpuinfo,
    random_prompts,
    timing,
)


def test_parse_configs():
    assert parse_configs("bfloat16:none, float32:gguf,") == [("bfloat16", "none"),
                                                            ("float32", "gguf")]
    for bad in ("bfloat16", "bfloat16:", ":gguf", " , "):
        with pytest.raises(ValueError):
            parse_configs(bad)


def test_timing_splits_prefill_from_decode():
    # first token 0.5 s after the start, then 4 more tokens (one step brought two) by 0.9 s
    stamps = [(10.5, 1), (10.6, 2), (10.8, 4), (10.9, 5)]
    prefill, per_token, total = timing(10.0, stamps)
    assert prefill == pytest.approx(500.0)
    assert per_token == pytest.approx(100.0)  # 400 ms over the 4 tokens after the first
    assert total == pytest.approx(900.0)
    assert math.isnan(timing(10.0, [(10.5, 1)])[1])
    with pytest.raises(ValueError):
        timing(10.0, [])


def test_random_prompts_are_reproducible_and_avoid_special_tokens():
    prompts = random_prompts(3, 64, 200, seed=1)
    assert prompts == random_prompts(3, 64, 200, seed=1)
    assert len({tuple(p) for p in prompts}) == 3  # a fresh prompt per run
    assert all(len(p) == 64 and min(p) >= 100 and max(p) < 200 for p in prompts)


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len([1, 2], [1, 2, 3]) == 2
    assert common_prefix_len([5], [1]) == 0


def test_parse_cpuinfo():
    text = ("processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu avx2 avx512f avx512_bf16 "
            "amx_tile\nprocessor\t: 1\nmodel name\t: Some Xeon\nflags\t\t: fpu avx512f\n")
    assert parse_cpuinfo(text) == {"model_name": "Some Xeon",
                                   "avx512": ["avx512_bf16", "avx512f"], "amx": ["amx_tile"]}
    assert parse_cpuinfo("")["model_name"] == "unknown"


def test_median_summary_and_table():
    runs = [RunResult(p, d, p + 10 * d, 11, [1]) for p, d in ((30, 2.0), (10, 4.0), (20, 3.0))]
    summary = median_summary(runs)
    assert (summary["prefill_ms"], summary["decode_ms_per_token"], summary["runs"]) == (20, 3, 3)
    rows = [{"engine": LLAMA_CPP, **summary, "decode_tokens_per_s": 1e3 / 3, "output_tokens": 11},
            {"engine": "pagedllm bfloat16:none", **summary, "decode_tokens_per_s": 1e3 / 3,
             "output_tokens": 11, "speed_ratio_vs_llama_cpp": 1.5,
             "greedy_tokens_matching_llama_cpp": 11},
            {"engine": "pagedllm float32:gguf", "error": "ValueError: no"}]
    table = markdown_table(rows).splitlines()
    assert len(table) == 5
    assert "reference" in table[2] and "1.50x" in table[3] and "11/11" in table[3]
    assert "error: ValueError: no" in table[4]


def test_llama_cpp_runner_is_greedy_and_restarts_cleanly():
    pytest.importorskip("llama_cpp")
    from benchmarks.llama_cpp_compare import LlamaCppRunner
    from pagedllm.model.source import default_model_path

    try:
        model = default_model_path()
    except ValueError as error:
        pytest.skip(str(error))
    runner = LlamaCppRunner(EngineSpec(LLAMA_CPP, str(model), threads=1))
    first, other = random_prompts(2, 8, runner.info["vocab_size"], seed=0)
    try:
        a = runner.run(first, 4)
        runner.run(other, 4)
        b = runner.run(first, 4)  # reset() must leave nothing of the runs before
    finally:
        runner.close()
    assert a.output_tokens == 4 and a.token_ids == b.token_ids
    assert a.prefill_ms > 0 and a.decode_ms_per_token > 0
