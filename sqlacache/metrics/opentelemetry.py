"""``OpenTelemetryMetrics``: a cache's metrics as OpenTelemetry instruments (observed at collection)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import metrics as otel
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError(
        "sqlacache.metrics.OpenTelemetryMetrics needs opentelemetry-api: "
        "pip install 'sqlacache[opentelemetry]'"
    ) from exc

from sqlacache.metrics.events import EVENTS, STORE_RESULTS, Snapshot, snapshot, stat_counters, stat_gauges
from sqlacache.policy import ConfigurationError
from sqlacache.resilience.stats import BUCKETS

if TYPE_CHECKING:
    from sqlacache.cache import Cache


class OpenTelemetryMetrics:
    """Export ``cache``'s metrics through an OpenTelemetry ``MeterProvider`` (the global one if
    ``meter_provider`` is None): observable counters ``sqlacache.hits``, ``.misses``, ``.fills``
    (attributes ``model``, ``op``), ``.refusals`` (+ ``reason``), ``.evictions`` (``table``),
    ``.errors`` (``call``, ``kind``), ``.stores`` (``result``), ``.invalidations``; gauges
    ``sqlacache.pending_invalidations`` and ``.breaker_open``; the histogram
    ``sqlacache.backend.duration`` (seconds, attribute ``call``). ``close()`` stops the histogram.
    """

    def __init__(
        self, cache: Cache, meter_provider: MeterProvider | None = None, prefix: str = "sqlacache"
    ) -> None:
        if meter_provider is not None and not isinstance(meter_provider, MeterProvider):
            raise ConfigurationError(
                f"OpenTelemetryMetrics: meter_provider={meter_provider!r} is not an "
                "opentelemetry MeterProvider (e.g. opentelemetry.sdk.metrics.MeterProvider(...))"
            )
        if not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.]*", prefix):
            raise ConfigurationError(
                f"OpenTelemetryMetrics: prefix={prefix!r}: give an instrument name prefix "
                "(a letter, then letters, digits, '_' or '.'), e.g. 'sqlacache'"
            )
        self.cache = cache
        provider = meter_provider or otel.get_meter_provider()
        meter = provider.get_meter("sqlacache")
        self._snap: tuple[float, Snapshot] | None = None
        self._recorder = cache.count.recording()
        for event, description in EVENTS.items():
            meter.create_observable_counter(
                f"{prefix}.{event}", callbacks=[self._events(event)], description=description
            )
        meter.create_observable_counter(
            f"{prefix}.stores",
            callbacks=[self._stores],
            description="store outcomes (the backend's atomic check)",
        )
        meter.create_observable_counter(
            f"{prefix}.invalidations",
            callbacks=[self._stat("invalidations")],
            description="invalidations sent",
        )
        meter.create_observable_counter(
            f"{prefix}.events",
            callbacks=[self._flat],
            description="every counter of Cache.stats(), by its name (attribute event)",
        )
        meter.create_observable_gauge(
            f"{prefix}.state",
            callbacks=[self._gauges],
            description="the gauges of Cache.stats() (attribute gauge)",
        )
        meter.create_observable_gauge(
            f"{prefix}.pending_invalidations",
            callbacks=[self._stat("pending_invalidations")],
            description="invalidations kept for retry while the backend is unreachable",
        )
        meter.create_observable_gauge(
            f"{prefix}.breaker_open", callbacks=[self._breaker], description="1 while the breaker skips calls"
        )
        histogram = meter.create_histogram(
            f"{prefix}.backend.duration",
            unit="s",
            description="backend call latency",
            explicit_bucket_boundaries_advisory=list(BUCKETS),
        )
        self._timing = lambda call, seconds: histogram.record(seconds, {"call": call})
        self._recorder.timing_listeners.append(self._timing)

    def _snapshot(self) -> Snapshot:
        # One collection calls every callback: they share one snapshot (stats() settles stores).
        now = time.monotonic()
        if self._snap is None or now - self._snap[0] > 0.05:
            self._snap = (now, snapshot(self.cache))
        return self._snap[1]

    def _events(self, event: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            out = []
            for (name, model, op, reason), n in self._snapshot().events.items():
                if name != event:
                    continue
                attrs: dict[str, Any]
                if event == "evictions":
                    attrs = {"table": model}
                elif event == "errors":
                    attrs = {"call": op, "kind": reason}
                else:
                    attrs = {"model": model, "op": op}
                    if event == "refusals":
                        attrs["reason"] = reason
                out.append(Observation(n, attrs))
            return out

        return observe

    def _stores(self, options: CallbackOptions) -> Iterable[Observation]:
        stats = self._snapshot().stats
        return [Observation(stats.get(name, 0), {"result": result}) for name, result in STORE_RESULTS.items()]

    def _stat(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(self._snapshot().stats.get(name, 0))]

        return observe

    def _flat(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(v, {"event": name}) for name, v in stat_counters(self._snapshot().stats)]

    def _gauges(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(v, {"gauge": name}) for name, v in stat_gauges(self._snapshot().stats)]

    def _breaker(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(int(self._snapshot().stats["breaker"] != "closed"))]

    def close(self) -> None:
        if self._timing in self._recorder.timing_listeners:
            self._recorder.timing_listeners.remove(self._timing)
