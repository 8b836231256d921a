"""`pagedllm bench throughput` on a tiny random model: it runs both engines and reports."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from pagedllm.entrypoints.cli import main


def test_bench_throughput_with_transformers_baseline(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                         max_position_embeddings=128)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    report_path = tmp_path / "report.json"
    code = main(["bench", "throughput", "--model", str(tmp_path / "model"),
                 "--skip-tokenizer-init", "--num-prompts", "6", "--input-len", "12",
                 "--output-len", "5", "--range-ratio", "0.5", "--baseline", "hf",
                 "--hf-batch-sizes", "2,6", "--kv-cache-memory", "8MiB",
                 "--output-json", str(report_path)])
    assert code == 0
    report = json.loads(report_path.read_text())
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
