"""``Cache.explain``: for each reason a read is not cached, explain says so AND the read really is not
served from the cache (and for a cacheable read, it really is); the debug log line says the same."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqlacache import Cache, CachingSession, Explanation


class Base(DeclarativeBase):
    pass


class Thing:
    """Not a value the codec carries (a PickleType column may hold anything)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Thing) and other.n == self.n

    __hash__ = None  # type: ignore[assignment]


class ThingType(sa.TypeDecorator[Thing]):
    impl = sa.Integer
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return None if value is None else value.n

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return None if value is None else Thing(value)


class Person(Base):
    __tablename__ = "person"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    blob: Mapped[Any] = mapped_column(sa.PickleType, nullable=True)
    thing: Mapped[Any] = mapped_column(ThingType, nullable=True)


class Pet(Base):
    __tablename__ = "pet"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


@pytest.fixture
def world(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path}/explain.db")
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(Person),
            [
                {"id": 1, "name": "ann", "blob": None, "thing": None},
                {"id": 2, "name": "bob", "blob": Thing(2), "thing": Thing(3)},
            ],
        )
        conn.execute(sa.insert(Pet), [{"id": 1, "name": "rex"}])
    cache = Cache("memory://", models={Person: {"ops": {"get", "fetch"}, "ttl": 60}})
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda c, cur, stmt, *a: seen.append(stmt))
    yield engine, cache, sessionmaker(engine, class_=CachingSession, cache=cache), seen
    cache.close()
    engine.dispose()


def served_from_cache(Session: Any, seen: list[str], stmt: Any) -> bool:
    """Run ``stmt`` in two fresh sessions: True when the second emitted no SQL."""
    for _ in range(2):
        before = len(seen)
        with Session() as s:
            s.execute(stmt).all()
    return len(seen) == before


REFUSED = [
    ("text", select(Person).where(text("name = 'ann'")), "text()"),
    ("nondeterministic", select(Person.id, func.random()), "random()"),
    ("for_update", select(Person).where(Person.id == 1).with_for_update(), "FOR UPDATE"),
    ("not_configured", select(Pet), "Pet is not configured"),
    ("not_configured", select(func.count()).select_from(Person), "op 'count' is not configured for Person"),
    ("load_option", select(Person).execution_options(populate_existing=True), "populate_existing=True"),
    ("off", select(Person).execution_options(cache=False), "cache=False"),
]


@pytest.mark.parametrize(
    ("code", "stmt", "words"), REFUSED, ids=[f"{r[0]}-{i}" for i, r in enumerate(REFUSED)]
)
def test_explain_says_why_and_the_read_really_is_not_cached(world, code, stmt, words, caplog):
    _engine, cache, Session, seen = world
    with Session() as s:
        found = cache.explain(stmt, s)
    assert isinstance(found, Explanation)
    assert (found.cacheable, found.code) == (False, code)
    assert words in found.reason and words in str(found)
    with caplog.at_level(logging.DEBUG, logger="sqlacache"):
        assert not served_from_cache(Session, seen, stmt)
    records = [r for r in caplog.records if getattr(r, "sqlacache_event", None) == "refusal"]
    assert records and records[-1].sqlacache_reason == code  # type: ignore[attr-defined]
    assert words in records[-1].getMessage()


def test_a_cacheable_read_is_explained_with_its_key_and_dependencies(world):
    _engine, cache, Session, seen = world
    stmt = select(Person).where(Person.name == "ann")
    with Session() as s:
        found = cache.explain(stmt, s)
    assert found.cacheable and found.reason is None and found.code is None
    assert (found.model, found.op, found.tables, found.ttl) == ("Person", "fetch", ("person",), 60.0)
    assert found.key is not None and any(d.startswith("c:person:name:") for d in found.dependencies)
    assert "cached for 60 s" in str(found)
    assert served_from_cache(Session, seen, stmt)
    # the same key as the read path's: the entry the read stored is there under it
    assert cache.backend.lookup(found.key, []).entry is not None  # type: ignore[union-attr]
    # without a session or bind: table-level dependencies and no key
    alone = cache.explain(stmt)
    assert alone.cacheable and alone.key is None and alone.dependencies


def test_a_table_this_transaction_wrote_is_read_from_the_database(world):
    _engine, cache, Session, seen = world
    stmt = select(Person).where(Person.id == 1)
    served_from_cache(Session, seen, stmt)  # stored
    with Session() as s:
        s.add(Person(id=3, name="cy"))
        s.flush()
        found = cache.explain(stmt, s)
        assert (found.cacheable, found.code) == (False, "written")
        assert "wrote person" in found.reason
        before = len(seen)
        s.execute(stmt).all()
        assert len(seen) == before + 1  # from the database, though an entry is there
        s.rollback()
        assert cache.explain(stmt, s).cacheable


