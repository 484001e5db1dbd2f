"""The read path: ``do_orm_execute`` → policy → key → backend → codec → ORM objects.

On a miss the statement runs as usual; what goes into the cache is what the *database* returned,
taken from objects at the moment the ORM created them from rows (the ``load`` event). Objects that
were already in the session's identity map are never trusted as a source: they may carry pending
changes or an older transaction's view. A result that contains one is simply not stored.

On a hit, objects are rebuilt the way the ORM builds them from rows: an identity already in the
session is returned as is (only its unloaded attributes are filled, exactly like a database load),
new ones are created persistent in the identity map, eager-loaded relationships are set, columns the
query did not load stay unloaded, and the ``load`` event fires.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import event, inspect, util
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Result
from sqlalchemy.engine.result import ChunkedIteratorResult
from sqlalchemy.orm import Mapper, ORMExecuteState, Session, attributes, strategies
from sqlalchemy.orm.base import instance_state
from sqlalchemy.orm.relationships import RelationshipProperty
from sqlalchemy.orm.util import LoaderCriteriaOption
from sqlalchemy.sql import visitors
from sqlalchemy.sql.schema import Column, Table
from sqlalchemy.sql.type_api import TypeEngine

from sqlacache import conditions, refreshing, rowtokens, stampede
from sqlacache import dependencies as deps_mod
from sqlacache._lru import LRU
from sqlacache.backends import Lookup
from sqlacache.binding import CacheClosedError, bound_to
from sqlacache.codec import CodecError, ValueCodec, codec_for
from sqlacache.conditions import Analysis
from sqlacache.context import Frame, SessionContext, context_of
from sqlacache.keys import Shape, Uncacheable, _path, translation_token
from sqlacache.policy import never_cached_reason, op_of
from sqlacache.resilient import StoreJob
from sqlacache.results import ResultTemplate, mode_of, result_from_rows, tap, template_from
from sqlacache.stampede import Fill

if TYPE_CHECKING:
    from sqlacache.cache import Cache

log = logging.getLogger("sqlacache.reads")

PAYLOAD_FORMAT = 1


_DEFERRED_LOADERS = tuple(
    c for c in (getattr(strategies, n, None) for n in ("LoadDeferredColumns", "_LoadDeferredColumns")) if c
)


class _Unstorable(Exception):
    """The result can't be reproduced faithfully from a cache entry; it is served, not stored."""


# --------------------------------------------------------------------------------------------
# Per-process memos: what a mapper looks like to the codec, what a statement shape looks like.


@dataclass(slots=True)
class MapperLayout:
    mapper: Mapper[Any]
    columns: dict[str, ValueCodec]  # loadable column attributes → codec
    pk_keys: tuple[str, ...]
    tables: frozenset[str]  # the mapper's own tables
    expr_tables: dict[str, frozenset[str]]  # column_property(select …) → the tables it reads
    eager_expire: frozenset[str]  # column attributes that are not deferred by mapping
    relationships: dict[str, RelationshipProperty[Any]]
    # Table dependencies seen on get entries (eager loads, column_property subqueries): the row's own
    # dependencies (``*``, ``a:``, ``r:``) are always in a get's hint already.
    get_hint: set[str] = field(default_factory=set)


_layouts: dict[Mapper[Any], MapperLayout] = {}
# Class path → mapper, per registry: two mappings of one class path (an old and a new model in
# one process) each decode their own entries.
_by_path: dict[tuple[Any, str], Mapper[Any]] = {}


def layout_of(mapper: Mapper[Any]) -> MapperLayout:
    found = _layouts.get(mapper)
    if found is not None:
        return found
    columns: dict[str, ValueCodec] = {}
    for t in mapper.tables:
        deps_mod.register_metadata(getattr(t, "metadata", None))
    tables = {deps_mod.table_name(t) for t in mapper.tables}
    expr_tables: dict[str, frozenset[str]] = {}
    not_deferred = set()
    for prop in mapper.column_attrs:
        expr = prop.columns[0]
        columns[prop.key] = codec_for(expr.type)
        if not isinstance(expr, Column) or expr.table not in mapper.tables:
            # column_property(select(...)) and friends read other tables.
            expr_tables[prop.key] = frozenset(
                deps_mod.table_name(e) for e in visitors.iterate(expr) if isinstance(e, Table)
            )
        if not prop.deferred:
            not_deferred.add(prop.key)
    pk_keys = tuple(mapper.get_property_by_column(c).key for c in mapper.primary_key)
    found = MapperLayout(
        mapper,
        columns,
        pk_keys,
        frozenset(tables),
        expr_tables,
        frozenset(not_deferred),
        {r.key: r for r in mapper.relationships},
    )
    _layouts[mapper] = found
    _by_path[(mapper.registry, _path(mapper.class_))] = mapper
    _by_path.setdefault((None, _path(mapper.class_)), mapper)
    return found


def _mapper_for_path(path: str, near: Mapper[Any] | None) -> Mapper[Any]:
    """The mapper of ``path`` in the registry of ``near`` (the statement's), else any."""
    registry = near.registry if near is not None else None
    mapper = _by_path.get((registry, path))
    if mapper is None and near is not None:
        for m in near.registry.mappers:
            layout_of(m)
        mapper = _by_path.get((registry, path))
    if mapper is None:
        mapper = _by_path.get((None, path))
    if mapper is None:
        raise CodecError(f"unknown mapped class {path!r}")
    return mapper


ENTITY = None  # a result column that holds ORM entities rather than values


@dataclass(slots=True)
class ShapeInfo:
    shape: Shape
    reason: str | None  # why it's never cached, or None
    op: str
    lead: type | None
    columns: list[ValueCodec | None] | None  # per result column; None entries are entities
    # How its result looks, per mode (see results.mode_of); learnt from its first execution here.
    templates: dict[tuple[bool, bool], ResultTemplate] = field(default_factory=dict)
    hint: set[str] = field(default_factory=set)  # dependencies its entries had, to fetch with them
    table_names: frozenset[str] = frozenset()  # dependency names of the tables the statement names
    analysis: Analysis | None = None  # its conditions (built on first use)
    criteria_tables: frozenset[str] | None = None  # tables read whole because of loader criteria
    pk_columns: dict[str, tuple[str, ...]] = field(default_factory=dict)  # table → primary key columns


