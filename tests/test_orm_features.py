"""ORM features around the cache: user hooks that rewrite statements, inheritance, legacy spellings."""

from __future__ import annotations

from sqlalchemy import ForeignKey, String, create_engine, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker, with_loader_criteria

from sqlacache import Cache, CachingSession
from tests.helpers import seed
from tests.models import Base, User


def test_statement_rewriting_hooks_registered_after_sqlacache_are_part_of_the_key(tmp_path):
    """A multi-tenant filter added in the application's own do_orm_execute hook must not let one
    tenant's cached result be served to another."""
    engine = create_engine(f"sqlite:///{tmp_path / 't.db'}")
    Base.metadata.create_all(engine)
    cache = Cache()
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)

    @event.listens_for(Session, "do_orm_execute")
    def only_active(state):
        if state.is_select and "active" in state.session.info:
            flag = state.session.info["active"]
            state.statement = state.statement.options(
                with_loader_criteria(User, lambda cls: cls.active == flag, track_closure_variables=True)
            )

    class W:
        pass

    W.Session = Session
    seed(W)
    with Session() as s:
        s.get(User, 3).active = False
        s.commit()
    for _ in range(3):
        for flag, expected in ((True, ["u1", "u2"]), (False, ["u3"])):
            with Session(info={"active": flag}) as s:
                assert [u.name for u in s.scalars(select(User).order_by(User.id))] == expected
    assert cache.stats()["hits"] >= 2


class IBase(DeclarativeBase):
    pass


class Employee(IBase):
    __tablename__ = "employees"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(30))
    kind: Mapped[str] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "employee"}


class Manager(Employee):
    __tablename__ = "managers"
    id: Mapped[int] = mapped_column(ForeignKey("employees.id"), primary_key=True)
    budget: Mapped[int]
    __mapper_args__ = {"polymorphic_identity": "manager"}


def test_joined_inheritance_returns_the_subclass_and_evicts_on_subclass_writes(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'i.db'}")
    IBase.metadata.create_all(engine)
    sql = []
    event.listen(engine, "before_cursor_execute", lambda *a: sql.append(a[2]))
    cache = Cache()
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    with Session() as s:
        s.add_all([Employee(id=1, name="e"), Manager(id=2, name="m", budget=10)])
        s.commit()
    for _ in range(3):
        with Session() as s:
            m = s.get(Employee, 2)
            listing = s.scalars(select(Employee).order_by(Employee.id)).all()
            assert type(m) is Manager and m.budget == 10
            assert [type(e).__name__ for e in listing] == ["Employee", "Manager"]
    before = len(sql)
    with Session() as s:
        m = s.get(Employee, 2)
        assert len(sql) == before and type(m) is Manager
        # Subclass columns not loaded by select(Employee) load on access — on a hit as on a DB load.
        assert m.budget == 10
    with Session() as s:
        s.get(Manager, 2).budget = 99  # writes only the managers table
        s.commit()
    with Session() as s:
        assert s.get(Employee, 2).budget == 99
        assert [getattr(e, "budget", None) for e in s.scalars(select(Employee).order_by(Employee.id))] == [
            None,
            99,
        ]
