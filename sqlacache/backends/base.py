"""The backend contract: the only thing the layers above ``backends/`` know about storage.

The cache never asks a backend to find the entries a write affects. Instead every cached entry
names the *dependencies* it was computed from (``"t:users"``, ``"r:users:…"``, …) and the
*generation* at which its database read began. A backend keeps one version number per
dependency; a commit bumps the versions of what it wrote. An entry is served only while every one
of its dependencies exists and has a version no newer than the entry's generation. That gives:

* invalidation whose cost depends on what was written, never on how much is cached;
* the stale-set race closed: ``store`` refuses an entry whose dependencies were bumped after the
  reader's generation was taken (check and store are one atomic step);
* lost metadata is a miss, never a stale hit: a missing version counts as "bumped just now".

Generations are strictly increasing per backend: any ``bump`` that happens after a call to
``lookup``/``generation`` returned ``g`` assigns versions greater than ``g``.

The algorithm, stated once (the Redis backend's ``backends/redis/lua/*.lua`` is the reference;
``MemoryBackend`` does the same in Python; dependency names are listed in
``sqlacache.analysis.dependencies``):

* **lookup**: the entry is valid when every dependency it names has a version, no newer than the
  entry's generation; otherwise it is a miss (and may be deleted). A miss makes the *roots* of the
  dependencies the reader expects (``hint``) exist: ``t:<table>`` for a ``r:``/``c:``/``a:``/``s:``
  of the table, the dependency itself for ``t:``, ``d:`` and ``*``. A missing root is created
  "bumped now", at a new generation, which the lookup returns: entries that depended on a lost
  root stay outdated, and the store after the first read of a table on a fresh backend finds a
  floor no newer than its reader and is accepted; any write from then on moves the roots past it.
* **store**: refused when a dependency's version is newer than the reader's generation, or missing.
  A missing ``r:``/``c:``/``a:``/``s:`` version of a table starts at the *floor*, the table's own
  ``t:`` version, when that exists and is no newer than the reader (every write to the table moves
  it); otherwise it is created "bumped now" and the store is refused, so the next reader can store.
  A ``c:<table>:<columns>:…`` whose scheme ``<columns>`` is not in the table's registry (kept with
  ``s:<table>``) adds it there, the registry's version starting no older than the floor.
* **bump**: each named version gets a new generation; a missing row or condition version stays
  missing (metadata grows with what is cached, not with what is written), a missing ``t:`` is
  created. Each row image bumps, per registered scheme of its table, the ``c:`` its values name,
  or ``s:<table>`` when it lacks a column or its ``guard`` is older than ``t:<table>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


class BackendError(Exception):
    """A backend failed (connection, timeout, server error). The read falls back to the database.

    ``kind`` names the failure for the counters: ``"timeout"``, ``"connection"``, ``"loading"``,
    ``"oom"``, ``"readonly"``, ``"noscript"``, ``"server"`` (another error reply), ``"protocol"``
    (a reply we cannot read) or ``"error"``.
    """

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind


class BackendUnavailable(BackendError):
    """The backend could not be reached at all (refused, timed out, still loading its data).

    The cache stops calling it for a while (a circuit breaker) instead of paying the timeout on
    every request; other errors (the server answered with one) do not trip it.
    """


@dataclass(frozen=True, slots=True)
class Entry:
    """A valid cached entry: the payload bytes as stored, and the dependencies it was stored with."""

    payload: bytes
    deps: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Lookup:
    """The answer to ``lookup``: the entry when there is a valid one, else the generation to read at."""

    entry: Entry | None
    generation: int
    # Set by the cache, not by backends: the entry is valid but due for refresh-ahead.
    refresh_due: bool = False


@runtime_checkable
class Backend(Protocol):
    """What every backend provides. All methods may raise :class:`BackendError`, nothing else.

    Keys and dependency names are given without the prefix; the backend adds its own namespace.
    Dependency names never contain ``"\\x1f"`` or ``"\\n"``.
    """

    def lookup(self, key: str, hint: Sequence[str] = ()) -> Lookup:
        """One round trip: the entry under ``key`` if it is still valid, else the current generation.

        An entry whose dependency versions are missing or newer than its generation is reported
        as absent (and may be deleted). ``hint`` names the dependencies the caller expects the
        entry to have; a backend may use it to fetch their versions with the entry.
        """
        ...

    def generation(self) -> int:
        """The current generation (used at transaction start under REPEATABLE READ/SERIALIZABLE)."""
        ...

    def store(self, key: str, payload: bytes, deps: Sequence[str], generation: int, ttl: float) -> bool:
        """Atomically store ``payload`` under ``key`` for ``ttl`` seconds, unless a dependency moved.

        Refuses (returns ``False``, stores nothing) when any dependency's version is newer than
        ``generation`` or missing; a missing version is created at the current generation so that
        later readers can store. On success every dependency's version is kept alive at least as
        long as the entry. A condition dependency ``c:<table>:<columns>:<tokens>`` whose scheme
        ``<columns>`` is not yet registered for ``<table>`` registers it, moves ``s:<table>`` to
        the current generation and refuses.
        """
        ...

    def bump(
        self, deps: Sequence[str], rows: Sequence[tuple[str, Mapping[str, str], int | None]] = ()
    ) -> None:
        """Give every dependency in ``deps`` a new version greater than every generation handed out.

        A missing version may stay missing. ``rows`` are row images ``(table, {column: token},
        guard)``: for every condition scheme registered for the table (by ``store`` of a
        dependency ``c:<table>:<columns>:<tokens>``), the image bumps the condition its values
        name, or ``s:<table>`` (every condition entry of the table) when it lacks one of the
        columns — or when ``guard`` is a generation and ``t:<table>``, before this bump, is
        missing or newer than it (the values may be older than the database).
        """
        ...

    def delete(self, keys: Sequence[str]) -> None:
        """Delete entries by key (a corrupt or foreign entry found by a reader)."""
        ...

    def clear(self) -> None:
        """Delete everything under this backend's prefix, and nothing else."""
        ...

    def close(self) -> None:
        """Release connections. The backend may not be used afterwards."""
        ...


