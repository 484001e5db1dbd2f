"""``PrometheusCollector``: a ``prometheus_client`` collector of a cache's metrics, read at scrape."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from sqlacache.policy import ConfigurationError

try:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError(
        "sqlacache.metrics.PrometheusCollector needs prometheus-client: pip install 'sqlacache[prometheus]'"
    ) from exc

from sqlacache.metrics.events import STORE_RESULTS, snapshot, stat_counters, stat_gauges

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from sqlacache.cache import Cache


class PrometheusCollector(Collector):
    """Export ``cache``'s metrics to Prometheus: ``registry.register(PrometheusCollector(cache))``.

    Counters by model and op (``<namespace>_reads_total{model,op,result}``, ``_refusals_total``
    with ``reason``, ``_fills_total``), ``_evictions_total{table}``, ``_errors_total{call,kind}``,
    ``_stores_total{result}``, ``_invalidations_total``, the backend call latency histogram
    ``_backend_call_seconds{call}`` and gauges (``_pending_invalidations``, ``_breaker_open``).
    Give each cache of a process its own ``namespace``.
    """

    def __init__(self, cache: Cache, namespace: str = "sqlacache") -> None:
        if not isinstance(namespace, str) or not namespace.replace("_", "").isalnum():
            raise ConfigurationError(
                f"PrometheusCollector: namespace={namespace!r}: give letters, digits and underscores "
                "(a metric name prefix, e.g. 'sqlacache' or 'sqlacache_sessions')"
            )
        self.cache = cache
        self.namespace = namespace
        cache.count.recording()  # per-model events are recorded from now on

    def collect(self) -> Iterator[Metric]:
        ns = self.namespace
        snap = snapshot(self.cache)
        reads = CounterMetricFamily(
            f"{ns}_reads",
            "Cacheable reads by model, op and result (hit, miss)",
            labels=["model", "op", "result"],
        )
        refusals = CounterMetricFamily(
            f"{ns}_refusals",
            "Reads neither served from nor stored to the cache, by model, op and reason",
            labels=["model", "op", "reason"],
        )
        fills = CounterMetricFamily(
            f"{ns}_fills", "Results of misses handed to the backend to store", labels=["model", "op"]
        )
        evictions = CounterMetricFamily(
            f"{ns}_evictions", "Invalidations sent per table written", labels=["table"]
        )
        errors = CounterMetricFamily(
            f"{ns}_errors", "Backend calls that failed, by call and kind", labels=["call", "kind"]
        )
        for (event, model, op, reason), n in sorted(snap.events.items()):
            if event == "hits" or event == "misses":
                reads.add_metric([model, op, "hit" if event == "hits" else "miss"], n)
            elif event == "refusals":
                refusals.add_metric([model, op, reason], n)
            elif event == "fills":
                fills.add_metric([model, op], n)
            elif event == "evictions":
                evictions.add_metric([model], n)
            elif event == "errors":
                errors.add_metric([op, reason], n)
        yield from (reads, refusals, fills, evictions, errors)
        stats = snap.stats
        stores = CounterMetricFamily(
            f"{ns}_stores", "Store outcomes (the backend's atomic check)", labels=["result"]
        )
        for name, result in STORE_RESULTS.items():
            stores.add_metric([result], stats.get(name, 0))
        yield stores
        yield CounterMetricFamily(
            f"{ns}_invalidations", "Invalidations sent", value=stats.get("invalidations", 0)
        )
        yield CounterMetricFamily(
            f"{ns}_internal_errors", "sqlacache's own errors, survived", value=stats.get("errors.internal", 0)
        )
        flat = CounterMetricFamily(
            f"{ns}_events", "Every counter of Cache.stats(), by its name", labels=["event"]
        )
        for name, value in stat_counters(stats):
            flat.add_metric([name], value)
        yield flat
        state = GaugeMetricFamily(
            f"{ns}_state",
            "The gauges of Cache.stats() (pending_invalidations, near_entries…)",
            labels=["gauge"],
        )
        for name, value in stat_gauges(stats):
            state.add_metric([name], value)
        yield state
        yield GaugeMetricFamily(
            f"{ns}_pending_invalidations",
            "Invalidations kept for retry while the backend is unreachable",
            value=stats.get("pending_invalidations", 0),
        )
        yield GaugeMetricFamily(
            f"{ns}_breaker_open",
            "1 while the circuit breaker skips backend calls",
            value=int(stats["breaker"] != "closed"),
        )
        latency = HistogramMetricFamily(f"{ns}_backend_call_seconds", "Backend call latency", labels=["call"])
        for call, (counts, total) in sorted(snap.timings.items()):
            cumulative, buckets = 0, []
            for le, n in zip([*map(repr, snap.buckets), "+Inf"], counts):
                cumulative += n
                buckets.append((le, float(cumulative)))
            latency.add_metric([call], buckets, total)
        yield latency
