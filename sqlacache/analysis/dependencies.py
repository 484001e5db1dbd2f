"""Pure analysis: what a cached read depends on, and what a write invalidates.

Dependency names (what backends version):
  ``t:<table>``                   reads of any row of the table (no provable conditions);
  ``c:<table>:<cols>:<tokens>``   reads of the rows whose columns ``<cols>`` (sorted, comma-joined)
                                  hold the values of ``<tokens>`` (see ``canon``);
  ``s:<table>``                   every condition read of the table, and its scheme registry;
  ``r:<table>:<tokens>``          one row by primary key (including a cached "not found");
  ``a:<table>``                   "all rows": bumped by writes whose rows we cannot name;
  ``d:<database>``                every read of one database: bumped by raw SQL we cannot understand;
  ``*``                           everything (``Cache.invalidate_all``, a failure to record a write).
A read depends on ``*``, ``d:`` of its database and, per table it read: ``t:``; or ``s:`` plus one ``c:`` per
conjunction of its conditions; or, when a conjunction pins the primary key, ``r:`` plus ``a:``.
A row write bumps ``r:`` and ``t:`` and hands the backend its old and new column tokens, from
which the backend bumps the ``c:`` of every registered scheme (or ``s:`` when a value is unknown).
A write whose rows are unknown bumps ``a:``, ``t:`` and ``s:``.
"""

from __future__ import annotations

import functools
import hashlib
import re
import weakref
from collections.abc import Iterable, Mapping, Sequence

from sqlalchemy import Table
from sqlalchemy.sql.schema import ForeignKeyConstraint, MetaData
from sqlalchemy.sql.selectable import TableClause

ALL = "*"

# A row image: (table, {column name: token}, guard) with the columns whose values are known. A
# guard g says the values are only known to be current if the table had no committed write since
# generation g (values an ORM object was loaded with); None: they are exact (written values).
RowImage = tuple[str, dict[str, str], int | None]


def table_name(table: TableClause) -> str:
    schema = getattr(table, "schema", None)
    name = f"{schema}.{table.name}" if schema else table.name
    return name.lower()


def table_dep(name: str) -> str:
    return f"t:{name}"


def allrows_dep(name: str) -> str:
    return f"a:{name}"


def scheme_dep(name: str) -> str:
    return f"s:{name}"


def row_dep(name: str, pk_tokens: Sequence[str]) -> str:
    return f"r:{name}:{','.join(pk_tokens)}"


def condition_dep(name: str, conjunction: Mapping[str, str]) -> str:
    columns = sorted(conjunction)
    return f"c:{name}:{','.join(columns)}:{','.join(conjunction[c] for c in columns)}"


def database_dep(database_id: str) -> str:
    """Every read of one database: bumped by raw SQL on it that we cannot understand."""
    return f"d:{hashlib.blake2b(database_id.encode(), digest_size=8).hexdigest()}"


def table_of_dep(dep: str) -> str | None:
    """The table a dependency belongs to (for the session's read-your-writes check)."""
    if dep == ALL or dep.startswith("d:"):
        return None
    kind, _, rest = dep.partition(":")
    if kind == "r" or kind == "c":
        return rest.split(":", 1)[0]
    return rest


def table_read_deps(tables: Iterable[str]) -> list[str]:
    return [ALL, *sorted({table_dep(t) for t in tables})]


_RESERVED = frozenset(":,|\x1f\n")


def column_nameable(name: str) -> bool:
    """Whether a column's name can appear in a condition dependency (the backends split on these)."""
    return not any(c in _RESERVED for c in name)


def keyable(name: str) -> bool:
    """Whether a table's name can carry row and condition dependencies (backends split on ':')."""
    return ":" not in name


def pk_read_deps(tables: Iterable[str], pk_tokens: Sequence[str]) -> list[str]:
    names = sorted(set(tables))
    if not all(keyable(n) for n in names):
        return table_read_deps(names)
    return [ALL, *(row_dep(t, pk_tokens) for t in names), *(allrows_dep(t) for t in names)]


