"""Which reads are cached, for how long, and which are never cached whatever the configuration."""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.orm import Mapper
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import BindParameter, ColumnClause, Label, TextClause
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import Exists, Select

from sqlacache import _sa
from sqlacache.analysis.literals import plain_literal

OPS = frozenset({"get", "fetch", "count", "exists"})

# Functions whose result changes between two identical executions: caching them would freeze time.
NONDETERMINISTIC = frozenset(
    {
        "now",
        "random",
        "rand",
        "current_timestamp",
        "current_date",
        "current_time",
        "localtime",
        "localtimestamp",
        "sysdate",
        "systimestamp",
        "utc_timestamp",
        "utc_date",
        "utc_time",
        "unix_timestamp",
        "clock_timestamp",
        "statement_timestamp",
        "transaction_timestamp",
        "timeofday",
        "uuid",
        "uuid_short",
        "gen_random_uuid",
        "uuid_generate_v1",
        "uuid_generate_v4",
        "random_uuid",
        "newid",
        "nextval",
        "currval",
        "lastval",
        "last_insert_id",
        "setseed",
        "txid_current",
        "pg_backend_pid",
        "connection_id",
        "current_user",
        "session_user",
        "user",
        "changes",
        "last_insert_rowid",
        "total_changes",
        "found_rows",
        "row_count",
    }
)
# SQLite's date functions are deterministic on a column but not on the string 'now': refuse them
# whenever an argument is a bound value, which is where 'now' would be.
_SQLITE_DATE_FUNCS = frozenset({"date", "time", "datetime", "julianday", "strftime", "unixepoch", "timediff"})
_LITERAL_CALL = re.compile(r"\b(" + "|".join(sorted(NONDETERMINISTIC)) + r")\b", re.IGNORECASE)


class ConfigurationError(ValueError):
    """The cache configuration is invalid; the message says what and how to fix it."""


@dataclass(frozen=True, slots=True)
class Rule:
    ops: frozenset[str]
    ttl: float


def _ops(value: Any, where: str) -> frozenset[str]:
    if value == "all":
        return OPS
    if isinstance(value, str):
        value = {value}
    if not isinstance(value, Iterable):
        raise ConfigurationError(f"{where}: 'ops' must be 'all' or a set of {sorted(OPS)}, got {value!r}")
    ops = frozenset(value)
    unknown = ops - OPS
    if unknown:
        raise ConfigurationError(
            f"{where}: unknown op(s) {sorted(unknown)}; use 'all' or a subset of {sorted(OPS)}"
        )
    return ops


def _exclude(value: Any, mapper: Mapper[Any], where: str) -> frozenset[str]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ConfigurationError(
            f"{where}: 'exclude' must be a list of column attributes, e.g. ['hashed_password']"
        )
    names = frozenset(value)
    known = {p.key for p in mapper.column_attrs}
    unknown = sorted(str(n) for n in names if n not in known)
    if unknown:
        raise ConfigurationError(
            f"{where}: 'exclude' names {unknown}, which are not column attributes of "
            f"{mapper.class_.__name__}; choose among {sorted(known)}"
        )
    return names


