"""The ``Session.get`` fast path: key from (class, primary key), one round trip, no statement built."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import inspect
from sqlalchemy.orm import Mapper, Session

from sqlacache import _sa
from sqlacache.analysis import dependencies as deps_mod
from sqlacache.analysis import rowtokens
from sqlacache.analysis.codec import CodecError
from sqlacache.backends import Lookup
from sqlacache.context import SessionContext
from sqlacache.fill import refresh_ahead, stampede
from sqlacache.fill.stampede import Fill
from sqlacache.keys import Uncacheable
from sqlacache.layout import MapperLayout, layout_of
from sqlacache.read import near
from sqlacache.read.execute import Guard
from sqlacache.read.near import Source
from sqlacache.read.plan import (
    GetTicket,
    KeyPlan,
    entry_written,
    hint_for,
    key_plans,
    learn,
    tables_written,
)
from sqlacache.read.rebuild import attach, decode_entities, immutable, load_payload, resolver

if TYPE_CHECKING:
    from sqlacache.cache import Cache


def reshaped_by_hooks(session: Session) -> bool:
    """True when hooks besides ours (``_on_execute``) see this session's statements: a get must
    reach them."""
    return len(session.dispatch.do_orm_execute) > 1


def _normalize_ident(mapper: Mapper[Any], layout: MapperLayout, ident: Any) -> tuple[Any, ...] | None:
    if isinstance(ident, dict):
        try:
            return tuple(ident[k] for k in layout.pk_keys)
        except KeyError:
            return None
    pk = tuple(ident) if isinstance(ident, (tuple, list)) else (ident,)
    if len(pk) != len(layout.pk_keys) or any(v is None for v in pk):
        return None
    return pk


NOT_HANDLED: Any = object()


@dataclass(slots=True)
class GetPlan:
    """A ``Session.get`` the cache can answer: its key and the dependencies to fetch with it."""

    key: str
    mapper: Mapper[Any]
    layout: MapperLayout
    plan: KeyPlan
    hint: list[str]
    ttl: float
    dialect: Any
    pk: tuple[Any, ...]
    began: float  # just before its lookup


def plan_get(
    session: Session,
    ctx: SessionContext,
    entity: Any,
    ident: Any,
    execution_options: Any,
    guard: Guard | None = None,
) -> GetPlan | None:
    """Decide whether the cache answers this ``get``: None when the database path must (identity map
    hit, op not cached, a table this transaction wrote, pending changes and no ``guard`` to flush them
    under)."""
    cache = ctx.cache
    mapper = getattr(entity, "__mapper__", None)
    if not isinstance(mapper, Mapper) or mapper.class_ is not entity:
        mapper = inspect(entity, raiseerr=False)
    if not isinstance(mapper, Mapper) or not cache.enabled:
        return None
    if execution_options.get("populate_existing") or reshaped_by_hooks(session):
        return None
    flag = execution_options.get("cache")
    if flag is False or "schema_translate_map" in execution_options:
        return None  # the statement path keys on the translation
    rule = cache.policy.rule_for(mapper.class_)
    if flag is not True and (rule is None or "get" not in rule.ops):
        return None
    layout = layout_of(mapper)
    pk = _normalize_ident(mapper, layout, ident)
    if pk is None:
        return None
    identity = mapper.identity_key_from_primary_key(pk)
    if identity in session.identity_map:
        return None  # the identity map answers, as it does without a cache
    if _sa.has_pending_changes(session):
        if guard is None:  # no way to flush here (async, outside the greenlet): the ORM path will
            return None
        guard.autoflush(session)
        if identity in session.identity_map:
            return None
    if tables_written(ctx, layout.tables):
        return None
    if _sa.current_transaction(session) is None:
        if not session.autobegin:
            return None  # the ORM path raises what a database read raises
        _sa.autobegin(session)  # as the database read would
    bind = session.get_bind(mapper)
    try:
        key = cache.keys.get_key(cache.internal.namespace(bind), mapper, pk)
    except Uncacheable:
        return None
    ttl = execution_options.get("cache_ttl") or (rule.ttl if rule is not None else cache.policy.default_ttl)
    plan = key_plans.get(key)
    if plan is None:
        tokens = rowtokens.pk_tokens(mapper, pk, bind.dialect)
        own = (
            deps_mod.pk_read_deps(layout.tables, tokens)
            if tokens is not None
            else deps_mod.table_read_deps(layout.tables)  # a key we cannot canonicalise: the table
        )
        plan = KeyPlan([cache.internal.database_dep(bind), *own])
        key_plans.put(key, plan)
    dialect = bind.dialect if cache.precise else None
    hint = hint_for(plan, layout.get_hint)
    return GetPlan(key, mapper, layout, plan, hint, ttl, dialect, pk, time.monotonic())


def finish_get(
    session: Session,
    ctx: SessionContext,
    plan: GetPlan,
    lookup: Lookup | None,
    fill: Fill | None = None,
    coordinated: bool = True,
    source: Source | None = None,
) -> Any:
    """The object (or None for a cached "not found") on a hit, else a GetTicket for the miss, which
    carries ``fill`` (the right to fill it); ``coordinated``: False while a miss has not yet waited
    for another reader filling it (the statement's hook then does). ``source``: the near-cache's
    account of where the entry came from."""
    entry = lookup.entry if lookup is not None else None
    if lookup is not None and entry is not None:
        learn(plan.plan, entry.deps, plan.layout.get_hint)
        if not entry_written(ctx, entry.deps):
            try:
                memo = source.memo if source is not None else None
                objs = _decode_get(session, entry.payload, plan.mapper, lookup.generation, memo)
            except Exception as exc:
                if source is not None:
                    source.corrupt()
                ctx.cache.io.drop(plan.key, "corrupt", exc)
                lookup = Lookup(None, lookup.generation)
                coordinated = fill is not None
            else:
                if source is not None:
                    source.served(lookup, plan.ttl)
                count = ctx.cache.count
                count("hits")
                if count.recorder is not None:  # a metrics sink listens
                    count.recorder.event("hits", plan.mapper.class_.__name__, "get")
                stampede.end(ctx.cache, fill)
                if lookup.refresh_due:
                    _refresh_get(session, ctx.cache, plan)
                return objs[0] if objs else None
    ticket = GetTicket(plan.key, plan.mapper, plan.plan, lookup, plan.ttl, plan.dialect, plan.began)
    ticket.fill, ticket.coordinated = fill, coordinated
    return ticket


def _refresh_get(session: Session, cache: Cache, plan: GetPlan) -> None:
    fill = refresh_ahead.claim(cache, plan.key, plan.began)
    if fill is None:
        return
    ticket = GetTicket(plan.key, plan.mapper, plan.plan, None, plan.ttl, plan.dialect)
    options = {"_sqlacache_get": ticket, "_sqlacache_refresh": fill}
    cls, pk = plan.mapper.class_, plan.pk
    refresh_ahead.start(
        cache, fill, session.get_bind(plan.mapper), lambda s: s.get(cls, pk, execution_options=options)
    )


def fast_get(session: Session, ctx: SessionContext, entity: Any, ident: Any, execution_options: Any) -> Any:
    """``Session.get`` without building a statement: key from (class, pk), one backend round trip.

    Returns the object (or None for a cached "not found"), ``NOT_HANDLED``, or a GetTicket to put
    into ``execution_options`` for the statement the ORM will run on a miss.
    """
    guard = Guard()
    try:
        plan = plan_get(session, ctx, entity, ident, execution_options, guard=guard)
        if plan is None:
            return NOT_HANDLED
        lookup, fill, source = near.lookup(session, ctx, plan.key, plan.hint, plan.began)
        return finish_get(session, ctx, plan, lookup, fill, source=source)
    except Exception as exc:
        if guard.passthrough:
            raise
        ctx.cache.internal.error(exc, "on the get path")
        return NOT_HANDLED


def _decode_get(
    session: Session, payload: bytes, mapper: Mapper[Any], generation: int, memo: dict[Any, Any] | None
) -> list[Any]:
    kept = memo.get("get") if memo is not None else None
    if kept is not None and kept[0] is mapper:
        decoded, rows = kept[1:]
    else:
        table, rows = load_payload(payload)
        if len(rows) > 1:
            raise CodecError("a primary-key read with several rows")
        decoded = decode_entities(table, mapper)
        if memo is not None and immutable(decoded, ()):
            memo["get"] = (mapper, decoded, rows)
    objs = attach(session, session.identity_map, decoded, generation, rows)
    return [resolver(objs)(ref) for ref in rows]
