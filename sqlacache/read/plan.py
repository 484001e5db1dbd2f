"""Per-process memos of the read path: what a statement shape looks like, and per key, what it depends on.

Also the tickets that hand a ``Session.get``'s key and lookup to the statement run on its miss, and
the read-your-writes checks (a table this session's transaction wrote is read from the database).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import inspect
from sqlalchemy.orm import Mapper
from sqlalchemy.orm.util import LoaderCriteriaOption
from sqlalchemy.sql.schema import Table
from sqlalchemy.sql.type_api import TypeEngine

from sqlacache import _sa
from sqlacache._lru import LRU
from sqlacache.analysis import conditions
from sqlacache.analysis import dependencies as deps_mod
from sqlacache.analysis.codec import ValueCodec, codec_for
from sqlacache.analysis.conditions import Analysis
from sqlacache.backends import Lookup
from sqlacache.context import SessionContext
from sqlacache.fill.stampede import Fill
from sqlacache.keys import Shape, Uncacheable
from sqlacache.layout import related_roots
from sqlacache.policy import never_cached_reason, op_of
from sqlacache.read.results import ResultTemplate

if TYPE_CHECKING:
    from sqlacache.cache import Cache


ENTITY = None  # a result column that holds ORM entities rather than values


@dataclass(slots=True)
class ShapeInfo:
    shape: Shape
    reason: str | None  # why it's never cached, or None
    op: str
    lead: type | None
    columns: list[ValueCodec | None] | None  # per result column; None entries are entities
    # How its result looks, per mode (_sa.result_mode: Query.tuples() / only_return_tuples, and
    # legacy uniquing, the only things besides the statement that decide the shape of a result);
    # learnt from its first execution here, or derived from the statement for a hit that comes first.
    templates: dict[tuple[bool, bool], ResultTemplate] = field(default_factory=dict)
    derivable: bool = True  # False: its template can only be learnt from an execution (select *)
    hint: set[str] = field(default_factory=set)  # dependencies its entries had, to fetch with them
    table_names: frozenset[str] = frozenset()  # dependency names of the tables the statement names
    analysis: Analysis | None = None  # its conditions (built on first use)
    criteria_tables: frozenset[str] | None = None  # tables read whole because of loader criteria
    pk_columns: dict[str, tuple[str, ...]] = field(default_factory=dict)  # table → primary key columns
    model: str = ""  # the metrics' and logs' name for it: its lead class, else the tables it reads
    reason_code: str = ""  # ``reason`` as a short label (see ``reason_code``)
    labels: list[str] = field(default_factory=list)  # per result column, "name (TYPE)", for messages
    # Why its last result was not stored (a value the codec refuses…), for explain(); None once stored.
    unstored: str | None = None


def reason_code(reason: str) -> str:
    """A short, stable label for a reason (metrics label values must not carry values or names)."""
    for prefix, code in (
        ("contains text()", "text"),
        ("uses FOR UPDATE", "for_update"),
        ("calls", "nondeterministic"),
        ("literal column", "nondeterministic"),
        ("result shape", "result_shape"),
    ):
        if reason.startswith(prefix):
            return code
    return "uncacheable"


def excluded_reason(column: str) -> str:
    """Why a statement naming an excluded column is not cached (``exclude``, docs/security.rst)."""
    return f"it names {column}, a column kept out of the cache (exclude)"


NO_CACHE_KEY = "SQLAlchemy gives the statement no cache key (a construct with no cache key support)"

# The execution options that make a read go to the database whatever the configuration (the ORM
# must refresh, or the caller streams its rows).
MUST_REACH_DATABASE = ("populate_existing", "yield_per", "stream_results")


def options_reason(options: Mapping[str, Any]) -> str | None:
    """Why these execution options keep a read from the cache, or None."""
    if options.get("cache") is False:
        return "the execution option cache=False turns it off"
    for name in MUST_REACH_DATABASE:
        if options.get(name):
            return f"the execution option {name}={options[name]!r} makes it reach the database"
    return None


def policy_reason(cache: Cache, info: ShapeInfo, op: str) -> str | None:
    """Why the configuration (``models=``) doesn't cache this op of this shape, or None."""
    rule = cache.policy.rule_for(info.lead)
    if rule is None:
        what = info.lead.__name__ if info.lead is not None else "a statement without a mapped class"
        return f"{what} is not configured in models= (add it, or '*')"
    if op not in rule.ops:
        return f"op {op!r} is not configured for {info.model} (its ops: {', '.join(sorted(rule.ops))})"
    return None


def written_reason(ctx: SessionContext, tables: Any) -> str | None:
    """Why this session reads these tables from the database until its transaction ends, or None."""
    if ctx.written_everything:
        return (
            "this session's transaction ran SQL whose writes are unknown: "
            "reads go to the database until it ends"
        )
    if ctx.written:
        hit = sorted(t for t in tables if t in ctx.written)
        if hit:
            return (
                f"this session's transaction wrote {', '.join(hit)}: it reads them from the database "
                "until it ends (read-your-writes)"
            )
    return None


_shapes: LRU[Any, ShapeInfo] = LRU(4096)


def _columns_of(statement: Any, labels: list[str]) -> list[ValueCodec | None] | None:
    try:
        descriptions = statement.column_descriptions
    except Exception:  # not a statement the ORM can describe
        return None
    out: list[ValueCodec | None] = []
    for d in descriptions:
        kind = d.get("type")
        if isinstance(kind, TypeEngine):
            out.append(codec_for(kind))
            labels.append(f"{d.get('name')!r} ({kind!r})")
        elif isinstance(kind, type) and isinstance(inspect(kind, raiseerr=False), Mapper):
            out.append(ENTITY)  # plain or aliased: rows hold instances of the class either way
            labels.append(kind.__name__)
        else:
            return None  # bundles and other composite columns: served from the database
    return out


