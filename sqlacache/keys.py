"""Statement → cache key: cheap, deterministic across processes, and collision-free.

A key is the hash of an unambiguous serialization of
  (key format, namespace of the bind, SQLAlchemy's statement cache key structure, the fingerprints
  of the schema and of the mappings it names, bound values).

SQLAlchemy already computes the statement cache key on every execution for its compiled cache; we
serialize its *structure* once per distinct statement shape (memoized on the hashable key tuple) and
only the bound values per call. Anything we cannot serialize unambiguously makes the statement
uncacheable rather than risking two queries sharing a key.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import enum
import hashlib
import ipaddress
import marshal
import types
import uuid
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Table, inspect
from sqlalchemy.dialects.postgresql.ranges import MultiRange, Range
from sqlalchemy.orm import ColumnProperty, Mapper, MapperProperty
from sqlalchemy.sql.schema import Column, MetaData
from sqlalchemy.sql.type_api import TypeEngine

from sqlacache._lru import LRU

# 2: keys include the fingerprint of the mappings an entry was built with (mapping_fingerprint).
FORMAT = "2"


class Uncacheable(Exception):
    """The statement (or a value bound to it) has no safe, deterministic key."""


def class_path(obj: Any) -> str:
    qualname = str(getattr(obj, "__qualname__", None) or getattr(obj, "__name__", ""))
    module = str(getattr(obj, "__module__", None) or "")
    if not qualname or "<locals>" in qualname or "<lambda>" in qualname:
        # Not addressable by name: unique within this process, never shared with another.
        return f"{module}.{qualname}@{id(obj):x}"
    return f"{module}.{qualname}"


def _leaf(x: Any) -> Any:
    """One leaf of a statement cache key → a JSON-able, type-tagged value."""
    if isinstance(x, str):
        return str(x)
    if x is None or x is True or x is False:
        return x
    if isinstance(x, int) and not isinstance(x, enum.Enum):
        return ["i", str(int(x))]
    if isinstance(x, float):
        return ["f", repr(x)]
    if isinstance(x, type):
        return ["c", class_path(x)]
    if isinstance(x, Mapper):
        return ["m", class_path(x.class_)]
    if isinstance(x, MapperProperty):
        return ["p", class_path(x.parent.class_), x.key]
    if isinstance(x, Table):
        return ["T", x.schema or "", x.name]
    if isinstance(x, enum.Enum):
        return ["e", class_path(type(x)), x.name]
    if isinstance(x, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return ["F", class_path(x)]
    if isinstance(x, types.CodeType):
        # marshal captures the code, its constants and nested code: equal bytes, equal semantics.
        return ["C", hashlib.blake2b(marshal.dumps(x), digest_size=16).hexdigest()]
    raise Uncacheable(f"cannot key a statement containing {type(x).__module__}.{type(x).__qualname__}")


def _type_arguments(pairs: tuple[Any, ...]) -> bool:
    """Whether these are the (name, value) pairs of a type's cache key (``TypeEngine._static_cache_key``)."""
    return all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in pairs)


def _walk(x: Any, tables: set[Table], mappers: list[Mapper[Any]], mapped: set[Mapper[Any]]) -> Any:
    """The key structure as JSON; collects its tables, its mappers (in order) and every mapper it
    names in any way (an entity, an attribute's parent, a mapped class), whose mappings it depends on."""
    if isinstance(x, tuple):
        if x and isinstance(x[0], type) and issubclass(x[0], TypeEngine) and _type_arguments(x[1:]):
            # A type's key names its arguments in the order of a set of their names, which differs
            # between processes (PYTHONHASHSEED): in name order, it is the same in every process.
            x = (x[0], *sorted(x[1:], key=lambda kv: str(kv[0])))
        return [_walk(y, tables, mappers, mapped) for y in x]
    if isinstance(x, Table):
        tables.add(x)
    elif isinstance(x, Mapper):
        if x not in mappers:
            mappers.append(x)
        mapped.add(x)
    elif isinstance(x, MapperProperty):
        mapped.add(x.parent)
    elif isinstance(x, type):
        found: Any = inspect(x, raiseerr=False)
        if isinstance(found, Mapper):
            mapped.add(found)
    return _leaf(x)


@dataclass(frozen=True, slots=True)
class Shape:
    """What one statement structure tells us, whatever values are bound to it."""

    digest: str
    tables: frozenset[Table]
    mappers: tuple[Mapper[Any], ...]  # in order of first appearance: the lead entity first


_IP_TYPES = (
    ipaddress.IPv4Address,
    ipaddress.IPv6Address,
    ipaddress.IPv4Interface,
    ipaddress.IPv6Interface,
    ipaddress.IPv4Network,
    ipaddress.IPv6Network,
)


