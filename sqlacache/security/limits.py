"""Limits against abuse: how much one process may make the cache backend hold.

A statement whose parameter comes from a client (a search box) makes one entry per value it is
given: without a limit, a client can fill Redis with one-off entries. ``Quota`` counts, per process,
the entries this process stored that have not yet expired (their TTL), per statement shape and in
bytes; a store beyond either limit is not made (the read is served all the same; counted as
``limited``). An entry counts from its store until its TTL ends, whether or not a commit outdated it
in between: outdated entries hold memory in Redis until then too.
"""

from __future__ import annotations

import heapq
import threading
import time

from sqlacache.policy import ConfigurationError


def limit_value(name: str, value: object, unit: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name}={value!r}: give {unit} (an int >= 1), or None for no limit")
    return value


class Quota:
    """Admits a store while this process's live entries stay within the limits (thread-safe)."""

    def __init__(self, per_shape: int | None, max_bytes: int | None) -> None:
        self.per_shape = per_shape
        self.max_bytes = max_bytes
        self.bytes = 0
        self._live: dict[str, tuple[float, int, str]] = {}  # key → (expires, size, shape)
        self._shapes: dict[str, int] = {}  # shape → live entries
        self._expiry: list[tuple[float, str]] = []  # (expires, key): a heap, stale items skipped
        self._lock = threading.Lock()

    def _forget(self, key: str) -> None:
        found = self._live.pop(key, None)
        if found is not None:
            _, size, shape = found
            self.bytes -= size
            left = self._shapes[shape] - 1
            if left:
                self._shapes[shape] = left
            else:
                del self._shapes[shape]

    def _expire(self, now: float) -> None:
        heap = self._expiry
        while heap and heap[0][0] <= now:
            expires, key = heapq.heappop(heap)
            found = self._live.get(key)
            if found is not None and found[0] == expires:
                self._forget(key)

    def admit(self, key: str, shape: str, size: int, ttl: float) -> str | None:
        """Record a store about to be made; or, refusing it, say which limit it would pass."""
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            self._forget(key)  # a store under the same key replaces that entry
            if self.per_shape is not None and self._shapes.get(shape, 0) >= self.per_shape:
                return f"max_keys_per_shape={self.per_shape}"
            if self.max_bytes is not None and self.bytes + size > self.max_bytes:
                return f"max_bytes_stored={self.max_bytes}"
            expires = now + ttl
            self._live[key] = (expires, size, shape)
            self._shapes[shape] = self._shapes.get(shape, 0) + 1
            self.bytes += size
            heapq.heappush(self._expiry, (expires, key))
            return None
