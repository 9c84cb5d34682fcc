"""Prometheus metrics of one server (its own registry: several servers in one process do not mix).

Latency histograms (TTFT, inter-token, end-to-end) are observed by the HTTP handlers; engine gauges and
counters are refreshed by the engine loop after every step; per-layer expert token counts are read from
:class:`routing.stats.RoutingStats` at scrape time, with the expert label bucketed so that the number of
series stays at or under ``max_expert_series`` whatever the model.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from serve.engine import LLMEngine

PREFIX = "moe_serve_"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)


def expert_buckets(num_layers: int, num_experts: int, max_series: int) -> list[tuple[int, int]]:
    """Expert ranges ``[lo, hi)`` per label so that ``num_layers * len(ranges) <= max_series``.

    >>> expert_buckets(2, 8, 8)
    [(0, 2), (2, 4), (4, 6), (6, 8)]
    """
    per_layer = max(1, max_series // max(num_layers, 1))
    width = -(-num_experts // per_layer)
    return [(lo, min(lo + width, num_experts)) for lo in range(0, num_experts, width)]


class ExpertTokensCollector:
    """``moe_serve_expert_tokens_total{layer, expert}``: routed tokens per layer and expert (or expert range)."""

    def __init__(self, stats, max_series: int) -> None:
        self.stats, self.max_series = stats, max_series

    def collect(self):
        family = CounterMetricFamily(PREFIX + "expert_tokens", "Tokens routed to each expert (top-k slots), "
                                     "cumulative; expert is an id or an id range lo-hi", labels=["layer", "expert"])
        counts_LE = self.stats.cumulative_counts().tolist()  # NOTE: host sync (at scrape time, not in forward)
        if counts_LE:
            ranges = expert_buckets(len(counts_LE), len(counts_LE[0]), self.max_series)
            for layer, row in enumerate(counts_LE):
                for lo, hi in ranges:
                    label = str(lo) if hi - lo == 1 else f"{lo}-{hi - 1}"
                    family.add_metric([str(layer), label], float(sum(row[lo:hi])))
        yield family


class ServerMetrics:
    def __init__(self, model_name: str, routing_stats=None, max_expert_series: int = 2048) -> None:
        self.registry = CollectorRegistry()
        r, p = self.registry, PREFIX
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between successive output tokens",
                             registry=r, buckets=LATENCY_BUCKETS)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Request latency, arrival to last token",
                             registry=r, buckets=LATENCY_BUCKETS)
        self.running = Gauge(p + "num_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge(p + "num_requests_waiting", "Sequences waiting to be scheduled", registry=r)
        self.kv_usage = Gauge(p + "kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0-1)", registry=r)
        self.kv_free = Gauge(p + "kv_cache_free_blocks", "KV-cache blocks not referenced by any sequence",
                             registry=r)
        self.kv_total = Gauge(p + "kv_cache_blocks", "KV-cache blocks in the pool", registry=r)
        self.prefix_queries = Counter(p + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      registry=r)
        self.prefix_hits = Counter(p + "prefix_cache_hits", "Prompt tokens found in the prefix cache", registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Generated tokens", registry=r)
        self.preemptions = Counter(p + "num_preemptions", "Sequences preempted (recomputed later)", registry=r)
        self.requests = Counter(p + "request_finished", "Finished requests by finish reason", ["finish_reason"],
                                registry=r)
        self.rejected = Counter(p + "request_rejected", "Requests refused before admission, by HTTP status",
                                ["status"], registry=r)
        if routing_stats is not None:
            r.register(ExpertTokensCollector(routing_stats, max_expert_series))
        self._last = (0, 0, 0, 0)
        self.model_name = model_name

    def on_step(self, engine: LLMEngine, outputs) -> None:
        """Refresh engine gauges and counters (engine-loop thread, after each step)."""
        blocks, sched = engine.blocks, engine.scheduler
        self.running.set(len(sched.running))
        self.waiting.set(len(sched.waiting))
        self.kv_total.set(blocks.num_blocks)
        self.kv_free.set(blocks.num_free_blocks)
        self.kv_usage.set(1 - blocks.num_free_blocks / blocks.num_blocks)
        now = (blocks.stats.queried_tokens, blocks.stats.hit_tokens, engine.stats.output_tokens,
               sched.num_preemptions)
        for counter, new, old in zip((self.prefix_queries, self.prefix_hits, self.generation_tokens,
                                      self.preemptions), now, self._last, strict=True):
            if new > old:
                counter.inc(new - old)
        self._last = now
        for out in outputs:
            if out.finished:
                self.requests.labels(out.finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
