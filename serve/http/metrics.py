"""Prometheus metrics of one server (its own registry: several servers in one process do not mix).

The request and engine metrics have vLLM V1's names, help strings, label names (``model_name``, ``engine``),
types and histogram buckets (vLLM 0.32: ``vllm/v1/metrics/loggers.py`` and ``buckets.py``), so dashboards built
for vLLM read them unchanged. They are observed where vLLM observes them: after every engine step and for every
finished sub-request (one choice of one prompt), on the engine-loop thread, from the engine's
:class:`serve.engine.outputs.RequestTimes`; the request-parameter histograms (``n``, ``max_tokens``) once an HTTP
request has finished. A sub-request aborted (client gone, drain) counts in ``vllm:request_success_total
{finished_reason="abort"}`` and in no latency histogram.

What is ours alone has the ``moe_serve_`` prefix and the ``model_name`` label too: KV-cache block counts, and
per-layer expert token counts read from :class:`routing.stats.RoutingStats` at scrape time, the expert label
bucketed so that the number of series stays at or under ``max_expert_series`` whatever the model.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from serve.engine.engine import EngineCounters
from serve.engine.outputs import RequestOutput

PREFIX = "moe_serve_"
LABELS = ("model_name", "engine")
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")  # vLLM's FinishReason; all exported from 0
ADMISSION_REASONS = ("max_num_queued_reqs", "max_num_queued_tokens")
PROMPT_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")

# vLLM 0.32's bucket families (vllm/v1/metrics/buckets.py)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)
TIME_TO_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                               10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                               10.0, 20.0, 40.0, 80.0)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
REQUEST_PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)
REQUEST_NUM_PREEMPTIONS_BUCKETS = (1, 2, 3, 4, 5, 10, 20)


def request_tokens_buckets(max_model_len: int) -> list[int]:
    """vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... up to ``max_model_len``.

    >>> request_tokens_buckets(256)
    [1, 2, 5, 10, 20, 50, 100, 200]
    """
    out: list[int] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_model_len:
                return out
            out.append(mantissa * scale)
        scale *= 10


def expert_buckets(num_layers: int, num_experts: int, max_series: int) -> list[tuple[int, int]]:
    """Expert ranges ``[lo, hi)`` per label so that ``num_layers * len(ranges) <= max_series``.

    >>> expert_buckets(2, 8, 8)
    [(0, 2), (2, 4), (4, 6), (6, 8)]
    """
    per_layer = max(1, max_series // max(num_layers, 1))
    width = -(-num_experts // per_layer)
    return [(lo, min(lo + width, num_experts)) for lo in range(0, num_experts, width)]


class ExpertTokensCollector:
    """``moe_serve_expert_tokens_total{model_name, layer, expert}``: routed tokens per layer and expert (range)."""

    def __init__(self, stats, max_series: int, model_name: str) -> None:
        self.stats, self.max_series, self.model_name = stats, max_series, model_name

    def collect(self):
        family = CounterMetricFamily(PREFIX + "expert_tokens", "Tokens routed to each expert (top-k slots), "
                                     "cumulative; expert is an id or an id range lo-hi",
                                     labels=["model_name", "layer", "expert"])
        counts_LE = self.stats.cumulative_counts().tolist()  # NOTE: host sync (at scrape time, not in forward)
        if counts_LE:
            ranges = expert_buckets(len(counts_LE), len(counts_LE[0]), self.max_series)
            for layer, row in enumerate(counts_LE):
                for lo, hi in ranges:
                    label = str(lo) if hi - lo == 1 else f"{lo}-{hi - 1}"
                    family.add_metric([self.model_name, str(layer), label], float(sum(row[lo:hi])))
        yield family


class ServerMetrics:
    """``on_step`` (engine-loop thread, after every step and batch of aborts), ``on_request_done`` (a handler,
    once all of an HTTP request's sub-requests finished), ``rejections[reason].inc()``, ``render()``."""

    def __init__(self, model_name: str, max_model_len: int, routing_stats=None, max_expert_series: int = 2048,
                 engine_index: int = 0) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self._values = (model_name, str(engine_index))
        self._add_engine_metrics()
        self._add_request_metrics(request_tokens_buckets(max_model_len))
        self._add_latency_metrics()
        if routing_stats is not None:
            self.registry.register(ExpertTokensCollector(routing_stats, max_expert_series, model_name))
        self._last = (0, 0, 0, 0, 0)  # prefix queried, prefix hit, preemptions, steps, step tokens

    def _add_engine_metrics(self) -> None:
        """Scheduler, KV cache and token counts, set after every step (prompt tokens when a sub-request's first
        token comes, as vLLM counts them)."""
        gauge, counter, v = self._gauge, self._counter, self._values
        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.kv_free = gauge(PREFIX + "kv_cache_free_blocks", "KV-cache blocks not referenced by any sequence")
        self.kv_total = gauge(PREFIX + "kv_cache_blocks", "KV-cache blocks in the pool")
        self.prefix_queries = counter("vllm:prefix_cache_queries",
                                      "Prefix cache queries, in terms of number of queried tokens.")
        self.prefix_hits = counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.")
        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        by_source = Counter("vllm:prompt_tokens_by_source", "Number of prompt tokens by source.",
                            [*LABELS, "source"], registry=self.registry)
        self.prompt_by_source = {source: by_source.labels(*v, source) for source in PROMPT_SOURCES}
        self.prompt_cached = counter("vllm:prompt_tokens_cached", "Number of cached prompt tokens (local + external).")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.iteration_tokens = self._histogram("vllm:iteration_tokens_total", "Histogram of number of tokens per "
                                                "engine_step.", ITERATION_TOKENS_BUCKETS)

    def _add_request_metrics(self, tokens: list[int]) -> None:
        """Per finished sub-request (and per HTTP request: ``n``, ``max_tokens``); rejections at admission."""
        histogram, v, r = self._histogram, self._values, self.registry
        self._success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                [*LABELS, "finished_reason"], registry=r)
        for reason in FINISH_REASONS:
            self._success.labels(*v, reason)
        rejections = Counter("vllm:admission_rejections", "Number of admission attempts rejected by a queue limit, "
                             "by reason.", ["model_name", "reason"], registry=r)
        self.rejections = {reason: rejections.labels(v[0], reason) for reason in ADMISSION_REASONS}
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                               tokens)
        self.request_generation_tokens = histogram("vllm:request_generation_tokens",
                                                   "Number of generation tokens processed.", tokens)
        self.request_max_generation_tokens = histogram(
            "vllm:request_max_num_generation_tokens", "Histogram of maximum number of requested generation tokens.",
            tokens)
        self.request_params_n = histogram("vllm:request_params_n", "Histogram of the n request parameter.",
                                          REQUEST_PARAMS_N_BUCKETS)
        self.request_params_max_tokens = histogram("vllm:request_params_max_tokens",
                                                   "Histogram of the max_tokens request parameter.", tokens)
        self.request_preemptions = histogram("vllm:request_num_preemptions", "Histogram of the number of times a "
                                             "request was preempted.", REQUEST_NUM_PREEMPTIONS_BUCKETS)
        self.request_kv_computed = histogram("vllm:request_prefill_kv_computed_tokens", "Histogram of new KV tokens "
                                             "computed during prefill (excluding cached tokens).", tokens)

    def _add_latency_metrics(self) -> None:
        histogram = self._histogram
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TIME_TO_FIRST_TOKEN_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             INTER_TOKEN_LATENCY_BUCKETS)
        self.tpot = histogram("vllm:request_time_per_output_token_seconds",
                              "Histogram of time_per_output_token_seconds per request.", INTER_TOKEN_LATENCY_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             REQUEST_LATENCY_BUCKETS)
        self.queue = histogram("vllm:request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.inference = histogram("vllm:request_inference_time_seconds",
                                   "Histogram of time spent in RUNNING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.prefill = histogram("vllm:request_prefill_time_seconds",
                                 "Histogram of time spent in PREFILL phase for request.", REQUEST_LATENCY_BUCKETS)
        self.decode = histogram("vllm:request_decode_time_seconds",
                                "Histogram of time spent in DECODE phase for request.", REQUEST_LATENCY_BUCKETS)

    def _gauge(self, name: str, doc: str):
        return Gauge(name, doc, LABELS, registry=self.registry).labels(*self._values)

    def _counter(self, name: str, doc: str):
        return Counter(name, doc, LABELS, registry=self.registry).labels(*self._values)

    def _histogram(self, name: str, doc: str, buckets):
        return Histogram(name, doc, LABELS, registry=self.registry, buckets=buckets).labels(*self._values)

    # -- engine-loop thread -------------------------------------------------------------------------------------
    def on_step(self, counters: EngineCounters, outputs: list[RequestOutput]) -> None:
        """Refresh gauges and counters from the engine's ``counters`` after a step (or a batch of aborts), observe
        what the step's outputs finished (the thread that delivers outputs)."""
        c = counters
        self.running.set(c.running)
        self.waiting.set(c.waiting)
        self.kv_total.set(c.num_blocks)
        self.kv_free.set(c.free_blocks)
        self.kv_usage.set(1 - c.free_blocks / c.num_blocks)
        now = (c.prefix_queried_tokens, c.prefix_hit_tokens, c.preemptions, c.steps, c.step_tokens)
        queried, hit, preempted, steps, step_tokens = (new - old for new, old in zip(now, self._last, strict=True))
        self._last = now
        self.prefix_queries.inc(queried)
        self.prefix_hits.inc(hit)
        self.preemptions.inc(preempted)
        if steps:  # not after a batch of aborts: no step ran
            self.iteration_tokens.observe(step_tokens)  # prompt tokens computed + tokens sampled
        for out in outputs:
            self._on_output(out)

    def _on_output(self, out: RequestOutput) -> None:
        t = out.times
        if out.new_token_ids and t.first_token is not None and t.last_token is not None:
            self.generation_tokens.inc(len(out.new_token_ids))
            if t.prev_token is None:  # the first token: the prompt is done
                prompt, cached = len(out.prompt_token_ids), out.num_cached_tokens
                self.prompt_tokens.inc(prompt)
                self.prompt_cached.inc(cached)
                self.prompt_by_source["local_compute"].inc(prompt - cached)
                self.prompt_by_source["local_cache_hit"].inc(cached)
                self.ttft.observe(t.first_token - t.arrival)
            else:
                self.itl.observe(t.last_token - t.prev_token)
        if not out.finished:
            return
        self._success.labels(*self._values, out.finish_reason).inc()
        if out.finish_reason == "abort" or t.scheduled is None or t.first_token is None or t.last_token is None:
            return
        generated, decode = len(out.token_ids), t.last_token - t.first_token
        self.e2e.observe(t.last_token - t.arrival)
        self.queue.observe(t.scheduled - t.queued)
        self.prefill.observe(t.first_token - t.scheduled)
        self.decode.observe(decode)
        self.inference.observe(t.last_token - t.scheduled)
        self.tpot.observe(decode / (generated - 1) if generated > 1 else 0.0)  # the prefill's token not counted
        self.request_prompt_tokens.observe(len(out.prompt_token_ids))
        self.request_generation_tokens.observe(generated)
        self.request_preemptions.observe(out.num_preemptions)
        self.request_kv_computed.observe(len(out.prompt_token_ids) - out.num_cached_tokens)

    # -- handlers -----------------------------------------------------------------------------------------------
    def on_request_done(self, n: int, max_tokens: list[int], final: list[RequestOutput]) -> None:
        """An HTTP request whose sub-requests (prompt-major, ``n`` choices each) all finished: per prompt its
        ``n`` and the most tokens one of its choices generated (vLLM's parent request), per choice ``max_tokens``."""
        for first in range(0, len(final), n):
            self.request_params_n.observe(n)
            self.request_max_generation_tokens.observe(max(len(out.token_ids) for out in final[first:first + n]))
        for value in max_tokens:
            self.request_params_max_tokens.observe(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
