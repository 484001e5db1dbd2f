"""The near-cache: entries a backend served, held in process memory and evicted by fan-out.

Bounded by entries and by bytes (least recently used goes first) and by time (never longer than
the entry's own TTL). It holds what the backend answered (payload and dependencies, the generation
it was read at) and, once the read path has decoded it, the decoded form — only when every value in
it is immutable, since objects built from it share those values.

Coherence rests on three rules, enforced here:

* It serves nothing unless its fan-out subscription is in step (``synced`` and not ``lost`` since).
* Every eviction (a fan-out message, a local commit, losing step) moves ``epoch`` and is
  remembered for a while; an entry read from the backend is taken only if no eviction since that
  read began could concern it — else a commit that landed between the backend's answer and the
  insertion would be missed for good.
* Losing step empties it.
* It takes an entry only when its subscription ``covers`` it: every bump that could outdate it is
  followed (a Redis Cluster's subscription follows each group from its first sight on, and
  ``widened`` refuses the reads that began before).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlacache.backends.base import Entry, Subscription

ALL = "*"
_HISTORY = 512  # evictions remembered for the insertion check; older reads are simply not taken


@dataclass(slots=True, eq=False)
class NearEntry:
    key: str
    entry: Entry
    generation: int
    expires: float
    size: int
    memo: dict[Any, Any] = field(default_factory=dict)  # decoded forms, by who decoded them


class NearStore:
    """Entries in process memory; a fan-out ``Listener``. Thread-safe."""

    def __init__(self, max_entries: int, max_bytes: int, ttl: float) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, NearEntry] = OrderedDict()
        self._by_dep: dict[str, set[str]] = {}
        self._bytes = 0
        self.epoch = 0
        self._history: deque[tuple[int, frozenset[str] | None]] = deque(maxlen=_HISTORY)
        self.in_step = False
        self._stepped = threading.Event()  # set while in step
        self.subscription: Subscription | None = None
        # Counters (read by Cache.stats): entries taken, evicted by a dependency, dropped for room.
        self.stored = 0
        self.evictions = 0
        self.dropped = 0  # for room (LRU) or by expiry

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    # -- reads -------------------------------------------------------------------------------

    def get(self, key: str) -> NearEntry | None:
        if not self.in_step:
            return None
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return None
            if found.expires <= time.monotonic():
                self._remove(found)
                self.dropped += 1
                return None
            self._entries.move_to_end(key)
            return found

    def offer(self, key: str, entry: Entry, generation: int, since: int, ttl: float) -> None:
        """Take ``entry``, read from the backend by a read that began at epoch ``since``, unless an
        eviction since then may concern it (or it is too large to hold)."""
        size = len(entry.payload) + sum(len(d) for d in entry.deps) + 200
        if size > self.max_bytes:
            return
        with self._lock:
            if not self.in_step or not self._untouched_since(since, entry.deps):
                return
            subscription = self.subscription
            if subscription is not None and not subscription.covers(key, entry.deps):
                return  # an eviction it needs may not be heard (yet): a Redis Cluster's new group
            old = self._entries.get(key)
            if old is not None:
                self._remove(old)
            near = NearEntry(key, entry, generation, time.monotonic() + min(ttl, self.ttl), size)
            self._entries[key] = near
            self._bytes += size
            for dep in entry.deps:
                self._by_dep.setdefault(dep, set()).add(key)
            self.stored += 1
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                self._remove(next(iter(self._entries.values())))
                self.dropped += 1

    def _untouched_since(self, since: int, deps: Iterable[str]) -> bool:
        if since == self.epoch:
            return True
        if not self._history or self._history[0][0] > since + 1:
            return False  # evictions older than our history happened since: can't tell
        wanted = set(deps)
        for epoch, moved in self._history:
            if epoch > since and (moved is None or ALL in moved or not wanted.isdisjoint(moved)):
                return False
        return True

    def discard(self, key: str) -> None:
        """Forget ``key`` (its entry could not be decoded)."""
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._remove(found)

    # -- evictions ---------------------------------------------------------------------------

    def evict(self, deps: frozenset[str]) -> None:
        """Evict every entry depending on any of ``deps`` (``*``: all)."""
        with self._lock:
            self.epoch += 1
            self._history.append((self.epoch, deps))
            if ALL in deps:
                self.evictions += len(self._entries)
                self._clear()
                return
            for dep in deps:
                for key in list(self._by_dep.get(dep, ())):
                    found = self._entries.get(key)
                    if found is not None:
                        self._remove(found)
                        self.evictions += 1

    def _remove(self, near: NearEntry) -> None:
        del self._entries[near.key]
        self._bytes -= near.size
        for dep in near.entry.deps:
            keys = self._by_dep.get(dep)
            if keys is not None:
                keys.discard(near.key)
                if not keys:
                    del self._by_dep[dep]

    def _clear(self) -> None:
        self._entries.clear()
        self._by_dep.clear()
        self._bytes = 0

    def _forget_all(self, in_step: bool) -> None:
        with self._lock:
            self.epoch += 1
            self._history.append((self.epoch, None))
            self._clear()
            self.in_step = in_step
        if in_step:
            self._stepped.set()
        else:
            self._stepped.clear()

    def wait_in_step(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the subscription to be in step."""
        return self._stepped.wait(timeout)

    # -- the fan-out Listener ------------------------------------------------------------------

    def apply(self, deps: frozenset[str]) -> None:
        self.evict(deps)

    def lost(self) -> None:
        self._forget_all(False)

    def synced(self) -> None:
        self._forget_all(True)

    def widened(self) -> None:
        # Bumps not followed until now may have outdated what a read in flight returned: refuse
        # every read that began before (the entries held depend only on what was followed).
        with self._lock:
            self.epoch += 1
            self._history.append((self.epoch, None))