def test_a_value_the_codec_refuses_is_named_with_its_column(world):
    _engine, cache, Session, seen = world
    stmt = select(Person).where(Person.id == 2)
    assert cache.explain(stmt).cacheable  # nothing tells before a result shows it
    assert not served_from_cache(Session, seen, stmt)
    found = cache.explain(stmt)
    assert (found.cacheable, found.code) == (False, "unencodable")
    assert "Person.blob (PickleType())" in found.reason and "Thing" in found.reason
    columns = select(Person.id, Person.blob).where(Person.id == 2)
    assert not served_from_cache(Session, seen, columns)
    # (PickleType's pickler module is in the statement's cache key: a shape no key can name)
    assert cache.explain(columns).code == "uncacheable"
    typed = select(Person.id, Person.thing).where(Person.id == 2)
    assert not served_from_cache(Session, seen, typed)
    assert "column 'thing' (ThingType())" in cache.explain(typed).reason  # type: ignore[operator]


def test_explain_of_a_plain_session_a_closed_or_disabled_cache_and_a_write(world):
    engine, cache, Session, seen = world
    with sessionmaker(engine)() as plain:
        assert cache.explain(select(Person), plain).code == "no_cache"
    assert cache.explain(sa.update(Person).values(name="x")).code == "not_select"
    off = Cache("memory://", enabled=False)
    assert off.explain(select(Person)).code == "disabled"
    off.close()
    assert off.explain(select(Person)).code == "closed"
    forced = select(Pet).execution_options(cache=True)
    assert cache.explain(forced).cacheable
    assert served_from_cache(Session, seen, forced)


def gets_from_cache(Session: Any, seen: list[str], model: Any, ident: Any) -> bool:
    for _ in range(2):
        before = len(seen)
        with Session() as s:
            s.get(model, ident)
    return len(seen) == before


def test_explain_get_agrees_with_session_get(world):
    _engine, cache, Session, seen = world
    with Session() as s:
        found = cache.explain_get(Person, 1, s)
    assert found.cacheable and (found.model, found.op, found.ttl) == ("Person", "get", 60.0)
    assert found.key is not None and any(d.startswith("r:person:") for d in found.dependencies)
    assert gets_from_cache(Session, seen, Person, 1)
    assert cache.backend.lookup(found.key, []).entry is not None  # type: ignore[union-attr]

    with Session() as s:
        found = cache.explain_get(Pet, 1, s)
    assert (found.cacheable, found.code) == (False, "not_configured")
    assert not gets_from_cache(Session, seen, Pet, 1)

    with Session() as s:
        found = cache.explain_get(Person, 1, s, execution_options={"populate_existing": True})
        assert found.code == "load_option"
        before = len(seen)
        s.get(Person, 1, populate_existing=True)
        assert len(seen) == before + 1

    with Session() as s:
        held = s.get(Person, 1)  # (the identity map holds objects weakly)
        found = cache.explain_get(Person, 1, s)
        assert found.code == "identity_map"
        before, hits = len(seen), cache.stats()["hits"]
        assert s.get(Person, 1) is held
        assert (len(seen), cache.stats()["hits"]) == (before, hits)  # no read at all

    with Session() as s:
        s.add(Person(id=9, name="new"))
        s.flush()
        assert cache.explain_get(Person, 1, s).code == "written"
        before = len(seen)
        s.get(Person, 1)
        assert len(seen) == before + 1  # from the database, though the entry is cached
        s.rollback()

    assert cache.explain_get(Person, (1, 2)).code == "bad_ident"
    assert cache.explain_get("Person", 1).code == "not_mapped"


def test_a_statement_naming_an_excluded_column_is_explained_as_excluded(world):
    engine, _, _, seen = world
    cache = Cache("memory://", models={Pet: {"ops": {"get", "fetch"}, "exclude": ["name"]}})
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    try:
        by_name = select(Pet).where(Pet.name == "rex")
        why = cache.explain(by_name, Session())
        assert not why.cacheable and why.code == "excluded" and "pet.name" in (why.reason or "")
        assert not served_from_cache(Session, seen, by_name)
        by_id = select(Pet).where(Pet.id == 1)  # the column is left out of the entry only
        assert cache.explain(by_id, Session()).cacheable
        assert served_from_cache(Session, seen, by_id)
    finally:
        cache.close()
