"""``Cache``: configuration and the facade every other layer talks to.

It owns the backend, the policy, the key builder and the counters, and it is where backend
failures stop: a failed lookup or store is logged, counted and turned into "go to the database";
a failed invalidation is kept and retried, and until it is delivered this process serves nothing
from the cache.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Engine, inspect
from sqlalchemy.engine import Connection
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.util.concurrency import greenlet_spawn, in_greenlet

from sqlacache import dependencies as deps_mod
from sqlacache import rowtokens
from sqlacache.backends import Backend, BackendError, Lookup, MemoryBackend, RedisBackend
from sqlacache.keys import KeyBuilder, translation_token
from sqlacache.policy import ConfigurationError, Policy, ttl_value

log = logging.getLogger("sqlacache")


class _RateLimitedLog:
    """One log line per kind of failure per interval: a Redis outage must not flood the logs."""

    def __init__(self, interval: float = 30.0) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}

    def __call__(self, kind: str, message: str, *args: Any, exc_info: BaseException | None = None) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -self._interval) >= self._interval:
            self._last[kind] = now
            log.warning(message, *args, exc_info=exc_info)


def _backend_from(spec: Any, prefix: str, socket_timeout: float, max_entries: int) -> Backend:
    if isinstance(spec, str):
        scheme = spec.partition("://")[0].lower()
        if scheme in ("memory", "mem"):
            return MemoryBackend(max_entries=max_entries)
        if scheme in ("redis", "rediss", "unix"):
            return RedisBackend.from_url(
                spec, prefix=prefix, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
            )
        raise ConfigurationError(
            f"backend {spec!r}: unknown scheme {scheme!r}; use 'memory://', 'redis://host:port/db', "
            "a redis-py client, or a Backend instance"
        )
    if isinstance(spec, Backend):
        return spec
    import redis
    import redis.asyncio

    if isinstance(spec, redis.asyncio.Redis):  # fakeredis' async client subclasses it too
        return RedisBackend(async_client=spec, prefix=prefix)
    if isinstance(spec, redis.Redis) or (hasattr(spec, "evalsha") and hasattr(spec, "register_script")):
        return RedisBackend(spec, prefix=prefix)
    raise ConfigurationError(
        f"backend {spec!r} is not a URL, a redis-py client or a sqlacache Backend; "
        "pass e.g. backend='redis://localhost:6379/0' or backend='memory://'"
    )


_database_ids: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()
# database → the caches holding reads of it: a commit there, by any session, invalidates them all.
_watchers: dict[str, weakref.WeakSet[Cache]] = {}


def database_id(engine: Engine) -> str:
    """The database an engine talks to, the same in every process (but private for SQLite memory)."""
    found = _database_ids.get(engine)
    if found is None:
        url = engine.url
        database = url.database or ""
        if url.get_backend_name() == "sqlite":
            if database in ("", ":memory:") or "mode=memory" in str(url):
                database = f":memory:{uuid.uuid4().hex}"  # private to this process and engine
            else:
                database = os.path.abspath(database)
        where = f"{url.username or ''}@{url.host or ''}:{url.port or ''}"
        found = _database_ids[engine] = f"{url.get_backend_name()}://{where}/{database}"
    return found


def watchers(engine: Engine) -> list[Cache]:
    found = _watchers.get(database_id(engine))
    return list(found) if found else []


_bound: weakref.WeakKeyDictionary[Engine, Cache] = weakref.WeakKeyDictionary()


def bound_cache(session: Session) -> Cache | None:
    """The cache a plain ``Session`` uses because its engine was passed to ``Cache.bind``."""
    cache: Cache | None = None
    if _bound:
        bind = session.bind
        engine = bind.engine if isinstance(bind, Connection) else bind
        cache = _bound.get(engine) if isinstance(engine, Engine) else None
    session.__dict__["_sqlacache_cache"] = cache or False
    return cache


class _Bound:
    """What ``bind`` returns: usable as is in sync code and awaitable in async code."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache

    def __await__(self) -> Any:
        return self.cache
        yield  # pragma: no cover - makes this a generator