_shapes: LRU[Any, ShapeInfo] = LRU(4096)


def _columns_of(statement: Any) -> list[ValueCodec | None] | None:
    try:
        descriptions = statement.column_descriptions
    except Exception:  # not a statement the ORM can describe
        return None
    out: list[ValueCodec | None] = []
    for d in descriptions:
        kind = d.get("type")
        if isinstance(kind, TypeEngine):
            out.append(codec_for(kind))
        elif isinstance(kind, type) and isinstance(inspect(kind, raiseerr=False), Mapper):
            out.append(ENTITY)  # plain or aliased: rows hold instances of the class either way
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
        columns = _columns_of(statement)
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
        info = ShapeInfo(
            shape,
            reason,
            op_of(statement),
            lead,
            columns,
            table_names=frozenset(deps_mod.table_name(t) for t in shape.tables),
            pk_columns=pk_columns,
        )
        with _shapes_lock:  # threads that built it at once must share one (its template, its memo)
            info = _shapes.get(key_tuple) or info
            _shapes.put(key_tuple, info)
    return info


# --------------------------------------------------------------------------------------------
# Capture: which objects the current read created from database rows.


_KNOWN = "sqlacache.loaded"  # key in InstanceState.info: (values as loaded, generation)


def remember(state: Any, values: dict[str, Any], generation: int | None) -> None:
    """Keep what an object looked like when the database (or a valid entry) produced it, and the
    generation that data is at least as fresh as: a later result containing the object can then be
    stored from these values, at that (older) generation."""
    if generation is None or generation < 0:
        return
    info = state.info
    known = info.get(_KNOWN)
    if known is not None:
        values = {**known[0], **values}
        generation = min(generation, known[1])
    info[_KNOWN] = (values, generation)


@event.listens_for(Mapper, "load", raw=True)
def _on_load(state: Any, context: Any = None) -> None:
    # Installed on every mapper of the process, so it must stand whatever "load" is fired with:
    # Session.merge() fires it with no query context, and nothing of ours is capturing then.
    ctx = getattr(getattr(context, "session", None), "_sqlacache", None)
    if not isinstance(ctx, SessionContext) or not ctx.frames:
        return
    layout = layout_of(state.mapper)
    dict_ = state.dict
    ctx.frames[-1].fresh[state] = {k: dict_[k] for k in layout.columns if k in dict_}


@dataclass(slots=True)
class _Graph:
    """What an encoded object graph read, beyond the statement's own conditions."""

    dialect: Any  # None: table-level invalidation
    covered: frozenset[str]  # tables the statement's conditions account for (its root rows)
    tables: set[str] = field(default_factory=set)  # every table read (read-your-writes check)
    deps: set[str] = field(default_factory=set)

    def whole(self, names: Any) -> None:
        self.tables.update(names)
        self.deps.update(deps_mod.table_dep(n) for n in names)

    def row(self, state: Any, layout: MapperLayout, loaded: dict[str, Any], related: bool | None) -> None:
        """``related``: False for the statement's own rows, True for rows reached through a
        relationship, None for those a relationship's condition already covers."""
        self.tables.update(layout.tables)
        for key in layout.expr_tables.keys() & loaded.keys():
            self.whole(layout.expr_tables[key])
        if related is None:
            return
        if not related:
            if not layout.tables <= self.covered:
                self.whole(layout.tables - self.covered)
            return
        # A row reached through a relationship: the statement's own dependencies don't cover it.
        tokens = None
        if self.dialect is not None:
            tokens = rowtokens.pk_tokens(state.mapper, [loaded.get(k) for k in layout.pk_keys], self.dialect)
        if tokens is None:
            self.whole(layout.tables)
        else:
            self.deps.update(deps_mod.pk_read_deps(layout.tables, tokens))

    def relationship(self, prop: RelationshipProperty[Any], loaded: dict[str, Any]) -> bool:
        """Account for a loaded relationship; True when its condition also covers its members'
        rows (a member's change shows in its old values, which satisfy the condition)."""
        target = layout_of(prop.mapper).tables
        secondary = (
            {deps_mod.table_name(t) for t in visitors.iterate(prop.secondary) if isinstance(t, Table)}
            if prop.secondary is not None
            else set()
        )
        self.tables.update(target, secondary)
        found = None if self.dialect is None else rowtokens.membership_deps(prop, loaded, self.dialect)
        if found is None:
            self.whole(target | secondary)
            return False
        self.deps.update(found)
        return prop.secondary is None


