"""The events every metrics sink exports, read from one snapshot, and ``LogEvents`` (structured logs)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlacache.policy import ConfigurationError
from sqlacache.resilience.stats import BUCKETS

if TYPE_CHECKING:
    from sqlacache.cache import Cache

# event name → what it counts (labels: model, op; refusals add reason; errors are by call and kind)
EVENTS: Mapping[str, str] = {
    "hits": "reads served from the cache",
    "misses": "cacheable reads that went to the database (their rows are then stored)",
    "refusals": "reads neither served from nor stored to the cache, by reason",
    "fills": "results of misses handed to the backend to store",
    "evictions": "commits' invalidations, per table written (the model label holds the table)",
    "errors": "backend calls that failed (the op label holds the call), by kind",
}

# The flat counters of Cache.stats() exported as "stores" outcomes.
STORE_RESULTS = {
    "stores": "stored",
    "stores_refused": "refused",
    "too_large": "too_large",
    "stores_dropped": "dropped",
}


# Values of Cache.stats() that go up and down (the rest of its numbers only go up).
STAT_GAUGES = frozenset({"pending_invalidations", "near_entries", "near_bytes", "near_in_step"})


def stat_counters(stats: Mapping[str, Any]) -> list[tuple[str, int]]:
    """Every counter of ``Cache.stats()`` (``hits``, ``coalesced``, ``errors.timeout``, ``near_hits``…)."""
    return sorted(
        (name, value) for name, value in stats.items() if type(value) is int and name not in STAT_GAUGES
    )


def stat_gauges(stats: Mapping[str, Any]) -> list[tuple[str, int]]:
    """The gauges of ``Cache.stats()`` present (the near-cache's only with one)."""
    return sorted((name, int(stats[name])) for name in STAT_GAUGES if name in stats)


@dataclass
class Snapshot:
    """What a sink exports at one instant."""

    events: dict[tuple[str, str, str, str], int]  # (event, model, op, reason) → count
    timings: dict[str, tuple[list[int], float]]  # call → (per bucket then +Inf, total seconds)
    stats: dict[str, Any]
    buckets: tuple[float, ...] = field(default=BUCKETS)


def snapshot(cache: Cache) -> Snapshot:
    """The recorded events, backend call latencies and ``Cache.stats()``, read at once."""
    recorder = cache.count.recording()
    events, timings = recorder.snapshot()
    return Snapshot(events, timings, cache.stats())


class LogEvents:
    """Log every hit, miss, refusal, fill, eviction and backend error of ``cache`` as one record on
    ``logger`` (``sqlacache.events`` by default) whose ``extra`` fields are the metrics' labels:
    ``sqlacache_event``, ``sqlacache_model``, ``sqlacache_op``, ``sqlacache_reason``.

    A JSON log formatter turns them into fields. Costly on a busy process: meant for diagnosis.
    ``close()`` stops it.
    """

    def __init__(self, cache: Cache, logger: logging.Logger | None = None, level: int = logging.INFO) -> None:
        if logger is not None and not isinstance(logger, logging.Logger):
            raise ConfigurationError(
                f"LogEvents: logger={logger!r} is not a logging.Logger; pass logging.getLogger('name')"
            )
        if isinstance(level, bool) or not isinstance(level, int):
            raise ConfigurationError(f"LogEvents: level={level!r}: give a logging level, e.g. logging.INFO")
        self.logger = logger or logging.getLogger("sqlacache.events")
        self.level = level
        self._recorder = cache.count.recording()
        self._recorder.listeners.append(self._log)

    def _log(self, event: str, model: str, op: str, reason: str, n: int) -> None:
        if self.logger.isEnabledFor(self.level):
            self.logger.log(
                self.level,
                "sqlacache %s %s %s%s",
                event,
                model or "-",
                op or "-",
                f" ({reason})" if reason else "",
                extra={
                    "sqlacache_event": event,
                    "sqlacache_model": model,
                    "sqlacache_op": op,
                    "sqlacache_reason": reason,
                },
            )

    def close(self) -> None:
        if self._log in self._recorder.listeners:
            self._recorder.listeners.remove(self._log)