def value_token(v: Any) -> Any:
    """A bound value → a JSON-able form that is injective across the types we accept."""
    if v is None or v is True or v is False or isinstance(v, str):
        return v
    if isinstance(v, enum.Enum):
        return ["e", class_path(type(v)), v.name]
    if isinstance(v, int):
        return ["i", str(v)]
    if isinstance(v, float):
        return ["f", repr(v)]
    if isinstance(v, decimal.Decimal):
        return ["d", str(v)]
    if isinstance(v, datetime.datetime):
        return ["dt", v.isoformat(), v.fold]
    if isinstance(v, datetime.date):
        return ["da", v.isoformat()]
    if isinstance(v, datetime.time):
        return ["ti", v.isoformat(), v.fold]
    if isinstance(v, datetime.timedelta):
        return ["td", v.days, v.seconds, v.microseconds]
    if isinstance(v, uuid.UUID):
        return ["u", v.hex]
    if isinstance(v, (bytes, bytearray, memoryview)):
        return ["b", base64.b64encode(bytes(v)).decode()]
    if isinstance(v, _IP_TYPES):  # PostgreSQL INET/CIDR values: the class says address/interface/network
        return ["ip", type(v).__name__, str(v)]
    if isinstance(v, Range):
        return ["rg", value_token(v.lower), value_token(v.upper), v.bounds, v.empty]
    if isinstance(v, MultiRange):  # (a list subclass, bound as a multirange, not as an array)
        return ["mr", [value_token(i) for i in v]]
    if isinstance(v, (list, tuple)):
        return ["l" if isinstance(v, list) else "t", [value_token(i) for i in v]]
    if isinstance(v, (set, frozenset)):
        tokens = [value_token(i) for i in v]
        return ["s", sorted(tokens, key=orjson.dumps)]
    if isinstance(v, Mapping):
        items = [(str(k), value_token(val)) for k, val in v.items() if isinstance(k, str)]
        if len(items) != len(v):
            raise Uncacheable("cannot key a mapping with non-string keys")
        return ["m", sorted(items)]
    raise Uncacheable(f"cannot key a bound value of type {type(v).__module__}.{type(v).__qualname__}")


def pk_bytes(pk: Sequence[Any]) -> bytes:
    """A primary key's unambiguous serialization (what row keys and row dependencies hash)."""
    return orjson.dumps([value_token(v) for v in pk])


def translation_token(translate: Mapping[Any, Any]) -> str:
    """A ``schema_translate_map`` as part of a namespace: the same statement reads other tables."""
    return digest(sorted([str(k), str(v)] for k, v in translate.items()))[:16]


def digest(parts: Any) -> str:
    return hashlib.blake2b(orjson.dumps(parts), digest_size=20).hexdigest()


def _type(t: TypeEngine[Any]) -> list[str]:
    # The class too: repr() doesn't name TypeDecorators' or enums' Python classes, which the codec uses.
    enum_class = getattr(t, "enum_class", None)
    return [class_path(type(t)), repr(t), class_path(enum_class) if enum_class is not None else ""]


def _expression(expr: Any) -> list[Any]:
    if isinstance(expr, Column) and isinstance(expr.table, Table):
        return [expr.table.schema or "", expr.table.name, expr.name, _type(expr.type)]
    try:
        text = str(expr)  # column_property(select …), an SQL expression
    except Exception:  # not compilable without its dialect: this process's own, never shared
        text = f"@{id(expr):x}"
    return ["x", text, _type(expr.type)]


def _clause(expr: Any) -> str:
    """A join condition, as SQL with its values in it."""
    try:
        return str(expr.compile(compile_kwargs={"literal_binds": True}))
    except Exception:  # a value not renderable as a literal: this process's own, never shared
        return f"{expr}@{id(expr):x}"


def _describe(mapper: Mapper[Any]) -> list[Any]:
    """One mapper's configuration: whatever decides which values an entry holds and how they come back."""
    attrs = []
    for prop in mapper.attrs:
        if isinstance(prop, ColumnProperty):
            attrs.append(["col", prop.key, [_expression(c) for c in prop.columns], bool(prop.deferred)])
        elif hasattr(prop, "mapper") and hasattr(prop, "uselist"):  # a relationship
            collection = getattr(prop, "collection_class", None)
            attrs.append(
                [
                    "rel",
                    prop.key,
                    class_path(prop.mapper.class_),
                    bool(prop.uselist),
                    class_path(collection) if collection is not None else "",
                    sorted(
                        [_expression(a), _expression(b)]
                        for a, b in getattr(prop, "local_remote_pairs", None) or ()
                    ),
                    # what an entry of a read holds of it and in which order: its join conditions
                    # (the rows in it), its default loading (eager ones are in the entry) and order
                    _clause(prop.primaryjoin),
                    _clause(prop.secondaryjoin) if prop.secondaryjoin is not None else "",
                    repr(prop.lazy),
                    [_expression(c) for c in prop.order_by or ()],
                    repr(prop.innerjoin),
                    repr(prop.join_depth),
                ]
            )
        else:  # composites, synonyms…: their kind and key
            attrs.append([class_path(type(prop)), prop.key])
    try:
        identity = value_token(mapper.polymorphic_identity)
    except Uncacheable:
        identity = repr(mapper.polymorphic_identity)
    return [
        class_path(mapper.class_),
        [[t.schema or "", t.name] for t in mapper.tables if isinstance(t, Table)],
        [_expression(c) for c in mapper.primary_key],
        class_path(mapper.inherits.class_) if mapper.inherits is not None else "",
        identity,
        _expression(mapper.polymorphic_on) if mapper.polymorphic_on is not None else "",
        sorted(attrs, key=lambda a: str(a[1])),
    ]


