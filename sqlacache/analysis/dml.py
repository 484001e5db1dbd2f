"""Writes that bypass the unit of work: which rows a Core or ORM-bulk INSERT/UPDATE/DELETE touched.

From the compiled statement and the parameters it ran with, as row images (see ``dependencies``):
an INSERT's new rows from its VALUES; an UPDATE's or DELETE's old rows from the conjunctions its
WHERE proves (``conditions``), and an UPDATE's new rows from those plus its SET. ``None`` means the
rows cannot be told (INSERT … SELECT, multi-VALUES, a WHERE with nothing provable): the caller then
evicts by table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.engine import Dialect
from sqlalchemy.sql import visitors
from sqlalchemy.sql.dml import Delete, Insert, Update
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.schema import Column, Table

from sqlacache import _sa
from sqlacache._lru import LRU
from sqlacache.analysis import dependencies as deps_mod
from sqlacache.analysis.canon import NULL_TOKEN, token
from sqlacache.analysis.conditions import Analysis, analyse_where, resolve

# (dependencies to bump, row images, whether some rows' keys are unknown)
Effects = tuple[list[str], list[deps_mod.RowImage], bool]

_analyses: LRU[Any, tuple[Analysis, frozenset[str]]] = LRU(1024)


def effects(
    compiled: Any, parameters: Sequence[Mapping[str, Any]], dialect: Dialect, in_limit: int
) -> Effects | None:
    """(dependencies to bump, row images) of one executed DML statement on its own table;
    ``parameters`` are the execution's compiled parameters (keyed by rendered bind names)."""
    statement = compiled.statement
    names = compiled.bind_names
    # Also key every value by its bind's own key, which is what the analysis refers to.
    parameters = [{**p, **{b.key: p[n] for b, n in names.items() if n in p}} for p in parameters]
    table = _sa.deannotate(statement.table)
    if not isinstance(table, Table):
        return None
    name = deps_mod.table_name(table)
    pk = [c.name for c in table.primary_key.columns]
    deps = [deps_mod.table_dep(name)]
    images: list[deps_mod.RowImage] = []

    keyless = [False]

    def keyed(image: dict[str, str]) -> None:
        # A row whose key we know bumps its keyed reads only; the caller decides for the others
        # (every keyed read of the table, unless RETURNING tells their keys).
        if pk and all(c in image and image[c] != NULL_TOKEN for c in pk):
            deps.append(deps_mod.row_dep(name, [image[c] for c in pk]))
        else:
            keyless[0] = True

    if isinstance(statement, Insert):
        if statement.select is not None or _sa.multi_values(statement):
            return None
        for params in parameters:
            image = _tokens(table, _insert_values(statement, params, table), dialect)
            images.append((name, image, None))
            keyed(image)
        return deps, images, keyless[0]
    if not isinstance(statement, (Update, Delete)):
        return None
    memo = _analyses.get(statement)
    if memo is None:
        where_keys = (
            frozenset(b.key for b in visitors.iterate(statement.whereclause) if isinstance(b, BindParameter))
            if statement.whereclause is not None
            else frozenset()
        )
        memo = (analyse_where(table, statement.whereclause, deps_mod.table_name), where_keys)
        _analyses.put(statement, memo)
    analysis, where_keys = memo
    for params in parameters:
        found = resolve(analysis, (), params, dialect, in_limit).get(name)
        if found is None:
            return None
        new_values = (
            _set_values(statement, params, table, where_keys) if isinstance(statement, Update) else None
        )
        for conjunction in found:
            images.append((name, dict(conjunction), None))
            keyed(conjunction)
            if new_values is not None:
                new = {c: t for c, t in conjunction.items() if c not in new_values}
                new.update(
                    _tokens(table, {c: v for c, v in new_values.items() if v is not _UNKNOWN}, dialect)
                )
                images.append((name, new, None))
                keyed(new)
    return deps, images, keyless[0]


_UNKNOWN: Any = object()


def returned_key_positions(compiled: Any, table: Table) -> list[int] | None:
    """Where the primary key sits in the rows the execution context will keep after a RETURNING
    (``return_defaults``, which the ORM's ``synchronize_session="fetch"`` adds where RETURNING
    works); None when it won't keep them."""
    returning = getattr(compiled, "effective_returning", None)
    if not returning:
        return None
    names = [getattr(c, "name", None) for c in returning]
    try:
        return [names.index(c.name) for c in table.primary_key.columns]
    except ValueError:
        return None


def _column(table: Table, key: Any) -> Column[Any] | None:
    if isinstance(key, Column):
        return key if key.table is table else table.columns.get(key.key)
    found = table.columns.get(str(key))
    return found if isinstance(found, Column) else None


def _insert_values(statement: Insert, params: Mapping[str, Any], table: Table) -> dict[str, Any]:
    out: dict[str, Any] = {}
    values = _sa.dml_values(statement)
    if values:
        for key, value in values.items():
            column = _column(table, key)
            if column is not None and isinstance(value, BindParameter) and value.key in params:
                out[column.name] = params[value.key]
    for column in table.columns:
        if column.name not in out and column.key in params and (not values or column.key not in values):
            out[column.name] = params[column.key]
    return out


def _set_values(
    statement: Update, params: Mapping[str, Any], table: Table, where_keys: frozenset[str]
) -> dict[str, Any]:
    """Column name → the value it is SET to, or _UNKNOWN (an expression, a server-side onupdate)."""
    out: dict[str, Any] = {}
    values = _sa.dml_values(statement)
    if values:
        for key, value in values.items():
            column = _column(table, key)
            if column is None:
                continue
            known = isinstance(value, BindParameter) and value.key in params
            out[column.name] = params[value.key] if known else _UNKNOWN
    else:
        for column in table.columns:
            if column.key in params and column.key not in where_keys:
                out[column.name] = params[column.key]
    for column in table.columns:
        if (column.onupdate is not None or column.server_onupdate is not None) and column.name not in out:
            out[column.name] = params.get(column.key, _UNKNOWN)
    return out


def _tokens(table: Table, values: Mapping[str, Any], dialect: Dialect) -> dict[str, str]:
    out: dict[str, str] = {}
    by_name = {c.name: c for c in table.columns}
    for name, value in values.items():
        column = by_name.get(name)
        if column is None or not deps_mod.column_nameable(name):
            continue
        t = NULL_TOKEN if value is None else token(column.type, value, dialect)
        if t is not None:
            out[name] = t
    return out