def condition_read_deps(
    conditions: Mapping[str, list[dict[str, str]] | None], pk_columns: Mapping[str, Sequence[str]]
) -> list[str]:
    """Dependencies of a read whose rows, per table, satisfy one of the conjunctions (None: any)."""
    out = {ALL}
    for name, conjunctions in conditions.items():
        if conjunctions is None or not keyable(name):
            out.add(table_dep(name))
            continue
        pk = pk_columns.get(name) or ()
        for conjunction in conjunctions:
            if pk and all(c in conjunction for c in pk):
                out.add(row_dep(name, [conjunction[c] for c in pk]))
                out.add(allrows_dep(name))
            else:
                out.add(condition_dep(name, conjunction))
                out.add(scheme_dep(name))
    return sorted(out)


def row_write_deps(table: str, pk_tokens: Sequence[str] | None) -> list[str]:
    if pk_tokens is None or not keyable(table):  # a key we cannot canonicalise: every keyed read
        return unknown_rows_write_deps(table)
    return [row_dep(table, pk_tokens), table_dep(table)]


def unknown_rows_write_deps(table: str) -> list[str]:
    return [allrows_dep(table), table_dep(table), scheme_dep(table)]


_known: weakref.WeakSet[MetaData] = weakref.WeakSet()


def register_metadata(metadata: MetaData | None) -> None:
    """Remember a schema, so raw SQL naming one of its tables can find its foreign keys."""
    if metadata is not None:
        _known.add(metadata)


def tables_named(name: str) -> list[Table]:
    return [t for md in list(_known) for t in md.tables.values() if table_name(t) == name]


def cascade_closure(table: Table, op: str, changed: Iterable[str] | None = None) -> frozenset[str]:
    """Every table the database may change through ON DELETE/UPDATE actions, transitively.
    ``changed=None`` means the updated columns are unknown (assume any)."""
    metadata = table.metadata
    # Memoized per schema size: a table added to the schema later is never missed.
    return _cascade_closure(table, op, None if changed is None else frozenset(changed), len(metadata.tables))


@functools.lru_cache(maxsize=4096)
def _cascade_closure(
    table: Table, op: str, changed: frozenset[str] | None, _schema_size: int
) -> frozenset[str]:
    out: set[str] = set()
    todo = [(table, op, changed)]
    seen: set[int] = set()
    while todo:
        current, current_op, current_changed = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for name, child in cascade_targets(current, current_op, current_changed):
            out.add(name)
            # A cascaded delete deletes; SET NULL / SET DEFAULT / CASCADE on update update.
            todo.append((child, current_op, None))
    return frozenset(out)


def referencing_closure(table: Table) -> frozenset[str]:
    """Every table whose foreign keys refer to ``table``, transitively (what TRUNCATE … CASCADE empties)."""
    return _referencing_closure(table, len(table.metadata.tables))


@functools.lru_cache(maxsize=1024)
def _referencing_closure(table: Table, _schema_size: int) -> frozenset[str]:
    out: set[str] = set()
    todo = [table]
    seen: set[int] = set()
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for other in current.metadata.tables.values():
            if any(
                isinstance(c, ForeignKeyConstraint) and c.referred_table is current for c in other.constraints
            ):
                out.add(table_name(other))
                todo.append(other)
    return frozenset(out)


def cascade_targets(table: Table, op: str, changed: Iterable[str] | None = None) -> list[tuple[str, Table]]:
    """Tables the database itself changes when rows of ``table`` are deleted (ON DELETE actions) or
    their referenced columns updated (ON UPDATE actions)."""
    metadata: MetaData | None = table.metadata
    if metadata is None:
        return []
    changed_set = None if changed is None else set(changed)
    out: list[tuple[str, Table]] = []
    for other in metadata.tables.values():
        for constraint in other.constraints:
            if not isinstance(constraint, ForeignKeyConstraint) or constraint.referred_table is not table:
                continue
            if (op == "delete" and constraint.ondelete) or (
                op == "update"
                and constraint.onupdate
                and (changed_set is None or any(fk.column.name in changed_set for fk in constraint.elements))
            ):
                out.append((table_name(other), other))
    return out


