"""`pagedllm bench latency` on a tiny random model: TTFT, decode-step and batch percentiles."""

from __future__ import annotations

import json

import pytest

from pagedllm.bench.stats import percentile, summarize
from pagedllm.entrypoints.cli import main

BATCH, OUTPUT_LEN, ITERS = 3, 6, 3


def assert_ordered_positive(summary: dict, count: int) -> None:
    assert summary["count"] == count
    assert summary["mean"] > 0
    assert 0 < summary["p50"] <= summary["p90"] <= summary["p99"]


def test_bench_latency_reports_percentiles(tiny_model, tmp_path):
    report_path = tmp_path / "latency.json"
    code = main(["bench", "latency", "--model", str(tiny_model), "--skip-tokenizer-init",
                 "--batch-size", str(BATCH), "--input-len", "8", "--output-len", str(OUTPUT_LEN),
                 "--num-iters", str(ITERS), "--num-iters-warmup", "1",
                 "--kv-cache-memory", "8MiB", "--output-json", str(report_path)])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert report["config"]["batch_size"] == BATCH and report["num_batches"] == ITERS
    # One step prefills the whole batch and gives each request its first token; each of the
    # other OUTPUT_LEN - 1 steps decodes one token for all three.
    decode_steps = ITERS * (OUTPUT_LEN - 1)
    assert report["num_decode_steps"] == decode_steps
    assert report["mean_decode_batch_size"] == BATCH
    assert_ordered_positive(report["ttft_ms"], ITERS * BATCH)
    assert_ordered_positive(report["decode_step_ms"], decode_steps)
    assert_ordered_positive(report["decode_ms_per_token"], decode_steps)
    assert_ordered_positive(report["e2e_ms"], ITERS)
    assert report["decode_ms_per_token"]["mean"] == pytest.approx(
        report["decode_step_ms"]["mean"] / BATCH)
    assert report["ttft_ms"]["p99"] < report["e2e_ms"]["p99"]
    # Salted prompts: the same prompts every iteration, yet no prefix-cache hit.
    assert report["prefix_cache_hits"] == 0


def test_bench_latency_rejects_bad_sizes(capsys):
    assert main(["bench", "latency", "--num-iters", "0"]) == 2
    assert "--num-iters must be at least 1" in capsys.readouterr().err


def test_percentiles_interpolate_between_ranks():
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([0.0, 10.0], 90) == pytest.approx(9.0)
    summary = summarize([4.0, 1.0, 3.0, 2.0])
    assert (summary.count, summary.mean, summary.p50) == (4, 2.5, 2.5)
    assert summary.p90 == pytest.approx(3.7) and summary.p99 == pytest.approx(3.97)
    assert summarize([]) is None
    one = summarize([7.0])
    assert one.p50 == one.p90 == one.p99 == 7.0
