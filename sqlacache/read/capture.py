"""Capture: which objects the current read created from database rows, encoded as a payload.

Objects are taken at the moment the ORM created them from rows (the ``load`` event). Objects that
were already in the session's identity map are never trusted as a source: they may carry pending
changes or an older transaction's view. A result that contains one is simply not stored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import event
from sqlalchemy.orm import Mapper
from sqlalchemy.orm.base import instance_state
from sqlalchemy.orm.relationships import RelationshipProperty
from sqlalchemy.sql import visitors
from sqlalchemy.sql.schema import Table

from sqlacache import _sa
from sqlacache.analysis import dependencies as deps_mod
from sqlacache.analysis import rowtokens
from sqlacache.analysis.codec import CodecError, ValueCodec
from sqlacache.context import Frame, SessionContext
from sqlacache.keys import class_path
from sqlacache.layout import KNOWN, MapperLayout, layout_of
from sqlacache.read.plan import ENTITY

if TYPE_CHECKING:
    pass


PAYLOAD_FORMAT = 1

# mapper → the column attributes never stored (security/exclude.py)
Excluded = Callable[[Mapper[Any]], frozenset[str]]


class Unstorable(Exception):
    """The result can't be reproduced faithfully from a cache entry; it is served, not stored."""


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
class Graph:
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
    roots: Sequence[Any], frame: Frame, graph: Graph, oldest: list[int], excluded: Excluded
) -> tuple[list[Any], dict[int, int]]:
    """The entity table of a payload. Objects this read created are encoded from what it loaded;
    objects that were already in the session from what they were loaded with, lowering ``oldest``
    to that load's generation. Anything else raises Unstorable. Columns ``excluded`` names for a
    mapper are left out (a hit expires them: they load from the database on access)."""
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
            remembered = state.info.get(KNOWN) if "info" in state.__dict__ else None
            if remembered is None:
                raise Unstorable("the result includes an object loaded outside the cache")
            loaded, generation = remembered
            oldest[0] = min(oldest[0], generation)
        for key, fn in state.callables.items():
            # defer()/load_only() loaders are reproduced on a hit (the attribute is expired);
            # anything else (raiseload, per-query lazy options) is not.
            if not isinstance(fn, _sa.DEFERRED_COLUMN_LOADERS) or getattr(fn, "raiseload", False):
                raise Unstorable(f"a loader option installed a per-object loader on {key!r}")
        layout = layout_of(state.mapper)
        graph.row(state, layout, loaded, related)
        slot = len(table)
        index[id(obj)] = slot
        skip = excluded(state.mapper)
        try:
            encoded = {k: layout.columns[k].encode(v) for k, v in loaded.items() if k not in skip}
        except CodecError as exc:
            raise _named(exc, state.mapper, loaded) from exc
        entry: list[Any] = [class_path(state.class_), encoded, {}]
        table.append(entry)
        rels: dict[str, Any] = {}
        dict_ = state.dict
        for key, prop in layout.relationships.items():
            if key not in dict_:
                continue
            if key in state.committed_state:
                raise Unstorable(f"relationship {key!r} has changes not flushed")
            covered = graph.relationship(prop, loaded)
            value = dict_[key]
            if prop.uselist:
                if not isinstance(value, (list, set)):
                    raise Unstorable(f"collection class of {key!r} is not a list or set")
                rels[key] = [ref(v, None if covered else True) for v in value]
            else:
                rels[key] = ref(value, None if covered else True)
        entry[2] = rels
        return slot

    for obj in roots:
        ref(obj, False)
    return table, index


def _none(mapper: Mapper[Any]) -> frozenset[str]:
    return frozenset()


def _named(exc: CodecError, mapper: Any, loaded: dict[str, Any]) -> CodecError:
    """``exc`` with the attribute and column type it came from (found again: the error path only)."""
    layout = layout_of(mapper)
    # In the mapping's order, not the load's (which differs between processes): with several
    # values refused, every process names the same column, each with its own error.
    for prop in mapper.column_attrs:
        key = prop.key
        if key not in loaded:
            continue
        try:
            layout.columns[key].encode(loaded[key])
        except CodecError as own:
            return CodecError(f"{mapper.class_.__name__}.{key} ({prop.columns[0].type!r}): {own}")
    return exc


def _named_column(
    exc: CodecError, data: Sequence[Any], columns: list[ValueCodec | None], labels: Sequence[str]
) -> CodecError:
    """``exc`` with the result column it came from (found again: the error path only)."""
    for row in data:
        for i, (v, c) in enumerate(zip(row, columns)):
            if c is not None:
                try:
                    c.encode(v)
                except CodecError:
                    label = labels[i] if i < len(labels) else f"#{i + 1}"
                    return CodecError(f"column {label}: {exc}")
    return exc


def encode_result(
    data: Sequence[Any],
    single: bool,
    columns: list[ValueCodec | None],
    frame: Frame,
    graph: Graph,
    excluded: Excluded = _none,
    labels: Sequence[str] = (),
) -> tuple[bytes, int]:
    """(payload bytes, the generation to store it at) for a result's rows (objects when ``single``,
    else tuples); what the graph read goes into ``graph``."""
    if frame.unstorable:
        raise Unstorable(frame.unstorable)
    if frame.generation is None:
        raise Unstorable("no generation: the backend was unavailable when the read began")
    oldest = [frame.generation]
    if single:
        table, index = _encode_entities(data, frame, graph, oldest, excluded)
        rows: list[Any] = [None if o is None else index[id(o)] for o in data]
    else:
        roots = [v for row in data for v, c in zip(row, columns) if c is ENTITY and v is not None]
        table, index = _encode_entities(roots, frame, graph, oldest, excluded)
        try:
            rows = [
                [
                    (None if v is None else index[id(v)]) if c is None else c.encode(v)
                    for v, c in zip(row, columns)
                ]
                for row in data
            ]
        except CodecError as exc:
            raise _named_column(exc, data, columns, labels) from exc
    return orjson.dumps([PAYLOAD_FORMAT, table, rows]), oldest[0]
