"""``CachingSession`` and ``CachingAsyncSession``: drop-in session classes.

Reads are intercepted by the ``do_orm_execute`` hook (see ``reads``), so every ORM read — ``get``,
``execute``, ``scalars``, ``scalar``, legacy ``Query``, relationship loads — goes through the cache.
These classes add three things on top: which cache to use, a statement-free ``get``, and ``.cached()``
on the result of ``execute`` for statements the configuration does not cache.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Generator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy.engine import Result, ScalarResult
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.orm.interfaces import ORMOption
from sqlalchemy.sql.base import Executable
from sqlalchemy.util import EMPTY_DICT

from sqlacache import _sa
from sqlacache import listeners as _listeners  # noqa: F401  (installs the event listeners)
from sqlacache.binding import CacheClosedError
from sqlacache.cache import Cache, default_cache, engine_of
from sqlacache.context import context_of
from sqlacache.fill import stampede
from sqlacache.policy import ConfigurationError, check_call_options, ttl_value
from sqlacache.read import near
from sqlacache.read.execute import set_ttl
from sqlacache.read.get import NOT_HANDLED, fast_get, finish_get, plan_get, reshaped_by_hooks
from sqlacache.read.plan import GetTicket, StatementGet, shape_info


def _cached_options(execution_options: Mapping[str, Any] | None, ttl: float | None) -> dict[str, Any]:
    options = dict(execution_options or {})
    options["cache"] = True
    if ttl is not None:
        options["cache_ttl"] = ttl
    return options


_O = TypeVar("_O", bound=object)
_T = TypeVar("_T")

if TYPE_CHECKING:

    class _CachedResult(Result[Any]):
        """What ``CachingSession.execute`` returns, to a type checker: a Result with ``.cached()``."""

        def cached(self, ttl: float | None = None) -> Result[Any]: ...

else:
    _CachedResult = Result


class _Cached:
    """Gives every result a ``CachingSession`` returns the ``.cached(ttl=…)`` of the design card.

    Mixed into the class of SQLAlchemy's own result object (so ``isinstance`` checks, ``.context``
    and everything else stay as they are). The statement already ran through the cache if the
    configuration caches it; a ``ttl`` still applies when its rows are stored on first use."""

    __slots__ = ()

    def cached(self, ttl: float | None = None) -> Any:
        """Serve this statement through the cache, with TTL ``ttl`` if given."""
        if ttl is not None:
            ttl_value(ttl, "cached(ttl=…)")
            set_ttl(self, ttl)
        return self


_with_cached: dict[type, type] = {}


def _cacheable(result: Any) -> Any:
    """``result``, of a subclass of its own class that has ``.cached()``."""
    cls = type(result)
    if isinstance(result, _Cached):
        return result
    sub = _with_cached.get(cls)
    if sub is None:
        names = {"__slots__": (), "__module__": cls.__module__, "__qualname__": cls.__qualname__}
        sub = _with_cached[cls] = type(cls.__name__, (cls, _Cached), names)
    result.__class__ = sub
    return result


class DeferredResult:
    """The result of ``CachingSession.execute`` for a SELECT the configuration doesn't cache.

    It runs the statement when first used — or from the cache, when ``.cached()`` is called first.
    The session runs it before its next operation (execute, get, flush, commit, rollback, close), so
    it always runs in the transaction state it was issued in.
    """

    def __init__(self, session: CachingSession, statement: Any, params: Any, kw: dict[str, Any]) -> None:
        self._session = session
        self._statement = statement
        self._params = params
        self._kw = kw
        self._result: Result[Any] | None = None

    def cached(self, ttl: float | None = None) -> Result[Any]:
        """Serve this statement through the cache (TTL ``ttl``, else the model's or the default)."""
        if ttl is not None:
            ttl_value(ttl, "cached(ttl=…)")
        if self._result is None:
            self._kw["execution_options"] = _cached_options(self._kw.get("execution_options"), ttl)
        return self._resolve()

    def _resolve(self) -> Result[Any]:
        if self._result is None:
            options = dict(self._kw.get("execution_options") or {})
            options["autoflush"] = False  # it already autoflushed when execute() was called
            self._kw["execution_options"] = options
            self._result = Session.execute(self._session, self._statement, self._params, **self._kw)
        return self._result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._resolve(), name)

    def __iter__(self) -> Any:
        return iter(self._resolve())

    def __enter__(self) -> Result[Any]:
        return self._resolve().__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._resolve().__exit__(*exc)


