"""``Cache.memoize``: a function's result cached until a commit writes one of the tables it names.

The entry goes through the same contract as a cached read (``backends/base.py``): it depends on
``*``, on ``t:<table>`` of each table in ``depends_on`` (every committed write of a table bumps it)
and on ``d:`` of the databases the cache watches (raw SQL it could not read). The generation is
taken by the lookup that missed, *before* the function runs, and the store is refused if any of
those moved since: a commit landing while the function computes cannot leave its older value
behind. Concurrent callers of one key wait for the first one's result (``fill/stampede.py``).
Arguments and results go through the generic tagged codec (exact JSON, never pickle).
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
import uuid
from collections import abc
from collections.abc import Callable, Iterable
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from time import monotonic
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import orjson
from sqlalchemy import Engine, Table
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapper

from sqlacache import _sa
from sqlacache.analysis import dependencies as deps_mod
from sqlacache.analysis import generic
from sqlacache.analysis.scalars import CodecError
from sqlacache.backends import Lookup
from sqlacache.fill import stampede
from sqlacache.fill.stampede import Fill
from sqlacache.keys import digest
from sqlacache.policy import ConfigurationError, ttl_value
from sqlacache.resilience.stores import StoreJob

if TYPE_CHECKING:
    from sqlacache.policy import Policy


class _Watching(Protocol):
    def watch(self, engine: Engine) -> None: ...

    def databases(self) -> list[str]: ...


class Owner(stampede.Owner, Protocol):
    """What memoizing needs of its cache (``Cache`` is one; this module stands below it)."""

    enabled: bool
    closed: bool
    policy: Policy

    @property
    def internal(self) -> _Watching: ...


F = TypeVar("F", bound=Callable[..., Any])

# What the generic codec carries exactly (analysis/generic.py); containers are checked item by item.
_LEAVES: frozenset[Any] = frozenset(
    {int, float, str, bool, bytes, Decimal, date, datetime, time, timedelta, uuid.UUID, type(None)}
)
_CONTAINERS: frozenset[Any] = frozenset({list, tuple, dict})
# Abstract annotations a list, tuple or dict satisfies: checked item by item, the value at call time.
_ABSTRACT: frozenset[Any] = frozenset({abc.Sequence, abc.MutableSequence, abc.Mapping, abc.MutableMapping})
_FIX = (
    "memoize caches None, bool, int, float, str, bytes, Decimal, date, time, datetime, timedelta, UUID "
    "and lists, tuples and str-keyed dicts of them (no ORM objects: return their ids or plain values)"
)


def _annotation_problem(hint: Any) -> str | None:
    """Why the codec can't carry values annotated ``hint`` (None: it can, or we can't tell)."""
    if hint is Any or isinstance(hint, TypeVar) or hint in _LEAVES:
        return None
    origin = typing.get_origin(hint)
    if origin is None:
        if hint in _CONTAINERS or hint in _ABSTRACT:
            return None
        return f"{getattr(hint, '__qualname__', hint)!s}"
    if origin is typing.Annotated:
        return _annotation_problem(typing.get_args(hint)[0])
    if origin is typing.Union or origin is types.UnionType:
        args: tuple[Any, ...] = typing.get_args(hint)
    elif origin in _CONTAINERS or origin in _ABSTRACT:
        args = typing.get_args(hint)
        if origin in (dict, abc.Mapping, abc.MutableMapping) and args and args[0] is not str:
            return f"{hint} (dict keys must be str)"
    elif origin is typing.Literal:
        return None
    else:
        return f"{hint}"
    for arg in args:
        if arg is Ellipsis:
            continue
        problem = _annotation_problem(arg)
        if problem is not None:
            return problem
    return None


def _check_annotations(fn: Callable[..., Any]) -> None:
    """Refuse at decoration time what the annotations already say can't be encoded."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: checked at call time instead
        return
    for name, hint in hints.items():
        problem = _annotation_problem(hint)
        if problem is not None:
            what = "its result" if name == "return" else f"its argument {name!r}"
            raise ConfigurationError(
                f"memoize({fn.__qualname__}): {what} is annotated {problem}, which the cache cannot "
                f"encode exactly. {_FIX}"
            )


def _tables(depends_on: Iterable[Any]) -> list[str]:
    if isinstance(depends_on, (str, type)) or not isinstance(depends_on, Iterable):
        raise ConfigurationError(
            f"memoize: depends_on={depends_on!r}: give a list of mapped classes, Tables or table names, "
            "e.g. depends_on=[User, Order]"
        )
    names: list[str] = []
    for item in depends_on:
        if isinstance(item, str) and item:
            names.append(item.lower())
        elif isinstance(item, Table):
            names.append(deps_mod.table_name(item))
        else:
            mapper = sa_inspect(item, raiseerr=False)
            if not isinstance(mapper, Mapper):
                raise ConfigurationError(
                    f"memoize: depends_on item {item!r} is not a mapped class, a Table or a table name"
                )
            names += [deps_mod.table_name(t) for t in mapper.tables]
    if not names:
        raise ConfigurationError(
            "memoize: depends_on is empty: name the tables the function reads, so that commits to them "
            "evict its results"
        )
    return sorted(set(names))


