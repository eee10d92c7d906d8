"""Prometheus metrics of rank 0 and their names (docs/metrics.md explains each). One registry per app, made by
`Metrics()`: nothing is registered at import.

The KEDA overlay scales on `bloom_server_queue_depth`: keep that name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "bloom_server"
QUEUE_DEPTH = f"{PREFIX}_queue_depth"  # the KEDA ScaledObject's metric

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_MAX_CACHED_LABELS = 1024
_TOKENS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096)
_STEPS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128)  # engine steps (continuous batching)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, labels, registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...], *labels: str) -> Histogram:
            return Histogram(f"{PREFIX}_{name}", doc, labels, buckets=buckets, registry=r)

        def gauge(name: str, doc: str, *labels: str) -> Gauge:
            return Gauge(f"{PREFIX}_{name}", doc, labels, registry=r)

        self.requests = counter(
            "requests", "HTTP requests answered, by route template, method and status.", "route", "method", "status"
        )
        self.request_duration = histogram(
            "request_duration_seconds",
            "HTTP request duration (to the last byte, streams included), by route.",
            _LATENCY,
            "route",
        )
        self.in_flight = gauge("in_flight_requests", "HTTP requests being served now (probes and metrics excluded).")
        self.queue_time = histogram(
            "queue_time_seconds", "Time a generation request waited before its batch started.", _LATENCY
        )
        self.ttft = histogram(
            "time_to_first_token_seconds",
            "From arrival to the first generated token of a generation request.",
            _LATENCY,
        )
        self.ttft_steps = histogram(
            "time_to_first_token_steps",
            "Continuous batching: engine steps from a generation request's arrival to its first token, by phase: "
            "wait (steps that ran while it waited for a slot), prefill (from the step that admitted it to the one "
            "that read its first token, both counted).",
            _STEPS,
            "phase",
        )
        self.tpot = histogram(
            "time_per_output_token_seconds",
            "Inference time divided by the tokens generated, per request (after the first token).",
            _PER_TOKEN,
        )
        self.inference_time = histogram(
            "inference_time_seconds", "From the start of a request's batch to its last token.", _LATENCY
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished generation requests.")
        self.generated_tokens = counter("generated_tokens", "Tokens generated for callers.")
        self.prompt_tokens_hist = histogram("request_prompt_tokens", "Prompt tokens per generation request.", _TOKENS)
        self.generated_tokens_hist = histogram(
            "request_generated_tokens", "Generated tokens per generation request.", _TOKENS
        )
        self.outcomes = counter(
            "generation_requests",
            "Generation requests by outcome: ok, cancelled (client left), deadline, error.",
            "outcome",
        )
        self.rejected = counter(
            "rejected_requests", "Requests refused before they ran, by reason (overloaded, not_ready, ...).", "reason"
        )
        self.batches = counter("batches", "Generate calls run (each may hold several requests).")
        self.batch_size = histogram("batch_size", "Rows per generate call.", (1, 2, 4, 8, 16, 32, 64, 128))
        self.queue_depth = Gauge(
            QUEUE_DEPTH, "Generation requests waiting for a batch (KEDA scales on this).", registry=r
        )
        self.queue_tokens = gauge("queue_tokens", "Tokens (prompt + max new) of the requests waiting.")
        self.running_batch = gauge("running_batch_size", "Rows in the generate call running now.")
        self.load_seconds = gauge("model_load_seconds", "Seconds from start to the model loaded on every rank.")
        self.ready = gauge("ready", "1 when the server is ready for requests, 0 while loading, draining or dead.")
        self.info = gauge(
            "info", "Always 1; the labels say what is served.", "model_id", "backend", "dtype", "world_size", "version"
        )
        self.weight_bytes = gauge(
            "weight_bytes", "Bytes of model weights resident on rank 0's device, as stored (backends that report it)."
        )
        self.load_bytes = gauge(
            "load_bytes",
            "Bytes of weights rank 0 has loaded (kind=loaded) of its total (kind=total); equal once loaded.",
            "kind",
        )
        self._engine_stats: Callable[[], dict] = dict
        r.register(_EngineCollector(lambda: self._engine_stats()))
        # Labelled children, looked up once per label set (labels() validates and locks on every call). Bounded:
        # past the bound a label set (a client's odd method, say) is looked up each time, as prometheus_client does.
        self._http_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._outcome_children: dict[str, Any] = {}

    def bind(
        self,
        *,
        queue_depth: Callable[[], float],
        queue_tokens: Callable[[], float],
        running: Callable[[], float],
        ready: Callable[[], float],
        load_seconds: Callable[[], float],
        engine_stats: Callable[[], dict] | None = None,
    ) -> None:
        """Gauges read at scrape time; `engine_stats`: the engine's own counters (prefix cache, decode graphs), also read at
        scrape time."""
        if engine_stats is not None:
            self._engine_stats = engine_stats
        self.queue_depth.set_function(queue_depth)
        self.queue_tokens.set_function(queue_tokens)
        self.running_batch.set_function(running)
        self.ready.set_function(ready)
        self.load_seconds.set_function(load_seconds)

    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        children = self._http_children.get(key)
        if children is None:
            children = (self.requests.labels(route, method, str(status)), self.request_duration.labels(route))
            if len(self._http_children) < _MAX_CACHED_LABELS:
                self._http_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe_generation(
        self,
        *,
        outcome: str,
        queue_s: float | None,
        ttft_s: float | None,
        ttft_steps: tuple[int, int] | None = None,
        inference_s: float | None,
        prompt_tokens: int,
        generated_tokens: int,
    ) -> None:
        child = self._outcome_children.get(outcome)
        if child is None:
            child = self._outcome_children[outcome] = self.outcomes.labels(outcome)
        child.inc()
        if queue_s is not None:
            self.queue_time.observe(queue_s)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if ttft_steps is not None:
            self.ttft_steps.labels("wait").observe(ttft_steps[0])
            self.ttft_steps.labels("prefill").observe(ttft_steps[1])
        if inference_s is not None:
            self.inference_time.observe(inference_s)
            if generated_tokens > 1:
                self.tpot.observe(inference_s / generated_tokens)
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(generated_tokens)
        self.prompt_tokens_hist.observe(prompt_tokens)
        self.generated_tokens_hist.observe(generated_tokens)

    def observe_batch(self, rows: int) -> None:
        self.batches.inc()
        self.batch_size.observe(rows)

    def set_load_progress(self, loaded: int, total: int) -> None:
        self.load_bytes.labels("loaded").set(loaded)
        self.load_bytes.labels("total").set(total)

    def set_info(self, **labels: Any) -> None:
        self.info.labels(**{k: str(v) for k, v in labels.items()}).set(1)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# The engine's prefix cache (fast/prefix_cache.py stats()): key -> (metric, kind, help). Counters get `_total`.
PREFIX_CACHE = {
    "hits": (
        "prefix_cache_hits",
        "counter",
        "Rows whose prompt started with a cached prefix (its KV copied, not computed).",
    ),
    "misses": ("prefix_cache_misses", "counter", "Rows whose prompt started with no cached prefix."),
    "hit_tokens": ("prefix_cache_hit_tokens", "counter", "Prompt tokens not computed thanks to the prefix cache."),
    "evictions": (
        "prefix_cache_evictions",
        "counter",
        "Prefix cache blocks dropped (least recently used) to make room.",
    ),
    "bytes": (
        "prefix_cache_bytes",
        "gauge",
        "Device bytes the prefix cache holds now (rank 0; every rank holds as much).",
    ),
    "capacity_bytes": ("prefix_cache_capacity_bytes", "gauge", "Device bytes the prefix cache may hold (rank 0)."),
}


# The fast engine's decode CUDA graphs (fast/engine.py graph_stats), same form.
DECODE_GRAPHS = {
    "graphs": ("decode_graphs", "gauge", "Decode CUDA graphs captured (one per batch and key bucket; rank 0)."),
    "capture_seconds": ("decode_graph_capture_seconds", "counter", "Seconds spent capturing decode graphs."),
    "eager_steps": (
        "decode_eager_steps",
        "counter",
        "Continuous-batching decode steps run without a graph: their shape was not captured yet.",
    ),
}
ENGINE_TABLES = {"prefix_cache": PREFIX_CACHE, "decode_graphs": DECODE_GRAPHS}


class _EngineCollector:
    """The engine's counters, read at scrape time from the engine (it never imports this layer); nothing is exported
    while the engine reports none (another backend, the cache off, or not loaded yet)."""

    def __init__(self, read: Callable[[], dict]):
        self.read = read

    def describe(self) -> list:
        return []  # unchecked at registration: the families exist only once the engine reports them

    def collect(self) -> Any:
        try:
            groups = self.read()
        except Exception:  # noqa: BLE001 - a scrape never fails for the engine's counters
            groups = {}
        for group, table in ENGINE_TABLES.items():
            stats = groups.get(group) or {}
            for key, (name, kind, doc) in table.items():
                if key in stats:
                    family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                    yield family(f"{PREFIX}_{name}", doc, value=stats[key])
