"""Counters and rate-limited logging: what the cache did, without flooding logs during an outage."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

# The names every ``Cache.stats()`` has, even at zero.
BASIC = ("hits", "misses", "stores", "stores_refused", "invalidations", "errors")


# Latency buckets (seconds) of backend calls: a loopback Redis answers in 50-500 µs, a remote one in
# 0.2-2 ms; the socket timeout (50 ms by default) bounds the rest.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

Labels = tuple[str, str, str, str]  # (event, model, op, reason)
Listener = Callable[[str, str, str, str, int], None]  # event, model, op, reason, n
TimingListener = Callable[[str, float], None]  # call, seconds


class Recorder:
    """Per-model/op events and backend call latencies, kept only once a metrics sink attached one
    (``sqlacache.metrics``): without one, the read path's cost is one attribute check."""

    def __init__(self) -> None:
        self.events: Counter[Labels] = Counter()
        # call → (count per bucket, then +Inf), total seconds
        self.timings: dict[str, tuple[list[int], list[float]]] = {}
        self.listeners: list[Listener] = []
        self.timing_listeners: list[TimingListener] = []
        self._lock = threading.Lock()

    def event(self, event: str, model: str, op: str, reason: str = "", n: int = 1) -> None:
        with self._lock:
            self.events[(event, model, op, reason)] += n
        for listener in self.listeners:
            with contextlib.suppress(Exception):  # a sink's failure must not reach a read
                listener(event, model, op, reason, n)

    def timing(self, call: str, seconds: float) -> None:
        with self._lock:
            found = self.timings.get(call)
            if found is None:
                found = self.timings[call] = ([0] * (len(BUCKETS) + 1), [0.0])
            counts, total = found
            i = 0
            while i < len(BUCKETS) and seconds > BUCKETS[i]:
                i += 1
            counts[i] += 1
            total[0] += seconds
        for timing_listener in self.timing_listeners:
            with contextlib.suppress(Exception):
                timing_listener(call, seconds)

    def snapshot(self) -> tuple[dict[Labels, int], dict[str, tuple[list[int], float]]]:
        with self._lock:
            return dict(self.events), {k: (list(c), t[0]) for k, (c, t) in self.timings.items()}


class Counters:
    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.recorder: Recorder | None = None  # set by the first metrics sink attached

    def recording(self) -> Recorder:
        """The recorder, made on first use (by a metrics sink)."""
        with self._lock:
            if self.recorder is None:
                self.recorder = Recorder()
            return self.recorder

    def event(self, name: str, model: str, op: str, reason: str = "") -> None:
        """Count ``name``, and — when a metrics sink listens — the same event by model and op."""
        self(name)
        recorder = self.recorder
        if recorder is not None:
            recorder.event(name, model, op, reason)

    def __call__(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {k: self._counts.get(k, 0) for k in BASIC}
            out.update({k: v for k, v in self._counts.items() if k not in out})
        return out

    def clear(self) -> None:
        with self._lock:
            self._counts.clear()


class RateLimitedLog:
    """One line per kind of event per ``interval`` seconds (a repeated failure is logged once)."""

    def __init__(self, logger: logging.Logger, interval: float = 30.0) -> None:
        self.logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(
        self,
        kind: str,
        message: str,
        *args: Any,
        exc_info: BaseException | None = None,
        level: int = logging.WARNING,
        extra: dict[str, Any] | None = None,
    ) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -self._interval) < self._interval:
                self._suppressed[kind] += 1
                return
            self._last[kind] = now
            suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            message += " (%d more like it not logged)"
            args = (*args, suppressed)
        self.logger.log(level, message, *args, exc_info=exc_info, extra=extra)
