"""Prometheus metrics under vLLM's names (so its dashboards, autoscalers and GuideLLM read them), plus tokenstep's.

Every series carries vLLM's model_name label. prometheus_client appends _total to counters, as in vLLM's own
exposition: vllm:prefix_cache_queries is served as vllm:prefix_cache_queries_total. Everything here is updated
by the engine thread once per step (gauges, step histograms) or per request event (first token, finish); the
inter-token latencies of a step go in as one update per distinct gap (BatchHistogram).
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# vLLM's buckets (vllm/v1/metrics/loggers.py), so histograms line up with theirs
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                  20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0)
REQUEST_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                     240.0, 480.0, 960.0, 1920.0, 7680.0)
STEP_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0,
                  5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

CONTENT_TYPE = CONTENT_TYPE_LATEST
FINISHED_REASONS = ("stop", "length", "abort", "error", "rejected")


class BatchHistogram:
    """A histogram that takes one value for many observations at once (observe(value, count)).

    Every request decoded in a step sees the same inter-token gap, so a step costs one update per distinct
    gap instead of one locked prometheus_client observation per token. Updated by one thread (the engine's);
    a scrape may read a step's update half done, which only shifts a count to the next scrape.
    """

    def __init__(self, name: str, doc: str, buckets: tuple, labels: dict[str, str],
                 registry: CollectorRegistry) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self.bounds = tuple(float(b) for b in buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last is +Inf
        self.sum = 0.0
        registry.register(self)

    def observe(self, value: float, count: int = 1) -> None:
        """Record count observations of value."""
        self.counts[bisect_left(self.bounds, value)] += count
        self.sum += value * count

    def collect(self):  # noqa: ANN201 - prometheus_client's collector protocol
        """The histogram family (cumulative buckets), for the registry."""
        family = HistogramMetricFamily(self.name, self.doc, labels=list(self.labels))
        cumulative, buckets = 0, []
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        family.add_metric(list(self.labels.values()), buckets, self.sum)
        yield family

    def describe(self) -> list:
        """Nothing to describe ahead of collection."""
        return []


class ServerMetrics:
    """The server's registry and its series, bound to one model name."""

    def __init__(self, model_name: str) -> None:
        self.registry = r = CollectorRegistry()
        m = ("model_name",)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, m, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, m, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(name, doc, m, buckets=buckets, registry=r).labels(model_name)

        self.num_requests_running = gauge("vllm:num_requests_running", "Requests in model execution batches.")
        self.num_requests_waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be processed.")
        self.kv_cache_usage_perc = gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage, 0 to 1: blocks held by running requests (cached "
            "prefixes of finished requests count as free, as in vLLM).")
        self.prefix_cache_queries = counter("vllm:prefix_cache_queries",
                                            "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("vllm:prefix_cache_hits", "Prompt tokens served from the prefix cache.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Generation tokens processed.")
        self._success = Counter("vllm:request_success", "Finished requests, by finish reason.",
                                ("model_name", "finished_reason"), registry=r)
        self.request_success = {reason: self._success.labels(model_name, reason) for reason in FINISHED_REASONS}
        self.time_to_first_token = histogram("vllm:time_to_first_token_seconds",
                                             "Time to first token (arrival at the server to the token computed).",
                                             TTFT_BUCKETS_S)
        self.inter_token_latency = BatchHistogram("vllm:inter_token_latency_seconds", "Inter-token latency.",
                                                  ITL_BUCKETS_S, {"model_name": model_name}, r)
        self.e2e_request_latency = histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.",
                                             REQUEST_BUCKETS_S)
        self.request_queue_time = histogram("vllm:request_queue_time_seconds",
                                            "Time from arrival to first scheduled.", REQUEST_BUCKETS_S)
        self.step_time = histogram("tokenstep:step_time_seconds", "Wall time of one engine step.", STEP_BUCKETS_S)
        self.batch_size = histogram("tokenstep:batch_size", "Requests (chunks) in one engine step.", BATCH_BUCKETS)
        self.batched_tokens = histogram("tokenstep:num_batched_tokens", "Tokens (prefill + decode) in one step.",
                                        (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192))
        self.num_preemptions = counter("vllm:num_preemptions", "Preemptions (by recompute).")
        self.num_requests_rejected = counter("tokenstep:num_requests_rejected",
                                             "Requests refused with 429 because the waiting queue was full.")

    def finished(self, reason: str) -> None:
        """Count one finished request under vLLM's finished_reason label."""
        child = self.request_success.get(reason)
        if child is None:
            child = self.request_success[reason] = self._success.labels(self.model_name_label, reason)
        child.inc()

    @property
    def model_name_label(self) -> str:
        """The model_name label value."""
        return self.num_requests_running._labelvalues[0]

    def exposition(self) -> bytes:
        """The Prometheus text format of every series."""
        return generate_latest(self.registry)
