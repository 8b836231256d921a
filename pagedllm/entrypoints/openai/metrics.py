"""GET /metrics: the engine's state at scrape time plus counters and latency histograms.

Gauges (running, waiting, KV-cache usage, blocks) are read from the engine thread's latest
published `EngineStats` when Prometheus scrapes. Counters and histograms are fed by the engine
thread once per finished request (prometheus-client's metrics are thread-safe).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pagedllm.core.stats import SpecDecodingStats
from pagedllm.engine.async_llm import AsyncLLM, RequestStats

PREFIX = "pagedllm:"
VLLM_PREFIX = "vllm:"  # the same values under vLLM's names, each series labelled model_name
# pagedllm series -> its vLLM name (docs/serving.md lists them): what dashboards and
# autoscaling rules written for vLLM read
VLLM_GAUGES = {"num_requests_running": "num_requests_running",
               "num_requests_waiting": "num_requests_waiting",
               "num_requests_swapped": "num_requests_swapped",
               "kv_cache_usage_perc": "kv_cache_usage_perc"}
VLLM_COUNTERS = {"prefix_cache_queries": "prefix_cache_queries",
                 "prefix_cache_hits": "prefix_cache_hits",
                 "num_preemptions": "num_preemptions"}
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. CPU serving is slow, so the buckets reach further than a GPU server's would.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class EngineStateCollector(Collector):
    """The engine's published snapshot, as gauges and counters, at scrape time."""

    def __init__(self, engine: AsyncLLM, model_name: str = "") -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        for metric in self._collect():
            yield metric
            vllm_name = (VLLM_GAUGES if metric.type == "gauge" else VLLM_COUNTERS).get(
                metric.name.removeprefix(PREFIX))
            if vllm_name is not None:
                yield self._as_vllm(metric, vllm_name)

    def _as_vllm(self, metric: Metric, name: str) -> Metric:
        kind = GaugeMetricFamily if metric.type == "gauge" else CounterMetricFamily
        family = kind(VLLM_PREFIX + name, metric.documentation, labels=["model_name"])
        family.add_metric([self.model_name], metric.samples[0].value)
        return family

    def _collect(self) -> Iterator[Metric]:
        stats = self.engine.stats
        gauges = [
            ("num_requests_running", "Sequences in the running batch", stats.num_running),
            ("num_requests_waiting", "Sequences waiting to be scheduled", stats.num_waiting),
            ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1)",
             stats.kv_cache_usage),
            ("kv_cache_free_blocks", "KV-cache blocks that are free (cached ones included)",
             stats.num_free_blocks),
            ("kv_cache_total_blocks", "KV-cache blocks in all", stats.num_blocks),
            ("max_batch_size", "Most sequences scheduled in one step so far",
             stats.max_batch_size),
        ]
        counters = [("engine_steps", "Engine steps that ran the model", stats.num_steps)]
        kv = stats.kv_cache
        if kv is not None:
            gauges.append(("kv_cache_waste_perc", "Empty slots of the blocks in use (0 to 1)",
                           kv.waste_fraction))
            gauges.append(("num_requests_swapped", "Requests swapped out to host memory",
                           kv.num_swapped_requests))
            counters += [
                ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                 kv.prefix_cache_queries),
                ("prefix_cache_hits", "Prompt tokens found in the prefix cache",
                 kv.prefix_cache_hits),
                ("num_preemptions", "Requests preempted so far", kv.num_preemptions),
                ("kv_cache_evictions", "Cached blocks evicted to be reused", kv.num_evictions),
            ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(PREFIX + name, doc, value=value)
        for name, doc, value in counters:
            yield CounterMetricFamily(PREFIX + name, doc, value=value)
        if stats.max_loras:
            yield lora_requests_info(stats)
        if stats.spec_decoding is not None:
            yield from spec_decode_counters(stats.spec_decoding)


def spec_decode_counters(spec: SpecDecodingStats) -> Iterator[Metric]:
    """vLLM's spec_decode_* counters: acceptance rate = accepted / draft tokens, and per
    position (the label) accepted / drafts."""
    for name, doc, value in (
        ("spec_decode_num_drafts", "Proposals verified (one per sequence and step)",
         spec.num_drafts),
        ("spec_decode_num_draft_tokens", "Draft tokens verified", spec.num_draft_tokens),
        ("spec_decode_num_accepted_tokens", "Draft tokens accepted", spec.num_accepted_tokens),
    ):
        yield CounterMetricFamily(PREFIX + name, doc, value=value)
    per_position = CounterMetricFamily(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                       "Draft tokens accepted, by position in the proposal",
                                       labels=["position"])
    for position, count in enumerate(spec.num_accepted_per_position):
        per_position.add_metric([str(position)], count)
    yield per_position