def _encode_entities(
    roots: Sequence[Any], frame: Frame, graph: _Graph, oldest: list[int]
) -> tuple[list[Any], dict[int, int]]:
    """The entity table of a payload. Objects this read created are encoded from what it loaded;
    objects that were already in the session from what they were loaded with, lowering ``oldest``
    to that load's generation. Anything else raises _Unstorable."""
    table: list[Any] = []
    index: dict[int, int] = {}

    def ref(obj: Any, related: bool | None = True) -> int | None:
        if obj is None:
            return None
        found = index.get(id(obj))
        if found is not None:
            return found
        state = instance_state(obj)
        loaded = frame.fresh.get(state)
        if loaded is None:
            remembered = state.info.get(_KNOWN) if "info" in state.__dict__ else None
            if remembered is None:
                raise _Unstorable("the result includes an object loaded outside the cache")
            loaded, generation = remembered
            oldest[0] = min(oldest[0], generation)
        for key, fn in state.callables.items():
            # defer()/load_only() loaders are reproduced on a hit (the attribute is expired);
            # anything else (raiseload, per-query lazy options) is not.
            if not isinstance(fn, _DEFERRED_LOADERS) or getattr(fn, "raiseload", False):
                raise _Unstorable(f"a loader option installed a per-object loader on {key!r}")
        layout = layout_of(state.mapper)
        graph.row(state, layout, loaded, related)
        slot = len(table)
        index[id(obj)] = slot
        entry: list[Any] = [
            _path(state.class_),
            {k: layout.columns[k].encode(v) for k, v in loaded.items()},
            {},
        ]
        table.append(entry)
        rels: dict[str, Any] = {}
        dict_ = state.dict
        for key, prop in layout.relationships.items():
            if key not in dict_:
                continue
            if key in state.committed_state:
                raise _Unstorable(f"relationship {key!r} has changes not flushed")
            covered = graph.relationship(prop, loaded)
            value = dict_[key]
            if prop.uselist:
                if not isinstance(value, (list, set)):
                    raise _Unstorable(f"collection class of {key!r} is not a list or set")
                rels[key] = [ref(v, None if covered else True) for v in value]
            else:
                rels[key] = ref(value, None if covered else True)
        entry[2] = rels
        return slot

    for obj in roots:
        ref(obj, False)
    return table, index


def encode_result(
    data: Sequence[Any], single: bool, columns: list[ValueCodec | None], frame: Frame, graph: _Graph
) -> tuple[bytes, int]:
    """(payload bytes, the generation to store it at) for a result's rows (objects when ``single``,
    else tuples); what the graph read goes into ``graph``."""
    if frame.unstorable:
        raise _Unstorable(frame.unstorable)
    if frame.generation is None:
        raise _Unstorable("no generation: the backend was unavailable when the read began")
    oldest = [frame.generation]
    if single:
        table, index = _encode_entities(data, frame, graph, oldest)
        rows: list[Any] = [None if o is None else index[id(o)] for o in data]
    else:
        roots = [v for row in data for v, c in zip(row, columns) if c is ENTITY and v is not None]
        table, index = _encode_entities(roots, frame, graph, oldest)
        rows = [
            [
                (None if v is None else index[id(v)]) if c is None else c.encode(v)
                for v, c in zip(row, columns)
            ]
            for row in data
        ]
    return orjson.dumps([PAYLOAD_FORMAT, table, rows]), oldest[0]


# --------------------------------------------------------------------------------------------
# Rebuild: payload → objects attached to the session, as a database load would leave them.


class _HitContext:
    """Stands in for the QueryContext that ``load`` listeners receive on a database load."""

    __slots__ = ("session",)

    def __init__(self, session: Session) -> None:
        self.session = session


_Decoded = list[tuple[Mapper[Any], MapperLayout, dict[str, Any], Any, dict[str, Any]]]


def _decode_entities(table: Any, near: Mapper[Any] | None) -> _Decoded:
    """An entry's entity table, decoded and validated without touching any session: a corrupt
    entry must leave no half-built object behind in an identity map. Raises CodecError."""
    if not isinstance(table, list):
        raise CodecError("entity table is not a list")
    decoded: _Decoded = []
    for entry in table:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)):
            raise CodecError("bad entity entry")
        cpath, raw, rels = entry
        if not isinstance(raw, dict) or not isinstance(rels, dict):
            raise CodecError("bad entity entry")
        mapper = _mapper_for_path(cpath, near)
        layout = layout_of(mapper)
        try:
            values = {k: layout.columns[k].decode(v) for k, v in raw.items()}
            pk = tuple(values[k] for k in layout.pk_keys)
        except KeyError as exc:
            raise CodecError(f"entry does not fit the mapping of {cpath}: {exc}") from exc
        for key, ref in rels.items():
            prop = layout.relationships.get(key)
            if prop is None:
                raise CodecError(f"unknown relationship {key!r}")
            for r in ref if isinstance(ref, list) else [ref]:
                if r is not None and (type(r) is not int or not 0 <= r < len(table)):
                    raise CodecError("bad entity reference")
            if prop.uselist != isinstance(ref, list):
                raise CodecError(f"bad value for relationship {key!r}")
        decoded.append((mapper, layout, values, mapper.identity_key_from_primary_key(pk), rels))
    return decoded


def _attach(
    session: Session,
    identity_map: Any,
    decoded: _Decoded,
    generation: int,
    roots: Sequence[Any] = (),
    load_options: tuple[Any, ...] = (),
) -> list[Any]:
    """Decoded entities → objects in ``identity_map``, as a database load leaves them. (The map of
    the moment the statement ran: one that close()/expunge_all() replaced since refuses them with
    the ORM's own error, as a database result consumed then does.)"""
    objs: list[Any] = []
    new_states: list[Any] = []
    for mapper, layout, values, ikey, _ in decoded:
        obj = identity_map.get(ikey)
        if obj is not None:
            # Already in the session: like a database load, fill only what isn't loaded.
            state = instance_state(obj)
            unloaded = state.unloaded
            to_load = [k for k in values if k in unloaded]
            if to_load:
                dict_ = state.dict
                for k in to_load:
                    dict_[k] = values[k]
                state._commit(dict_, to_load)
                remember(state, {k: values[k] for k in to_load}, generation)
        else:
            obj = mapper.class_manager.new_instance()
            state = instance_state(obj)
            dict_ = state.dict
            dict_.update(values)
            state.key = ikey
            state.identity_token = None
            state.session_id = session.hash_key
            identity_map._add_unpresent(state, ikey)
            missing = () if layout.eager_expire.issubset(values) else layout.eager_expire.difference(values)
            if missing:
                # The query left these out (load_only/defer): load them on access, like the ORM does.
                state._expire_attributes(dict_, missing)
            new_states.append(state)
            remember(state, values, generation)
        objs.append(obj)

    fresh = {id(s.obj()) for s in new_states}
    for obj, (_, layout, _, _, rels) in zip(objs, decoded):
        dict_ = instance_state(obj).dict
        for key, ref in rels.items():
            if id(obj) not in fresh and key in dict_:
                continue
            prop = layout.relationships[key]
            if prop.uselist:
                value: Any = [None if r is None else objs[r] for r in ref]
                if prop.collection_class is set:
                    value = set(value)
            else:
                value = None if ref is None else objs[ref]
            attributes.set_committed_value(obj, key, value)

    # What a load leaves on new states for their lazy loads: the query's propagating options, and
    # where in the query each object was loaded (their paths line up with those options).
    if new_states:
        paths = _load_paths(decoded, roots)
        states = {id(s): slot for slot, s in enumerate(instance_state(o) for o in objs)}
        for state in new_states:
            state.load_options = load_options
            slot = states[id(state)]
            state.load_path = paths.get(slot) or decoded[slot][0]._path_registry

    # New states hold only committed values (nothing to _commit_all); fire what a load fires.
    context = _HitContext(session)
    dispatch_persistent = session.dispatch.loaded_as_persistent
    for state in new_states:
        state.manager.dispatch.load(state, context)
        if dispatch_persistent:
            dispatch_persistent(session, state)
    return objs


