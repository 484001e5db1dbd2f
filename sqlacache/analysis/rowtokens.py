"""Rows as tokens: what the write path and the read path say about one mapped row.

The write path turns a written row into images ``(table, {column: token})`` for the backend to
match against condition dependencies; the read path names the rows a loaded object graph depends
on (its related rows by key, the membership of its relationships by condition). Both must
canonicalise exactly alike, so both go through here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Mapper
from sqlalchemy.orm.relationships import RelationshipProperty
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import BinaryExpression, BooleanClauseList
from sqlalchemy.sql.schema import Column
from sqlalchemy.sql.type_api import TypeEngine
from sqlalchemy.util import symbol

from sqlacache.analysis import dependencies as deps_mod
from sqlacache.analysis.canon import NULL_TOKEN, token


@dataclass(frozen=True, slots=True)
class TableColumns:
    name: str  # dependency name of the table
    columns: tuple[tuple[str, str, TypeEngine[Any]], ...]  # (column name, attribute key, type)
    pk: tuple[str, ...]  # primary key column names


@dataclass(frozen=True, slots=True)
class MapperColumns:
    tables: tuple[TableColumns, ...]
    pk_types: tuple[TypeEngine[Any], ...]  # of the mapper's primary key, in identity order


_memo: dict[Mapper[Any], MapperColumns] = {}


def columns_of(mapper: Mapper[Any]) -> MapperColumns:
    found = _memo.get(mapper)
    if found is None:
        tables = []
        for table in mapper.tables:
            columns = []
            for column in table.columns:
                if not deps_mod.column_nameable(column.name):
                    continue  # cannot appear in a dependency name: conditions on it widen
                try:
                    prop = mapper.get_property_by_column(column)
                except Exception:  # a column this mapper doesn't map
                    continue
                columns.append((column.name, prop.key, column.type))
            pk = tuple(c.name for c in getattr(table, "primary_key", ()))
            tables.append(TableColumns(deps_mod.table_name(table), tuple(columns), pk))
        found = MapperColumns(tuple(tables), tuple(c.type for c in mapper.primary_key))
        _memo[mapper] = found
    return found


def _known(value: Any) -> bool:
    # NO_VALUE, NEVER_SET… are int subclasses: never mistake one for a column value.
    return not isinstance(value, symbol)


def pk_tokens(mapper: Mapper[Any], pk: Sequence[Any], dialect: Dialect) -> list[str] | None:
    types = columns_of(mapper).pk_types
    if len(types) != len(pk):
        return None
    out = []
    for type_, value in zip(types, pk):
        if value is None or not _known(value):
            return None
        t = token(type_, value, dialect)
        if t is None:
            return None
        out.append(t)
    return out


def images(
    mapper: Mapper[Any], values: Mapping[str, Any], dialect: Dialect, guard: int | None = None
) -> list[deps_mod.RowImage]:
    """One image per table of the mapper, with the columns whose values are known (by attribute key)."""
    out = []
    for table in columns_of(mapper).tables:
        if not deps_mod.keyable(table.name):
            continue  # its reads are table-level, which the write's table dependency covers
        image: dict[str, str] = {}
        for name, key, type_ in table.columns:
            if key not in values:
                continue
            value = values[key]
            if not _known(value):
                continue
            t = NULL_TOKEN if value is None else token(type_, value, dialect)
            if t is not None:
                image[name] = t
        out.append((table.name, image, guard))
    return out


# -- relationships ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Pairs:
    """How a relationship's membership is decided: remote columns equal to the parent's attributes."""

    remote: str  # dependency name of the table the pairs constrain (target or secondary)
    remote_pk: tuple[str, ...]
    pairs: tuple[tuple[str, str, TypeEngine[Any]], ...]  # (parent attribute key, remote column, type)


_pairs_memo: dict[RelationshipProperty[Any], _Pairs | None] = {}


def _only_equalities(clause: Any) -> bool:
    if clause is None:
        return True
    if isinstance(clause, BooleanClauseList) and clause.operator is operators.and_:
        return all(_only_equalities(c) for c in clause.clauses)
    return isinstance(clause, BinaryExpression) and clause.operator is operators.eq


def _pairs_of(prop: RelationshipProperty[Any]) -> _Pairs | None:
    if prop in _pairs_memo:
        return _pairs_memo[prop]
    found: _Pairs | None = None
    try:
        if _only_equalities(prop.primaryjoin) and _only_equalities(prop.secondaryjoin):
            # (parent column, remote column): to the target, or to the association table.
            raw = prop.synchronize_pairs if prop.secondary is not None else prop.local_remote_pairs
            pairs: list[tuple[str, str, TypeEngine[Any]]] = []
            remote_tables: dict[str, Any] = {}
            for local, remote in raw or []:
                if not isinstance(remote, Column) or not deps_mod.column_nameable(remote.name):
                    pairs = []
                    break
                key = prop.parent.get_property_by_column(local).key
                pairs.append((key, remote.name, remote.type))
                remote_tables[deps_mod.table_name(remote.table)] = remote.table
            if pairs and len(remote_tables) == 1:
                ((name, table),) = remote_tables.items()
                found = _Pairs(name, tuple(c.name for c in table.primary_key.columns), tuple(pairs))
    except Exception:  # an unusual relationship: its membership is "any row of its tables"
        found = None
    _pairs_memo[prop] = found
    return found


def membership_deps(
    prop: RelationshipProperty[Any], parent_values: Mapping[str, Any], dialect: Dialect
) -> list[str] | None:
    """What decides which rows this relationship holds for this parent: the condition every member
    (or association) row satisfies. None when it cannot be told (read the tables whole instead)."""
    pairs = _pairs_of(prop)
    if pairs is None:
        return None
    conjunction: dict[str, str] = {}
    for key, column, type_ in pairs.pairs:
        value = parent_values.get(key)
        if value is None:
            return []  # a NULL key relates to no row: only the parent's own row decides
        if not _known(value):
            return None
        t = token(type_, value, dialect)
        if t is None:
            return None
        conjunction[column] = t
    return deps_mod.condition_read_deps({pairs.remote: [conjunction]}, {pairs.remote: pairs.remote_pk})
