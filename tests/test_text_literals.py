"""``text()`` in a SELECT: a lone numeric or string literal (``count(text("1"))``, what
advanced-alchemy's ``count()``/``exists()`` emit) is cached and evicted like any read; every other
``text()`` keeps the statement uncached."""

from __future__ import annotations

import pytest
from sqlalchemy import exists, func, literal_column, select, text

from sqlacache.analysis.literals import plain_literal
from sqlacache.policy import never_cached_reason
from tests.helpers import cached, seed
from tests.models import User


@pytest.mark.parametrize("literal", ["1", "0", "42", "1.5", " 1 ", "'a'", "''", "'it''s'", "'user ñ'"])
def test_plain_numeric_and_string_literals_qualify(literal):
    assert plain_literal(text(literal))
    assert never_cached_reason(select(func.count(text(literal))).select_from(User)) is None


@pytest.mark.parametrize(
    "fragment",
    [
        "*",  # every column: not a literal
        "1 = 1",
        "1 + 1",
        "-1",  # an operator applied to a literal
        "1e3",
        "x",  # a column (of which table?)
        "now()",
        "random()",
        "SELECT 1",
        "(SELECT count(*) FROM users)",
        "'a'; DELETE FROM users",
        "'a' || name",
        "'a\\'",  # MySQL reads the backslash as an escape: the literal would not end there
        "':id'",  # text() takes :id for a bind parameter, even inside quotes
        '"a"',  # an identifier on most databases
        "1 -- comment",
        "1 /* c */",
        "",
    ],
)
def test_anything_else_in_text_stays_uncached(fragment):
    assert not plain_literal(text(fragment))
    assert never_cached_reason(select(func.count(text(fragment))).select_from(User)) == "contains text()"


def test_text_with_bind_parameters_stays_uncached():
    clause = text(":n").bindparams(n=1)
    assert not plain_literal(clause)
    assert never_cached_reason(select(User).where(text("id = :id").bindparams(id=1))) == "contains text()"


def test_a_whole_text_statement_stays_uncached_even_when_it_is_a_literal():
    assert never_cached_reason(text("1")) == "contains text()"


def test_a_literal_next_to_other_text_leaves_the_statement_uncached():
    statement = select(func.count(text("1"))).select_from(User).where(text("name = 'x'"))
    assert never_cached_reason(statement) == "contains text()"


def test_other_reasons_still_apply_next_to_a_literal():
    statement = select(func.count(text("1"))).select_from(User).with_for_update()
    assert never_cached_reason(statement) == "uses FOR UPDATE"


def _count(s, **filters):
    # advanced-alchemy's count(): the entity's select with only count(text("1")) as its column.
    statement = select(User).filter_by(**filters)
    return s.execute(
        statement.with_only_columns(func.count(text("1")), maintain_column_froms=True)
    ).scalar_one()


def test_count_of_text_1_is_served_from_the_cache_and_evicted_by_commits(world):
    seed(world)
    db, hit = cached(world, lambda s: _count(s, active=True))
    assert db == hit == 3
    db, hit = cached(world, lambda s: _count(s, name="u2"))
    assert db == hit == 1
    with world.Session() as s:
        s.get(User, 2).name = "renamed"
        s.add(User(id=9, name="u9"))
        s.commit()
    with world.Session() as s:
        assert _count(s, active=True) == 4
        assert _count(s, name="u2") == 0


def test_exists_and_string_literals_are_cached(world):
    seed(world)
    read = lambda s: s.scalar(select(exists(select(text("1")).select_from(User).where(User.name == "u3"))))
    db, hit = cached(world, read)
    assert db is hit is True
    labelled = lambda s: s.execute(select(User.id, text("'tag'")).order_by(User.id)).all()
    db, hit = cached(world, labelled)
    assert [tuple(r) for r in hit] == [tuple(r) for r in db] == [(1, "tag"), (2, "tag"), (3, "tag")]
    with world.Session() as s:
        s.delete(s.get(User, 3))
        s.commit()
    with world.Session() as s:
        assert s.scalar(select(exists(select(text("1")).select_from(User).where(User.name == "u3")))) is False
        assert [r[0] for r in s.execute(select(User.id, text("'tag'")).order_by(User.id))] == [1, 2]


def test_other_text_is_read_from_the_database_every_time(world):
    seed(world)
    statement = select(func.count(literal_column("*"))).select_from(User).where(text("name <> 'x'"))
    for _ in range(3):
        with world.Session() as s:
            before = world.statements()
            assert s.execute(statement).scalar_one() == 3
            assert world.statements() > before


def test_literal_columns_come_back_with_the_database_types(world):
    seed(world)
    read = lambda s: [
        tuple((type(v), v) for v in row)
        for row in s.execute(
            select(User.id, text("1.5"), text("2"), text("'x'"), text("''")).order_by(User.id)
        )
    ]
    db, hit = cached(world, read)
    assert hit == db and len(hit) == 3
    assert [v for _, v in hit[0]][1:] == [db[0][1][1], 2, "x", ""]