_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)
_DOLLAR_QUOTED = re.compile(r"\$(\w*)\$.*?\$\1\$", re.DOTALL)  # PostgreSQL function bodies
_IDENT = r'(?:"[^"]+"|`[^`]+`|\[[^\]]+\]|[A-Za-z_][\w$]*)'
_NAME = rf"({_IDENT}(?:\s*\.\s*{_IDENT})*)"
_WRITES = [
    re.compile(
        rf"^\s*(?:INSERT|REPLACE)\s+(?:OR\s+\w+\s+|IGNORE\s+|LOW_PRIORITY\s+|DELAYED\s+)*(?:INTO\s+)?{_NAME}",
        re.I,
    ),
    re.compile(rf"^\s*UPDATE\s+(?:OR\s+\w+\s+|ONLY\s+|LOW_PRIORITY\s+|IGNORE\s+)*{_NAME}", re.I),
    re.compile(rf"^\s*DELETE\s+(?:LOW_PRIORITY\s+|QUICK\s+|IGNORE\s+)*FROM\s+(?:ONLY\s+)?{_NAME}", re.I),
    re.compile(rf"^\s*MERGE\s+INTO\s+{_NAME}", re.I),
    re.compile(rf"^\s*ALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?{_NAME}", re.I),
    # A table created (again, after a drop that was not seen) has none of the rows cached for its name.
    re.compile(rf"^\s*CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?{_NAME}", re.I),
    re.compile(rf"^\s*CREATE\s+(?:OR\s+REPLACE\s+)?VIEW\s+(?:IF\s+NOT\s+EXISTS\s+)?{_NAME}", re.I),
]
_LISTS = [  # statements naming several tables, comma-separated
    re.compile(rf"^\s*TRUNCATE\s+(?:TABLE\s+)?(?:ONLY\s+)?({_NAME}(?:\s*,\s*{_NAME})*)", re.I),
    re.compile(rf"^\s*DROP\s+(?:TABLE|VIEW)\s+(?:IF\s+EXISTS\s+)?({_NAME}(?:\s*,\s*{_NAME})*)", re.I),
]
# ALTER TABLE t RENAME TO u: reads of u (a table dropped earlier, say) go too.
_RENAME_TO = re.compile(rf"\bRENAME\s+TO\s+{_NAME}", re.I)
_READ_ONLY = re.compile(
    r"^\s*(?:SELECT|SHOW|EXPLAIN|VALUES|PRAGMA|DESCRIBE|DESC|SET|RESET|BEGIN|START|COMMIT|ROLLBACK|"
    r"SAVEPOINT|RELEASE|LOCK|ANALYZE|CREATE\s+(?:TEMP|TEMPORARY)\s|CREATE\s+INDEX|"
    r"CREATE\s+UNIQUE\s+INDEX|DROP\s+INDEX|CREATE\s+TRIGGER|DROP\s+TRIGGER|"
    # A trigger function changes no data by being defined, and no query can call it.
    r"CREATE\s+(?:OR\s+REPLACE\s+)?FUNCTION\s+[^(]+\(\s*\)\s+RETURNS\s+TRIGGER|"
    r"LISTEN|UNLISTEN|NOTIFY|DISCARD|DEALLOCATE|PREPARE|USE)\b",
    re.I,
)
_WRITE_WORD = re.compile(r"\b(?:INSERT|UPDATE|DELETE|MERGE|TRUNCATE|REPLACE|ALTER|DROP)\b", re.I)


def _names(raw: str) -> set[str]:
    parts = [p.strip().strip('"`[]') for p in re.split(r"\s*\.\s*", raw.strip())]
    qualified = ".".join(parts).lower()
    # "public.users" may be the Table("users") of the default schema: name both.
    return {qualified, parts[-1].lower()}


def written_tables(sql: str) -> set[str] | None:
    """Tables a raw SQL string writes: an empty set for reads, None when it cannot be told."""
    out: set[str] = set()
    for statement in _DOLLAR_QUOTED.sub("''", _COMMENTS.sub(" ", sql)).split(";"):
        if not statement.strip():
            continue
        for pattern in _WRITES:
            match = pattern.match(statement)
            if match:
                out |= _names(match.group(1))
                renamed = _RENAME_TO.search(statement)
                if renamed:
                    out |= _names(renamed.group(1))
                break
        else:
            match = next((m for m in (p.match(statement) for p in _LISTS) if m), None)
            if match:
                for raw in re.split(r"\s*,\s*", match.group(1)):
                    out |= _names(raw)
            elif _READ_ONLY.match(statement):
                # A read that embeds a write (WITH … UPDATE, SELECT … INTO) is not understood.
                if statement.lstrip()[:6].upper() == "SELECT" and re.search(r"\bINTO\b", statement, re.I):
                    return None
                continue
            elif re.match(r"^\s*WITH\b", statement, re.I):
                if _WRITE_WORD.search(statement):
                    return None
            else:
                return None
    return out
