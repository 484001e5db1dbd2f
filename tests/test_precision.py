"""Condition-level invalidation: a write evicts the cached reads its rows can change, and only those.

Every test checks both sides: reads the write can change come back fresh (correctness), reads it
cannot change are still served without SQL (precision). Runs on every world (SQLite + memory,
SQLite + fakeredis, PostgreSQL + Redis).
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import String, create_engine, delete, event, func, insert, or_, select, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, joinedload, mapped_column, selectinload, sessionmaker

from sqlacache import CachingSession
from tests.helpers import cached, seed
from tests.models import Order, Status, Tag, User, user_tags

# Freshness: also in the near-cache worlds (conftest.py).
pytestmark = [pytest.mark.near_worlds, pytest.mark.cluster_worlds]


def still_cached(world: Any, read: Any, expected: Any) -> None:
    before = world.statements()
    with world.Session() as s:
        assert read(s) == expected
    assert world.statements() == before, f"expected a hit, got SQL: {world.sql[before:]}"


def fresh(world: Any, read: Any, expected: Any) -> None:
    with world.Session() as s:
        assert read(s) == expected


def commit(world: Any, change: Any) -> None:
    with world.Session() as s:
        change(s)
        s.commit()


def named(name: str) -> Any:
    return lambda s: [u.id for u in s.scalars(select(User).where(User.name == name).order_by(User.id))]


def test_update_evicts_only_reads_whose_filter_matches_old_or_new_values(world):
    seed(world)
    u1, u2, u3 = named("u1"), named("u2"), named("renamed")
    for read in (u1, u2, u3):
        cached(world, read)
    count_u2 = lambda s: s.scalar(select(func.count()).select_from(User).where(User.name == "u2"))
    cached(world, count_u2)

    commit(world, lambda s: setattr(s.get(User, 1), "name", "renamed"))  # u1 → renamed

    fresh(world, u1, [])  # moved out of the filter
    fresh(world, u3, [1])  # moved into it
    still_cached(world, u2, [2])
    still_cached(world, count_u2, 1)


def test_insert_and_delete_evict_only_matching_reads(world):
    seed(world)
    u2, new = named("u2"), named("new")
    cached(world, u2)
    cached(world, new)
    commit(world, lambda s: s.add(User(id=9, name="new")))
    fresh(world, new, [9])
    still_cached(world, u2, [2])
    cached(world, new)
    commit(world, lambda s: s.delete(s.get(User, 9)))
    fresh(world, new, [])
    still_cached(world, u2, [2])


def test_in_lists_or_and_is_null_conditions(world):
    seed(world)
    some = lambda s: [u.id for u in s.scalars(select(User).where(User.id.in_([1, 2])).order_by(User.id))]
    either = lambda s: sorted(
        u.id for u in s.scalars(select(User).where(or_(User.id == 3, User.name == "x")))
    )
    no_bio = lambda s: [u.id for u in s.scalars(select(User).where(User.bio.is_(None), User.id == 2))]
    cached(world, some)
    cached(world, either)
    cached(world, no_bio)
    commit(world, lambda s: setattr(s.get(User, 3), "active", False))
    fresh(world, either, [3])
    still_cached(world, some, [1, 2])
    still_cached(world, no_bio, [2])
    commit(world, lambda s: s.add(User(id=8, name="x")))  # joins the OR through its other branch
    fresh(world, either, [3, 8])
    still_cached(world, some, [1, 2])


def test_primary_key_reads_depend_on_their_row_alone(world):
    seed(world)
    cached(world, lambda s: s.get(User, 2).name)
    by_pk = lambda s: s.scalars(select(User.name).where(User.id == 2)).all()
    cached(world, by_pk)
    commit(world, lambda s: setattr(s.get(User, 1), "name", "other"))
    commit(world, lambda s: s.add(User(id=5, name="u2")))  # same name, other key
    still_cached(world, lambda s: s.get(User, 2).name, "u2")
    still_cached(world, by_pk, ["u2"])


def test_range_and_like_filters_widen_to_the_table(world):
    seed(world)
    big = lambda s: [o.id for o in s.scalars(select(Order).where(Order.total > 0).order_by(Order.id))]
    like = lambda s: [u.id for u in s.scalars(select(User).where(User.name.like("u%")).order_by(User.id))]
    cached(world, big)
    cached(world, like)
    commit(world, lambda s: setattr(s.get(Order, 10), "total", 5))
    fresh(world, big, [10, 11, 21, 31])
    still_cached(world, like, [1, 2, 3])  # another table
    commit(world, lambda s: setattr(s.get(User, 2), "active", False))
    fresh(world, like, [1, 2, 3])  # an unprovable filter: any write to users evicts it


def test_joins_propagate_equalities(world):
    seed(world)
    of_user = lambda s: [
        o.id for o in s.scalars(select(Order).join(Order.user).where(User.id == 1).order_by(Order.id))
    ]
    cached(world, of_user)
    commit(world, lambda s: setattr(s.get(Order, 20), "total", 7))  # user 2's order
    still_cached(world, of_user, [10, 11])
    commit(world, lambda s: setattr(s.get(Order, 20), "user_id", 1))  # moves to user 1
    fresh(world, of_user, [10, 11, 20])


def test_relationships_depend_on_the_related_rows_they_loaded(world):
    seed(world)

    def with_orders(uid: int) -> Any:
        return lambda s: [
            (u.id, [(o.id, o.total) for o in u.orders])
            for u in s.scalars(select(User).options(selectinload(User.orders)).where(User.id == uid))
        ]

    def with_user(oid: int) -> Any:
        return lambda s: [
            (o.id, o.user.name)
            for o in s.scalars(select(Order).options(joinedload(Order.user)).where(Order.id == oid))
        ]

    def with_tags(uid: int) -> Any:
        return lambda s: [
            [t.label for t in u.tags]
            for u in s.scalars(select(User).options(selectinload(User.tags)).where(User.id == uid))
        ]

    reads = {"o1": with_orders(1), "o2": with_orders(2), "u10": with_user(10), "u20": with_user(20)}
    reads |= {"t1": with_tags(1), "t2": with_tags(2)}
    for read in reads.values():
        cached(world, read)

    commit(world, lambda s: setattr(s.get(Order, 10), "total", 99))  # an order of user 1
    fresh(world, reads["o1"], [(1, [(10, 99), (11, 1)])])
    still_cached(world, reads["o2"], [(2, [(20, 0), (21, 1)])])

    commit(world, lambda s: s.add(Order(id=12, user_id=1, total=3)))  # joins user 1's collection
    fresh(world, reads["o1"], [(1, [(10, 99), (11, 1), (12, 3)])])
    still_cached(world, reads["o2"], [(2, [(20, 0), (21, 1)])])

    fresh(world, reads["u10"], [(10, "u1")])  # its own row changed
    cached(world, reads["u10"])
    commit(world, lambda s: setattr(s.get(User, 2), "name", "bob"))  # the user of order 20
    fresh(world, reads["u20"], [(20, "bob")])
    still_cached(world, reads["u10"], [(10, "u1")])

    def tag(uid: int, tid: int, add: bool) -> Any:
        def change(s: Any) -> None:
            user = s.get(User, uid)  # held: a collection event needs its parent alive
            (user.tags.append if add else user.tags.remove)(s.get(Tag, tid))

        return change

    cached(world, reads["t2"])  # evicted by the rename of its user
    commit(world, tag(1, 2, add=True))  # a many-to-many row of user 1
    fresh(world, reads["t1"], [["red", "blue"]])
    still_cached(world, reads["t2"], [["red", "blue"]])
    cached(world, reads["t1"])

    commit(world, tag(2, 2, add=False))
    fresh(world, reads["t2"], [["red"]])
    still_cached(world, reads["t1"], [["red", "blue"]])

    commit(world, lambda s: setattr(s.get(Tag, 1), "label", "crimson"))  # a tag both users have
    fresh(world, reads["t1"], [["crimson", "blue"]])
    fresh(world, reads["t2"], [["crimson"]])


def test_bulk_statements_evict_by_their_own_conditions(world):
    seed(world)
    u1, u2, ghost = named("u1"), named("u2"), named("ghost")
    for read in (u1, u2, ghost):
        cached(world, read)
    commit(world, lambda s: s.execute(update(User).where(User.name == "u1").values(name="ghost")))
    fresh(world, u1, [])
    fresh(world, ghost, [1])
    still_cached(world, u2, [2])
    # Rows named by key evict only their own keyed reads (rows named otherwise evict them all).
    cached(world, lambda s: s.get(User, 3).name)
    commit(world, lambda s: s.execute(update(User).where(User.id == 1).values(active=False)))
    still_cached(world, lambda s: s.get(User, 3).name, "u3")
    fresh(world, lambda s: s.get(User, 1).active, False)

    commit(world, lambda s: s.execute(delete(Order).where(Order.user_id == 1)))
    orders_of = lambda uid: (
        lambda s: [o.id for o in s.scalars(select(Order).where(Order.user_id == uid).order_by(Order.id))]
    )
    fresh(world, orders_of(1), [])
    cached(world, orders_of(2))
    commit(world, lambda s: s.execute(insert(Order).values(id=40, user_id=3, total=1)))
    still_cached(world, orders_of(2), [20, 21])
    fresh(world, orders_of(3), [30, 31, 40])
    commit(world, lambda s: s.execute(update(Order).values(total=Order.total + 1)))  # no WHERE: all rows
    fresh(
        world,
        lambda s: s.scalars(select(Order.total).where(Order.user_id == 2).order_by(Order.id)).all(),
        [1, 2],
    )


def test_raw_sql_evicts_its_tables(world):
    seed(world)
    u2 = named("u2")
    cached(world, u2)
    orders_of_2 = lambda s: [
        o.id for o in s.scalars(select(Order).where(Order.user_id == 2).order_by(Order.id))
    ]
    cached(world, orders_of_2)
    commit(world, lambda s: s.execute(text("UPDATE users SET name = 'u2' WHERE id = 3")))
    fresh(world, u2, [2, 3])
    still_cached(world, orders_of_2, [20, 21])


def test_enum_and_typed_values_match_however_they_are_spelled(world):
    seed(world)
    banned = lambda s: [u.id for u in s.scalars(select(User).where(User.status == Status.banned))]
    banned_by_name = lambda s: [u.id for u in s.scalars(select(User).where(User.status == "banned"))]
    cached(world, banned)
    cached(world, banned_by_name)
    commit(world, lambda s: setattr(s.get(User, 2), "status", Status.banned))
    fresh(world, banned, [2])
    fresh(world, banned_by_name, [2])


def test_table_level_mode_evicts_every_read_of_a_written_table(world):
    cache = world.make_cache(invalidation="tables")
    seed(world)
    from sqlalchemy.orm import sessionmaker

    from sqlacache import CachingSession

    Session = sessionmaker(world.engine, class_=CachingSession, cache=cache)
    read = named("u2")

    def run() -> tuple[Any, int]:
        before = world.statements()
        with Session() as s:
            return read(s), world.statements() - before

    run(), run()
    assert run() == ([2], 0)
    with Session() as s:
        s.get(User, 1).name = "other"
        s.commit()
    assert run() == ([2], 1)  # not matching, evicted anyway


def test_association_rows_written_by_core(world):
    seed(world)
    tags_of = lambda uid: (
        lambda s: [
            [t.id for t in u.tags]
            for u in s.scalars(select(User).options(selectinload(User.tags)).where(User.id == uid))
        ]
    )
    cached(world, tags_of(1))
    cached(world, tags_of(3))
    commit(world, lambda s: s.execute(insert(user_tags).values(user_id=3, tag_id=2)))
    fresh(world, tags_of(3), [[2]])
    still_cached(world, tags_of(1), [[1]])


def test_bulk_statements_returning_their_keys_evict_only_those_rows_keyed_reads(world):
    seed(world)
    for uid in (1, 3):
        cached(world, lambda s, uid=uid: s.get(User, uid).name)
    fetch = {"synchronize_session": "fetch"}  # the ORM asks for the keys with RETURNING where it can
    commit(
        world,
        lambda s: s.execute(
            update(User).where(User.name == "u1").values(active=False), execution_options=fetch
        ),
    )
    fresh(world, lambda s: (s.get(User, 1).name, s.get(User, 1).active), ("u1", False))
    if world.engine.dialect.update_returning:
        still_cached(world, lambda s: s.get(User, 3).name, "u3")
    commit(world, lambda s: s.execute(delete(Order).where(Order.total == 1), execution_options=fetch))
    fresh(world, lambda s: s.scalars(select(Order.id).order_by(Order.id)).all(), [10, 20, 30])


def test_an_object_loaded_before_another_commit_updates_what_the_database_holds(world):
    """Session A holds user 1 as loaded ("u1"); another request renames it and commits; reads of
    the new name are cached; A then changes another column of its older copy. Its unchanged
    columns are not what the database holds, so they can't say which reads the row is in."""
    seed(world)
    a = world.Session(expire_on_commit=False)
    try:
        mine = a.get(User, 1)
        commit(world, lambda s: setattr(s.get(User, 1), "name", "bob"))
        bob = lambda s: [(u.id, u.active) for u in s.scalars(select(User).where(User.name == "bob"))]
        cached(world, bob)
        mine.active = False  # UPDATE users SET active=false WHERE id=1: the row is named "bob" now
        a.commit()
    finally:
        a.close()
    fresh(world, bob, [(1, False)])


