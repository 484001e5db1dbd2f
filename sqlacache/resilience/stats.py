"""Counters and rate-limited logging: what the cache did, without flooding logs during an outage."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any

# The names every ``Cache.stats()`` has, even at zero.
BASIC = ("hits", "misses", "stores", "stores_refused", "invalidations", "errors")


class Counters:
    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

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
        self.logger.log(level, message, *args, exc_info=exc_info)