_shapes_lock = threading.Lock()


def shape_info(cache: Cache, statement: Any, key_tuple: Any) -> ShapeInfo:
    info = _shapes.get(key_tuple)
    if info is None:
        reason = never_cached_reason(statement)
        try:
            shape = cache.keys.shape(key_tuple)
        except Uncacheable as exc:
            shape, reason = Shape("", frozenset(), ()), reason or str(exc)
        labels: list[str] = []
        columns = _columns_of(statement, labels)
        if columns is None and reason is None:
            reason = "result shape not supported (bundles)"
        for table in shape.tables:  # so raw SQL naming these tables finds their foreign keys
            deps_mod.register_metadata(table.metadata)
        pk_columns = {
            deps_mod.table_name(t): tuple(c.name for c in t.primary_key.columns)
            for t in shape.tables
            if isinstance(t, Table)
        }
        lead = shape.mappers[0].class_ if shape.mappers else None
        table_names = frozenset(deps_mod.table_name(t) for t in shape.tables)
        info = ShapeInfo(
            shape,
            reason,
            op_of(statement),
            lead,
            columns,
            table_names=table_names,
            pk_columns=pk_columns,
            model=lead.__name__ if lead is not None else ",".join(sorted(table_names)),
            reason_code=reason_code(reason) if reason is not None else "",
            labels=labels,
        )
        # (see related_roots: only a statement with options can make a lazy relationship eager)
        info.hint.update(related_roots(shape.mappers, every=bool(_sa.statement_options_if_any(statement))))
        with _shapes_lock:  # threads that built it at once must share one (its template, its memo)
            info = _shapes.get(key_tuple) or info
            _shapes.put(key_tuple, info)
    return info


@dataclass(slots=True)
class GetTicket:
    """Hands ``Session.get``'s key and lookup to the statement the ORM then executes on a miss."""

    key: str
    mapper: Mapper[Any]
    plan: KeyPlan  # its deps: the row's own dependencies
    lookup: Lookup | None
    ttl: float
    dialect: Any
    began: float = 0.0  # when its lookup began
    used: bool = False
    fill: Fill | None = None  # the right to fill it, taken with the lookup; ended by whoever has it
    coordinated: bool = True  # False: a miss whose wait for another filler is still to be done


@dataclass(slots=True)
class StatementGet:
    """Marks the statement of a ``Session.get`` that other ``do_orm_execute`` hooks may reshape
    (tenant criteria, soft delete): cached under the "get" op, keyed by the statement they leave."""

    used: bool = False


def tables_written(ctx: SessionContext, tables: Any) -> bool:
    return ctx.written_everything or (bool(ctx.written) and any(t in ctx.written for t in tables))


def entry_written(ctx: SessionContext, entry_deps: Sequence[str]) -> bool:
    if ctx.written_everything:
        return True
    if not ctx.written:
        return False
    return any(deps_mod.table_of_dep(d) in ctx.written for d in entry_deps)


@dataclass(slots=True)
class KeyPlan:
    """Per key: the dependencies its statement predicts, those its entry had, and the hint."""

    deps: list[str]
    learned: tuple[str, ...] = ()
    hint: list[str] | None = None
    shape_size: int = -1


key_plans: LRU[Any, KeyPlan] = LRU(8192)  # (key, mode) → plan: computed once per key, not per read


def _valueless(dep: str) -> bool:
    """A dependency every entry of a shape shares (not one naming rows by value)."""
    return dep[0] not in "rc"


def learn(plan: KeyPlan, deps: Sequence[str], shape_hint: set[str] | None) -> None:
    """Remember an entry's dependencies so that the next lookup fetches their versions with it."""
    found = tuple(deps)
    if found != plan.learned:
        plan.learned = found
        plan.hint = None
    if shape_hint is not None:
        shape_hint.update(d for d in found if _valueless(d))


def hint_for(plan: KeyPlan, shape_hint: set[str]) -> list[str]:
    if plan.hint is None or plan.shape_size != len(shape_hint):
        plan.hint = sorted(set(plan.deps) | shape_hint | set(plan.learned))
        plan.shape_size = len(shape_hint)
    return plan.hint


def deps_of_statement(
    cache: Cache, info: ShapeInfo, statement: Any, ck: Any, parameters: Any, dialect: Any
) -> list[str]:
    """What a statement's own conditions make it depend on (before any row is loaded)."""
    if dialect is None:
        return deps_mod.table_read_deps(info.table_names)
    if info.analysis is None:
        info.analysis = conditions.analyse(statement, ck.bindparams, deps_mod.table_name)
    found = conditions.resolve(
        info.analysis,
        ck.bindparams,
        parameters if isinstance(parameters, Mapping) else None,
        dialect,
        cache.condition_in_limit,
    )
    if info.criteria_tables is None:
        # with_loader_criteria() adds conditions (and maybe subqueries) when the ORM compiles the
        # statement, out of the analysis' sight: every table the shape names is then read whole.
        options = _sa.statement_options_if_any(statement)
        info.criteria_tables = (
            info.table_names if any(isinstance(o, LoaderCriteriaOption) for o in options) else frozenset()
        )
    for name in info.criteria_tables:
        found.setdefault(name, None)
    return deps_mod.condition_read_deps(found, info.pk_columns)
