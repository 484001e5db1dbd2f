"""Invalidations the backend could not take after a commit: kept (bounded) and retried until delivered.

They are retried inline (the next call that needs the backend) and from a background thread; until
they are delivered this process serves nothing from the cache.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from sqlacache.analysis import dependencies as deps_mod
from sqlacache.resilience.stats import Counters

log = logging.getLogger("sqlacache.backend")

_MAX_PENDING = 10_000


class Pending:
    """The kept invalidations. ``send(deps, forced)`` delivers them: True when the backend took them."""

    def __init__(
        self,
        send: Callable[[list[str], bool], bool],
        threads_allowed: Callable[[], bool],
        count: Counters,
        internal_error: Callable[[str, BaseException], None],
        retry_interval: float,
    ) -> None:
        self._send = send
        self._threads_allowed = threads_allowed
        self.count = count
        self.internal_error = internal_error
        self._retry_interval = retry_interval
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._closed = False
        self._last_attempt = 0.0
        self._retrier: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def keep(self, deps: Sequence[str]) -> None:
        with self._lock:
            self._pending.update(deps)
            if len(self._pending) > _MAX_PENDING:  # bounded: evict everything instead
                self._pending = {deps_mod.ALL}
            start = self._retrier is None and self._threads_allowed()
            if start:
                self._retrier = threading.Thread(target=self._retry_loop, name="sqlacache-retry", daemon=True)
        if start and self._retrier is not None:
            self._retrier.start()

    def _retry_loop(self) -> None:
        while True:
            time.sleep(self._retry_interval)
            with self._lock:
                if not self._pending or self._closed:
                    self._retrier = None
                    return
            try:
                self.deliver(force=True)
            except Exception as exc:  # the thread must outlive anything one attempt does
                self.internal_error("while retrying invalidations", exc)

    def deliver(self, force: bool = False) -> bool:
        """Deliver the invalidations kept earlier; True when none remain."""
        if not self._pending:
            return True
        now = time.monotonic()
        if not force and now - self._last_attempt < self._retry_interval:
            return False  # the last attempt just failed: don't pay for another one per request
        with self._lock:
            todo = sorted(self._pending)
            self._last_attempt = now
        if not self._send(todo, force):
            return False
        with self._lock:
            self._pending.difference_update(todo)
            left = not self._pending
        if left:
            self.count("pending_delivered")
            log.info("sqlacache: delivered the invalidations kept while the cache was unreachable")
        return left

    def close(self) -> None:
        self._closed = True