def lora_requests_info(stats) -> GaugeMetricFamily:
    """vLLM's lora_requests_info: the adapters of the running and of the waiting requests as
    comma-separated labels, valued at the time of the snapshot they come from."""
    gauge = GaugeMetricFamily(PREFIX + "lora_requests_info", "Running stats on LoRA requests",
                              labels=["max_lora", "running_lora_adapters",
                                      "waiting_lora_adapters"])
    gauge.add_metric([str(stats.max_loras), ",".join(stats.running_loras),
                      ",".join(stats.waiting_loras)], stats.published_at)
    return gauge


class ServerMetrics:
    def __init__(self, engine: AsyncLLM, model_name: str = "") -> None:
        # The *_created series (one timestamp per counter) only add noise to a scrape. This is
        # process-wide in prometheus-client; the server owns its process.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        self.registry.register(EngineStateCollector(engine, model_name))
        self.model_name = model_name
        r = self.registry
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished "
                                     "requests", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated by "
                                         "finished requests", registry=r)
        self.request_success = Counter(PREFIX + "request_success", "Finished requests, by "
                                       "finish reason (stop, length, abort)",
                                       ["finished_reason"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Arrival to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds", "Mean time between "
                              "output tokens, per request", buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to finish",
                             buckets=E2E_BUCKETS, registry=r)
        self.queue = Histogram(PREFIX + "request_queue_time_seconds", "Arrival to first "
                               "scheduled", buckets=TTFT_BUCKETS, registry=r)
        self.vllm = VLLMRequestMetrics(r, model_name)
        engine.add_observer(self.observe)

    def observe(self, stats: RequestStats) -> None:
        """Runs on the engine thread when a request ends."""
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        self.generation_tokens.inc(stats.num_generation_tokens)
        self.request_success.labels(finished_reason=stats.finish_reason).inc()
        self.e2e.observe(stats.finished_time - stats.arrival_time)
        if stats.first_scheduled_time is not None:
            self.queue.observe(max(0.0, stats.first_scheduled_time - stats.arrival_time))
        if stats.first_token_time is not None:
            self.ttft.observe(stats.first_token_time - stats.arrival_time)
            if stats.num_generation_tokens > 1:
                self.tpot.observe(mean_token_gap(stats))
        self.vllm.observe(stats)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def mean_token_gap(stats: RequestStats) -> float:
    """Mean seconds between a request's output tokens (it has more than one)."""
    return (stats.finished_time - stats.first_token_time) / (stats.num_generation_tokens - 1)


class VLLMRequestMetrics:
    """The per-request series under vLLM's names, labelled model_name."""

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(VLLM_PREFIX + name, doc, ["model_name", *labels], registry=registry)

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(VLLM_PREFIX + name, doc, ["model_name"], buckets=buckets,
                             registry=registry)

        self.model_name = model_name
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests")
        self.generation_tokens = counter("generation_tokens", "Generated tokens of finished "
                                         "requests")
        self.request_success = counter("request_success", "Finished requests",
                                       "finished_reason")
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token",
                              TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between output tokens (each "
                             "request's mean gap, once per gap)", TPOT_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds", "Mean time between output "
                              "tokens, per request", TPOT_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish", E2E_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Arrival to first scheduled",
                               TTFT_BUCKETS)
        self.prompt_len = histogram("request_prompt_tokens", "Prompt tokens per request",
                                    TOKEN_BUCKETS)
        self.output_len = histogram("request_generation_tokens", "Generated tokens per "
                                    "request", TOKEN_BUCKETS)

    def observe(self, stats: RequestStats) -> None:
        name = self.model_name
        self.prompt_tokens.labels(name).inc(stats.num_prompt_tokens)
        self.generation_tokens.labels(name).inc(stats.num_generation_tokens)
        self.request_success.labels(name, stats.finish_reason).inc()
        self.e2e.labels(name).observe(stats.finished_time - stats.arrival_time)
        self.prompt_len.labels(name).observe(stats.num_prompt_tokens)
        self.output_len.labels(name).observe(stats.num_generation_tokens)
        if stats.first_scheduled_time is not None:
            self.queue.labels(name).observe(max(0.0, stats.first_scheduled_time -
                                                stats.arrival_time))
        if stats.first_token_time is None:
            return
        self.ttft.labels(name).observe(stats.first_token_time - stats.arrival_time)
        if stats.num_generation_tokens > 1:
            gap = mean_token_gap(stats)
            self.tpot.labels(name).observe(gap)
            # Only the mean gap is known: observed once per gap, so _sum and _count are exact
            # and the buckets hold each request's gaps at their mean.
            observe_times(self.itl.labels(name), gap, stats.num_generation_tokens - 1)


def observe_times(histogram: Histogram, value: float, times: int) -> None:
    """`histogram.observe(value)` `times` times, in one step (prometheus-client has no weighted
    observe; its histogram is a sum and per-bucket counts, which this adds to directly)."""
    histogram._sum.inc(value * times)
    for bound, bucket in zip(histogram._upper_bounds, histogram._buckets):
        if value <= bound:
            bucket.inc(times)
            break
