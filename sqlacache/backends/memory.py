"""In-process backend: a bounded LRU of entries plus a bounded LRU of dependency versions.

Everything lives in two ordered dicts behind one lock. Each operation touches only the key and its
dependencies, so the lock is held for a handful of dict operations; payloads are never copied or
serialized under it.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from sqlacache.backends.base import BackendError, Entry, Lookup

__all__ = ["MemoryBackend"]

log = logging.getLogger("sqlacache")
_instances: weakref.WeakSet[MemoryBackend] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for backend in list(_instances):
        backend._forked = True
        # A thread of the parent may have held the lock at the fork: it would never be released here.
        backend._lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # not on Windows, which doesn't fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Stored(NamedTuple):
    payload: bytes
    deps: tuple[str, ...]
    generation: int
    expires_at: float  # time.monotonic() deadline


def _check_dep_names(deps: Sequence[str]) -> None:
    # The Redis entry format cannot represent these; refusing them here too keeps both backends
    # interchangeable, so a bad dependency name fails in development on the memory backend.
    for dep in deps:
        if "\x1f" in dep or "\n" in dep:
            raise ValueError(f"dependency name {dep!r} contains a separator character (\\x1f or \\n)")


class MemoryBackend:
    """A :class:`~sqlacache.backends.base.Backend` for one process.

    ``max_entries`` bounds the cached entries (least recently used is evicted first; a hit counts as a
    use). ``max_versions`` bounds the dependency version table the same way: dropping a version is
    safe because a missing version is treated as "bumped just now", which can only cause misses.

    ``Lookup.generation`` is always the current generation, on a hit as on a miss.
    """

    def __init__(self, max_entries: int = 10_000, max_versions: int = 100_000) -> None:
        for name, value in (("max_entries", max_entries), ("max_versions", max_versions)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: give an int >= 1")
        self._max_entries = max_entries
        self._max_versions = max_versions
        self._entries: OrderedDict[str, _Stored] = OrderedDict()
        self._versions: OrderedDict[str, int] = OrderedDict()
        # table → the condition schemes (sorted column names) its entries use; meaningful only while
        # the registry version "s:<table>" exists.
        self._schemes: dict[str, list[str]] = {}
        # Starts above 0 so that a generation of 0 can never be mistaken for a real one.
        self._generation = 1
        self._closed = False
        self._lock = threading.Lock()
        self._forked = False
        _instances.add(self)

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError("MemoryBackend is closed")
        if self._forked:
            self._forked = False  # once per process
            log.warning(
                "sqlacache: the memory:// cache is used in a process forked after it was created "
                "(pid %d). It is per process: a commit here does not evict the other processes' "
                "entries, so they serve stale reads. With several worker processes (gunicorn, uWSGI, "
                "multiprocessing) use backend='redis://…', or create the Cache in each worker.",
                os.getpid(),
            )

    def _next_generation(self) -> int:
        # Caller holds the lock.
        self._generation += 1
        return self._generation

    def _set_version(self, dep: str, generation: int) -> None:
        # Caller holds the lock.
        self._versions[dep] = generation
        self._versions.move_to_end(dep)
        while len(self._versions) > self._max_versions:
            self._versions.popitem(last=False)

    def lookup(self, key: str, hint: Sequence[str] = ()) -> Lookup:
        now = time.monotonic()
        with self._lock:
            self._check_open()
            stored = self._entries.get(key)
            if stored is None:
                return self._miss(hint)
            valid = stored.expires_at > now
            if valid:
                versions = self._versions
                for dep in stored.deps:
                    version = versions.get(dep)
                    if version is None or version > stored.generation:
                        valid = False
                        break
            if not valid:
                del self._entries[key]
                return self._miss(hint)
            self._entries.move_to_end(key)
            for dep in stored.deps:
                # Versions that live entries use are worth keeping longer than idle ones.
                self._versions.move_to_end(dep)
            return Lookup(Entry(stored.payload, stored.deps), self._generation)

    def _miss(self, hint: Sequence[str]) -> Lookup:
        """A miss makes the roots of the hinted dependencies exist at the current generation (see
        the contract), so that the store after a first read is accepted. Caller holds the lock."""
        fresh: int | None = None
        for dep in hint:
            root = f"t:{dep.split(':', 2)[1]}" if dep[:2] in ("c:", "r:", "a:", "s:") else dep
            if root not in self._versions:
                if fresh is None:
                    fresh = self._next_generation()  # "bumped now": entries depending on it are out
                self._set_version(root, fresh)
        return Lookup(None, self._generation)

    def generation(self) -> int:
        with self._lock:
            self._check_open()
            return self._generation

    def store(self, key: str, payload: bytes, deps: Sequence[str], generation: int, ttl: float) -> bool:
        _check_dep_names(deps)
        if not ttl > 0:  # also rejects NaN
            return False
        deps = tuple(deps)
        payload = bytes(payload)
        expires_at = time.monotonic() + (ttl if math.isfinite(ttl) else 1e12)
        with self._lock:
            self._check_open()
            accepted = True
            fresh: int | None = None
            versions = self._versions

            def floor(table: str) -> int | None:
                # The floor (see the contract, backends/base.py): a missing row/condition version of a
                # table may start at the table's own version when that is no newer than this reader.
                nonlocal fresh
                found = versions.get(f"t:{table}")
                if found is None:
                    if fresh is None:
                        fresh = self._next_generation()
                    self._set_version(f"t:{table}", fresh)
                return found if found is not None and found <= generation else None

            # Condition dependencies register their scheme with their table (see the contract).
            for dep in deps:
                if not dep.startswith("c:"):
                    continue
                table, scheme = dep.split(":", 3)[1:3]
                registry = f"s:{table}"
                current = versions.get(registry)
                schemes = self._schemes.get(table) if current is not None else None
                if schemes is None or scheme not in schemes:
                    start = floor(table)
                    if start is None:
                        if fresh is None:
                            fresh = self._next_generation()
                        start = fresh
                        accepted = False
                    self._schemes[table] = [*(schemes or []), scheme]
                    self._set_version(registry, max(start, current or 0))
            for dep in deps:
                version = versions.get(dep)
                if version is None:
                    start = floor(dep.split(":", 2)[1]) if dep[:2] in ("c:", "r:", "a:", "s:") else None
                    if start is not None:
                        self._set_version(dep, start)
                        continue
                    # Lost metadata counts as a bump that happened just now: this reader may have
                    # read before the (forgotten) write, so refuse; the next reader can store.
                    if fresh is None:
                        fresh = self._next_generation()
                    self._set_version(dep, fresh)
                    accepted = False
                elif version > generation:
                    accepted = False
            if not accepted:
                return False
            for dep in deps:
                self._versions.move_to_end(dep)
            self._entries[key] = _Stored(payload, deps, generation, expires_at)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
            return True

    def bump(
        self, deps: Sequence[str], rows: Sequence[tuple[str, Mapping[str, str], int | None]] = ()
    ) -> None:
        if not deps and not rows:
            return
        with self._lock:
            self._check_open()
            generation = self._next_generation()
            todo = set(deps)
            for table, values, guard in rows:
                if f"s:{table}" not in self._versions:
                    continue  # no registry: no condition entry of this table is valid anyway
                if guard is not None:
                    # Values as an object was loaded: current only if its table wasn't written since
                    # (checked before this bump moves the table's own version).
                    current = self._versions.get(f"t:{table}")
                    if current is None or current > guard:
                        todo.add(f"s:{table}")
                        continue
                for scheme in self._schemes.get(table, ()):
                    tokens = [values.get(c) for c in scheme.split(",")]
                    if all(t is not None for t in tokens):
                        todo.add(f"c:{table}:{scheme}:{','.join(tokens)}")  # type: ignore[arg-type]
                    else:
                        todo.add(f"s:{table}")
            versions = self._versions
            for dep in todo:
                # A missing row/condition version stays missing: nothing valid depends on it. A
                # table's own is created, for the others to start from (see store).
                if dep in versions:
                    versions[dep] = generation
                elif dep.startswith("t:"):
                    self._set_version(dep, generation)

    def delete(self, keys: Sequence[str]) -> None:
        with self._lock:
            self._check_open()
            for key in keys:
                self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._check_open()
            self._entries.clear()
            # The generation counter survives: generations must keep increasing for readers that
            # took one before the clear.
            self._versions.clear()
            self._schemes.clear()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._entries.clear()
            self._versions.clear()

    def __len__(self) -> int:
        """The number of entries held, including expired ones not yet looked up or evicted."""
        return len(self._entries)