class _OtherBase(DeclarativeBase):
    pass


class Note(_OtherBase):
    """A table only the second database has."""

    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(String(20))


def test_unreadable_raw_sql_evicts_its_database_only(world, tmp_path, caplog):
    """A statement whose written tables can't be told evicts every read of *its* database, and the
    warning comes once per statement text."""
    other = create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    _OtherBase.metadata.create_all(other)
    with sessionmaker(other)() as s:
        s.add(Note(id=1, body="elsewhere"))
        s.commit()
    sql: list[str] = []
    event.listen(other, "before_cursor_execute", lambda *a: sql.append(a[2]))
    Other = sessionmaker(other, class_=CachingSession, cache=world.cache)
    notes = lambda s: s.scalars(select(Note.body)).all()
    seed(world)
    labels = lambda s: s.scalars(select(Tag.label).order_by(Tag.id)).all()
    cached(world, labels)
    for _ in range(3):
        with Other() as s:
            assert notes(s) == ["elsewhere"]
    statement = "DO $$ BEGIN UPDATE tags SET label = 'green' WHERE id = 1; END $$"
    if world.dialect != "postgresql":
        statement = "/* unknown */ WITH x AS (SELECT 1) UPDATE tags SET label = 'green' WHERE id = 1"
    statement += f" /* {world.name} {tmp_path.name} */"  # the warning is once per text, per process
    for _ in range(2):
        with world.Session() as s:
            s.execute(text(statement))
            s.commit()
    fresh(world, labels, ["green", "blue"])
    before = len(sql)
    with Other() as s:
        assert notes(s) == ["elsewhere"]
    assert len(sql) == before  # the other database's entries survived
    warned = [r for r in caplog.records if "cannot tell which tables" in r.getMessage()]
    assert len(warned) == 1
    other.dispose()
