"""Keys: two different queries never share a key; the same query has the same key in every process."""

from __future__ import annotations

import datetime
import decimal
import json
import subprocess
import sys
import uuid
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import inspect, select
from sqlalchemy.orm import aliased, selectinload

from sqlacache.keys import KeyBuilder, Uncacheable, value_token
from tests.models import Order, User

builder = KeyBuilder()
NS = "postgresql://u@h:5432/db"


def key_of(statement, params=None, namespace=NS):
    ck = statement._generate_cache_key()
    shape = builder.shape(ck.key)
    return builder.key(namespace, shape.digest, [b.effective_value for b in ck.bindparams], params)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.decimals(allow_nan=False, allow_infinity=False, places=3),
    st.datetimes(timezones=st.one_of(st.none(), st.timezones())),
    st.dates(),
    st.times(),
    st.timedeltas(),
    st.uuids(),
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner), max_leaves=6
)


def same_value(a, b):
    """Equal for a cache key: same type and same value at every level."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, datetime.datetime):
        return a == b and a.tzinfo == b.tzinfo and a.utcoffset() == b.utcoffset() and a.fold == b.fold
    if isinstance(a, decimal.Decimal):
        return str(a) == str(b)
    if isinstance(a, float):
        return repr(a) == repr(b)
    return a == b


@settings(max_examples=300)
@given(values, values)
def test_value_tokens_are_injective(a, b):
    assert (value_token(a) == value_token(b)) == same_value(a, b)


def test_lookalike_values_get_different_keys():
    lookalikes = [
        1,
        True,
        1.0,
        "1",
        decimal.Decimal("1"),
        decimal.Decimal("1.0"),
        [1],
        (1,),
        b"1",
        None,
        "None",
    ]
    keys = {
        key_of(select(User).where(User.name == v)) if not isinstance(v, (list, tuple)) else None
        for v in lookalikes
    }
    assert len({k for k in keys if k}) == len([v for v in lookalikes if not isinstance(v, (list, tuple))])
    in_keys = {key_of(select(User).where(User.id.in_(v))) for v in ([1], [1, 2], [2, 1], [True], ["1"])}
    assert len(in_keys) == 5


# A small grammar of statements: each spec maps to one query, different specs to different queries.
specs = st.fixed_dictionaries(
    {
        "entity": st.sampled_from(["user", "order", "user.name", "aliased"]),
        "column": st.sampled_from(["id", "name"]),
        "op": st.sampled_from(["eq", "ne", "lt", "in"]),
        "value": st.integers(0, 3),
        "order": st.sampled_from([None, "asc", "desc"]),
        "limit": st.one_of(st.none(), st.integers(1, 3)),
        "offset": st.one_of(st.none(), st.integers(1, 3)),
        "eager": st.booleans(),
    }
)


def build(spec):
    if spec["entity"] == "order":
        target, col = Order, (Order.id if spec["column"] == "id" else Order.total)
        stmt = select(Order)
    else:
        target = aliased(User, name="u_alias") if spec["entity"] == "aliased" else User
        col = target.id if spec["column"] == "id" else target.name
        stmt = select(target.name) if spec["entity"] == "user.name" else select(target)
        if spec["eager"] and spec["entity"] == "user":
            stmt = stmt.options(selectinload(User.orders))
    v = spec["value"] if spec["column"] == "id" else f"n{spec['value']}"
    cond = {
        "eq": col == v,
        "ne": col != v,
        "lt": col < v,
        "in": col.in_([v, v + 1] if isinstance(v, int) else [v]),
    }[spec["op"]]
    stmt = stmt.where(cond)
    if spec["order"]:
        stmt = stmt.order_by(col.asc() if spec["order"] == "asc" else col.desc())
    if spec["limit"] is not None:
        stmt = stmt.limit(spec["limit"])
    if spec["offset"] is not None:
        stmt = stmt.offset(spec["offset"])
    return stmt


def canonical(spec):
    spec = dict(spec)
    if spec["entity"] != "user":
        spec["eager"] = False
    return json.dumps(spec, sort_keys=True)


@settings(max_examples=300)
@given(specs, specs)
def test_different_queries_never_share_a_key(a, b):
    assert (key_of(build(a)) == key_of(build(b))) == (canonical(a) == canonical(b))


def test_namespace_and_params_are_part_of_the_key():
    stmt = select(User).where(User.id == 1)
    assert key_of(stmt) != key_of(stmt, namespace="postgresql://u@h:5432/other")
    assert key_of(stmt, {"x": 1}) != key_of(stmt, {"x": 2})
    assert key_of(stmt) == key_of(select(User).where(User.id == 1))


def test_unkeyable_values_make_the_statement_uncacheable():
    class Opaque:
        pass

    try:
        key_of(select(User).where(User.name == Opaque()))  # type: ignore[arg-type]
    except Uncacheable:
        pass
    else:  # pragma: no cover
        raise AssertionError("an opaque bound value must not be keyed")


_CHILD = """
import json, sys
sys.path.insert(0, {root!r})
from sqlalchemy import select
from sqlalchemy.orm import selectinload
from tests.test_keys import key_of, builder
from tests.models import User
out = [key_of(select(User).where(User.id == 7)),
       key_of(select(User).options(selectinload(User.orders)).where(User.name.in_(["a", "b"])).limit(5)),
       builder.get_key("ns", User.__mapper__, (7,))]
