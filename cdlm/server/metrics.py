"""Prometheus metrics with the `cdlm:` prefix (names fixed by docs/ARCHITECTURE.md).

One `ServerMetrics` owns its own registry, so several apps can live in one process (tests).
Engine-side figures (gauges, batch size, tokens per step, steps per block) are fed from the
engine thread after every step; request-level figures (latencies, success/failure counters)
from the async wrapper when a request finishes.
"""

from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported)

# Latency buckets: CPU steps of the bundled model are milliseconds, GPU 7B steps are ~10 ms,
# long CPU generations reach minutes; cover 1 ms .. 10 min.
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
E2E_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0,
               30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0)
QUEUE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
INTER_BLOCK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                       0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0)
# A block of B=32 takes 1..32 steps (tokens_per_step=1 gives B); buckets up to 64 for B=64.
STEPS_PER_BLOCK_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 48, 64)
TOKENS_PER_STEP_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 20, 24, 32, 48, 64)
STEPS_PER_REQUEST_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512,
                             1024, 2048, 4096, 8192)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)

FINISHED_REASONS = ("stop", "length", "abort")
FAILURE_REASONS = ("error", "rejected")


class ServerMetrics:
    def __init__(self, model_name: str = "", registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.time_to_first_token = Histogram(
            "cdlm:time_to_first_token_seconds",
            "Time from arrival to the first finished block (first streamed chunk).",
            buckets=TTFT_BUCKETS, registry=r)
        self.e2e_latency = Histogram(
            "cdlm:e2e_request_latency_seconds", "Time from arrival to finish.",
            buckets=E2E_BUCKETS, registry=r)
        self.queue_time = Histogram(
            "cdlm:request_queue_time_seconds", "Time from arrival to the first scheduled step.",
            buckets=QUEUE_BUCKETS, registry=r)
        self.inter_block_latency = Histogram(
            "cdlm:inter_block_latency_seconds",
            "Time between consecutive finished blocks of a request.",
            buckets=INTER_BLOCK_BUCKETS, registry=r)
        self.num_running = Gauge("cdlm:num_requests_running",
                                 "Requests in the running batch.", registry=r)
        self.num_waiting = Gauge("cdlm:num_requests_waiting",
                                 "Requests waiting for admission (queue depth).", registry=r)
        self.kv_cache_usage = Gauge("cdlm:kv_cache_usage_perc",
                                    "Used KV pages / all KV pages, 0..1.", registry=r)
        self.engine_healthy = Gauge("cdlm:engine_healthy",
                                    "1 while the engine loop runs, 0 once it died.", registry=r)
        self.prompt_tokens = Counter("cdlm:prompt_tokens", "Prompt tokens processed.",
                                     registry=r)
        self.generation_tokens = Counter("cdlm:generation_tokens",
                                         "Generated (finalised and returned) tokens.",
                                         registry=r)
        self.request_success = Counter("cdlm:request_success",
                                       "Finished requests by finish reason.",
                                       ["finished_reason"], registry=r)
        self.request_failure = Counter("cdlm:request_failure",
                                       "Failed requests: error (server/engine error) or "
                                       "rejected (queue full, draining, engine down).",
                                       ["reason"], registry=r)
        self.steps_per_block = Histogram("cdlm:steps_per_block",
                                         "Denoising steps each finished block took.",
                                         buckets=STEPS_PER_BLOCK_BUCKETS, registry=r)
        self.tokens_per_step = Histogram("cdlm:tokens_per_step",
                                         "Tokens finalised per request per step.",
                                         buckets=TOKENS_PER_STEP_BUCKETS, registry=r)
        self.steps_per_request = Histogram("cdlm:steps_per_request",
                                           "Denoising steps of each finished request.",
                                           buckets=STEPS_PER_REQUEST_BUCKETS, registry=r)
        self.batch_size_per_step = Histogram("cdlm:batch_size_per_step",
                                             "Requests in each engine step.",
                                             buckets=BATCH_SIZE_BUCKETS, registry=r)
        # Label children exist from the start, so dashboards see zeros rather than no data.
        for reason in FINISHED_REASONS:
            self.request_success.labels(finished_reason=reason)
        for reason in FAILURE_REASONS:
            self.request_failure.labels(reason=reason)
        self.engine_healthy.set(0)

    # --- engine side (engine thread) -----------------------------------------------------

    def set_gauges(self, running: int | None, waiting: int | None,
                   kv_usage: float | None) -> None:
        if running is not None:
            self.num_running.set(running)
        if waiting is not None:
            self.num_waiting.set(waiting)
        if kv_usage is not None:
            self.kv_cache_usage.set(kv_usage)

    def observe_step(self, batch_size: int, tokens_per_request: list[int] | tuple = (),
                     block_steps: list[int] | tuple = ()) -> None:
        if batch_size > 0:
            self.batch_size_per_step.observe(batch_size)
        for n in tokens_per_request:
            self.tokens_per_step.observe(n)
        for s in block_steps:
            self.steps_per_block.observe(s)

    # --- request side --------------------------------------------------------------------

    def observe_finished(self, reason: str, *, e2e: float | None = None,
                         steps: int | None = None) -> None:
        reason = reason if reason in FINISHED_REASONS else "stop"
        self.request_success.labels(finished_reason=reason).inc()
        if e2e is not None:
            self.e2e_latency.observe(max(0.0, e2e))
        if steps is not None:
            self.steps_per_request.observe(steps)

    def observe_failure(self, reason: str) -> None:
        self.request_failure.labels(reason=reason if reason in FAILURE_REASONS else "error").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