class Memoized:
    """What ``Cache.memoize`` wraps a function with (sync or async share this)."""

    def __init__(
        self, cache: Owner, fn: Callable[..., Any], tables: list[str], ttl: float, bind: Any
    ) -> None:
        self.cache = cache
        self.fn = fn
        self.signature = inspect.signature(fn)
        self.name = f"{fn.__module__}.{fn.__qualname__}"
        self.table_deps = [deps_mod.ALL, *(deps_mod.table_dep(t) for t in tables)]
        self.ttl = ttl
        self.bind = bind
        if bind is not None:
            cache.internal.watch(bind)

    def key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        bound = self.signature.bind(*args, **kwargs)  # a wrong call raises the function's TypeError
        bound.apply_defaults()
        try:
            encoded = generic.encode(list(bound.arguments.items()))
        except CodecError as exc:
            raise ConfigurationError(
                f"memoize({self.fn.__qualname__}): an argument can't be part of a cache key ({exc}). {_FIX}"
            ) from None
        return f"memo:{self.fn.__qualname__}:{digest([self.name, encoded])}"

    def deps(self) -> list[str]:
        # The databases the cache watches now: raw SQL it can't read there bumps their ``d:``.
        databases = {deps_mod.database_dep(db) for db in self.cache.internal.databases()}
        return [*self.table_deps, *sorted(databases)]

    def encode(self, value: Any) -> bytes:
        try:
            return orjson.dumps(generic.encode(value))
        except (CodecError, TypeError) as exc:
            raise ConfigurationError(
                f"memoize({self.fn.__qualname__}) returned a value the cache can't encode exactly "
                f"({exc}). {_FIX}"
            ) from None

    def served(self, key: str, payload: bytes) -> tuple[bool, Any]:
        try:
            value = generic.decode(orjson.loads(payload))
        except (CodecError, orjson.JSONDecodeError) as exc:
            self.cache.io.drop(key, "corrupt", exc)
            return False, None
        self.cache.count("hits")
        self.cache.count("memoize_hits")
        return True, value

    def store(self, key: str, value: Any, deps: list[str], found: Lookup | None, fill: Fill | None) -> None:
        payload = self.encode(value)  # refused the same way whatever the backend's state
        self.cache.count("misses")
        self.cache.count("memoize_misses")
        if found is None:  # the backend can't say (down, or an eviction undelivered): don't store
            return
        lease = fill.lease if fill is not None else None
        # A database the function's sessions made the cache watch meanwhile: its ``d:`` too (the
        # store refuses a dependency that has no version yet; the next call stores).
        deps = sorted({*deps, *self.deps()})
        # At the generation the lookup took before the function ran: refused if a commit moved
        # a dependency since (the race a compute and a commit run, closed in the backend).
        self.cache.io.store(StoreJob(key, payload, deps, found.generation, self.ttl, lease))
        if fill is not None:
            fill.lease = None  # the store gave it back

    def call(self, *args: Any, **kwargs: Any) -> Any:
        cache = self.cache
        if not cache.enabled or cache.closed:
            return self.fn(*args, **kwargs)
        key = self.key(args, kwargs)
        deps = self.deps()
        # As the read path does: concurrent callers of one key (threads here, processes through a
        # lease) wait for the first one's result instead of all computing it.
        found, fill = stampede.lookup(cache, key, deps, monotonic())
        try:
            if found is not None and found.entry is not None:
                ok, value = self.served(key, found.entry.payload)
                if ok:
                    return value
            value = self.fn(*args, **kwargs)
            self.store(key, value, deps, found, fill)
            return value
        finally:
            stampede.end(cache, fill)

    async def acall(self, *args: Any, **kwargs: Any) -> Any:
        cache = self.cache
        if not cache.enabled or cache.closed:
            return await self.fn(*args, **kwargs)
        key = self.key(args, kwargs)
        deps = self.deps()
        # In a greenlet, where waiting for another caller's fill awaits instead of blocking the loop.
        found, fill = await _sa.greenlet_spawn(stampede.lookup, cache, key, deps, monotonic())
        try:
            if found is not None and found.entry is not None:
                ok, value = self.served(key, found.entry.payload)
                if ok:
                    return value
            value = await self.fn(*args, **kwargs)
            await _sa.greenlet_spawn(self.store, key, value, deps, found, fill)
            return value
        finally:
            await _sa.greenlet_spawn(stampede.end, cache, fill)


def memoize(cache: Owner, depends_on: Iterable[Any], ttl: float | None, bind: Any) -> Callable[[F], F]:
    tables = _tables(depends_on)
    seconds = cache.policy.default_ttl if ttl is None else ttl_value(ttl, "memoize ttl")
    if bind is not None:
        engine = getattr(bind, "sync_engine", bind)
        engine = engine.engine if isinstance(engine, Connection) else engine
        if not isinstance(engine, Engine):
            raise ConfigurationError(f"memoize: bind={bind!r} is not an Engine or AsyncEngine")
        bind = engine

    def decorate(fn: F) -> F:
        if not callable(fn):
            raise ConfigurationError(f"memoize decorates a function; got {fn!r}")
        _check_annotations(fn)
        memo = Memoized(cache, fn, tables, seconds, bind)
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def awrapper(*args: Any, **kwargs: Any) -> Any:
                return await memo.acall(*args, **kwargs)

            wrapper: Any = awrapper
        else:

            @functools.wraps(fn)
            def swrapper(*args: Any, **kwargs: Any) -> Any:
                return memo.call(*args, **kwargs)

            wrapper = swrapper
        return cast(F, wrapper)

    return decorate
