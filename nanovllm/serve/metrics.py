"""The server's Prometheus metrics (text format at ``GET /metrics``), in a registry of their own."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from nanovllm.engine.llm_engine import LLMEngine

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0)


class Metrics:
    """Gauges of the engine's state and counters of the work done.

    Gauges: ``nanovllm_num_requests_running`` (sequences in the running batch), ``nanovllm_num_requests_waiting``
    (submitted, not yet admitted), ``nanovllm_kv_cache_usage_perc`` (fraction of KV blocks held by live sequences,
    0 to 1). Counters: ``nanovllm_prompt_tokens_total``, ``nanovllm_generation_tokens_total``,
    ``nanovllm_request_success_total`` (label ``finish_reason``: stop, length, abort). Histograms (seconds):
    ``nanovllm_time_to_first_token_seconds``, ``nanovllm_e2e_request_latency_seconds``.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("nanovllm_num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("nanovllm_num_requests_waiting", "Requests waiting for admission", registry=r)
        self.kv_usage = Gauge("nanovllm_kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1)",
                              registry=r)
        self.prompt_tokens = Counter("nanovllm_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("nanovllm_generation_tokens", "Generated tokens", registry=r)
        self.requests = Counter("nanovllm_request_success", "Finished requests", ["finish_reason"], registry=r)
        self.time_to_first_token = Histogram("nanovllm_time_to_first_token_seconds", "Time to first token",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e_latency = Histogram("nanovllm_e2e_request_latency_seconds", "Request latency, arrival to finish",
                                     buckets=_LATENCY_BUCKETS, registry=r)

    def update_engine(self, engine: LLMEngine) -> None:
        """Read the engine's queues and KV usage (call from the engine's thread, after a step)."""
        running = len(engine.scheduler.running)
        self.running.set(running)
        self.waiting.set(max(engine.num_unfinished_requests - running, 0))
        self.kv_usage.set(engine.block_manager.usage())

    def finish(self, finish_reason: str | None, num_prompt_tokens: int, latency: float) -> None:
        """Count a finished request."""
        self.requests.labels(finish_reason=finish_reason or "abort").inc()
        self.prompt_tokens.inc(num_prompt_tokens)
        self.e2e_latency.observe(latency)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
