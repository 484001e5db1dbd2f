"""``Cache``: configuration and the facade every other layer talks to.

It owns the configuration, the policy, the key builder and the counters; backend calls go through
``Cache.io`` (``resilient.py``), where backend failures stop.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Engine, inspect
from sqlalchemy.engine import Connection
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Mapper

from sqlacache import _sa
from sqlacache.analysis import dependencies as deps_mod
from sqlacache.analysis import rowtokens
from sqlacache.backends import Backend, FansOut, MemoryBackend
from sqlacache.connect import backend_from, warn_if_unbounded
from sqlacache.fill.flight import Flights
from sqlacache.keys import KeyBuilder, translation_token
from sqlacache.memoize import memoize
from sqlacache.near.store import NearStore
from sqlacache.policy import ConfigurationError, Policy, ttl_value
from sqlacache.resilience.breaker import Breaker
from sqlacache.resilience.outbox import Outbox
from sqlacache.resilience.resilient import Resilient
from sqlacache.resilience.stats import Counters
from sqlacache.security.exclude import Exclusions
from sqlacache.security.limits import Quota, limit_value
from sqlacache.security.seal import Seal

if TYPE_CHECKING:
    from sqlacache.read.explain import Explanation

log = logging.getLogger("sqlacache")

_F = TypeVar("_F", bound=Callable[..., Any])


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name}={value!r}: give True or False")


def _number(name: str, value: Any, unit: str, positive: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        bound = "a positive" if positive else "a non-negative"
        raise ConfigurationError(f"{name}={value!r}: give {bound} number ({unit})")
    return float(value)


def _near_options(
    coherence: Any, max_entries: Any, max_bytes: Any, ttl: Any, heartbeat: Any
) -> tuple[float, float]:
    """The near-cache's options checked (near_ttl and near_heartbeat as floats), its flag on or off."""
    if coherence not in ("strict", "fanout"):
        raise ConfigurationError(
            f"near_coherence={coherence!r}: use 'strict' (one small round trip per transaction: "
            "nothing older than a commit that finished before it) or 'fanout' (no round trip: "
            "another process's commit is seen once its message arrives)"
        )
    for name, value in (("near_max_entries", max_entries), ("near_max_bytes", max_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigurationError(f"{name}={value!r}: give an int >= 1")
    return (
        _number("near_ttl", ttl, "seconds an entry may stay in process memory", positive=True),
        _number("near_heartbeat", heartbeat, "seconds", positive=True),
    )


_database_ids: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()
# database → the caches holding reads of it: a commit there, by any session, invalidates them all.
_watchers: dict[str, weakref.WeakSet[Cache]] = {}


# engine → the cache ``Cache.bind`` gave it to: plain sessions reaching it read through that cache.
_bound: weakref.WeakKeyDictionary[Engine, Cache] = weakref.WeakKeyDictionary()


def engine_of(bind: Any) -> Engine | None:
    engine = bind.engine if isinstance(bind, Connection) else bind
    return engine if isinstance(engine, Engine) else None


def bound_to(bind: Any) -> Cache | None:
    """The cache ``bind``'s engine was given to with ``Cache.bind``, if any."""
    engine = engine_of(bind)
    return _bound.get(engine) if engine is not None else None


def bound_caches() -> set[Cache]:
    return set(_bound.values())


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


def watched_databases(cache: Cache) -> list[str]:
    """The databases whose commits invalidate ``cache`` (``database_id`` of each)."""
    return [db for db, caches in list(_watchers.items()) if cache in caches]


# Every Cache not yet collected: the pytest plugin isolates them (``sqlacache.pytest_plugin``).
live: weakref.WeakSet[Cache] = weakref.WeakSet()
# Set by the pytest plugin only, for the test run: a suffix for every new Cache's prefix (one per
# pytest-xdist worker, so that workers sharing a Redis never read each other's entries), and
# ``enabled=False`` for every Cache (``--sqlacache=off``).
test_run: dict[str, Any] = {}


def watched(engine: Engine) -> bool:
    """Whether some cache reads this engine's database (cheaper than ``watchers``)."""
    return bool(_watchers.get(database_id(engine)))


def watchers(engine: Engine) -> list[Cache]:
    found = _watchers.get(database_id(engine))
    return list(found) if found else []


class _Bound:
    """What ``bind`` returns: usable as is in sync code and awaitable in async code."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache

    def __await__(self) -> Any:
        return self.cache
        yield  # pragma: no cover - makes this a generator


class Internal:
    """What the read and write paths ask of their :class:`Cache` (``cache.internal``), kept off its
    public surface: the key namespace of a bind, the commit fan-out, invalidation, internal errors."""

    def __init__(self, cache: Cache) -> None:
        self.cache = weakref.ref(cache)  # not a cycle: a Cache nobody holds goes as it did
        self.io = cache.io
        self.count = cache.count
        self.namespaces: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()
        self.database_deps: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()

    def error(self, exc: BaseException, where: str) -> None:
        """A bug of sqlacache's own, survived: counted, logged with its traceback (rate-limited)."""
        self.io.internal_error(where, exc)

    def namespace(self, bind: Engine | Connection) -> str:
        """Which database a key belongs to: the same server and database in every process, and the
        same schema translation (``schema_translate_map`` makes one statement read other tables)."""
        engine = bind.engine if isinstance(bind, Connection) else bind
        ns = self.namespaces.get(engine)
        if ns is None:
            ns = database_id(engine)
            self.watch(engine)
            translate = engine.get_execution_options().get("schema_translate_map")
            if translate:
                ns = f"{ns}|{translation_token(translate)}"
            self.namespaces[engine] = ns
        if isinstance(bind, Connection):
            translate = bind.get_execution_options().get("schema_translate_map")
            if translate:
                return f"{ns}|{translation_token(translate)}"
        return ns

    def database_dep(self, bind: Engine | Connection) -> str:
        """The dependency every read of this bind's database has (see ``dependencies``)."""
        engine = bind.engine if isinstance(bind, Connection) else bind
        dep = self.database_deps.get(engine)
        if dep is None:
            dep = self.database_deps[engine] = deps_mod.database_dep(database_id(engine))
        return dep

    def databases(self) -> list[str]:
        """The databases whose commits invalidate this cache (``database_id`` of each)."""
        cache = self.cache()
        return watched_databases(cache) if cache is not None else []

    def watch(self, engine: Engine) -> None:
        """Have commits on this database — from any session, cached or not — invalidate this cache."""
        cache = self.cache()
        if cache is not None:
            _watchers.setdefault(database_id(engine), weakref.WeakSet()).add(cache)

    def bump(self, deps: Iterable[str], rows: Sequence[deps_mod.RowImage] = ()) -> bool:
        """Invalidate ``deps`` (and the conditions ``rows`` match): never raises, kept if it fails.
        True if delivered now."""
        todo = sorted(set(deps))
        if not todo and not rows:
            return True
        self.count("invalidations")
        recorder = self.count.recorder
        if recorder is not None:  # per table, for the metrics sinks
            tables = {deps_mod.table_of_dep(d) for d in todo}.union(row[0] for row in rows)
            for table in sorted(t for t in tables if t):
                recorder.event("evictions", table, "commit")
        delivered = self.io.bump(todo, rows)
        cache = self.cache()
        near = cache.near if cache is not None else None
        if near is not None:
            # After the bump (a read that began before it must not refill memory with what it
            # read): this process's own near-cache is fresh before commit() returns, whatever the
            # fan-out does. The conditions ``rows`` match are computed by the backend; here the
            # whole registry of each table they wrote goes (every condition read depends on it).
            near.evict(frozenset(todo).union(deps_mod.scheme_dep(row[0]) for row in rows))
        return delivered


class Cache:
    """A query cache for SQLAlchemy sessions: what is cached, where, for how long.

    Give it to sessions with ``sessionmaker(engine, class_=CachingSession, cache=cache)`` (or
    ``CachingAsyncSession``), or cache plain sessions of an engine with :meth:`bind`. Every mistake
    in the configuration (an unknown op or key, a TTL that isn't a positive finite number, a number
    of the wrong type or range, a flag that isn't a bool, an unimportable dotted path, a class
    that isn't mapped, an unknown backend scheme or URL part) raises
    :class:`~sqlacache.ConfigurationError` here, at construction, naming the problem and the fix.

    :param backend: Where entries live.

        * ``"memory://"`` (alias ``"mem://"``): in this process, thread-safe, TTL- and
          LRU-bounded to ``max_entries``. Per process: a commit in one process does not evict
          another's entries, so never use it with several workers (a process forked after the
          cache was created is warned once).
        * ``"redis://host:port/db"`` (also ``rediss://``, ``unix://…?db=N``): a sync and an asyncio
          redis-py client with ``socket_timeout`` and ``socket_connect_timeout`` of
          ``socket_timeout`` seconds. The URL is checked (the path must be a database number,
          query parameters must be redis-py's) and one connection is opened: a database index the
          server rejects is a ``ConfigurationError`` carrying Redis's message; a Redis that is down
          or slow is not (the cache starts; reads go to the database until it answers).
        * ``"redis+sentinel://host:26379,host:26379/<service>/<db>"`` (also
          ``rediss+sentinel://``): the master of a Sentinel-managed service, checked the same way
          (and the service name against the sentinels that answer).
        * ``"redis+cluster://host:7000,host:7000/"`` (also ``rediss+cluster://``): a Redis
          Cluster (Redis >= 7).
        * A ``redis.Redis`` / ``redis.asyncio.Redis`` client (or a redis-py-compatible one such as
          fakeredis, a
          ``Sentinel(...).master_for(...)`` client, a ``RedisCluster``), or a
          :class:`~sqlacache.Backend`.
    :param models: ``{target: {"ops": …, "ttl": seconds}}`` where ``target`` is a mapped class, a
        dotted path ``"pkg.module.Class"`` (imported at construction, so a typo fails at start-up)
        or ``"*"`` for every mapped class not listed. Subclasses inherit their base class's entry.
        ``ops`` is ``"all"`` (the default) or a set of ``"get"``, ``"fetch"``, ``"count"``,
        ``"exists"``. ``None`` (the default) caches every mapped class with all ops. A statement's
        model is its lead entity (the first mapped class it selects from). ``"timeout"`` is the
        0.1 spelling of ``"ttl"``. ``"exclude": [columns]`` keeps those columns of the model out
        of every entry (loaded from the database on access; docs/security.rst).
    :param prefix: Namespace of every Redis key this cache writes; :meth:`invalidate_all` deletes
        these and nothing else. Non-empty, no spaces or glob characters.
    :param default_ttl: Seconds (positive, finite; 3600 when not given). TTL precedence: per call
        (``execution_options={"cache_ttl": …}`` / ``.cached(ttl=…)``) > per model >
        ``default_ttl``. ``default_timeout`` is its 0.1 spelling (give one of the two).
    :param enabled: ``False`` makes every session a plain pass-through.
    :param socket_timeout: Seconds (positive; default 0.05) for the clients built from a
        ``redis://`` URL: a slow Redis must not slow the application more than that.
    :param max_entries: Entries the memory backend keeps (an int >= 1; default 10 000).
    :param background_stores: A miss never waits for its store. ``False`` (default): with Redis, a
        sync reader sends the store on a connection of its own without waiting for the reply
        (read with later stores', or by :meth:`stats`); inside an ``AsyncSession`` the store is
        a task of the event loop. ``True``: sync stores are handed to a worker thread instead
        (slower on a busy interpreter; kept for backends that can't send without waiting). Either
        way the store is the same atomic check against the generation the read began at, so a
        late store never installs stale data. :meth:`wait_for_stores` (``await_for_stores``)
        waits for them, and :meth:`close` does too. The memory backend stores inline.
    :param invalidation: ``"conditions"`` (default): a committed write evicts the cached reads
        whose conditions its rows' old or new values match. ``"tables"``: a write to a table
        evicts every cached read of that table — simpler to reason about, and the way to compare.
    :param condition_in_limit: The longest ``IN (…)`` list tracked value by value (default 32); a
        longer one is treated as if the condition were absent for that column (it evicts more,
        never less).
    :param fill_timeout: Seconds a reader waits for another reader already filling the same
        missing key (in this process, or in another one holding the key's lease in Redis) before
        it queries the database itself; also the lease's lifetime. ``0`` turns stampede
        protection off.
    :param refresh_ahead: A fraction of the TTL (``0 <= f < 1``; default ``0``, off). An entry
        read in the last ``f`` of its TTL is recomputed in the background by one reader while
        everyone is served the entry.
    :param max_entry_size: Bytes (default 1 MiB; ``None``: no limit). A larger result is not
        stored (counted ``too_large``); a larger entry found in the backend is a miss and deleted.
    :param breaker_cooldown: Seconds (default 0.25) the circuit breaker stays open after the
        backend was unreachable before one request probes it.
    :param breaker_max_cooldown: Seconds (default 5): the cooldown doubles after each failed probe,
        up to this.
    :param near_cache: ``True`` keeps the entries Redis serves in process memory too, kept coherent
        by Redis pub/sub (default ``False``; a Redis backend only).
    :param near_coherence: ``"strict"`` (default: one small round trip per transaction; nothing
        older than a commit that finished before it) or ``"fanout"`` (no round trip; another
        process's commit is seen once its message arrives).
    :param near_max_entries: Entries the near-cache keeps (an int >= 1; default 10 000), least
        recently used dropped first.
    :param near_max_bytes: Bytes the near-cache keeps (an int >= 1; default 64 MiB).
    :param near_ttl: Seconds an entry may stay in memory (default 60), never longer than the read's
        own TTL.
    :param near_heartbeat: Seconds (default 1): the subscriber PINGs after this long without a
        message, and a missing answer after as long again counts as a lost connection.
    :param secret: A str/bytes of at least 16 bytes, or a list of them to rotate (the first
        signs, any verifies): every entry carries an HMAC-SHA256 over the prefix, its key and its
        bytes; one that fails the check is a miss, deleted and counted ``tampered``
        (docs/security.rst). The near-cache's fan-out messages are signed too (with
        ``encryption_key`` alone, under it): one that fails is ignored (``near_forged``).
    :param encryption_key: A str/bytes of at least 16 random bytes (or a list, to rotate):
        entries are encrypted with AES-256-GCM under a key derived from it, bound to the key they
        are stored under, which also authenticates them (the ``encryption`` extra).
    :param exclude_columns: Column names, ``table.column`` names or ``fnmatch`` patterns never
        stored for any model (as a model's ``"exclude"``); a column mapped with
        ``info={"sqlacache": "never"}`` is excluded too.
    :param max_keys_per_shape: Entries (an int >= 1; default ``None``, no cap) this process may
        hold stored per statement shape until their TTL runs out: a client-controlled value (a
        search box) cannot fill Redis with one-off entries. A store beyond it is counted
        ``limited``.
    :param max_bytes_stored: Bytes (an int >= 1; default ``None``) this process may hold stored
        in the backend until their TTL runs out; beyond it stores are skipped (``limited``).
    :raises ConfigurationError: for any invalid option, at construction.
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
        fill_timeout: float = 2.0,
        refresh_ahead: float = 0.0,
        max_entry_size: int | None = 1_048_576,
        breaker_cooldown: float = 0.25,
        breaker_max_cooldown: float = 5.0,
        near_cache: bool = False,
        near_coherence: str = "strict",
        near_max_entries: int = 10_000,
        near_max_bytes: int = 64 * 1024 * 1024,
        near_ttl: float = 60.0,
        near_heartbeat: float = 1.0,
        secret: str | bytes | Sequence[str | bytes] | None = None,
        encryption_key: str | bytes | Sequence[str | bytes] | None = None,
        exclude_columns: Iterable[str] = (),
        max_keys_per_shape: int | None = None,
        max_bytes_stored: int | None = None,
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
        # Concurrent misses of one key: one reader fills it, the rest wait at most this long.
        self.fill_timeout = _number(
            "fill_timeout", fill_timeout, "seconds readers wait for another's fill; 0 = off"
        )
        if not 0 <= _number("refresh_ahead", refresh_ahead, "a fraction of the TTL") < 1:
            raise ConfigurationError(
                f"refresh_ahead={refresh_ahead!r}: give the fraction of a TTL (0 <= f < 1, e.g. 0.1) "
                "before expiry at which one reader refreshes a hot entry; 0 turns it off"
            )
        self.refresh_ahead = float(refresh_ahead)
        if max_entry_size is not None:
            _number("max_entry_size", max_entry_size, "bytes; None = no limit", positive=True)
        _flag("enabled", enabled)
        _flag("background_stores", background_stores)
        socket_timeout = _number("socket_timeout", socket_timeout, "seconds a Redis call may take", True)
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ConfigurationError(
                f"max_entries={max_entries!r}: give how many entries the memory backend keeps (an int >= 1)"
            )
        cooldown = _number("breaker_cooldown", breaker_cooldown, "seconds", positive=True)
        max_cooldown = _number("breaker_max_cooldown", breaker_max_cooldown, "seconds", positive=True)
        if max_cooldown < cooldown:
            raise ConfigurationError(
                f"breaker_max_cooldown={breaker_max_cooldown!r} is below breaker_cooldown="
                f"{breaker_cooldown!r}: the cooldown doubles up to the maximum; give a maximum >= it"
            )
        if test_run.get("disabled"):
            enabled = False
        suffix = test_run.get("prefix_suffix", "")
        if suffix and not prefix.endswith(suffix):
            prefix += suffix
        self.enabled = enabled
        self.prefix = prefix
        self.keys = KeyBuilder()
        # Checked before connecting: a bad secret is a configuration error, not a runtime one.
        seal = (
            Seal(prefix, secret, encryption_key) if secret is not None or encryption_key is not None else None
        )
        self.exclusions = Exclusions(self.policy, exclude_columns)
        per_shape = limit_value(
            "max_keys_per_shape", max_keys_per_shape, "entries one statement shape may store"
        )
        max_bytes = limit_value("max_bytes_stored", max_bytes_stored, "bytes this process may store")
        quota = Quota(per_shape, max_bytes) if per_shape is not None or max_bytes is not None else None
        self.backend: Backend = backend_from(backend, prefix, socket_timeout, max_entries)
        # A Backend instance passed in belongs to the caller (it may be shared): close() leaves it open.
        self._owns_backend = self.backend is not backend
        sign_fanout = getattr(self.backend, "sign_fanout", None)
        if seal is not None and seal.fanout_keys and sign_fanout is not None:
            # Every commit's fan-out message signed, near-cache or not: another process's
            # near-cache accepts only signed ones (backends/redis/signing.py).
            try:
                sign_fanout(seal.fanout_keys)
            except ValueError as exc:
                raise ConfigurationError(str(exc)) from None
        self.count = Counters()
        breaker = Breaker(cooldown, max_cooldown)
        # A miss doesn't need the store's answer: with background_stores the reader returns as
        # soon as it has its rows. Safety doesn't depend on timing — the store is still the atomic
        # check against the generation the read began at, however late it arrives.
        self.io = Resilient(
            self.backend,
            self.count,
            max_entry_size=max_entry_size,
            breaker=breaker,
            background_stores=background_stores and not isinstance(self.backend, MemoryBackend),
            seal=seal,
            quota=quota,
            strip=self.exclusions.strip,
        )
        self.flights = Flights()
        _flag("near_cache", near_cache)
        # Checked with near_cache off too: a typo must not wait for the day the flag is turned on.
        near_ttl, near_heartbeat = _near_options(
            near_coherence, near_max_entries, near_max_bytes, near_ttl, near_heartbeat
        )
        self.near_coherence = near_coherence
        self.near: NearStore | None = None
        if near_cache:
            self.near = self._near_cache(near_max_entries, near_max_bytes, near_ttl, near_heartbeat)
        self.refresh_pool: ThreadPoolExecutor | None = None  # refresh-ahead reads (fill/refresh_ahead.py)
        self.outbox: Outbox | None = None
        self.closed = False
        self.internal = Internal(self)
        live.add(self)
        warn_if_unbounded(self.backend)

    def _near_cache(self, max_entries: int, max_bytes: int, ttl: float, heartbeat: float) -> NearStore:
        if isinstance(self.backend, MemoryBackend):
            raise ConfigurationError(
                "near_cache=True with the memory backend: its entries are in process memory already. "
                "Drop near_cache, or use a Redis backend (backend='redis://…')"
            )
        if not isinstance(self.backend, FansOut):
            raise ConfigurationError(
                f"near_cache=True needs a backend that fans out its invalidations to every process; "
                f"{type(self.backend).__name__} does not (a RedisBackend does)"
            )
        near = NearStore(max_entries, max_bytes, ttl)
        try:
            near.subscription = self.backend.subscribe(near, heartbeat)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        # Serve from memory from the first reads on, when Redis answers at once; a Redis that
        # doesn't must not hold up start-up (the near-cache starts serving once in step).
        near.wait_in_step(0.2)
        return near

    # -- counters ---------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters since start (docs/operations.rst, "Statistics"), the breaker's state, what is pending."""
        self.io.settle_stores()  # the stores sent without waiting: count what they answered
        out = self.count.snapshot()
        corrupt = getattr(self.backend, "corrupt_entries", 0)  # found and deleted inside the backend
        if isinstance(corrupt, int) and corrupt:
            out["corrupt"] = out.get("corrupt", 0) + corrupt
        changes = getattr(self.backend, "server_changes", 0)  # watch_server: a new server found
        if isinstance(changes, int) and changes:
            out["server_changes"] = changes
        out["pending_invalidations"] = self.io.pending
        out["breaker"] = self.io.breaker.state
        out["breaker_opened"] = self.io.breaker.opened
        near = self.near
        if near is not None:
            subscription = near.subscription
            out.update(
                near_entries=len(near),
                near_bytes=near.size_bytes,
                near_stores=near.stored,
                near_evictions=near.evictions,
                near_dropped=near.dropped,
                near_in_step=near.in_step,
                near_resyncs=getattr(subscription, "resyncs", 0),
                near_forged=getattr(subscription, "forged", 0),
            )
            out.setdefault("near_hits", 0)
        return out

    def explain(
        self,
        statement: Any,
        session: Any = None,
        *,
        bind: Any = None,
        params: Mapping[str, Any] | None = None,
        execution_options: Mapping[str, Any] | None = None,
    ) -> Explanation:
        """Whether ``session.execute(statement)`` would be served from and stored to this cache,
        and if not, why (see :class:`~sqlacache.Explanation`), decided by the read path's own checks.

        With ``session`` (sync or async), its transaction's writes count too, and the key and the
        dependencies are those of its bind (or give ``bind=``, an engine). A refusal only a result
        can show (a value the codec refuses) is reported once a read of the statement has met it.
        It sees the statement as given: ``do_orm_execute`` hooks of your own that rewrite it
        (tenant criteria…) run at execution, so the key of what they make differs.
        """
        from sqlacache.read.explain import explain  # the read path sits above this module

        return explain(
            self, statement, session, bind=bind, params=params, execution_options=execution_options
        )

    def explain_get(
        self,
        entity: Any,
        ident: Any,
        session: Any = None,
        *,
        bind: Any = None,
        execution_options: Mapping[str, Any] | None = None,
    ) -> Explanation:
        """:meth:`explain` for ``session.get(entity, ident)``: whether it would be answered from this
        cache, and if not why (the object is in the session's identity map, ``get`` is not
        configured for the model, the transaction wrote its table…); with ``session`` or ``bind``,
        its key and dependencies."""
        from sqlacache.read.explain import explain_get

        return explain_get(self, entity, ident, session, bind=bind, execution_options=execution_options)

    def reset_stats(self) -> None:
        """Set every counter of :meth:`stats` back to zero (gauges such as the breaker's state stay)."""
        self.count.clear()

    def retry_pending(self) -> bool:
        """Deliver now the invalidations kept while the backend was unreachable; True if none remain.

        They are retried on their own (every 20 ms in the background, and before any read);
        this is for shutdown hooks and tests that want to know they are out."""
        return self.io.deliver_pending(force=True)

    async def aretry_pending(self) -> bool:
        """Async twin of :meth:`retry_pending`."""
        delivered: bool = await _sa.greenlet_spawn(self.retry_pending)
        return delivered

    def wait_for_stores(self, timeout: float = 5.0) -> None:
        """Block until background stores queued so far are done (for tests and shutdown)."""
        self.io.wait_for_stores(timeout)

    async def await_for_stores(self, timeout: float = 5.0) -> None:
        """Async twin of :meth:`wait_for_stores`."""
        await self.io.await_for_stores(timeout)

    async def await_stores(self) -> None:
        """Deprecated spelling of :meth:`await_for_stores` (async twins are named ``a`` + the sync name)."""
        warnings.warn(
            "Cache.await_stores() is deprecated: use await cache.await_for_stores()", DeprecationWarning, 2
        )
        await self.await_for_stores()

    # -- manual control ---------------------------------------------------------------------

    def invalidate(
        self, model: Any = None, pks: Iterable[Any] | None = None, *, tables: Iterable[str] | None = None
    ) -> None:
        """Evict cached reads of ``model`` (rows ``pks`` only, if given) and of raw ``tables``.

        With no arguments at all, evicts everything under this cache's prefix (see
        :meth:`invalidate_all`); an empty ``pks`` or ``tables`` evicts nothing. Use it after writes
        made outside the application.
        """
        if model is None and pks is None and tables is None:
            self.invalidate_all()
            return
        if isinstance(tables, str):
            raise ConfigurationError(
                f"invalidate: tables={tables!r} is one string; pass a list: [{tables!r}]"
            )
        todo: list[str] = []
        if model is not None:
            mapper = inspect(model, raiseerr=False)
            if not isinstance(mapper, Mapper):
                raise ConfigurationError(f"invalidate: {model!r} is not a mapped class")
            names = [deps_mod.table_name(t) for t in mapper.tables]
            if pks is None:
                for name in names:
                    todo += deps_mod.unknown_rows_write_deps(name)
            elif pks := list(pks):  # no rows named (an empty query result, say): nothing changed
                # Rows changed in ways we don't know: their keyed reads, and every condition read.
                dialects = {e.dialect.name: e.dialect for e in list(self.internal.namespaces.keys())}
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
        for t in tables or ():
            todo += deps_mod.unknown_rows_write_deps(t.lower())
        self.internal.bump(todo)

    def use_outbox(self, engine: Engine, *, grace: float = 10.0, interval: float = 1.0) -> None:
        """Record every commit's invalidation in the table ``sqlacache_outbox`` of ``engine``'s
        database, in the commit's own transaction, so that it is delivered even if this process
        dies before Redis can take it (see the faults guide, "Invalidations that cannot be delivered").

        Creates the table if it is missing. ``engine`` is a sync engine of the database (for an
        async application, one on a sync driver of the same database): a background thread uses
        it to delete delivered rows and to deliver rows older than ``grace`` seconds, every
        ``interval`` seconds. Sessions on any engine of that database, sync or async, write rows.
        """
        if not isinstance(engine, Engine):
            raise ConfigurationError(
                f"use_outbox: {engine!r} is not a sync Engine; for an async application pass an engine "
                "on a sync driver of the same database, e.g. create_engine('postgresql+psycopg://…')"
            )
        grace = _number("grace", grace, "seconds a row waits for its own process", positive=True)
        interval = _number("interval", interval, "seconds between relay rounds", positive=True)
        if self.outbox is None:
            self.outbox = Outbox(self.io, self.count, grace, interval)
        self.outbox.attach(database_id(engine), engine)
        self.internal.watch(engine)

    def invalidate_all(self) -> None:
        """Evict every entry under this cache's prefix (never anything else: no FLUSHDB)."""
        self.count("invalidations")
        self.io.invalidate_all()

    async def ainvalidate(
        self, model: Any = None, pks: Iterable[Any] | None = None, *, tables: Iterable[str] | None = None
    ) -> None:
        """Async twin of :meth:`invalidate` (works with asyncio Redis clients)."""
        await _sa.greenlet_spawn(self.invalidate, model, pks, tables=tables)

    async def ainvalidate_all(self) -> None:
        """Async twin of :meth:`invalidate_all`."""
        await _sa.greenlet_spawn(self.invalidate_all)

    def memoize(
        self, depends_on: Iterable[Any], ttl: float | None = None, *, bind: Engine | AsyncEngine | None = None
    ) -> Callable[[_F], _F]:
        """Cache a function's result (sync or ``async def``) until a commit writes a table it reads.

        ``depends_on``: the mapped classes, ``Table`` objects or table names the function reads.
        ``ttl``: seconds (default: the cache's ``default_ttl``). ``bind``: the engine the function
        reads, so that commits there invalidate this cache even before any session of this cache
        has used it. The key is the function's module, name and arguments (bound to its signature,
        defaults applied). Arguments and results must be what the cache encodes exactly (None,
        bool, int, float, str, bytes, Decimal, date/time/datetime/timedelta, UUID, and lists,
        tuples and str-keyed dicts of them): an annotation that says otherwise is refused here,
        a value at call time, with :class:`ConfigurationError`. See docs/memoize.rst.
        """
        return memoize(self, depends_on, ttl, bind)

    # -- wiring -----------------------------------------------------------------------------

    def bind(self, engine: Engine | AsyncEngine) -> _Bound:
        """Cache plain ``Session``/``AsyncSession`` objects bound to ``engine`` (``await`` it or not)."""
        sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        if not isinstance(sync_engine, Engine):
            raise ConfigurationError(f"bind: {engine!r} is not an Engine or AsyncEngine")
        _bound[sync_engine] = self
        self.internal.watch(sync_engine)
        return _Bound(self)

    def unbind(self, engine: Engine | AsyncEngine) -> None:
        """Undo :meth:`bind`: plain sessions on ``engine`` are no longer cached."""
        sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        _bound.pop(sync_engine, None)

    def close(self) -> None:
        """Stop: sessions made from this cache raise ``CacheClosedError`` from now on, and plain
        sessions on engines it was bound to are no longer cached."""
        self.closed = True
        for engine, owner in list(_bound.items()):
            if owner is self:
                _bound.pop(engine, None)
        for watching in _watchers.values():
            watching.discard(self)
        if self.refresh_pool is not None:
            self.refresh_pool.shutdown(wait=True)
        if self.outbox is not None:
            self.outbox.close()
        if self.near is not None and self.near.subscription is not None:
            self.near.subscription.close()
            self.near.lost()
        self.io.close()
        if self._owns_backend:
            self.backend.close()

    async def aclose(self) -> None:
        """Async twin of :meth:`close`: waits for the stores in flight on the event loop first."""
        await self.await_for_stores()
        await _sa.greenlet_spawn(self.close)

    # 0.1 spelling
    async def disconnect(self) -> None:
        """The 0.1 spelling of :meth:`aclose`."""
        await self.aclose()


_default: Cache | None = None


def configure(**kwargs: Any) -> Cache:
    """Create the default :class:`Cache`, used by sessions created without ``cache=``."""
    global _default
    _default = Cache(**kwargs)
    return _default


def default_cache() -> Cache | None:
    """The default :class:`Cache` (made by :func:`configure`), or ``None`` if there is none."""
    return _default


def install_default(cache: Cache | None) -> Cache | None:
    """Make ``cache`` the default (the pytest fixture's, for one test); returns the one it replaces."""
    global _default
    previous, _default = _default, cache
    return previous