def _load_paths(decoded: Sequence[Any], roots: Sequence[Any]) -> dict[int, Any]:
    """Each object's path in the query: roots at their mapper, related objects under the
    relationship they were reached through (the shallowest path wins, as in the ORM)."""
    paths: dict[int, Any] = {}
    todo = [(r, decoded[r][0]._path_registry) for r in roots if type(r) is int and 0 <= r < len(decoded)]
    while todo:
        nxt: list[tuple[Any, Any]] = []
        for slot, path in todo:
            if slot in paths:
                continue
            paths[slot] = path
            layout, rels = decoded[slot][1], decoded[slot][4]
            for key, ref in rels.items():
                prop = layout.relationships[key]
                child = path[prop][prop.entity]
                nxt.extend((r, child) for r in (ref if isinstance(ref, list) else [ref]) if r is not None)
        todo = nxt
    return paths


def _propagating(state: ORMExecuteState) -> tuple[Any, ...]:
    """The statement's options that a database load would leave on its objects (state.load_options)."""
    return tuple(o for o in state.statement._with_options if getattr(o, "propagate_to_loaders", False))


def _load_payload(payload: bytes) -> tuple[Any, list[Any]]:
    """(entity table, rows) of an entry's payload; raises CodecError on anything else."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise CodecError("payload is not JSON") from exc
    if not (
        isinstance(doc, list) and len(doc) == 3 and doc[0] == PAYLOAD_FORMAT and isinstance(doc[2], list)
    ):
        raise CodecError("payload format not recognised")
    return doc[1], doc[2]


def _resolver(objs: list[Any]) -> Any:
    def resolve(ref: Any) -> Any:
        if ref is None:
            return None
        if type(ref) is not int or not 0 <= ref < len(objs):
            raise CodecError("bad entity reference")
        return objs[ref]

    return resolve


def decode_result(
    session: Session, payload: bytes, info: ShapeInfo, generation: int, load_options: tuple[Any, ...] = ()
) -> Callable[[], list[Any]]:
    """Rows (tuples) of objects and values in the shape of ``info``, made when called: the payload
    is decoded and validated now (raises CodecError), the objects are attached to the session when
    the result is consumed, as a database result makes them.

    A payload stored by a single-entity result holds one reference per row, one stored with
    ``tuples()`` a list: either serves both."""
    table, rows = _load_payload(payload)
    decoded = _decode_entities(table, info.shape.mappers[0] if info.shape.mappers else None)
    columns = info.columns or []
    refs = range(len(decoded))
    plans: list[tuple[Any, ...]] = []  # per row: entity slots (or None) and decoded values
    roots: list[int] = []
    for row in rows:
        cells = [(row, ENTITY)] if not isinstance(row, list) else list(zip(row, columns))
        if (not isinstance(row, list) and (len(columns) != 1 or columns[0] is not ENTITY)) or (
            isinstance(row, list) and len(row) != len(columns)
        ):
            raise CodecError("row does not fit the result shape")
        plan: list[Any] = []
        for v, c in cells:
            if c is ENTITY:
                if v is not None and (type(v) is not int or v not in refs):
                    raise CodecError("bad entity reference")
                plan.append(v)
                if v is not None:
                    roots.append(v)
            else:
                plan.append(c.decode(v))
        plans.append(tuple(plan))
    identity_map = session.identity_map
    entity_at = [i for i, c in enumerate(columns if columns else [ENTITY]) if c is ENTITY]

    def make() -> list[Any]:
        objs = _attach(session, identity_map, decoded, generation, roots, load_options)
        out = []
        for plan in plans:
            cells = list(plan)
            for i in entity_at:
                if i < len(cells) and cells[i] is not None:
                    cells[i] = objs[cells[i]]
            out.append(tuple(cells))
        return out

    return make


# --------------------------------------------------------------------------------------------
# The orchestration: one function per entry point (do_orm_execute, Session.get).


@dataclass(slots=True)
class GetTicket:
    """Hands ``Session.get``'s key and lookup to the statement the ORM then executes on a miss."""

    key: str
    mapper: Mapper[Any]
    plan: _KeyPlan  # its deps: the row's own dependencies
    lookup: Lookup | None
    ttl: float
    dialect: Any
    began: float = 0.0  # when its lookup began
    used: bool = False


@dataclass(slots=True)
class StatementGet:
    """Marks the statement of a ``Session.get`` that other ``do_orm_execute`` hooks may reshape
    (tenant criteria, soft delete): cached under the "get" op, keyed by the statement they leave."""

    used: bool = False


def reshaped_by_hooks(session: Session) -> bool:
    """True when hooks besides ours (``_on_execute``) see this session's statements: a get must
    reach them."""
    return len(session.dispatch.do_orm_execute) > 1