_mapping_fingerprints: weakref.WeakKeyDictionary[Mapper[Any], str] = weakref.WeakKeyDictionary()


def mapping_fingerprint(mapper: Mapper[Any]) -> str:
    """A short hash of how ``mapper`` — and every mapper its entries may hold objects of (its
    inheritance hierarchy, what its relationships reach) — maps classes to columns, the same in
    every process that runs the same model code. Keys include it, so code that maps a class
    differently (a rolling deploy adding, renaming or retyping a column) never reads entries built
    by the other code. Computed once per mapper."""
    found = _mapping_fingerprints.get(mapper)
    if found is None:
        seen: set[Mapper[Any]] = set()
        todo = [mapper]
        while todo:
            current = todo.pop()
            if current not in seen:
                seen.add(current)
                todo.extend(current.base_mapper.self_and_descendants)
                todo.extend(r.mapper for r in current.relationships)
        found = digest(sorted(_described(m) for m in seen))[:16]
        _mapping_fingerprints[mapper] = found
    return found


_descriptions: weakref.WeakKeyDictionary[Mapper[Any], str] = weakref.WeakKeyDictionary()


def _described(mapper: Mapper[Any]) -> str:
    """``_describe`` hashed, once per mapper: a fingerprint covers a whole group of related mappers."""
    found = _descriptions.get(mapper)
    if found is None:
        found = _descriptions[mapper] = digest(_describe(mapper))
    return found


def schema_fingerprint(metadata: MetaData) -> str:
    """A hash of every table's name, columns, types and primary key in ``metadata``."""
    desc = []
    for name in sorted(metadata.tables):
        t = metadata.tables[name]
        cols = [[c.name, repr(c.type), bool(c.primary_key), bool(c.nullable)] for c in t.columns]
        desc.append([name, cols])
    return digest(desc)[:16]


class KeyBuilder:
    """Turns statements into keys; memoizes per statement shape."""

    def __init__(self, max_shapes: int = 4096) -> None:
        self._shapes: LRU[Any, Shape] = LRU(max_shapes)
        self._fingerprints: dict[int, tuple[int, MetaData, str]] = {}
        self._get_prefixes: LRU[tuple[str, Mapper[Any]], bytes] = LRU(max_shapes)

    def fingerprint(self, metadata: MetaData) -> str:
        known = self._fingerprints.get(id(metadata))
        if known is not None and known[1] is metadata and known[0] == len(metadata.tables):
            return known[2]
        fp = schema_fingerprint(metadata)
        self._fingerprints[id(metadata)] = (len(metadata.tables), metadata, fp)
        return fp

    def shape(self, key_tuple: Any) -> Shape:
        """The statement structure's digest (schema of its tables included), its tables and mappers."""
        found = self._shapes.get(key_tuple)
        if found is None:
            tables: set[Table] = set()
            mappers: list[Mapper[Any]] = []
            mapped: set[Mapper[Any]] = set()
            structure = _walk(key_tuple, tables, mappers, mapped)
            fps = sorted({self.fingerprint(t.metadata) for t in tables})
            fps += sorted({mapping_fingerprint(m) for m in mapped})
            found = Shape(digest([FORMAT, fps, structure]), frozenset(tables), tuple(mappers))
            self._shapes.put(key_tuple, found)
        return found

    @staticmethod
    def key(
        namespace: str, shape_digest: str, values: Iterable[Any], params: Mapping[str, Any] | None
    ) -> str:
        tokens: list[Any] = [value_token(v) for v in values]
        extra = sorted((k, value_token(v)) for k, v in params.items()) if params else []
        return "q:" + digest([namespace, shape_digest, tokens, extra])

    def get_key(self, namespace: str, mapper: Mapper[Any], pk: Sequence[Any]) -> str:
        """The key of ``Session.get(Model, pk)``: no statement needed, so it costs a few microseconds."""
        memo = (namespace, mapper)
        prefix = self._get_prefixes.get(memo)
        if prefix is None:
            fps = sorted({self.fingerprint(t.metadata) for t in mapper.tables if isinstance(t, Table)})
            prefix = orjson.dumps(
                [FORMAT, namespace, fps, mapping_fingerprint(mapper), class_path(mapper.class_)]
            )
            self._get_prefixes.put(memo, prefix)
        h = hashlib.blake2b(prefix, digest_size=20)
        h.update(pk_bytes(pk))
        return "g:" + h.hexdigest()