def ttl_value(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigurationError(
            f"{where}: a TTL must be a positive number of seconds, finite (e.g. 3600), got {value!r}"
        )
    return float(value)


def check_call_options(options: Mapping[str, Any]) -> None:
    """A call's ``cache``/``cache_ttl`` execution options, refused with the fix when wrong: a truthy
    ``"no"`` would have cached, a TTL of 0 or ``"60"`` would have been ignored or failed each store."""
    flag = options.get("cache")
    if flag is not None and flag is not True and flag is not False:
        raise ConfigurationError(
            f"execution_options={{'cache': {flag!r}}}: give False (bypass the cache for this call) or "
            "True (cache it even if its model isn't configured)"
        )
    ttl = options.get("cache_ttl")
    if ttl is not None:
        ttl_value(ttl, f"execution_options={{'cache_ttl': {ttl!r}}}")


def _resolve(path: str) -> type:
    module, _, name = path.rpartition(".")
    if not module:
        raise ConfigurationError(
            f"models: {path!r} is not a dotted path; write 'package.module.ClassName' or pass the class"
        )
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as exc:
        raise ConfigurationError(f"models: cannot import module {module!r} for {path!r}: {exc}") from exc
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ConfigurationError(f"models: module {module!r} has no attribute {name!r}")
    if not isinstance(obj, type):
        raise ConfigurationError(f"models: {path!r} is not a class")
    return obj


class Policy:
    """Per-model ops and TTLs, resolved once per class (subclasses inherit their base's rule)."""

    def __init__(self, models: Mapping[Any, Mapping[str, Any]] | None, default_ttl: float) -> None:
        self.default_ttl = ttl_value(default_ttl, "default_ttl")
        self._rules: dict[type, Rule] = {}
        self._fallback: Rule | None = None
        self._memo: dict[type, Rule | None] = {}
        # Column attributes a model's rule keeps out of every entry (security/exclude.py).
        self.excluded: dict[type, frozenset[str]] = {}
        if models is None:
            self._fallback = Rule(OPS, self.default_ttl)
            return
        if not isinstance(models, Mapping):
            raise ConfigurationError("models must be a dict of {Model or 'dotted.path' or '*': {...}}")
        for target, spec in models.items():
            where = f"models[{target!r}]"
            if not isinstance(spec, Mapping):
                raise ConfigurationError(f"{where}: expected a dict like {{'ops': 'all', 'ttl': 60}}")
            unknown = set(spec) - {"ops", "ttl", "timeout", "exclude"}
            if unknown:
                raise ConfigurationError(
                    f"{where}: unknown key(s) {sorted(unknown)}; allowed: ops, ttl, exclude"
                )
            if "ttl" in spec and "timeout" in spec:
                raise ConfigurationError(f"{where}: give 'ttl' or its alias 'timeout', not both")
            ttl = spec.get("ttl", spec.get("timeout", self.default_ttl))
            rule = Rule(_ops(spec.get("ops", "all"), where), ttl_value(ttl, where))
            if target == "*":
                if "exclude" in spec:
                    raise ConfigurationError(
                        f"{where}: 'exclude' names one model's columns; for every model use "
                        "Cache(exclude_columns=[...]) (names or patterns like '*_token')"
                    )
                self._fallback = rule
                continue
            cls = _resolve(target) if isinstance(target, str) else target
            mapper = inspect(cls, raiseerr=False) if isinstance(cls, type) else None
            if not isinstance(mapper, Mapper):
                raise ConfigurationError(f"{where}: {cls!r} is not a mapped class")
            self._rules[cls] = rule
            if "exclude" in spec:
                self.excluded[cls] = _exclude(spec["exclude"], mapper, where)

    def excluded_for(self, cls: type) -> frozenset[str]:
        """The column attributes the rules of ``cls`` and its bases exclude."""
        return frozenset().union(*(self.excluded.get(c, ()) for c in cls.__mro__))

    def rule_for(self, cls: type | None) -> Rule | None:
        if cls is None:
            return self._fallback
        try:
            return self._memo[cls]
        except KeyError:
            pass
        rule = next((self._rules[c] for c in cls.__mro__ if c in self._rules), self._fallback)
        self._memo[cls] = rule
        return rule


def op_of(statement: Any) -> str:
    """'count', 'exists' or 'fetch' for a SELECT (``get`` is decided by the caller)."""
    if isinstance(statement, Select):
        # The columns as written: selected_columns would adapt ORM entities (and may warn).
        cols = _sa.raw_columns(statement)
        if len(cols) == 1:
            col: Any = cols[0]
            if isinstance(col, Label):
                col = col.element
            if isinstance(col, Exists):
                return "exists"
            if isinstance(col, FunctionElement) and getattr(col, "name", "").lower() == "count":
                return "count"
    return "fetch"


def never_cached_reason(statement: Any) -> str | None:
    """Why this statement may never be served from or stored to the cache, or None."""
    for element in visitors.iterate(statement):
        # text("1") in a SELECT (count(text("1")), as advanced-alchemy counts) reads nothing.
        if isinstance(element, TextClause) and (element is statement or not plain_literal(element)):
            return "contains text()"
        if isinstance(element, Select) and _sa.for_update_arg(element) is not None:
            return "uses FOR UPDATE"
        if isinstance(element, FunctionElement):
            name = getattr(element, "name", "") or ""
            if name.lower() in NONDETERMINISTIC:
                return f"calls non-deterministic {name}()"
            if name.lower() in _SQLITE_DATE_FUNCS and any(
                isinstance(arg, BindParameter) for arg in visitors.iterate(element.clause_expr)
            ):
                return f"calls {name}() on a bound value (possibly 'now')"
        elif isinstance(element, ColumnClause) and element.is_literal and _LITERAL_CALL.search(element.name):
            return f"literal column {element.name!r} may be non-deterministic"
    return None