def _written(ctx: SessionContext, tables: Any) -> bool:
    return ctx.written_everything or (bool(ctx.written) and any(t in ctx.written for t in tables))


def _entry_written(ctx: SessionContext, entry_deps: Sequence[str]) -> bool:
    if ctx.written_everything:
        return True
    if not ctx.written:
        return False
    return any(deps_mod.table_of_dep(d) in ctx.written for d in entry_deps)


def _run_remaining(state: ORMExecuteState) -> Result[Any] | None:
    """Run the do_orm_execute hooks registered after ours first, so that what they change in the
    statement (tenant criteria, soft-delete filters…) is part of the key."""
    hooks: list[Any] = list(state._remaining_events())
    for fn in hooks:
        state._starting_event_idx += 1
        result = fn(state)
        if result:
            return result  # type: ignore[no-any-return]
    return None


@event.listens_for(Session, "do_orm_execute")
def _on_execute(state: ORMExecuteState) -> Result[Any] | None:
    session = state.session
    ctx = session.__dict__.get("_sqlacache")
    if ctx is None:
        if session.__dict__.get("_sqlacache_cache") is False:
            return None
        ctx = context_of(session)
        if ctx is None:
            return None
    if ctx.cache.closed:
        raise CacheClosedError()
    if not state.is_select or not ctx.reads or not ctx.cache.enabled:
        return None
    flag = state.execution_options.get("cache")
    if flag is False:
        return None
    if ctx.routed and bound_to(session.get_bind(**state.bind_arguments)) is not ctx.cache:
        return None  # a session that routes statements itself, to an engine not bound to this cache
    ran_others = bool(state._remaining_events())
    if ran_others:
        early = _run_remaining(state)
        if early is not None:
            return early
    # A bug in sqlacache must never break a read: before the statement runs (and outside the
    # autoflush, whose errors are the application's), any failure means "go to the database".
    guard = _Guard()
    try:
        result = _read(ctx, state, flag is True, guard)
    except Exception as exc:
        if guard.passthrough:
            raise
        ctx.cache.internal_error(exc, "on the read path")
        result = None
    if result is None and ran_others:
        # The later hooks have run already; don't let the session run them a second time.
        return invoke(state)
    return result


# The execution options the ORM reads into its load options (QueryContext.default_load_options
# .from_execution_options in orm_pre_session_exec).
_LOAD_OPTION_KEYS = ("populate_existing", "autoflush", "yield_per", "identity_token")


def invoke(state: ORMExecuteState) -> Result[Any]:
    """``state.invoke_statement()``, minus the private ``_sa_skip_events`` bind argument it adds:
    a ``get_bind(self, mapper=None, clause=None)`` override, as SQLAlchemy's docs write one, takes
    no such argument, and the database path (no hook re-executing) never passes it."""
    options = state.local_execution_options
    # What the ORM already turned into load options (and, for a post-load, merged in from the
    # enclosing query) must not be read again as if the caller had passed it: the enclosing query's
    # yield_per or autoflush would leak into its relationship loads. A hook's own settings stay.
    again = [k for k in _LOAD_OPTION_KEYS if k in options and k not in state._update_execution_options]
    if again:
        options = util.immutabledict({k: v for k, v in options.items() if k not in again})
    result: Result[Any] = state.session._execute_internal(
        state.statement,
        state.parameters,
        execution_options=options,
        bind_arguments=dict(state.bind_arguments),
        _parent_execute_state=state,
    )
    return result


class _Guard:
    """True while the application's own work runs (autoflush, the statement): its errors are its own."""

    __slots__ = ("passthrough",)

    def __init__(self) -> None:
        self.passthrough = False

    def begin(self, session: Session) -> None:
        """Autobegin, as a database read would (an error if the session was made autobegin=False)."""
        self.passthrough = True
        session._autobegin_t()
        self.passthrough = False

    def autoflush(self, session: Session) -> None:
        """The flush the database path would do before reading; a failure in it is the caller's."""
        self.passthrough = True
        session._autoflush()
        self.passthrough = False


def _plain_read(state: ORMExecuteState) -> bool:
    """False for loads that must reach the database: refresh, populate_existing, streaming…"""
    lo = state.load_options
    if (
        lo._populate_existing
        or lo._refresh_state is not None
        or lo._yield_per
        or lo._identity_token is not None
    ):
        return False
    opts = state.execution_options
    return not (opts.get("populate_existing") or opts.get("yield_per") or opts.get("stream_results"))


@dataclass(slots=True)
class _KeyPlan:
    """Per key: the dependencies its statement predicts, those its entry had, and the hint."""

    deps: list[str]
    learned: tuple[str, ...] = ()
    hint: list[str] | None = None
    shape_size: int = -1


_plans: LRU[Any, _KeyPlan] = LRU(8192)  # (key, mode) → plan: computed once per key, not per read


def _valueless(dep: str) -> bool:
    """A dependency every entry of a shape shares (not one naming rows by value)."""
    return dep[0] not in "rc"


def _learn(plan: _KeyPlan, deps: Sequence[str], shape_hint: set[str] | None) -> None:
    """Remember an entry's dependencies so that the next lookup fetches their versions with it."""
    found = tuple(deps)
    if found != plan.learned:
        plan.learned = found
        plan.hint = None
    if shape_hint is not None:
        shape_hint.update(d for d in found if _valueless(d))


def _hint(plan: _KeyPlan, shape_hint: set[str]) -> list[str]:
    if plan.hint is None or plan.shape_size != len(shape_hint):
        plan.hint = sorted(set(plan.deps) | shape_hint | set(plan.learned))
        plan.shape_size = len(shape_hint)
    return plan.hint