class Cache:
    """A query cache for SQLAlchemy sessions.

    ``backend``: ``"memory://"`` (alias ``"mem://"``), ``"redis://…"``, a redis-py client (sync or
    asyncio; fakeredis works) or a :class:`~sqlacache.backends.Backend`.
    ``models``: ``{Model or "pkg.mod.Model" or "*": {"ops": "all" | {...}, "ttl": seconds}}``;
    ``None`` caches every mapped class with all ops. ``timeout``/``default_timeout`` are the 0.1
    spellings of ``ttl``/``default_ttl``.
    """

    def __init__(
        self,
        backend: Any = "memory://",
        models: Mapping[Any, Mapping[str, Any]] | None = None,
        prefix: str = "sqlacache",
        default_ttl: float | None = None,
        enabled: bool = True,
        *,
        default_timeout: float | None = None,
        socket_timeout: float = 0.05,
        max_entries: int = 10_000,
        background_stores: bool = False,
        invalidation: str = "conditions",
        condition_in_limit: int = 32,
    ) -> None:
        if default_ttl is not None and default_timeout is not None:
            raise ConfigurationError("give default_ttl or its alias default_timeout, not both")
        if not isinstance(prefix, str) or not prefix or any(c in prefix for c in "\n\x1f*?[] "):
            raise ConfigurationError(
                f"prefix {prefix!r} must be a non-empty string without spaces or glob characters"
            )
        ttl = default_ttl if default_ttl is not None else default_timeout
        self.policy = Policy(models, ttl_value(ttl if ttl is not None else 3600, "default_ttl"))
        if invalidation not in ("conditions", "tables"):
            raise ConfigurationError(
                f"invalidation={invalidation!r}: use 'conditions' (evict the reads whose WHERE a written "
                "row matches) or 'tables' (evict every read of a written table)"
            )
        if (
            isinstance(condition_in_limit, bool)
            or not isinstance(condition_in_limit, int)
            or (condition_in_limit < 0)
        ):
            raise ConfigurationError(
                f"condition_in_limit={condition_in_limit!r}: give the longest IN list (an int >= 0) "
                "to track value by value"
            )
        # Condition-level: a write evicts only the cached reads whose conditions its old or new
        # values match. Table-level: any write to a table evicts every read of it.
        self.precise = invalidation == "conditions"
        self.condition_in_limit = condition_in_limit
        self.enabled = bool(enabled)
        self.prefix = prefix
        self.keys = KeyBuilder()
        self.backend: Backend = _backend_from(backend, prefix, socket_timeout, max_entries)
        # A Backend instance passed in belongs to the caller (it may be shared): close() leaves it open.
        self._owns_backend = self.backend is not backend
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._namespaces: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()
        self._database_deps: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()
        self._warn = _RateLimitedLog()
        # A miss doesn't need the store's answer: with background_stores the reader returns as
        # soon as it has its rows. Safety doesn't depend on timing — the store is still the atomic
        # check against the generation the read began at, however late it arrives.
        self.background_stores = bool(background_stores) and not isinstance(self.backend, MemoryBackend)
        self._queue: queue.Queue[tuple[str, bytes, Sequence[str], int, float] | None] = queue.Queue(1024)
        self._worker: threading.Thread | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- counters ---------------------------------------------------------------------------

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _error(self, kind: str, exc: BaseException) -> None:
        self.count("errors")
        self.count(f"errors.{kind}")
        self._warn(kind, "sqlacache: %s failed, using the database: %s", kind, exc)

    def internal_error(self, exc: BaseException, where: str) -> None:
        """A bug of sqlacache's own, survived: counted, logged with its traceback (rate-limited)."""
        self.count("errors")
        self.count("errors.internal")
        self._warn(
            f"internal:{where}", "sqlacache: internal error %s; using the database", where, exc_info=exc
        )

    def stats(self) -> dict[str, Any]:
        """Counters since start: hits, misses, stores, stores_refused, invalidations, errors, …"""
        with self._lock:
            out: dict[str, Any] = {
                k: self._counts.get(k, 0)
                for k in ("hits", "misses", "stores", "stores_refused", "invalidations", "errors")
            }
            out.update({k: v for k, v in self._counts.items() if k not in out})
            out["pending_invalidations"] = len(self._pending)
        return out

    def reset_stats(self) -> None:
        with self._lock:
            self._counts.clear()

    # -- backend calls that never raise -----------------------------------------------------

    def _deliver_pending(self) -> bool:
        """Deliver invalidations that failed earlier; until they are, nothing is served."""
        if not self._pending:
            return True
        with self._lock:
            pending = list(self._pending)
        try:
            self.backend.bump(pending)
        except BackendError as exc:
            self._error("invalidate", exc)
            return False
        with self._lock:
            del self._pending[: len(pending)]
        return True

    def lookup(self, key: str, hint: Sequence[str] = ()) -> Lookup | None:
        if not self._deliver_pending():
            return None
        try:
            return self.backend.lookup(key, hint)
        except BackendError as exc:
            self._error("lookup", exc)
            return None

    async def alookup(self, key: str, hint: Sequence[str] = ()) -> Lookup | None:
        """``lookup`` for async callers: native when the backend offers it, else in a greenlet."""
        native = getattr(self.backend, "alookup", None)
        if native is None or self._pending:
            return await greenlet_spawn(self.lookup, key, hint)
        try:
            found: Lookup = await native(key, hint)
            return found
        except BackendError as exc:
            self._error("lookup", exc)
            return None

    def generation(self) -> int | None:
        if not self._deliver_pending():
            return None
        try:
            return self.backend.generation()
        except BackendError as exc:
            self._error("generation", exc)
            return None

    def store(self, key: str, payload: bytes, deps: Sequence[str], generation: int, ttl: float) -> bool:
        if not self._deliver_pending():
            return False
        try:
            stored = self.backend.store(key, payload, deps, generation, ttl)
        except BackendError as exc:
            self._error("store", exc)
            return False
        self.count("stores" if stored else "stores_refused")
        return stored

    def submit_store(
        self, key: str, payload: bytes, deps: Sequence[str], generation: int, ttl: float
    ) -> None:
        """Store now, or hand the store to the background when ``background_stores`` is on."""
        if not self.background_stores:
            self.store(key, payload, deps, generation, ttl)
            return
        astore = getattr(self.backend, "astore", None)
        if astore is not None and in_greenlet():
            # Inside an AsyncSession: the event loop runs the store as a task.
            task = asyncio.get_running_loop().create_task(
                self._astore(astore, key, payload, deps, generation, ttl)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        if self._worker is None:
            with self._lock:
                if self._worker is None:
                    self._worker = threading.Thread(
                        target=self._store_worker, name="sqlacache-stores", daemon=True
                    )
                    self._worker.start()
        try:
            self._queue.put_nowait((key, payload, deps, generation, ttl))
        except queue.Full:
            self.count("stores_dropped")  # a dropped store is only a later miss

    async def _astore(
        self, astore: Any, key: str, payload: bytes, deps: Sequence[str], generation: int, ttl: float
    ) -> None:
        try:
            stored = await astore(key, payload, deps, generation, ttl)
        except BackendError as exc:
            self._error("store", exc)
            return
        self.count("stores" if stored else "stores_refused")

    def _store_worker(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self.store(*item)
            except Exception as exc:  # the worker must outlive any one store
                self._error("store", exc)
            finally:
                self._queue.task_done()

    def wait_for_stores(self, timeout: float = 5.0) -> None:
        """Block until background stores queued so far are done (for tests and shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.001)

    async def await_stores(self) -> None:
        """Async twin of :meth:`wait_for_stores`."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await greenlet_spawn(self.wait_for_stores)

    def discard(self, key: str) -> None:
        try:
            self.backend.delete([key])
        except BackendError as exc:
            self._error("delete", exc)

    def bump(self, deps: Iterable[str], rows: Sequence[deps_mod.RowImage] = ()) -> None:
        """Invalidate: called after the database committed, so it must not raise.

        ``rows`` are the written rows' images, for condition-level invalidation."""
        todo = sorted(set(deps))
        if not todo and not rows:
            return
        self.count("invalidations")
        if self._deliver_pending():
            try:
                if rows:
                    self.backend.bump(todo, rows)
                else:  # a Backend written before row images existed still works
                    self.backend.bump(todo)
                return
            except BackendError as exc:
                self._error("invalidate", exc)
        # Kept for retry without the images: every condition read of their tables goes instead.
        with self._lock:
            self._pending.extend(todo)
            self._pending.extend(sorted({deps_mod.scheme_dep(image[0]) for image in rows}))

    # -- keys -------------------------------------------------------------------------------

    def namespace(self, bind: Engine | Connection) -> str:
        """Which database a key belongs to: the same server and database in every process, and the
        same schema translation (``schema_translate_map`` makes one statement read other tables)."""
        engine = bind.engine if isinstance(bind, Connection) else bind
        ns = self._namespaces.get(engine)
        if ns is None:
            ns = database_id(engine)
            self.watch(engine)
            translate = engine._execution_options.get("schema_translate_map")
            if translate:
                ns = f"{ns}|{translation_token(translate)}"
            self._namespaces[engine] = ns
        if isinstance(bind, Connection):
            translate = bind._execution_options.get("schema_translate_map")
            if translate:
                return f"{ns}|{translation_token(translate)}"
        return ns

    def database_dep(self, bind: Engine | Connection) -> str:
        """The dependency every read of this bind's database has (see ``dependencies``)."""
        engine = bind.engine if isinstance(bind, Connection) else bind
        dep = self._database_deps.get(engine)
        if dep is None:
            dep = self._database_deps[engine] = deps_mod.database_dep(database_id(engine))
        return dep

    def watch(self, engine: Engine) -> None:
        """Have commits on this database — from any session, cached or not — invalidate this cache."""
        _watchers.setdefault(database_id(engine), weakref.WeakSet()).add(self)

    # -- manual control ---------------------------------------------------------------------

    def invalidate(
        self, model: Any = None, pks: Iterable[Any] | None = None, *, tables: Iterable[str] = ()
    ) -> None:
        """Evict cached reads of ``model`` (rows ``pks`` only, if given) and of raw ``tables``.

        With no arguments at all, evicts everything under this cache's prefix (see
        :meth:`invalidate_all`). Use it after writes made outside the application.
        """
        if model is None and pks is None and not tables:
            self.invalidate_all()
            return
        todo: list[str] = []
        if model is not None:
            mapper = inspect(model, raiseerr=False)
            if not isinstance(mapper, Mapper):
                raise ConfigurationError(f"invalidate: {model!r} is not a mapped class")
            names = [deps_mod.table_name(t) for t in mapper.tables]
            if pks is None:
                for name in names:
                    todo += deps_mod.unknown_rows_write_deps(name)
            else:
                # Rows changed in ways we don't know: their keyed reads, and every condition read.
                dialects = {e.dialect.name: e.dialect for e in list(self._namespaces.keys())}
                for pk in pks:
                    ident = tuple(pk) if isinstance(pk, (tuple, list)) else (pk,)
                    for dialect in dialects.values() or [DefaultDialect()]:
                        tokens = rowtokens.pk_tokens(mapper, ident, dialect)
                        for name in names:
                            todo += deps_mod.row_write_deps(name, tokens)
                for name in names:
                    todo.append(deps_mod.scheme_dep(name))
        elif pks is not None:
            raise ConfigurationError("invalidate: pks= needs a model")
        for t in tables:
            todo += deps_mod.unknown_rows_write_deps(t.lower())
        self.bump(todo)

    def invalidate_all(self) -> None:
        """Evict every entry under this cache's prefix (never anything else: no FLUSHDB)."""
        self.count("invalidations")
        try:
            self.backend.bump([deps_mod.ALL])
            self.backend.clear()
        except BackendError as exc:
            self._error("invalidate", exc)
            with self._lock:
                self._pending.append(deps_mod.ALL)

    async def ainvalidate(
        self, model: Any = None, pks: Iterable[Any] | None = None, *, tables: Iterable[str] = ()
    ) -> None:
        """Async twin of :meth:`invalidate` (works with asyncio Redis clients)."""
        await greenlet_spawn(self.invalidate, model, pks, tables=tables)

    async def ainvalidate_all(self) -> None:
        await greenlet_spawn(self.invalidate_all)

    # -- wiring -----------------------------------------------------------------------------

    def bind(self, engine: Engine | AsyncEngine) -> _Bound:
        """Cache plain ``Session``/``AsyncSession`` objects bound to ``engine`` (``await`` it or not)."""
        sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        if not isinstance(sync_engine, Engine):
            raise ConfigurationError(f"bind: {engine!r} is not an Engine or AsyncEngine")
        _bound[sync_engine] = self
        self.watch(sync_engine)
        return _Bound(self)

    def unbind(self, engine: Engine | AsyncEngine) -> None:
        sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        _bound.pop(sync_engine, None)

    def close(self) -> None:
        for watching in _watchers.values():
            watching.discard(self)
        if self._worker is not None:
            self.wait_for_stores()
            self._queue.put(None)
            self._worker.join(5)
            self._worker = None
        if self._owns_backend:
            self.backend.close()

    async def aclose(self) -> None:
        await self.await_stores()
        await greenlet_spawn(self.close)

    # 0.1 spelling
    async def disconnect(self) -> None:
        await self.aclose()


_default: Cache | None = None


def configure(**kwargs: Any) -> Cache:
    """Create the default :class:`Cache`, used by sessions created without ``cache=``."""
    global _default
    _default = Cache(**kwargs)
    return _default


def default_cache() -> Cache | None:
    return _default
