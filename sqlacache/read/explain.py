"""``Cache.explain``: whether a read would be cached and, if not, why — decided by the read path's
own checks (plan.py, policy.py), in the order ``execute.py`` makes them, so the two never disagree."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import inspect
from sqlalchemy.orm import Mapper, Session

from sqlacache import _sa
from sqlacache.analysis import dependencies as deps_mod
from sqlacache.analysis import rowtokens
from sqlacache.context import context_of
from sqlacache.keys import Uncacheable
from sqlacache.layout import layout_of
from sqlacache.read.plan import (
    NO_CACHE_KEY,
    ShapeInfo,
    deps_of_statement,
    excluded_reason,
    options_reason,
    policy_reason,
    shape_info,
    written_reason,
)

if TYPE_CHECKING:
    from sqlacache.cache import Cache


@dataclass(frozen=True)
class Explanation:
    """What :meth:`Cache.explain` found; ``print()`` it for a readable summary.

    ``cacheable``: whether the read would be served from / stored to the cache. ``reason``: why not
    (None when it is), and ``code`` the same as the short label the metrics and log records use
    (``text``, ``for_update``, ``nondeterministic``, ``not_configured``, ``load_option``, ``off``,
    ``written``, ``unencodable``…). ``model``/``op``: the labels its metrics carry. ``tables``: the
    tables it reads; ``dependencies``: what a commit must change for its entry to be evicted (with a
    bind; table-level without one); ``key``: its cache key (with a bind); ``ttl``: seconds.
    """

    cacheable: bool
    reason: str | None = None
    code: str | None = None
    model: str = ""
    op: str = ""
    tables: tuple[str, ...] = ()
    dependencies: tuple[str, ...] = ()
    key: str | None = None
    ttl: float | None = None

    def __str__(self) -> str:
        head = f"{self.model or '-'} {self.op or '-'}: "
        if not self.cacheable:
            lines = [f"{head}not cached ({self.code}): {self.reason}"]
        else:
            lines = [f"{head}cached for {self.ttl:g} s" if self.ttl is not None else f"{head}cached"]
        if self.tables:
            lines.append(f"  reads: {', '.join(self.tables)}")
        if self.dependencies:
            lines.append("  evicted by commits changing: " + ", ".join(self.dependencies))
        if self.key is not None:
            lines.append(f"  key: {self.key}")
        return "\n".join(lines)


def _no(code: str, reason: str, info: ShapeInfo | None = None, op: str = "") -> Explanation:
    if info is None:
        return Explanation(False, reason, code, op=op)
    return Explanation(False, reason, code, info.model, op or info.op, tuple(sorted(info.table_names)))


def explain(
    cache: Cache,
    statement: Any,
    session: Session | None = None,
    *,
    bind: Any = None,
    params: Mapping[str, Any] | None = None,
    execution_options: Mapping[str, Any] | None = None,
) -> Explanation:
    """See :meth:`Cache.explain`."""
    if cache.closed:
        return _no("closed", "the cache is closed")
    if not cache.enabled:
        return _no("disabled", "the cache is disabled (Cache(enabled=False))")
    if not getattr(statement, "is_select", False):
        return _no("not_select", f"only SELECT statements are cached; this is a {type(statement).__name__}")
    ctx = None
    if session is not None:
        sync = getattr(session, "sync_session", session)  # an AsyncSession
        ctx = context_of(sync)
        if ctx is None or not ctx.reads:
            return _no(
                "no_cache", "this session reads through no cache (a plain Session on an unbound engine)"
            )
        if ctx.cache is not cache:
            return _no("other_cache", "this session reads through another Cache")
        session = sync
    options = {**statement.get_execution_options(), **(execution_options or {})}
    why = options_reason(options)
    if why is not None:
        return _no("off" if options.get("cache") is False else "load_option", why)
    ck = _sa.cache_key(statement)
    if ck is None:
        return _no("uncacheable", NO_CACHE_KEY)
    info = shape_info(cache, statement, ck.key)
    op = info.op
    if info.reason is not None:
        return _no(info.reason_code, info.reason, info)
    excluded = cache.exclusions.named_by(info.shape.digest, statement)
    if excluded:
        return _no("excluded", excluded_reason(excluded), info)
    rule = cache.policy.rule_for(info.lead)
    if options.get("cache") is not True:
        why = policy_reason(cache, info, op)
        if why is not None:
            return _no("not_configured", why, info)
    if ctx is not None:
        why = written_reason(ctx, info.table_names)
        if why is not None:
            return _no("written", why, info)
    if info.unstored is not None:
        return _no("unencodable", info.unstored, info)
    ttl = options.get("cache_ttl") or (rule.ttl if rule is not None else cache.policy.default_ttl)
    if bind is None and session is not None:
        mapper = inspect(info.lead) if info.lead is not None else None
        bind = session.get_bind(mapper=mapper, clause=statement)
    bind = getattr(bind, "sync_engine", bind)  # an AsyncEngine
    key = None
    if bind is not None:
        dialect = bind.dialect if cache.precise else None
        try:
            values = [b.effective_value for b in ck.bindparams]
            key = cache.keys.key(cache.internal.namespace(bind), info.shape.digest, values, params)
        except Uncacheable as exc:
            return _no("uncacheable_value", str(exc), info)
        except sa_exc.InvalidRequestError as exc:
            return _no("unresolved", f"a bound value can't be resolved: {exc}", info)
        found = deps_of_statement(cache, info, statement, ck, params, dialect)
        deps = (cache.internal.database_dep(bind), *found)
    else:
        deps = tuple(deps_of_statement(cache, info, statement, ck, params, None))
    return Explanation(
        True, None, None, info.model, op, tuple(sorted(info.table_names)), tuple(deps), key, ttl
    )


def explain_get(
    cache: Cache,
    entity: Any,
    ident: Any,
    session: Session | None = None,
    *,
    bind: Any = None,
    execution_options: Mapping[str, Any] | None = None,
) -> Explanation:
    """See :meth:`Cache.explain_get`: the checks of ``read/get.py``'s ``plan_get``, in its order."""
    from sqlacache.read.get import _normalize_ident, reshaped_by_hooks

    if cache.closed:
        return _no("closed", "the cache is closed", op="get")
    if not cache.enabled:
        return _no("disabled", "the cache is disabled (Cache(enabled=False))", op="get")
    mapper = inspect(entity, raiseerr=False)
    if not isinstance(mapper, Mapper):
        return _no("not_mapped", f"{entity!r} is not a mapped class", op="get")
    model, tables = mapper.class_.__name__, layout_of(mapper).tables

    def no(code: str, reason: str) -> Explanation:
        return Explanation(False, reason, code, model, "get", tuple(sorted(tables)))

    ctx = None
    if session is not None:
        session = getattr(session, "sync_session", session)
        ctx = context_of(session)
        if ctx is None or not ctx.reads:
            return no(
                "no_cache", "this session reads through no cache (a plain Session on an unbound engine)"
            )
        if ctx.cache is not cache:
            return no("other_cache", "this session reads through another Cache")
    options = execution_options or {}
    why = options_reason(options)
    if why is not None:
        return no("off" if options.get("cache") is False else "load_option", why)
    rule = cache.policy.rule_for(mapper.class_)
    if options.get("cache") is not True and (rule is None or "get" not in rule.ops):
        if rule is None:
            return no("not_configured", f"{model} is not configured in models= (add it, or '*')")
        ops = ", ".join(sorted(rule.ops))
        return no("not_configured", f"op 'get' is not configured for {model} (its ops: {ops})")
    layout = layout_of(mapper)
    pk = _normalize_ident(mapper, layout, ident)
    if pk is None:
        return no("bad_ident", f"{ident!r} is not a whole primary key of {model} {layout.pk_keys}")
    if session is not None and ctx is not None:
        if mapper.identity_key_from_primary_key(pk) in session.identity_map:
            return no(
                "identity_map", "the object is in this session's identity map: get() returns it, no read"
            )
        why = written_reason(ctx, tables)
        if why is not None:
            return no("written", why)
        if bind is None:
            bind = session.get_bind(mapper)
    ttl = options.get("cache_ttl") or (rule.ttl if rule is not None else cache.policy.default_ttl)
    if bind is None or (session is not None and reshaped_by_hooks(session)):
        # (Other do_orm_execute hooks: the get runs as the statement they reshape, keyed by it.)
        return Explanation(True, None, None, model, "get", tuple(sorted(tables)), (), None, ttl)
    bind = getattr(bind, "sync_engine", bind)
    try:
        key = cache.keys.get_key(cache.internal.namespace(bind), mapper, pk)
    except Uncacheable as exc:
        return no("uncacheable_value", str(exc))
    tokens = rowtokens.pk_tokens(mapper, pk, bind.dialect)
    own = deps_mod.pk_read_deps(tables, tokens) if tokens is not None else deps_mod.table_read_deps(tables)
    deps = (cache.internal.database_dep(bind), *own)
    return Explanation(True, None, None, model, "get", tuple(sorted(tables)), deps, key, ttl)