def _statement_deps(
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
        options = getattr(statement, "_with_options", ())
        info.criteria_tables = (
            info.table_names if any(isinstance(o, LoaderCriteriaOption) for o in options) else frozenset()
        )
    for name in info.criteria_tables:
        found.setdefault(name, None)
    return deps_mod.condition_read_deps(found, info.pk_columns)


def _read(ctx: SessionContext, state: ORMExecuteState, forced: bool, guard: _Guard) -> Result[Any] | None:
    cache = ctx.cache
    if not _plain_read(state):
        return None
    opts = state.execution_options
    ticket: GetTicket | None = opts.get("_sqlacache_get")
    if ticket is not None:
        if ticket.used:
            ticket = None  # a nested load (selectin…) inherited the options of the get
        else:
            ticket.used = True
    op = None
    shaped: StatementGet | None = opts.get("_sqlacache_statement_get")
    if shaped is not None and not shaped.used:  # (nested loads inherit the get's options)
        shaped.used, op = True, "get"
    statement: Any = state.statement
    ck = statement._generate_cache_key()
    if ck is None:
        return None
    info = shape_info(cache, statement, ck.key)
    if info.reason is not None:
        if not ctx.frames:  # a nested load's entity rows are stored in the enclosing entry anyway
            cache.count("uncacheable")
        return None
    session = state.session
    if ticket is not None:
        ttl = ticket.ttl
    else:
        rule = cache.policy.rule_for(info.lead)
        if not forced and (rule is None or (op or info.op) not in rule.ops):
            return None
        ttl = opts.get("cache_ttl") or (rule.ttl if rule is not None else cache.policy.default_ttl)
    # The database path begins the session's transaction (or refuses to, autobegin=False) and
    # flushes before it reads; so must we, or a hit would hide pending writes.
    guard.begin(session)
    # A hook may have turned it off with update_execution_options(autoflush=False).
    if state._update_execution_options.get("autoflush", state.load_options._autoflush):
        guard.autoflush(session)
    statement_tables = info.table_names
    if _written(ctx, statement_tables):
        return None
    statement_deps: list[str]
    refresh: Fill | None = opts.get("_sqlacache_refresh")
    if ticket is not None:
        key, lookup, dialect, plan = ticket.key, ticket.lookup, ticket.dialect, ticket.plan
        statement_deps = plan.deps
        hint = plan.hint or []
        began = ticket.began
    else:
        bind = session.get_bind(**state.bind_arguments)
        dialect = bind.dialect if cache.precise else None
        namespace = cache.namespace(bind)
        translate = opts.get("schema_translate_map")
        if translate:
            namespace = f"{namespace}|{translation_token(translate)}"
        try:
            values = [b.effective_value for b in ck.bindparams]
        except sa_exc.InvalidRequestError:
            # A value the ORM can't resolve (a comparison to a detached or unflushed object): the
            # statement raises that to the caller itself, as without the cache; not our error.
            return None
        try:
            key = cache.keys.key(
                namespace,
                info.shape.digest,
                values,
                state.parameters if isinstance(state.parameters, Mapping) else None,
            )
        except Uncacheable:
            cache.count("uncacheable")
            return None
        plan_key = (key, cache.precise, cache.condition_in_limit)
        memo = _plans.get(plan_key)
        if memo is None:
            found = _statement_deps(cache, info, statement, ck, state.parameters, dialect)
            memo = _KeyPlan([cache.database_dep(bind), *found])
            _plans.put(plan_key, memo)
        plan = memo
        statement_deps = plan.deps
        hint = _hint(plan, info.hint)
        began = time.monotonic()
        lookup = None if refresh is not None else cache.io.lookup(key, hint)
    fill = refresh
    filling = False  # from the moment _fill runs, it lands the fill (when its rows are stored)
    mode = mode_of(state.load_options)
    template = info.templates.get(mode)
    try:
        if refresh is not None:
            lookup = Lookup(None, cache.io.generation() or -1)
        else:
            hit = _serve(ctx, state, info, template, key, lookup, plan if ticket is None else None)
            if hit is not None:
                if lookup is not None and lookup.refresh_due and ticket is None:
                    _refresh_statement(cache, state, key, began)
                return hit
            if lookup is not None and (lookup.entry is None or template is None):
                # A miss (or a shape this process has never run, so it can't rebuild the result
                # yet): if another reader is filling this key, wait for it instead.
                again, fill = stampede.begin(cache, key, hint, began)
                if again is not None:
                    template = info.templates.get(mode)  # the leader we waited for may have made it
                    hit = _serve(ctx, state, info, template, key, again, plan if ticket is None else None)
                    if hit is not None:
                        return hit
                    lookup = again
        if refresh is None:  # a refresh-ahead read is counted as "refreshes", not as a reader's miss
            cache.count("misses")
        filling = True
        capture = _Capture(ctx, info, key, fill, ticket, statement_deps, dialect, plan, ttl, lookup)
        return _fill(state, capture, guard)
    finally:
        if not filling:
            stampede.end(cache, fill)


def _refresh_statement(cache: Cache, state: ORMExecuteState, key: str, began: float) -> None:
    fill = refreshing.claim(cache, key, began)
    if fill is None:
        return
    statement, params = state.statement, state.parameters
    options = {k: v for k, v in state.execution_options.items() if not k.startswith("_sqlacache")}
    options["_sqlacache_refresh"] = fill
    bind = state.session.get_bind(**state.bind_arguments)
    refreshing.start(
        cache, fill, bind, lambda s: s.execute(statement, params, execution_options=options).all()
    )


def _serve(
    ctx: SessionContext,
    state: ORMExecuteState,
    info: ShapeInfo,
    template: ResultTemplate | None,
    key: str,
    lookup: Lookup | None,
    plan: _KeyPlan | None,
) -> Result[Any] | None:
    """The cached result, when the lookup found one this session may use."""
    entry = lookup.entry if lookup is not None else None
    if entry is None or lookup is None:
        return None
    if plan is not None:
        _learn(plan, entry.deps, info.hint)
    if template is None or _entry_written(ctx, entry.deps):
        return None
    try:
        make = decode_result(state.session, entry.payload, info, lookup.generation, _propagating(state))
    except Exception as exc:  # corrupt, foreign or outdated: a miss, never an error
        ctx.cache.io.drop(key, "corrupt", exc)
        return None
    ctx.cache.count("hits")
    if ctx.frames:
        ctx.frames[-1].deps.update(entry.deps)
    if state.execution_options.get("prebuffer_rows"):
        # AsyncSession has the ORM make its objects inside the call (in the greenlet); so do we.
        rows = make()
        make = lambda: rows  # noqa: E731
    return result_from_rows(template, make)


def _fill(state: ORMExecuteState, capture: _Capture, guard: _Guard) -> Result[Any]:
    """A miss: run the statement and return SQLAlchemy's own result; its rows are stored when the
    caller consumes it (see ``_Capture``)."""
    ctx, frame = capture.ctx, capture.frame
    top = capture.top = state.load_options._sa_top_level_orm_context
    if top is not None:  # (the ORM registers the eager loads beneath it when the statement runs)
        capture.later_before = set(getattr(top, "post_load_paths", ()))
    ctx.frames.append(frame)
    guard.passthrough = True  # from here on the statement runs: its errors reach the caller
    try:
        result = invoke(state)
    except BaseException:
        capture.end()
        raise
    finally:
        _pop(ctx, frame)
    mode = mode_of(state.load_options)
    if isinstance(result, ChunkedIteratorResult):
        capture.watch(result, mode)
    if isinstance(result, ChunkedIteratorResult) and not state.execution_options.get("prebuffer_rows"):
        # The ORM makes objects (and runs eager loads) when the result is first consumed.
        tap(result, capture.pull)
        weakref.finalize(result, capture.end)  # never consumed: let waiting readers go
        result.__dict__["_sqlacache_capture"] = capture  # for .cached(ttl=…) before first use
        return result
    if isinstance(result, ChunkedIteratorResult):
        # Rows already made (AsyncSession buffers them inside the call): take them now.
        capture.pull(result.chunks(None))
        return result
    # A Core result (column selects), or one of another hook's making: take its rows now.
    frozen = result.freeze()
    copy = frozen()
    capture.watch(copy, mode)
    capture.pull(iter([list(frozen.data)]))
    return frozen()


def set_ttl(result: Any, ttl: float) -> None:
    """The TTL a miss's rows are stored with, if they are not stored yet (``.cached(ttl=…)``)."""
    capture = getattr(result, "__dict__", {}).get("_sqlacache_capture")
    if capture is not None and not capture.done:
        capture.ttl = ttl


def _pop(ctx: SessionContext, frame: Frame) -> None:
    if ctx.frames and ctx.frames[-1] is frame:
        ctx.frames.pop()
    elif frame in ctx.frames:
        ctx.frames.remove(frame)


class _Capture:
    """A miss's rows on their way to the caller: encoded and handed to the backend once, when the
    ORM makes them (the first consumption of the result), then the fill is landed."""

    def __init__(
        self,
        ctx: SessionContext,
        info: ShapeInfo,
        key: str,
        fill: Fill | None,
        ticket: GetTicket | None,
        statement_deps: list[str],
        dialect: Any,
        plan: _KeyPlan,
        ttl: float,
        lookup: Lookup | None,
    ) -> None:
        self.ctx, self.info, self.key, self.fill, self.ticket = ctx, info, key, fill, ticket
        generation = (
            ctx.tx_generation if ctx.tx_generation is not None else (lookup.generation if lookup else None)
        )
        frame = Frame(generation if generation is not None and generation >= 0 else None)
        self.statement_deps, self.dialect, self.plan, self.ttl, self.frame = (
            statement_deps,
            dialect,
            plan,
            ttl,
            frame,
        )
        self.mode: tuple[bool, bool] = (False, False)
        self.single = False
        self.result: weakref.ref[Any] | None = None  # for the shape's template, until first consumed
        self.requires_unique = False
        self.done = False
        self.top: Any = None  # the enclosing query's context, for a relationship load run for it
        self.standalone = True  # whether its rows make an entry on their own
        self.later_before: set[Any] | None = None

    def watch(self, result: Any, mode: tuple[bool, bool]) -> None:
        self.mode, self.single = mode, bool(result._source_supports_scalars)
        if mode not in self.info.templates:
            self.result = weakref.ref(result)
            # Read now: the caller's .unique() replaces it.
            self.requires_unique = result._unique_filter_state is not None

    def end(self) -> None:
        if not self.done:
            self.done = True
            stampede.end(self.ctx.cache, self.fill)

    def pull(self, source: Any) -> Any:
        """Take the first chunk from ``source`` with this read's frame current; store it."""
        if self.done:
            return next(source, None)
        frame = self.frame
        # A relationship load run for an enclosing query registers the eager loads beneath it with
        # that query (when its statement runs), which runs them after this read: their results
        # can't be in this read's entry, and a hit couldn't schedule them. Such a read is not
        # stored on its own (the enclosing query's entry holds the whole graph).
        later = getattr(self.top, "post_load_paths", None)
        before = self.later_before
        self.ctx.frames.append(frame)
        try:
            rows = next(source, None)
        except BaseException:
            self.end()
            raise
        finally:
            _pop(self.ctx, frame)
        if before is not None and later is not None and not before.issuperset(later):
            self.standalone = False
        try:
            self._finish(rows or [])
        finally:
            self.end()
        return rows

    def _finish(self, rows: list[Any]) -> None:
        ctx, info, cache, frame, ticket = self.ctx, self.info, self.ctx.cache, self.frame, self.ticket
        result = self.result() if self.result is not None else None
        if result is not None:
            made = template_from(result, self.requires_unique)
            if made is not None:
                info.templates.setdefault(self.mode, made)
            self.result = None
        deps: list[str] = []
        try:
            statement_tables = info.table_names
            graph = _Graph(
                self.dialect, statement_tables if ticket is None else layout_of(ticket.mapper).tables
            )
            payload, generation = encode_result(rows, self.single, info.columns or [], frame, graph)
            deps = sorted(set(self.statement_deps) | graph.deps | frame.deps)
            if not self.standalone:
                cache.count("unstorable")
            elif not _written(ctx, graph.tables | statement_tables):
                fill = self.fill
                lease = fill.lease if fill is not None else None
                cache.io.submit_store(
                    StoreJob(self.key, payload, deps, generation, self.ttl, lease, cache.refresh_ahead)
                )
                if fill is not None:
                    fill.lease = None  # the store gives it back
            _learn(self.plan, deps, layout_of(ticket.mapper).get_hint if ticket is not None else info.hint)
        except _Unstorable as exc:
            cache.count("unstorable")
            log.debug("sqlacache: not storing %s: %s", self.key, exc)
        except (CodecError, orjson.JSONEncodeError) as exc:  # orjson refuses e.g. lone surrogates
            cache.count("unencodable")
            log.debug("sqlacache: cannot encode %s: %s", self.key, exc)
        except Exception as exc:  # a bug of ours: the caller still gets its rows, nothing is stored
            cache.internal_error(exc, "while storing a result")
        for loaded_state, values in frame.fresh.items():
            remember(loaded_state, values, frame.generation)
        if ctx.frames:
            parent = ctx.frames[-1]
            parent.fresh.update(frame.fresh)
            parent.deps.update(deps or [deps_mod.ALL])
            if frame.unstorable:
                parent.unstorable = frame.unstorable


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


_NOT_HANDLED: Any = object()


@dataclass(slots=True)
class GetPlan:
    """A ``Session.get`` the cache can answer: its key and the dependencies to fetch with it."""

    key: str
    mapper: Mapper[Any]
    layout: MapperLayout
    plan: _KeyPlan
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
    guard: _Guard | None = None,
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
    if session._new or session._deleted or session.identity_map._modified:
        if guard is None:  # no way to flush here (async, outside the greenlet): the ORM path will
            return None
        guard.autoflush(session)
        if identity in session.identity_map:
            return None
    if _written(ctx, layout.tables):
        return None
    if session._transaction is None:
        if not session.autobegin:
            return None  # the ORM path raises what a database read raises
        session._autobegin_t()  # as the database read would
    bind = session.get_bind(mapper)
    try:
        key = cache.keys.get_key(cache.namespace(bind), mapper, pk)
    except Uncacheable:
        return None
    ttl = execution_options.get("cache_ttl") or (rule.ttl if rule is not None else cache.policy.default_ttl)
    plan = _plans.get(key)
    if plan is None:
        tokens = rowtokens.pk_tokens(mapper, pk, bind.dialect)
        own = (
            deps_mod.pk_read_deps(layout.tables, tokens)
            if tokens is not None
            else deps_mod.table_read_deps(layout.tables)  # a key we cannot canonicalise: the table
        )
        plan = _KeyPlan([cache.database_dep(bind), *own])
        _plans.put(key, plan)
    dialect = bind.dialect if cache.precise else None
    hint = _hint(plan, layout.get_hint)
    return GetPlan(key, mapper, layout, plan, hint, ttl, dialect, pk, time.monotonic())


def finish_get(session: Session, ctx: SessionContext, plan: GetPlan, lookup: Lookup | None) -> Any:
    """The object (or None for a cached "not found") on a hit, else a GetTicket for the miss."""
    entry = lookup.entry if lookup is not None else None
    if lookup is not None and entry is not None:
        _learn(plan.plan, entry.deps, plan.layout.get_hint)
        if not _entry_written(ctx, entry.deps):
            try:
                objs = _decode_get(session, entry.payload, plan.mapper, lookup.generation)
            except Exception as exc:
                ctx.cache.io.drop(plan.key, "corrupt", exc)
                lookup = Lookup(None, lookup.generation)
            else:
                ctx.cache.count("hits")
                if lookup.refresh_due:
                    _refresh_get(session, ctx.cache, plan)
                return objs[0] if objs else None
    return GetTicket(plan.key, plan.mapper, plan.plan, lookup, plan.ttl, plan.dialect, plan.began)


def _refresh_get(session: Session, cache: Cache, plan: GetPlan) -> None:
    fill = refreshing.claim(cache, plan.key, plan.began)
    if fill is None:
        return
    ticket = GetTicket(plan.key, plan.mapper, plan.plan, None, plan.ttl, plan.dialect)
    options = {"_sqlacache_get": ticket, "_sqlacache_refresh": fill}
    cls, pk = plan.mapper.class_, plan.pk
    refreshing.start(
        cache, fill, session.get_bind(plan.mapper), lambda s: s.get(cls, pk, execution_options=options)
    )


def fast_get(session: Session, ctx: SessionContext, entity: Any, ident: Any, execution_options: Any) -> Any:
    """``Session.get`` without building a statement: key from (class, pk), one backend round trip.

    Returns the object (or None for a cached "not found"), ``_NOT_HANDLED``, or a GetTicket to put
    into ``execution_options`` for the statement the ORM will run on a miss.
    """
    guard = _Guard()
    try:
        plan = plan_get(session, ctx, entity, ident, execution_options, guard=guard)
        if plan is None:
            return _NOT_HANDLED
        return finish_get(session, ctx, plan, ctx.cache.io.lookup(plan.key, plan.hint))
    except Exception as exc:
        if guard.passthrough:
            raise
        ctx.cache.internal_error(exc, "on the get path")
        return _NOT_HANDLED


def _decode_get(session: Session, payload: bytes, mapper: Mapper[Any], generation: int) -> list[Any]:
    table, rows = _load_payload(payload)
    if len(rows) > 1:
        raise CodecError("a primary-key read with several rows")
    objs = _attach(session, session.identity_map, _decode_entities(table, mapper), generation, rows)
    return [_resolver(objs)(ref) for ref in rows]
