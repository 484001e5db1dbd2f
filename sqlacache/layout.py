"""Mapper layouts and what an object looked like when loaded: shared by the read and the write path.

Per-process memos: what a mapper looks like to the codec (its columns, keys, tables, relationships),
and the values an object had when the database (or a valid entry) produced it, kept in its
``InstanceState.info``: the read path writes them, the write path reads them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Mapper
from sqlalchemy.orm.relationships import RelationshipProperty
from sqlalchemy.sql import visitors
from sqlalchemy.sql.schema import Column, Table

from sqlacache import _sa
from sqlacache.analysis import dependencies as deps_mod
from sqlacache.analysis.codec import CodecError, ValueCodec, codec_for
from sqlacache.keys import class_path


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
    # (key, codec.decode, the type that decodes to itself or None), in the columns' order: a hit's
    # rebuild decodes every column of every row with these.
    decoders: tuple[tuple[str, Callable[[Any], Any], type | None], ...] = field(init=False)

    def __post_init__(self) -> None:
        self.decoders = tuple((k, c.decode, c.same) for k, c in self.columns.items())


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
    # In the order a database load sets them: an object rebuilt from the cache then has the same
    # __dict__ order as one loaded, and so the same field order in SQLModel's/pydantic's JSON.
    order = _sa.load_order(mapper)
    for prop in sorted(mapper.column_attrs, key=lambda p: order.get(p.key, len(order))):
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
        set(related_roots([mapper], every=False)),  # a get with options takes the statement path
    )
    _layouts[mapper] = found
    _by_path[(mapper.registry, class_path(mapper.class_))] = mapper
    _by_path.setdefault((None, class_path(mapper.class_)), mapper)
    return found


_RELATED_LIMIT = 64


# Relationship loaders that load with the read that names the mapper, whatever its options say.
_EAGER = frozenset({"joined", "selectin", "subquery", "immediate"})


def related_roots(mappers: Iterable[Mapper[Any]], every: bool) -> frozenset[str]:
    """The table roots (``t:<table>``) of every table the mappers' eager relationships reach (with
    ``every``: all their relationships — a statement whose loader options may make any of them
    eager), theirs too, up to 64 tables: what an eager load of a read of them may come to depend on.

    A lookup makes the missing roots of the dependencies it is hinted exist, as "changed now", so
    that the store of a first read is accepted (lookup.lua). An eager load's tables are known only
    once it ran: without their roots in the hint, the first read of ``select(A)`` with
    ``selectinload(A.bs)`` was refused (``b``'s root appeared after the read began) and only the
    second was stored. Making a root exist that nothing depends on yet changes no entry."""
    seen: set[Mapper[Any]] = set()
    todo = list(mappers)
    names: set[str] = set()
    while todo and len(names) < _RELATED_LIMIT:
        mapper = todo.pop()
        if mapper in seen:
            continue
        seen.add(mapper)
        names.update(deps_mod.table_name(t) for t in mapper.tables)
        for rel in mapper.relationships:
            if not every and rel.lazy not in _EAGER:
                continue
            if rel.secondary is not None and isinstance(rel.secondary, Table):
                names.add(deps_mod.table_name(rel.secondary))
            todo.append(rel.mapper)
    return frozenset(deps_mod.table_dep(n) for n in names)


@event.listens_for(Mapper, "after_mapper_constructed")
def _remapped(mapper: Mapper[Any], class_: type) -> None:
    """A class mapped anew (its mapping disposed of, as ``clear_mappers()`` does, and made again):
    entries naming it decode with its new mapper, found again in its registry on first use."""
    path = class_path(class_)
    _by_path.pop((mapper.registry, path), None)
    anywhere = _by_path.get((None, path))
    if anywhere is not None and anywhere.class_ is class_:
        del _by_path[(None, path)]


def mapper_for_path(path: str, near: Mapper[Any] | None) -> Mapper[Any]:
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


KNOWN = "sqlacache.loaded"  # key in InstanceState.info: (values as loaded, generation)


def remember(state: Any, values: dict[str, Any], generation: int | None) -> None:
    """Keep what an object looked like when the database (or a valid entry) produced it, and the
    generation that data is at least as fresh as: a later result containing the object can then be
    stored from these values, at that (older) generation."""
    if generation is None or generation < 0:
        return
    info = state.info
    known = info.get(KNOWN)
    if known is not None:
        values = {**known[0], **values}
        generation = min(generation, known[1])
    info[KNOWN] = (values, generation)
