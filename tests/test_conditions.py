"""The condition analysis on its own: statements in, per-table conditions out. No database, no backend.

``resolve`` answers, per table, either ``None`` (the read may contain any row) or the list of
conjunctions ``{column: token}`` every row of that table in the result satisfies. Soundness is what
matters: whenever the analysis cannot prove a condition it must widen, never narrow.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import and_, bindparam, exists, func, literal_column, not_, or_, select, true
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import aliased, joinedload, selectinload

from sqlacache.analysis.canon import NULL_TOKEN, token
from sqlacache.analysis.conditions import analyse, resolve
from sqlacache.analysis.dependencies import condition_read_deps, table_name
from tests.models import Order, Status, User

DIALECT = sqlite.dialect()


def conditions(statement: Any, params: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    ck = statement._generate_cache_key()
    analysis = analyse(statement, ck.bindparams, table_name)
    return resolve(analysis, ck.bindparams, params, kw.pop("dialect", DIALECT), **kw)


def t(column: Any, value: Any) -> str:
    found = token(column.type, value, DIALECT)
    assert found is not None
    return found


def test_equality_in_and_or_become_conjunctions():
    assert conditions(select(User).where(User.name == "a")) == {"users": [{"name": t(User.name, "a")}]}
    assert conditions(select(User).where(User.name.in_(["a", "b"]), User.active.is_(True))) == {
        "users": [
            {"name": t(User.name, "a"), "active": t(User.active, True)},
            {"name": t(User.name, "b"), "active": t(User.active, True)},
        ]
    }
    assert conditions(select(User).where(or_(User.id == 1, User.name == "x"))) == {
        "users": [{"id": t(User.id, 1)}, {"name": t(User.name, "x")}]
    }
    assert conditions(select(User).where(User.bio.is_(None))) == {"users": [{"bio": NULL_TOKEN}]}


@pytest.mark.parametrize(
    "criterion",
    [
        User.id > 3,
        User.name.like("a%"),
        func.lower(User.name) == "a",
        not_(User.name == "a"),
        User.name != "a",
        User.bio.is_not(None),
        User.id.in_(select(Order.user_id)),
        literal_column("users.name") == "a",
        true(),
    ],
)
def test_what_cannot_be_proven_widens_to_the_table(criterion):
    assert conditions(select(User).where(criterion))["users"] is None


def test_an_unprovable_atom_is_dropped_from_its_conjunction_only():
    found = conditions(select(User).where(User.name == "a", User.id > 3))
    assert found == {"users": [{"name": t(User.name, "a")}]}
    # …but an unprovable branch of an OR admits any row.
    assert conditions(select(User).where(or_(User.name == "a", User.id > 3)))["users"] is None


def test_contradictions_match_no_rows():
    assert conditions(select(User).where(User.id == 1, User.id == 2)) == {"users": []}


def test_in_lists_longer_than_the_limit_widen():
    statement = select(User).where(User.id.in_(list(range(10))))
    assert len(conditions(statement)["users"]) == 10
    ck = statement._generate_cache_key()
    found = resolve(analyse(statement, ck.bindparams, table_name), ck.bindparams, None, DIALECT, max_in=5)
    assert found["users"] is None


def test_cross_products_are_capped():
    statement = select(User).where(User.id.in_(list(range(10))), User.name.in_([str(i) for i in range(10)]))
    found = conditions(statement, max_conjunctions=20)
    # 100 combinations exceed the cap: the longer lists are dropped, and with them the condition.
    assert found["users"] is None


def test_values_come_from_each_execution():
    statement = select(User).where(User.id == bindparam("uid"))
    assert conditions(statement, {"uid": 7}) == {"users": [{"id": t(User.id, 7)}]}
    assert conditions(statement, {"uid": 8}) == {"users": [{"id": t(User.id, 8)}]}
    assert conditions(statement)["users"] is None  # a parameter we were not given: unknown


def test_joins_carry_equalities_to_the_other_table():
    found = conditions(select(Order).join(Order.user).where(User.id == 3))
    assert found == {"orders": [{"user_id": t(Order.user_id, 3)}], "users": [{"id": t(User.id, 3)}]}
    found = conditions(select(User, Order).where(User.id == Order.user_id, Order.user_id == 5))
    assert found["users"] == [{"id": t(User.id, 5)}]


def test_outer_joins_never_restrict_the_preserved_side():
    # ON conditions of a LEFT JOIN filter the joined rows, not the left ones.
    statement = select(User).outerjoin(Order, and_(Order.user_id == User.id, Order.total == 1))
    found = conditions(statement)
    assert found["users"] is None
    assert found["orders"] == [{"total": t(Order.total, 1)}]
    # Values flow from the preserved side into the optional one…
    found = conditions(select(User, Order).outerjoin(Order, Order.user_id == User.id).where(User.id == 2))
    assert found["orders"] == [{"user_id": t(Order.user_id, 2)}]


def test_is_null_on_the_optional_side_of_an_outer_join_is_not_trusted():
    # "users without orders": inserting an order changes the result though no row has id NULL.
    found = conditions(select(User).outerjoin(Order).where(Order.id.is_(None)))
    assert found == {"users": None, "orders": None}


def test_aliases_and_self_joins_are_separate_occurrences():
    other = aliased(User)
    found = conditions(select(User, other).join(other, other.id == User.id).where(other.name == "q"))
    assert found["users"] is None  # the unaliased occurrence has no condition of its own


def test_derived_tables_are_followed_and_subqueries_in_where_widen():
    inner = select(User).where(User.name == "z").subquery()
    assert conditions(select(func.count()).select_from(inner)) == {"users": [{"name": t(User.name, "z")}]}
    found = conditions(select(User).where(User.name == "a", exists().where(Order.user_id == User.id)))
    assert found["users"] == [{"name": t(User.name, "a")}]
    assert found["orders"] is None


def test_eager_joins_are_left_to_the_loaded_relationships():
    # joinedload adds a LEFT OUTER JOIN that can't filter the orders; the rows it loads are
    # accounted for by the relationship, so the analysis does not widen users to the whole table.
    found = conditions(select(Order).options(joinedload(Order.user)).where(Order.id == 10))
    assert found == {"orders": [{"id": t(Order.id, 10)}]}
    found = conditions(select(User).options(selectinload(User.orders)).where(User.id == 1))
    assert found == {"users": [{"id": t(User.id, 1)}]}


def test_values_are_canonicalised_as_the_column_compares_them():
    assert conditions(select(User).where(User.status == Status.banned)) == conditions(
        select(User).where(User.status == "banned")
    )
    # A bind typed differently from the column may be compared after a conversion: not trusted.
    pg = postgresql.psycopg.dialect()
    found = conditions(select(User).where(User.id == literal_column("'2'")), dialect=pg)
    assert found["users"] is None


def test_primary_key_conjunctions_become_row_dependencies():
    found = conditions(select(User).where(User.id == 1, User.name == "a"))
    deps = condition_read_deps(found, {"users": ("id",)})
    assert any(d.startswith("r:users:") for d in deps) and "a:users" in deps
    assert not any(d.startswith("c:") for d in deps)
    deps = condition_read_deps(conditions(select(User).where(User.name == "a")), {"users": ("id",)})
    assert "s:users" in deps and any(d.startswith("c:users:name:") for d in deps)


@given(st.lists(st.sampled_from(["u1", "u2", "x", None]), min_size=1, max_size=4), st.booleans())
def test_every_row_a_query_can_return_satisfies_one_of_its_conjunctions(names, conjoin_active):
    """Soundness on generated IN/OR/AND shapes: a row matching the SQL semantics of the WHERE
    (evaluated here in Python) always matches one of the resolved conjunctions."""
    clause = or_(*[User.name.is_(None) if n is None else User.name == n for n in names])
    if conjoin_active:
        clause = and_(clause, User.active.is_(True))
    found = conditions(select(User).where(clause))["users"]
    for name in ["u1", "u2", "x", "zz", None]:
        for active in (True, False):
            matches = name in names and (active or not conjoin_active)
            if not matches:
                continue
            row = {
                "name": NULL_TOKEN if name is None else t(User.name, name),
                "active": t(User.active, active),
            }
            assert found is None or any(all(row.get(c) == v for c, v in conj.items()) for conj in found)