# -- optional capabilities: a backend has one when it has its methods (the cache checks them once,
# when it wraps the backend: resilience/resilient.py). Without them the cache does the same work
# another way, as noted.


@runtime_checkable
class Leases(Protocol):
    """Fill leases shared by every process: one reader per missing key queries, the others wait.

    Without it, single flight is per process. ``store`` of a backend with leases also takes
    ``lease=token`` (keyword) and gives that lease back in the same atomic step.
    """

    def lease(self, key: str, ttl: float, hint: Sequence[str] = ()) -> tuple[Lookup, str | bool | None]:
        """``lookup(key, hint)``, and on a miss take the key's lease for ``ttl`` seconds, in one
        step: (lookup, token); (lookup, False) when another process holds it; (hit, None)."""
        ...

    def claim(self, key: str, ttl: float) -> str | None:
        """The key's lease whatever its entry (a refresh-ahead): a token, or None if held."""
        ...

    def release(self, key: str, token: str) -> None:
        """Give a lease back, only if it is still ``token``'s."""
        ...


@runtime_checkable
class NativeAsyncio(Protocol):
    """``lookup`` and ``store`` awaited on the event loop, without a greenlet.

    Without it, async callers run the sync methods inside SQLAlchemy's greenlet bridge.
    """

    async def alookup(self, key: str, hint: Sequence[str] = ()) -> Lookup: ...

    async def astore(
        self,
        key: str,
        payload: bytes,
        deps: Sequence[str],
        generation: int,
        ttl: float,
        *,
        lease: str | None = None,
    ) -> bool: ...


@runtime_checkable
class SendsStores(Protocol):
    """``store`` without waiting for its reply: a miss's store leaves the reader's path.

    Without it, a sync reader waits for the store's reply (or ``background_stores`` hands the store
    to a thread).
    """

    def send_store(
        self,
        key: str,
        payload: bytes,
        deps: Sequence[str],
        generation: int,
        ttl: float,
        *,
        lease: str | None = None,
    ) -> bool:
        """Send what ``store`` does and return: True once sent, False if it can't be sent this way
        now (the caller then calls ``store``)."""
        ...

    def store_replies(self) -> list[bool | BackendError]:
        """The replies of the stores sent so far, in order: stored, refused, or the failure."""
        ...


# Where the bumps stand, read from the backend (``FansOut.position``) and checked only by the same
# backend's subscription (``Subscription.caught_up``): one Redis, ``(born, n)``; a Redis Cluster, a
# tuple of such positions, one per group its subscription follows.
Position = Any


class Listener(Protocol):
    """What a fan-out subscription drives (the near-cache)."""

    def apply(self, deps: frozenset[str]) -> None:
        """The next bump: evict what depends on any of ``deps``."""

    def lost(self) -> None:
        """Out of step: forget everything and serve nothing until :meth:`synced`."""

    def synced(self) -> None:
        """In step again: every bump up to now is in the backend, the later ones will be applied."""

    def widened(self) -> None:
        """The subscription now follows bumps it did not follow before (a Redis Cluster's group, on
        first sight): what a read that began before this call returned can't be taken."""


class Subscription(Protocol):
    position: Position | None  # the last bump applied; None while out of step

    def caught_up(self, position: Position) -> bool:
        """Whether every bump up to ``position`` (read from the backend) has been applied."""
        ...

    def covers(self, key: str, deps: Sequence[str]) -> bool:
        """Whether every bump that could outdate the entry under ``key`` with ``deps`` is followed
        (and in step): only then may the near-cache take it. A subscription that follows only part
        of the bumps (a Redis Cluster's: groups on first sight) starts following what is missing (the
        read path asks it before a lookup too, with the dependencies it expects)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class FansOut(Protocol):
    """Every process hears every bump, in order: what keeps near-caches coherent.

    Without it, ``Cache(near_cache=True)`` is refused (an in-process backend needs no near-cache).
    """

    def subscribe(self, listener: Listener, heartbeat: float) -> Subscription:
        """Start hearing bumps; a silent partition is noticed within about ``2 * heartbeat``."""
        ...

    def position(self) -> Position:
        """Where the sequence of bumps stands now (one small round trip)."""
        ...

    async def aposition(self) -> Position:
        """``position`` awaited on the event loop."""
        ...


@runtime_checkable
class LoopBound(Protocol):
    """A backend that may be unusable from plain threads (an asyncio client only).

    ``sync_capable`` False keeps background threads (the invalidation retry) from calling it.
    Without it, a backend is taken to be callable from any thread.
    """

    @property
    def sync_capable(self) -> bool: ...