def _end_unused(session: Session, execution_options: Mapping[str, Any]) -> None:
    """A get's fill that no statement took (the ORM raised before running it): land it, so that
    the readers waiting for it don't wait in vain."""
    ticket = execution_options.get("_sqlacache_get")
    if ticket is not None and ticket.fill is not None:
        fill, ticket.fill = ticket.fill, None
        stampede.end(session.__dict__["_sqlacache_cache"], fill)


class CachingSession(Session):
    """A ``Session`` whose reads are cached. ``cache=`` defaults to the one from ``configure()``.

    Takes every argument ``Session`` takes, plus ``cache=`` (a :class:`~sqlacache.Cache`); the
    arguments it doesn't know are passed on up the MRO, so it mixes with other ``Session``
    subclasses in either order. ``get()`` and ``execute()``/``scalars()``/``scalar()`` of the
    SELECTs the cache's configuration names are served from the cache when an entry is fresh;
    ``commit()`` evicts what the transaction's writes could change before it returns. Per call,
    ``execution_options={"cache": False}`` bypasses the cache and ``{"cache_ttl": seconds}`` sets
    the TTL; every result has ``.cached(ttl=…)`` to cache a statement the configuration doesn't.
    """

    def __init__(self, *args: Any, cache: Cache | None = None, **kw: Any) -> None:
        # Cooperative: positional arguments go on up the MRO untouched, so this class mixes with
        # Session subclasses whose first argument isn't the bind (Flask-SQLAlchemy's takes db).
        super().__init__(*args, **kw)
        cache = cache if cache is not None else default_cache()
        if cache is None:
            raise ConfigurationError(
                "CachingSession has no cache: pass cache=Cache(...) to the session or sessionmaker, "
                "or call sqlacache.configure(...) first"
            )
        if not isinstance(cache, Cache):
            shown = repr(cache) if len(repr(cache)) <= 80 else f"a {type(cache).__name__}"
            raise ConfigurationError(
                f"CachingSession: cache={shown} is not a sqlacache.Cache; pass the Cache itself, "
                "e.g. sessionmaker(engine, class_=CachingSession, cache=Cache(backend='memory://'))"
            )
        if cache.closed:
            raise CacheClosedError()
        self.__dict__["_sqlacache_cache"] = cache
        for bind in (self.bind, *(kw.get("binds") or {}).values()):
            engine = engine_of(bind)
            if engine is not None:
                cache.internal.watch(engine)
        self._sqlacache_deferred: list[weakref.ref[DeferredResult]] = []
        # Under CachingAsyncSession the awaitable offers .cached(); results must be real here.
        self._sqlacache_async = False

    @property
    def cache(self) -> Cache:
        """The :class:`~sqlacache.Cache` this session reads through."""
        cache: Cache = self.__dict__["_sqlacache_cache"]
        return cache

    def _run_deferred(self) -> None:
        if self._sqlacache_deferred:
            pending, self._sqlacache_deferred = self._sqlacache_deferred, []
            for ref in pending:
                deferred = ref()
                if deferred is not None:
                    deferred._resolve()

    def get(  # type: ignore[override]
        self,
        entity: type[_O] | Mapper[_O],
        ident: Any,
        *,
        options: Sequence[ORMOption] | None = None,
        populate_existing: bool | None = None,
        with_for_update: Any = None,
        identity_token: Any = None,
        execution_options: Mapping[str, Any] = EMPTY_DICT,
        bind_arguments: dict[str, Any] | None = None,
    ) -> _O | None:
        self._run_deferred()
        check_call_options(execution_options)
        kw: dict[str, Any] = {}
        if not (
            options
            or populate_existing
            or with_for_update
            or identity_token
            or bind_arguments
            or "_sqlacache_get" in execution_options  # CachingAsyncSession.get looked it up already
            or execution_options.get("cache") is False  # bypassed: nothing of ours to do
        ):
            ctx = context_of(self)
            if ctx is not None:
                if reshaped_by_hooks(self):
                    execution_options = {**execution_options, "_sqlacache_statement_get": StatementGet()}
                else:
                    found = fast_get(self, ctx, entity, ident, execution_options)
                    if isinstance(found, GetTicket):
                        execution_options = {**execution_options, "_sqlacache_get": found}
                    elif found is not NOT_HANDLED:
                        return cast("_O | None", found)
        if populate_existing is not None:  # else SQLAlchemy 2.1 takes it from execution_options
            kw["populate_existing"] = populate_existing
        try:
            return super().get(  # type: ignore[arg-type]
                entity,
                ident,
                options=options,
                with_for_update=with_for_update,
                identity_token=identity_token,
                execution_options=execution_options,
                bind_arguments=bind_arguments,
                **kw,
            )
        finally:
            _end_unused(self, execution_options)

    def execute(self, statement: Any, params: Any = None, **kw: Any) -> _CachedResult:  # type: ignore[override]
        self._run_deferred()
        options = kw.get("execution_options") or {}
        if (
            not self._sqlacache_async
            and getattr(statement, "is_select", False)
            and _sa.ORM_LOAD_OPTIONS not in options
            and "cache" not in options
            and not self._configured_to_cache(statement)
        ):
            if options.get("autoflush", True):
                _sa.autoflush(self)
            deferred = DeferredResult(self, statement, params, dict(kw))
            self._sqlacache_deferred.append(weakref.ref(deferred))
            return deferred  # type: ignore[return-value]
        result = super().execute(statement, params, **kw)
        return result if self._sqlacache_async else _cacheable(result)  # type: ignore[return-value]

    def _configured_to_cache(self, statement: Any) -> bool:
        cache = self.cache
        if not cache.enabled:
            return True  # nothing to defer for: .cached() can't serve anything either
        ck = _sa.cache_key(statement)
        if ck is None:
            return True
        info = shape_info(cache, statement, ck.key)
        if info.reason is not None:
            return True
        rule = cache.policy.rule_for(info.lead)
        return rule is not None and info.op in rule.ops

    def flush(self, objects: Any = None) -> None:
        self._run_deferred()
        super().flush(objects)

    def connection(self, *args: Any, **kw: Any) -> Any:
        # What runs on the connection next (a write, say) must come after the deferred reads.
        self._run_deferred()
        return super().connection(*args, **kw)

    if not TYPE_CHECKING:  # typed exactly as Session's

        def scalars(self, *args: Any, **kw: Any) -> Any:
            self._run_deferred()
            return super().scalars(*args, **kw)

        def scalar(self, *args: Any, **kw: Any) -> Any:
            self._run_deferred()
            return super().scalar(*args, **kw)

    def commit(self) -> None:
        self._run_deferred()
        super().commit()

    def rollback(self) -> None:
        self._run_deferred()
        super().rollback()

    def close(self) -> None:
        self._run_deferred()
        super().close()


