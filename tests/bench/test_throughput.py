"""`pagedllm bench throughput` on a tiny random model: both engines, and dataset workloads."""

from __future__ import annotations

import json

import pytest

from pagedllm.bench.dataset import WorkItem, load_dataset, with_token_ids
from pagedllm.entrypoints.cli import main

from .helpers import write_jsonl


def run_throughput(model, tmp_path, *extra: str) -> dict:
    report_path = tmp_path / "report.json"
    code = main(["bench", "throughput", "--model", str(model), "--kv-cache-memory", "8MiB",
                 "--output-json", str(report_path), *extra])
    assert code == 0
    return json.loads(report_path.read_text())


def test_bench_throughput_with_transformers_baseline(tiny_model, tmp_path):
    report = run_throughput(tiny_model, tmp_path, "--skip-tokenizer-init", "--num-prompts", "6",
                            "--input-len", "12", "--output-len", "5", "--range-ratio", "0.5",
                            "--baseline", "hf", "--hf-batch-sizes", "2,6")
    engines = [r["engine"] for r in report["results"]]
    assert engines == ["pagedllm", "transformers(bs=2)", "transformers(bs=6)"]
    ours, hf_small, hf_big = report["results"]
    assert ours["num_requests"] == 6
    # same requested work on both sides
    assert ours["output_tokens"] == hf_small["output_tokens"] == hf_big["output_tokens"]
    assert ours["prompt_tokens"] == hf_small["prompt_tokens"]
    for result in report["results"]:
        assert result["output_tokens_per_s"] > 0 and result["elapsed_s"] > 0
    assert report["speedup_vs_transformers"] > 0
    assert report["peak_rss_mib"] > 0 and report["matmul_peak_gflops"] > 0
    kv = report["kv_cache"]
    assert 0 <= kv["mean_waste_fraction"] < 1 and 0 < kv["peak_usage"] <= 1
    assert kv["counters"]["prefix_cache_queries"] > 0


def test_bench_throughput_runs_a_token_id_dataset(tiny_model, tmp_path):
    dataset = write_jsonl(tmp_path / "data.jsonl", [
        {"prompt_token_ids": [5, 6, 7, 8], "output_len": 3},
        "",  # blank lines are skipped
        {"prompt_token_ids": list(range(10, 30)), "output_len": 7, "source": "kept, ignored"},
        {"prompt_token_ids": [9, 9, 9], "prompt": "text the engine does not need",
         "output_len": 2},
    ])
    report = run_throughput(tiny_model, tmp_path, "--skip-tokenizer-init", "--dataset",
                            str(dataset))
    (ours,) = report["results"]
    assert ours["num_requests"] == 3
    assert ours["prompt_tokens"] == 4 + 20 + 3
    assert ours["output_tokens"] == 3 + 7 + 2


def test_bench_throughput_tokenizes_dataset_text_and_takes_the_first_n(tiny_model, tmp_path):
    dataset = write_jsonl(tmp_path / "data.jsonl", [
        {"prompt": "the sea and the river", "output_len": 4},  # one token per word
        {"prompt_token_ids": [7] * 9, "output_len": 2},
        {"prompt": "never read", "output_len": 50},
    ])
    report = run_throughput(tiny_model, tmp_path, "--dataset", str(dataset),
                            "--num-prompts", "2")
    (ours,) = report["results"]
    assert (ours["num_requests"], ours["prompt_tokens"], ours["output_tokens"]) == (2, 14, 6)


@pytest.mark.parametrize(("line", "reason"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"output_len": 4}', 'needs "prompt"'),
    ('{"prompt": "hi"}', '"output_len" must be a positive integer'),
    ('{"prompt": "hi", "output_len": 0}', '"output_len" must be a positive integer'),
    ('{"prompt": "hi", "output_len": true}', '"output_len" must be a positive integer'),
    ('{"prompt": "", "output_len": 3}', '"prompt" must be non-empty text'),
    ('{"prompt_token_ids": [], "output_len": 3}', '"prompt_token_ids" must be a non-empty list'),
    ('{"prompt_token_ids": [1, "2"], "output_len": 3}', "found '2'"),
    ('{"prompt_token_ids": [1, -2], "output_len": 3}', "found -2"),
])
def test_malformed_dataset_line_names_line_and_reason(tmp_path, capsys, line, reason):
    dataset = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine", "output_len": 2}, line])
    # The dataset is read before any model loads: no --model needed to see the error.
    code = main(["bench", "throughput", "--dataset", str(dataset)])
    assert code == 2
    error = capsys.readouterr().err
    assert f"{dataset}, line 2: " in error and reason in error, error


def test_dataset_count_and_tokenizer_errors(tmp_path):
    dataset = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "a b", "output_len": 2}])
    with pytest.raises(ValueError, match="asks for 5 requests, the dataset holds 1"):
        load_dataset(dataset, num_prompts=5)
    with pytest.raises(ValueError, match="holds no request"):
        load_dataset(write_jsonl(tmp_path / "empty.jsonl", ["", " "]))
    with pytest.raises(ValueError, match="skip-tokenizer-init"):
        with_token_ids([WorkItem(2, prompt="a b")], tokenizer=None)
