"""What one executed statement writes: its tables, and which of their reads it invalidates.

Shared by the two places that see statements run: a session's connections (``tracker``) and engine
connections outside any session (``connection_writes``). Compiled Core and ORM-bulk DML is analysed
row by row (``dml``); raw SQL, ``text()`` and DDL by the tables it names (``dependencies``), with
the tables the database changes in turn (ON DELETE/UPDATE actions, TRUNCATE … CASCADE).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table
from sqlalchemy.sql.elements import TextClause

from sqlacache import _sa
from sqlacache._lru import LRU
from sqlacache.analysis import canon, dml
from sqlacache.analysis import dependencies as deps_mod

log = logging.getLogger("sqlacache.tracker")


@dataclass(slots=True)
class Written:
    """The tables a statement writes (``None``: it can't be told), and for compiled DML its table."""

    tables: set[str] | None
    compiled: Any = None  # the compiled INSERT/UPDATE/DELETE, when the statement is one
    table: Any = None  # its target table (deannotated), a Table or a lightweight table()
    ddl: bool = False  # changes a table's definition, or empties it (TRUNCATE)


@dataclass(slots=True)
class Effects:
    """What to invalidate when the statement's transaction commits."""

    deps: list[str] = field(default_factory=list)
    rows: list[deps_mod.RowImage] = field(default_factory=list)
    # (execution context, table, primary key positions, dialect): keys RETURNING will tell by then.
    returning: list[Any] = field(default_factory=list)


_DDL = re.compile(r"^\s*(?:CREATE|DROP|ALTER|TRUNCATE|RENAME)\b", re.I)
_CASCADE = re.compile(r"\bCASCADE\b", re.I)


def written(statement: str, context: Any) -> Written | None:
    """What the statement ``context`` ran writes; None if it writes nothing."""
    compiled = context.compiled
    if compiled is not None and (context.isinsert or context.isupdate or context.isdelete):
        table = _sa.deannotate(compiled.statement.table)  # ORM statements carry annotated copies
        tables = {deps_mod.table_name(table)}
        if not context.isinsert and isinstance(table, Table):
            tables |= deps_mod.cascade_closure(table, "delete" if context.isdelete else "update")
        return Written(tables, compiled, table)
    if compiled is not None and not context.isddl and not isinstance(compiled.statement, TextClause):
        return None  # a compiled SELECT
    found = deps_mod.written_tables(statement)
    if found is not None and not found:
        return None
    ddl = bool(context.isddl or _DDL.match(statement))
    if found is not None:
        verb = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else ""
        # ON DELETE actions follow deletes (and REPLACE, which deletes); ON UPDATE ones updates.
        ops = {"UPDATE": ("update",), "INSERT": ()}.get(verb, ("delete", "update"))
        for name in list(found):
            for table in deps_mod.tables_named(name):
                for op in ops:
                    found |= deps_mod.cascade_closure(table, op)
                if verb == "TRUNCATE" and _CASCADE.search(statement):
                    found |= deps_mod.referencing_closure(table)  # emptied whatever their keys say
    return Written(found, ddl=ddl)


def effects(found: Written, context: Any, dialect: Any, precise: bool, in_limit: int) -> Effects:
    """The invalidation of a statement whose tables are known (``found.tables`` is not None)."""
    out = Effects()
    rows = None
    if precise and found.compiled is not None:
        rows = dml.effects(found.compiled, context.compiled_parameters, dialect, in_limit)
    own = deps_mod.table_name(found.table) if rows is not None else None
    if rows is not None:
        out.deps, out.rows, keyless = rows
        if keyless:
            positions = dml.returned_key_positions(found.compiled, found.table)
            if positions is not None:
                out.returning.append((context, found.table, positions, dialect))
            else:
                out.deps.append(deps_mod.allrows_dep(deps_mod.table_name(found.table)))
    for name in found.tables or ():
        if name != own:
            out.deps += deps_mod.unknown_rows_write_deps(name)  # rows we cannot name (or cascaded)
    return out


def returned_keys(context: Any, table: Table, positions: list[int], dialect: Any) -> list[str]:
    """The keyed reads of the rows a statement's RETURNING named (all of the table's if it kept
    none: an explicit ``.returning()`` hands its rows to the caller, not to us)."""
    name = deps_mod.table_name(table)
    rows = getattr(context, "returned_default_rows", None)
    if not rows:
        return [deps_mod.allrows_dep(name)] if rows is None else []
    columns = list(table.primary_key.columns)
    out = []
    for row in rows:
        tokens = []
        for column, position in zip(columns, positions):
            value = row[position] if position < len(row) else None
            found = None if value is None else canon.token(column.type, value, dialect)
            if found is None:
                return [deps_mod.allrows_dep(name)]
            tokens.append(found)
        out.append(deps_mod.row_dep(name, tokens))
    return out


_warned: LRU[str, bool] = LRU(1024)


def warn_unknown(statement: str) -> None:
    """Once per statement shape (its text, which carries placeholders rather than values)."""
    if _warned.get(statement) is None:
        _warned.put(statement, True)
        log.warning(
            "sqlacache: cannot tell which tables %r writes; its commit evicts every cached read of "
            "this database. Use cache.invalidate(tables=...) after it instead, or cache=False reads.",
            statement[:200],
        )