class _Pending(Awaitable[_T]):
    """What ``CachingAsyncSession.execute``/``scalars``/``scalar`` return: nothing runs until awaited,
    and ``.cached(ttl=…)`` gives another awaitable that reads through the cache."""

    def __init__(
        self, session: CachingAsyncSession, method: str, statement: Any, params: Any, kw: dict[str, Any]
    ):
        self._session = session
        self._method = method
        self._statement = statement
        self._params = params
        self._kw = kw

    def cached(self, ttl: float | None = None) -> _Pending[_T]:
        if ttl is not None:
            ttl_value(ttl, "cached(ttl=…)")
        kw = dict(self._kw)
        kw["execution_options"] = _cached_options(kw.get("execution_options"), ttl)
        return _Pending(self._session, self._method, self._statement, self._params, kw)

    async def _run(self) -> _T:
        method = getattr(AsyncSession, self._method)
        found: _T = await method(self._session, self._statement, self._params, **self._kw)
        return found

    def __await__(self) -> Generator[Any, None, _T]:
        return self._run().__await__()


class CachingAsyncSession(AsyncSession):
    """An ``AsyncSession`` whose reads are cached; ``cache=`` as for :class:`CachingSession`.

    Use it with ``async_sessionmaker(engine, class_=CachingAsyncSession, cache=cache,
    expire_on_commit=False)``. Its sync core is a :class:`CachingSession` run in SQLAlchemy's
    greenlet, so the behaviour is the same; a ``redis.asyncio`` client is awaited from inside it,
    and the event loop is never blocked. ``await s.execute(stmt).cached(ttl=60)`` runs no SQL on a
    hit.
    """

    sync_session_class = CachingSession

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        if not isinstance(self.sync_session, CachingSession):
            # It would cache nothing, silently (advanced-alchemy's session_config(class_=...) swaps
            # in a sessionmaker of plain Sessions, for instance).
            raise ConfigurationError(
                f"CachingAsyncSession's sync session is a {type(self.sync_session).__qualname__}, not a "
                "CachingSession: it would cache nothing. Give sync_session_class=CachingSession (or a "
                "subclass), or leave it unset; with advanced-alchemy, keep its session class and add "
                "sqlacache.litestar.SQLACachePlugin(cache, config) (or call cache.bind(engine))"
            )
        self.sync_session._sqlacache_async = True

    @property
    def cache(self) -> Cache:
        """The :class:`~sqlacache.Cache` this session reads through."""
        cache: Cache = self.sync_session.__dict__["_sqlacache_cache"]
        return cache

    async def get(  # type: ignore[override]
        self,
        entity: type[_O] | Mapper[_O],
        ident: Any,
        *,
        options: Sequence[ORMOption] | None = None,
        populate_existing: bool | None = None,
        with_for_update: Any = None,
        identity_token: Any = None,
        execution_options: Mapping[str, Any] = EMPTY_DICT,
        **kw: Any,
    ) -> _O | None:
        # The lookup is awaited here, on the event loop: no greenlet for a hit. Anything that might
        # need I/O beyond it (a flush, the miss) goes through AsyncSession.get as usual.
        sync = self.sync_session
        check_call_options(execution_options)
        bypassed = execution_options.get("cache") is False
        ctx = None if bypassed else context_of(sync)
        if ctx is not None and not (options or populate_existing or with_for_update or identity_token or kw):
            try:  # no guard: nothing of the application's runs here (no flush), so any failure is ours
                plan = plan_get(sync, ctx, entity, ident, execution_options)
                found = None
                if plan is not None:
                    lookup, fill, coordinated, source = await near.alookup(sync, ctx, plan.key, plan.hint)
                    found = finish_get(sync, ctx, plan, lookup, fill, coordinated, source)
            except Exception as exc:
                ctx.cache.internal.error(exc, "on the get path")
                plan = None
            if plan is not None:
                if not isinstance(found, GetTicket):
                    return cast("_O | None", found)
                execution_options = {**execution_options, "_sqlacache_get": found}
        if populate_existing is not None:  # else SQLAlchemy 2.1 takes it from execution_options
            kw["populate_existing"] = populate_existing
        try:
            return await super().get(  # type: ignore[arg-type]
                entity,
                ident,
                options=options,
                with_for_update=with_for_update,
                identity_token=identity_token,
                execution_options=execution_options,
                **kw,
            )
        finally:
            _end_unused(sync, execution_options)

    def execute(  # type: ignore[override]
        self, statement: Executable, params: Any = None, **kw: Any
    ) -> _Pending[Result[Any]]:
        return _Pending(self, "execute", statement, params, kw)

    def scalars(  # type: ignore[override]
        self, statement: Executable, params: Any = None, **kw: Any
    ) -> _Pending[ScalarResult[Any]]:
        return _Pending(self, "scalars", statement, params, kw)

    def scalar(self, statement: Executable, params: Any = None, **kw: Any) -> _Pending[Any]:  # type: ignore[override]
        return _Pending(self, "scalar", statement, params, kw)