print(json.dumps(out))
"""


def test_keys_are_identical_in_another_process():
    import pathlib

    from sqlalchemy.orm import selectinload as sl

    root = str(pathlib.Path(__file__).resolve().parents[1])
    child = subprocess.run(
        [sys.executable, "-c", _CHILD.format(root=root)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    theirs = json.loads(child.stdout)
    ours = [
        key_of(select(User).where(User.id == 7)),
        key_of(select(User).options(sl(User.orders)).where(User.name.in_(["a", "b"])).limit(5)),
        builder.get_key("ns", User.__mapper__, (7,)),
    ]
    assert theirs == ours


_TYPED_CHILD = """
import json, sys
sys.path.insert(0, {root!r})
from tests.test_keys import typed_keys
print(json.dumps(typed_keys()))
"""


def typed_keys() -> list[str]:
    """Keys of statements whose cache keys hold types of several arguments (Numeric(12, 2)…)."""
    from sqlalchemy import String, cast, func, literal

    return [
        key_of(select(User.id, User.balance)),
        key_of(select(User).where(User.balance > decimal.Decimal("1.50"))),
        key_of(select(cast(User.name, String(20, collation="C")))),
        key_of(select(func.coalesce(User.balance, literal(decimal.Decimal(0))))),
    ]


def test_keys_of_typed_statements_are_identical_whatever_the_hash_seed():
    """A type's cache key lists its arguments in an order that depends on string hashing: the keys
    must not (16 worker processes must find each other's entries)."""
    import os
    import pathlib

    root = str(pathlib.Path(__file__).resolve().parents[1])
    ours = typed_keys()
    for seed in ("1", "2", "3", "4", "5", "6"):
        child = subprocess.run(
            [sys.executable, "-c", _TYPED_CHILD.format(root=root)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        assert json.loads(child.stdout) == ours, seed


def test_get_keys_differ_by_class_and_pk():
    keys = {builder.get_key(NS, m.__mapper__, pk) for m in (User, Order) for pk in [(1,), (2,), ("1",)]}
    assert len(keys) == 6
    assert builder.get_key(NS, User.__mapper__, (uuid.UUID(int=1),)) != builder.get_key(
        NS, User.__mapper__, (1,)
    )


# -- mappings that give an entry other contents -------------------------------------------------


class _Parent:
    pass


class _Child:
    pass


def _fingerprint(**relationship_kw: Any) -> str:
    """The mapping fingerprint of _Parent mapped with a ``children`` relationship configured so."""
    from sqlalchemy import Column, ForeignKey, Integer, MetaData, String, Table
    from sqlalchemy.orm import registry, relationship

    from sqlacache.keys import mapping_fingerprint

    metadata = MetaData()
    parents = Table("parents", metadata, Column("id", Integer, primary_key=True))
    children = Table(
        "children",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("parent_id", ForeignKey("parents.id")),
        Column("name", String(20)),
    )
    reg = registry(metadata=metadata)
    kw = {k: (v(parents, children) if callable(v) else v) for k, v in relationship_kw.items()}
    try:
        reg.map_imperatively(_Parent, parents, properties={"children": relationship(_Child, **kw)})
        reg.map_imperatively(_Child, children)
        reg.configure()
        return mapping_fingerprint(inspect(_Parent))
    finally:
        reg.dispose()


def test_mappings_that_load_a_relationship_into_entries_differently_have_other_fingerprints():
    """An entry holds what the mapping's relationship loaded (eagerly or not, which rows, in which
    order): a mapping that would load it otherwise must not read it (one process remapping a class,
    or a deploy changing a relationship)."""
    default = _fingerprint()
    assert _fingerprint() == default
    variants = [
        _fingerprint(lazy="joined"),
        _fingerprint(lazy="selectin"),
        _fingerprint(order_by=lambda p, c: c.c.name),
        _fingerprint(order_by=lambda p, c: c.c.name.desc()),
        _fingerprint(lazy="joined", innerjoin=True),
        _fingerprint(lazy="joined", join_depth=2),
        _fingerprint(primaryjoin=lambda p, c: (c.c.parent_id == p.c.id) & (c.c.name != "x")),
        _fingerprint(primaryjoin=lambda p, c: (c.c.parent_id == p.c.id) & (c.c.name != "y")),
    ]
    assert len({default, *variants}) == len(variants) + 1
