"""A circuit breaker for the backend: stop paying a timeout on every request while Redis is down.

Closed: every call goes to the backend. A failure that says the server is unreachable (refused,
timed out, loading; ``threshold`` of them in a row) opens the breaker, so that a request pays at
most one timeout: for ``cooldown`` seconds no call is made and the cache acts
as if it were empty. Then one caller is let through as a probe (half-open); its success closes the
breaker, its failure opens it again for twice as long, up to ``max_cooldown``.

Errors where the server answered (out of memory, read-only replica) do not open it: the server is
there, and reads still work.
"""

from __future__ import annotations

import threading
import time

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"


class Breaker:
    def __init__(self, cooldown: float = 0.25, max_cooldown: float = 5.0, threshold: int = 1) -> None:
        self._threshold = threshold
        self._failures = 0
        self._base = cooldown
        self._max = max(cooldown, max_cooldown)
        self._cooldown = cooldown
        self._state = CLOSED
        self._until = 0.0  # while open: when the next probe may go
        self._probe_deadline = 0.0  # a probe that never reports back frees the slot after this
        self._lock = threading.Lock()
        self.opened = 0  # how many times it opened

    @property
    def state(self) -> str:
        return self._state

    def allow(self) -> bool:
        """May this call go to the backend? While open, True for one probe once the cooldown ends."""
        if self._state == CLOSED:  # the common case, without the lock
            return True
        now = time.monotonic()
        with self._lock:
            if self._state == CLOSED:
                return True
            if self._state == OPEN and now >= self._until:
                self._state = HALF_OPEN
                self._probe_deadline = now + max(self._cooldown, 1.0)
                return True
            if self._state == HALF_OPEN and now >= self._probe_deadline:
                self._probe_deadline = now + max(self._cooldown, 1.0)
                return True
            return False

    def succeeded(self) -> None:
        if self._state == CLOSED and not self._failures:
            return
        with self._lock:
            self._state = CLOSED
            self._failures = 0
            self._cooldown = self._base

    def failed(self) -> None:
        """The server could not be reached: open (again), backing off while it stays down."""
        now = time.monotonic()
        with self._lock:
            if self._state == HALF_OPEN:
                self._cooldown = min(self._cooldown * 2, self._max)
            elif self._state == OPEN:
                return  # a call that was already in flight when it opened
            else:
                self._failures += 1
                if self._failures < self._threshold:
                    return
            self._state = OPEN
            self._until = now + self._cooldown
            self.opened += 1
