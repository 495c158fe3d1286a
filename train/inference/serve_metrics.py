"""The server's Prometheus metrics (`GET /metrics`), in a registry of its own.

Token times are stamped on the engine's thread as each token comes out; throughput is
also a gauge over the last WINDOW_S seconds, for a dashboard without PromQL's rate().
"""

from __future__ import annotations

import collections
import threading
import time

import prometheus_client as prom

WINDOW_S = 10.0
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                   30, 60)


class ServeMetrics:
    def __init__(self):
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter(
            "shardlm_requests", "HTTP requests answered, by route and status code",
            ["route", "status"], registry=r)
        self.finished = prom.Counter(
            "shardlm_generations", "generations ended, by finish reason", ["reason"],
            registry=r)
        self.ttft = prom.Histogram(
            "shardlm_time_to_first_token_seconds", "from a request's arrival to its first "
            "new token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = prom.Histogram(
            "shardlm_inter_token_latency_seconds", "between consecutive new tokens of a "
            "request", buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = prom.Counter(
            "shardlm_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generated_tokens = prom.Counter(
            "shardlm_generation_tokens", "new tokens generated", registry=r)
        self.tokens_per_s = prom.Gauge(
            "shardlm_generation_tokens_per_second",
            f"new tokens per second over the last {WINDOW_S:g} s", registry=r)
        self.queue = prom.Gauge("shardlm_queue_depth", "requests waiting for a slot",
                                registry=r)
        self.slots_busy = prom.Gauge("shardlm_slots_busy", "decode slots in use", registry=r)
        self.slots = prom.Gauge("shardlm_slots", "decode slots (serve.max_batch)", registry=r)
        self.pages_used = prom.Gauge("shardlm_kv_pages_used", "KV cache pages held by "
                                     "requests (a paged cache)", registry=r)
        self.pages = prom.Gauge("shardlm_kv_pages", "KV cache pages (serve.kv_pages)",
                                registry=r)
        self._times: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()
        self.tokens_per_s.set_function(self._rate)

    def watch(self, engine) -> None:
        """Queue depth, slot and page occupancy read from `engine` at each scrape."""
        self.queue.set_function(lambda: engine.queued)
        self.slots_busy.set_function(lambda: engine.slots_busy)
        self.slots.set(engine.B)
        self.pages_used.set_function(lambda: engine.kv_pages - len(engine.free_pages))
        self.pages.set(engine.kv_pages)

    def token(self, now: float, count: int = 1) -> None:
        """`count` new tokens that arrived at `now`."""
        self.generated_tokens.inc(count)
        with self._lock:
            self._times.extend([now] * count)

    def _rate(self) -> float:
        now = time.perf_counter()
        with self._lock:
            while self._times and self._times[0] < now - WINDOW_S:
                self._times.popleft()
            return len(self._times) / WINDOW_S

    def exposition(self) -> tuple[bytes, str]:
        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST
