"""Metrics and structured logs of what a :class:`~sqlacache.Cache` does, per model and op.

``PrometheusCollector`` (extra ``sqlacache[prometheus]``) and ``OpenTelemetryMetrics`` (extra
``sqlacache[opentelemetry]``) import their library only when used; ``LogEvents`` needs nothing.
Attach them when the cache is created: per-model events are recorded from then on (the flat
counters of ``Cache.stats()`` count from the start).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlacache.metrics.events import EVENTS, LogEvents, snapshot

if TYPE_CHECKING:
    from sqlacache.metrics.opentelemetry import OpenTelemetryMetrics
    from sqlacache.metrics.prometheus import PrometheusCollector

__all__ = ["EVENTS", "LogEvents", "OpenTelemetryMetrics", "PrometheusCollector", "snapshot"]


def __getattr__(name: str) -> Any:
    # Lazily, so that ``import sqlacache.metrics`` works without either library installed.
    if name == "PrometheusCollector":
        from sqlacache.metrics.prometheus import PrometheusCollector

        return PrometheusCollector
    if name == "OpenTelemetryMetrics":
        from sqlacache.metrics.opentelemetry import OpenTelemetryMetrics

        return OpenTelemetryMetrics
    raise AttributeError(f"module 'sqlacache.metrics' has no attribute {name!r}")
