"""The backend as the cache calls it: every call returns, whatever the backend does.

A failed lookup or store is counted, logged (rate-limited) and turned into "go to the database".
A failure that says the backend is unreachable opens the circuit breaker, so that an outage costs
one timeout, not one per request. An invalidation that cannot be delivered after a commit is kept
and retried (pending.py); until it is delivered this process serves nothing from the cache. Stores
may be made in the background (stores.py). A generation lower than one already seen means the
backend came back with older data than it had (a restart from an old snapshot, a failover that
lost writes): everything under the prefix is evicted before anything is served.

Entries are wrapped in a small envelope (a magic number and the refresh-ahead time): anything
else under an entry key is foreign or damaged, and is a miss that is deleted and counted, as is an
entry larger than ``max_entry_size``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from sqlacache._sa import greenlet_spawn, in_greenlet
from sqlacache.analysis import dependencies as deps_mod
from sqlacache.backends import Backend, BackendError, Lookup
from sqlacache.backends.base import (
    BackendUnavailable,
    Entry,
    Leases,
    LoopBound,
    NativeAsyncio,
    SendsStores,
)
from sqlacache.resilience.breaker import Breaker
from sqlacache.resilience.pending import Pending
from sqlacache.resilience.stats import Counters, RateLimitedLog, Recorder
from sqlacache.resilience.stores import BackgroundStores, StoreJob
from sqlacache.security.limits import Quota
from sqlacache.security.seal import Seal

log = logging.getLogger("sqlacache.backend")

_T = TypeVar("_T")

# b"\xa7q" + the refresh-ahead time in wall-clock milliseconds (0: never), then the codec's payload.
_ENVELOPE = struct.Struct(">2sQ")
_MAGIC = b"\xa7q"
# A generation may trail the highest one seen by this much without meaning lost data (Redis
# generations are microseconds; a burst of bumps can push them a little ahead of its clock).
_SLACK = 1000
# Stores sent without waiting have their replies read this many at a time (and whenever the
# counters are asked for): they only move counters, and each read is a system call on the miss path.
_SETTLE_EVERY = 16

Row = tuple[str, Mapping[str, str], "int | None"]


def _unexpected(op: str, exc: BaseException) -> BackendError:
    return BackendError(f"cache {op} raised {exc!r}", "client")


def _timed(recorder: Recorder, op: str, fn: Callable[..., _T]) -> Callable[..., _T]:
    def timed(*args: Any, **kwargs: Any) -> _T:
        began = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            recorder.timing(op, time.perf_counter() - began)

    return timed


def _atimed(recorder: Recorder, op: str, fn: Callable[..., Awaitable[_T]]) -> Callable[..., Awaitable[_T]]:
    async def timed(*args: Any, **kwargs: Any) -> _T:
        began = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        finally:
            recorder.timing(op, time.perf_counter() - began)

    return timed


class _Skipped(Exception):
    """The breaker is open: the call was not made."""


class Resilient:
    def __init__(
        self,
        backend: Backend,
        count: Counters,
        *,
        max_entry_size: int | None,
        breaker: Breaker,
        background_stores: bool,
        retry_interval: float = 0.02,
        seal: Seal | None = None,
        quota: Quota | None = None,
        strip: Callable[[Sequence[Row]], Sequence[Row]] | None = None,
    ) -> None:
        self.backend = backend
        # Signs (or encrypts) every entry stored and checks every entry found: None, no work at all.
        self.seal = seal
        self.quota = quota  # limits on what this process stores (security/limits.py); None: none
        # Drops excluded columns' values from row images before they go to the backend.
        self.strip = strip
        self.count = count
        self.breaker = breaker
        self.max_entry_size = max_entry_size
        self.warn = RateLimitedLog(log)
        # The optional capabilities (backends/base.py), checked once here.
        self.leases = isinstance(backend, Leases)
        self.native: NativeAsyncio | None = backend if isinstance(backend, NativeAsyncio) else None
        self._loop_bound: LoopBound | None = backend if isinstance(backend, LoopBound) else None
        self.sender: SendsStores | None = backend if isinstance(backend, SendsStores) else None
        self._unsettled = 0  # stores sent since their replies were last read (approximate: threads)
        self._lock = threading.Lock()
        self._pending = Pending(self._send, self._threads_allowed, count, self.internal_error, retry_interval)
        # The highest generation this process has been given, and when its answer arrived: only a
        # call that began after that may be compared with it (replies overtake each other).
        self._seen = -1
        self._seen_at = 0.0
        self.background_stores = background_stores
        self._stores = BackgroundStores(self.store, count, self.internal_error)

    # -- calling the backend --------------------------------------------------------------------

    def _failed(self, op: str, exc: BackendError) -> None:
        kind = getattr(exc, "kind", "error")
        self.count("errors")
        self.count(f"errors.{op}")
        self.count(f"errors.{kind}")
        recorder = self.count.recorder
        if recorder is not None:
            recorder.event("errors", "", op, kind)
        if isinstance(exc, BackendUnavailable):
            self.breaker.failed()
        else:
            self.breaker.succeeded()  # it answered: reachable
        self.warn(
            f"{op}:{kind}",
            "sqlacache: cache %s failed (%s), using the database: %s",
            op,
            kind,
            exc,
            extra={"sqlacache_event": "errors", "sqlacache_op": op, "sqlacache_reason": kind},
        )

    def _call(self, op: str, fn: Callable[..., _T], *args: Any, probe: bool = False, **kwargs: Any) -> _T:
        if not probe and not self.breaker.allow():
            self.count("breaker_skips")
            raise _Skipped
        recorder = self.count.recorder
        if recorder is not None:  # a metrics sink listens: time the call
            fn = _timed(recorder, op, fn)
        try:
            result = fn(*args, **kwargs)
        except BackendError as exc:
            self._failed(op, exc)
            raise
        except Exception as exc:  # a client library's own bug must not reach a read either
            error = _unexpected(op, exc)
            self._failed(op, error)
            raise error from exc
        self.breaker.succeeded()
        return result

    async def _acall(self, op: str, fn: Callable[..., Awaitable[_T]], *args: Any, **kwargs: Any) -> _T:
        """``_call`` for the asyncio client, awaited on the event loop."""
        if not self.breaker.allow():
            self.count("breaker_skips")
            raise _Skipped
        recorder = self.count.recorder
        if recorder is not None:
            fn = _atimed(recorder, op, fn)
        try:
            result = await fn(*args, **kwargs)
        except BackendError as exc:
            self._failed(op, exc)
            raise
        except Exception as exc:  # a client library's own bug must not reach a read either
            error = _unexpected(op, exc)
            self._failed(op, error)
            raise error from exc
        self.breaker.succeeded()
        return result

    def internal_error(self, where: str, exc: BaseException) -> None:
        """A bug of sqlacache's own, survived: counted, logged with its traceback (rate-limited)."""
        self.count("errors")
        self.count("errors.internal")
        self.warn(
            f"internal:{where}",
            "sqlacache: internal error %s; using the database",
            where,
            exc_info=exc,
            extra={"sqlacache_event": "errors", "sqlacache_op": where, "sqlacache_reason": "internal"},
        )

    def track(self, task: asyncio.Task[Any]) -> None:
        """Keep a background task alive until it is done (``await_for_stores`` waits for them)."""
        self._stores.track(task)

    # -- invalidations that could not be delivered (pending.py) --------------------------------

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _keep(self, deps: Sequence[str]) -> None:
        self._pending.keep(deps)

    def deliver_pending(self, force: bool = False) -> bool:
        """Deliver the invalidations kept earlier; True when none remain."""
        return self._pending.deliver(force)

    def _send(self, todo: list[str], force: bool) -> bool:
        try:
            # Forced (the retry thread, retry_pending) it is a probe: the breaker doesn't stop it.
            self._call("invalidate", self.backend.bump, todo, probe=force)
        except (BackendError, _Skipped):
            return False
        return True

    def _threads_allowed(self) -> bool:
        return self._loop_bound is None or self._loop_bound.sync_capable

    # -- reads ----------------------------------------------------------------------------------

    def lookup(self, key: str, hint: Sequence[str] = ()) -> Lookup | None:
        if self._pending and not self.deliver_pending():
            return None
        began = time.monotonic()
        try:
            found = self._call("lookup", self.backend.lookup, key, hint)
        except (BackendError, _Skipped):
            return None
        return self._checked(key, found, began)

    async def alookup(self, key: str, hint: Sequence[str] = ()) -> Lookup | None:
        """``lookup`` for async callers: native when the backend offers it, else in a greenlet."""
        native = self.native.alookup if self.native is not None else None
        if native is None or self._pending:
            return await greenlet_spawn(self.lookup, key, hint)
        began = time.monotonic()
        try:
            found: Lookup = await self._acall("lookup", native, key, hint)
        except (BackendError, _Skipped):
            return None
        return self._checked(key, found, began)

    def _checked(self, key: str, found: Lookup, began: float) -> Lookup | None:
        if not self._observe(found.generation, began):
            return None
        entry = found.entry
        if entry is None:
            return found
        raw = entry.payload
        if self.seal is not None:
            opened = self.seal.open(key, raw)
            if isinstance(opened, str):
                self.drop(key, "tampered", opened, level=logging.ERROR)
                return Lookup(None, found.generation)
            raw = opened
        if len(raw) < _ENVELOPE.size or raw[:2] != _MAGIC:
            self.drop(key, "corrupt", "not in sqlacache's format")
            return Lookup(None, found.generation)
        if self.max_entry_size is not None and len(raw) - _ENVELOPE.size > self.max_entry_size:
            self.drop(key, "too_large", f"{len(raw)} bytes, above max_entry_size={self.max_entry_size}")
            return Lookup(None, found.generation)
        refresh_at = _ENVELOPE.unpack_from(raw)[1]
        due = bool(refresh_at) and time.time() * 1000 >= refresh_at
        return Lookup(Entry(raw[_ENVELOPE.size :], entry.deps), found.generation, due)

    def _observe(self, generation: int, began: float) -> bool:
        """False when ``generation`` went backwards: the backend lost data it had (then evict all).

        ``began``: when the call that returned it started."""
        with self._lock:
            seen = self._seen
            if generation >= seen - _SLACK or began <= self._seen_at:
                if generation > seen:
                    self._seen = generation
                    self._seen_at = time.monotonic()
                return True
            self._seen = generation
            self._seen_at = time.monotonic()
        self.count("data_loss")
        self.warn(
            "data_loss",
            "sqlacache: the cache's generation went back from %d to %d: it lost data it had "
            "(restarted from an old snapshot, or failed over); evicting everything",
            seen,
            generation,
            level=logging.ERROR,
        )
        self.invalidate_all()
        return False

    def drop(self, key: str, what: str, why: Any, level: int = logging.WARNING) -> None:
        """An entry that cannot be served: counted, logged once in a while, deleted."""
        self.count(what)
        self.warn(what, "sqlacache: dropping the cache entry %s: %s", key, why, level=level)
        if self._loop_bound is not None and not self._loop_bound.sync_capable and not in_greenlet():
            # Found on the event loop by a native lookup: an asyncio client deletes it in a task.
            with contextlib.suppress(RuntimeError):
                loop = asyncio.get_running_loop()
                self.track(loop.create_task(greenlet_spawn(self._delete, key)))
                return
        self._delete(key)

    def _delete(self, key: str) -> None:
        with contextlib.suppress(BackendError, _Skipped):
            self._call("delete", self.backend.delete, [key])

    def generation(self) -> int | None:
        if self._pending and not self.deliver_pending():
            return None
        began = time.monotonic()
        try:
            generation = self._call("generation", self.backend.generation)
        except (BackendError, _Skipped):
            return None
        return generation if self._observe(generation, began) else None

    def position(self) -> Any:
        """Where the backend's sequence of bumps stands (fan-out), or None if it can't say."""
        if self._pending and not self.deliver_pending():
            return None
        try:
            return self._call("position", self.backend.position)  # type: ignore[attr-defined]
        except (BackendError, _Skipped):
            return None

    async def aposition(self) -> Any:
        """``position`` awaited on the event loop."""
        if self._pending:
            return await greenlet_spawn(self.position)
        try:
            return await self._acall("position", self.backend.aposition)  # type: ignore[attr-defined]
        except (BackendError, _Skipped):
            return None

    # -- leases ---------------------------------------------------------------------------------

    def lease(
        self, key: str, ttl: float, hint: Sequence[str] = ()
    ) -> tuple[Lookup | None, str | bool | None]:
        """Look ``key`` up and take its fill lease if it is missing, in one round trip: (a miss,
        token); (a miss, False) if another process holds the lease; (a hit, None); (None, None)
        if the backend can't say (then fill anyway)."""
        if self._pending and not self.deliver_pending():
            return None, None  # nothing is served while an eviction waits
        began = time.monotonic()
        try:
            found, held = self._call("lease", self.backend.lease, key, ttl, hint)  # type: ignore[attr-defined]
        except (BackendError, _Skipped):
            return None, None
        checked = self._checked(key, found, began)
        if checked is None or (checked.entry is None and found.entry is not None):
            return checked, None  # lost data, or an entry we dropped: fill, without a lease
        return checked, held

    async def alease(
        self, key: str, ttl: float, hint: Sequence[str] = ()
    ) -> tuple[Lookup | None, str | bool | None]:
        """``lease`` for async callers: native when the backend offers it, else in a greenlet."""
        native = getattr(self.native, "alease", None) if self.native is not None else None
        if native is None or self._pending:
            return await greenlet_spawn(self.lease, key, ttl, hint)
        began = time.monotonic()
        try:
            found, held = await self._acall("lease", native, key, ttl, hint)
        except (BackendError, _Skipped):
            return None, None
        checked = self._checked(key, found, began)
        if checked is None or (checked.entry is None and found.entry is not None):
            return checked, None
        return checked, held

    def claim(self, key: str, ttl: float) -> str | bool | None:
        """The lease of ``key`` whatever its entry: a token, False if held elsewhere, None if the
        backend can't say."""
        try:
            token: str | None = self._call("claim", self.backend.claim, key, ttl)  # type: ignore[attr-defined]
        except (BackendError, _Skipped):
            return None
        return token if token is not None else False

    def release(self, key: str, token: str) -> None:
        with contextlib.suppress(BackendError, _Skipped):
            self._call("release", self.backend.release, key, token)  # type: ignore[attr-defined]

    # -- stores ---------------------------------------------------------------------------------

    def _wrap(self, job: StoreJob) -> bytes:
        refresh_at = 0
        if job.refresh_ahead > 0 and math.isfinite(job.ttl):
            refresh_at = int((time.time() + job.ttl * (1 - job.refresh_ahead)) * 1000)
        inner = _ENVELOPE.pack(_MAGIC, refresh_at) + job.payload
        return inner if self.seal is None else self.seal.close(job.key, inner)

    def _admitted(self, job: StoreJob) -> bool:
        """Whether the limits let ``job`` be stored (no I/O: what they refuse is counted here)."""
        if self.max_entry_size is not None and len(job.payload) > self.max_entry_size:
            self.count("too_large")
            return False
        if self.quota is not None:
            passed = self.quota.admit(job.key, job.shape, len(job.payload) + len(job.key), job.ttl)
            if passed is not None:
                self.count("limited")
                self.warn("limited", "sqlacache: not storing %s: this process reached %s", job.key, passed)
                return False
        return True

    def _storable(self, job: StoreJob) -> bool:
        """``_admitted``, a refused store's lease given back, and kept invalidations delivered first."""
        if not self._admitted(job):
            if job.lease is not None:
                self.release(job.key, job.lease)
            return False
        return not self._pending or self.deliver_pending()

    @staticmethod
    def _with_lease(store: Callable[..., _T], job: StoreJob) -> Callable[..., _T]:
        # Only backends with leases take the argument (the contract's store has none).
        return store if job.lease is None else functools.partial(store, lease=job.lease)

    def store(self, job: StoreJob) -> bool:
        if not self._storable(job):
            return False
        store = self._with_lease(self.backend.store, job)
        try:
            stored = self._call("store", store, job.key, self._wrap(job), job.deps, job.generation, job.ttl)
        except (BackendError, _Skipped):
            return False
        self.count("stores" if stored else "stores_refused")
        return stored

    def submit_store(self, job: StoreJob) -> None:
        """``store`` off the reader's path: inside an ``AsyncSession``, a task of the event loop;
        else sent without waiting for its reply where the backend can (a sync client), or with
        ``background_stores`` by a thread; otherwise now."""
        astore = self.native.astore if self.native is not None else None
        if astore is not None and in_greenlet():
            self.track(asyncio.get_running_loop().create_task(self._astore(astore, job)))
            return
        if self.background_stores:
            self._stores.put(job)
        elif self.sender is None or not self._send_store(job):
            self.store(job)

    def _send_store(self, job: StoreJob) -> bool:
        """Send the store and return; its reply is read later, with others'. False: store inline."""
        if not self._storable(job):
            return True
        if self._unsettled >= _SETTLE_EVERY:
            # The replies of the stores sent before, read together: one socket read for many.
            self.settle_stores()
        try:
            sent: bool = self._call(
                "store",
                self._with_lease(self.sender.send_store, job),  # type: ignore[union-attr]
                job.key,
                self._wrap(job),
                job.deps,
                job.generation,
                job.ttl,
            )
        except (BackendError, _Skipped):
            return True  # counted; its lease expires on its own
        self._unsettled += sent
        return sent

    def settle_stores(self) -> None:
        """Count what the stores sent so far answered (stored, refused, failed)."""
        if self.sender is None:
            return
        self._unsettled = 0
        try:
            replies = self._call("store", self.sender.store_replies)
        except (BackendError, _Skipped):
            return
        for reply in replies:
            if isinstance(reply, BackendError):
                self._failed("store", reply)
                self._unsettled = _SETTLE_EVERY  # read the next one's at once, until all is well
            else:
                self.count("stores" if reply else "stores_refused")

    async def _astore(self, astore: Any, job: StoreJob) -> None:
        # The limits are checked here on the loop; what needs I/O (a refused store's lease given
        # back, kept invalidations delivered) runs in the greenlet, and only when there is any.
        if not self._admitted(job):
            if job.lease is not None:
                await greenlet_spawn(self.release, job.key, job.lease)
            return
        if self._pending and not await greenlet_spawn(self.deliver_pending):
            return
        store = self._with_lease(astore, job)
        try:
            stored = await self._acall(
                "store", store, job.key, self._wrap(job), job.deps, job.generation, job.ttl
            )
        except (BackendError, _Skipped):
            return
        self.count("stores" if stored else "stores_refused")

    def wait_for_stores(self, timeout: float = 5.0) -> None:
        self._stores.wait(timeout)
        self.settle_stores()

    async def await_for_stores(self, timeout: float = 5.0) -> None:
        await self._stores.await_all(timeout)

    # -- writes ---------------------------------------------------------------------------------

    def deliver(self, deps: Sequence[str], rows: Sequence[Row] = ()) -> bool:
        """Invalidate now, or return False (nothing kept: the caller keeps it)."""
        if not self.deliver_pending():
            return False
        if rows and self.strip is not None:
            rows = self.strip(rows)
        try:
            if rows:
                self._call("invalidate", self.backend.bump, deps, rows)
            else:  # a Backend written before row images existed still works
                self._call("invalidate", self.backend.bump, deps)
        except (BackendError, _Skipped):
            return False
        return True

    def bump(self, deps: Sequence[str], rows: Sequence[Row] = ()) -> bool:
        """Invalidate after the database committed: never raises; what fails is kept for retry.
        True if delivered now."""
        if self.deliver(deps, rows):
            return True
        # Kept without the images: every condition read of their tables goes instead.
        self._keep([*deps, *sorted({deps_mod.scheme_dep(image[0]) for image in rows})])
        return False

    def invalidate_all(self) -> None:
        try:
            self._call("invalidate", self.backend.bump, [deps_mod.ALL])
            self._call("invalidate", self.backend.clear)
        except (BackendError, _Skipped):
            self._keep([deps_mod.ALL])

    def close(self) -> None:
        self.settle_stores()
        self._pending.close()  # pending evictions die with the cache: a closed backend can't take them
        self._stores.close()
