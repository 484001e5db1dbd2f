"""Columns that never leave the process: kept out of every cache entry.

A column is excluded when its model's rule names it (``models={User: {"exclude": [...]}}``), when
its name or ``table.column`` matches a pattern of ``Cache(exclude_columns=[...])`` (``fnmatch``,
case-insensitive), or when the column is marked ``info={"sqlacache": "never"}``.

* An ORM object is cached without its excluded columns; rebuilt from the cache, they are expired,
  so the first access loads them from the database (as a ``defer()`` column would be).
* A statement that names an excluded column itself (selects it as a value, filters or orders by
  it: its value could reach a key, a dependency name or a payload) is never cached.
"""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy.orm import Mapper
from sqlalchemy.sql import visitors
from sqlalchemy.sql.schema import Column
from sqlalchemy.sql.type_api import TypeEngine

from sqlacache._lru import LRU
from sqlacache.policy import ConfigurationError, Policy

MARK = "never"

# (table, {column: token}, guard): a written row as the backend's bump takes it.
RowImage = tuple[str, Mapping[str, str], "int | None"]


def _base_name(column: Any) -> tuple[str, str]:
    table = getattr(column, "table", None)
    table = getattr(table, "element", table)  # an alias names the table it aliases
    return str(getattr(table, "name", "") or "").lower(), str(column.name).lower()


class Exclusions:
    """Which columns of which mappers stay out of the cache (memoised per mapper and per column)."""

    def __init__(self, policy: Policy, patterns: Iterable[str]) -> None:
        if isinstance(patterns, str) or not isinstance(patterns, Iterable):
            raise ConfigurationError(
                f"exclude_columns={patterns!r}: give a list of column names or patterns, "
                "e.g. ['hashed_password', '*_token', 'users.email']"
            )
        found = []
        for p in patterns:
            if not isinstance(p, str) or not p.strip():
                raise ConfigurationError(
                    f"exclude_columns: {p!r} is not a column name or pattern; give non-empty strings "
                    "like 'hashed_password' or '*_secret'"
                )
            found.append(p.strip().lower())
        self.patterns = tuple(found)
        self.policy = policy
        self._mappers: dict[Mapper[Any], frozenset[str]] = {}
        self._columns: dict[tuple[str, str], bool] = {}
        self._lock = threading.Lock()
        self._shapes: LRU[str, str] = LRU(4096)  # statement shape → the excluded column it names, or ""
        # (table, column) named by a model's rule: known once that model's mapper has been seen.
        self._named: set[tuple[str, str]] = set()
        self._marked: set[str] = set()  # tables with a column marked info={"sqlacache": "never"}
        for cls, keys in policy.excluded.items():
            mapper: Any = cls.__mapper__  # type: ignore[attr-defined]
            for key in keys:
                for column in mapper.get_property(key).columns:
                    self._named.add(_base_name(column))

    def _matches(self, table: str, name: str) -> bool:
        return any(
            fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(f"{table}.{name}", p) for p in self.patterns
        )

    def of_mapper(self, mapper: Mapper[Any]) -> frozenset[str]:
        """The column attributes of ``mapper`` that are never stored."""
        found = self._mappers.get(mapper)
        if found is not None:
            return found
        keys = set(self.policy.excluded_for(mapper.class_))
        for prop in mapper.column_attrs:
            if any(isinstance(c, Column) and self.column(c) for c in prop.columns):
                keys.add(prop.key)
        found = frozenset(keys)
        with self._lock:
            self._mappers[mapper] = found
        return found

    def column(self, column: Any) -> bool:
        """Whether a table column is excluded."""
        name = _base_name(column)
        if getattr(column, "info", {}).get("sqlacache") == MARK:
            if not self._columns.get(name):
                with self._lock:
                    self._columns[name] = True
                    self._marked.add(name[0])
            return True
        found = self._columns.get(name)
        if found is None:
            found = name in self._named or self._matches(*name)
            with self._lock:
                self._columns[name] = found
        return found

    def strip(self, rows: Sequence[RowImage]) -> Sequence[RowImage]:
        """Row images without the values of excluded columns (a commit's bump carries the others
        to the backend; a missing value makes it evict every condition read of the table instead)."""
        if not (self.patterns or self._named or self._marked):
            return rows
        out = []
        for table, image, guard in rows:
            t = table.lower()
            kept = {
                c: v
                for c, v in image.items()
                if not (
                    self._columns.get((t, c.lower()))
                    or (t, c.lower()) in self._named
                    or self._matches(t, c.lower())
                )
            }
            out.append((table, kept, guard))
        return out

    def named_in(self, statement: Any, values: Iterable[Any]) -> str | None:
        """The excluded column a statement names itself (or returns as a value), if any."""
        columns = [e for e in visitors.iterate(statement) if isinstance(e, Column)]
        for expr in values:
            columns.extend(e for e in visitors.iterate(expr) if isinstance(e, Column))
        for c in columns:
            for base in getattr(c, "base_columns", None) or (c,):
                if self.column(base) or (base is not c and self.column(c)):
                    return ".".join(_base_name(base))
        return None

    def named_by(self, digest: str, statement: Any) -> str:
        """The excluded column a statement (of the shape ``digest``) names, or "": such a statement
        is never cached."""
        found = self._shapes.get(digest)
        if found is None:
            values = []
            try:
                descriptions = statement.column_descriptions
            except Exception:  # not an ORM-describable statement: its own elements are walked
                descriptions = []
            for d in descriptions:
                if isinstance(d.get("type"), TypeEngine) and d.get("expr") is not None:
                    values.append(d["expr"])
            found = self.named_in(statement, values) or ""
            self._shapes.put(digest, found)
        return found
