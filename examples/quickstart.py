"""sqlacache quickstart: run ``python examples/quickstart.py`` (no servers needed).

It uses an in-memory SQLite database and the in-memory cache backend; pass ``--redis
redis://localhost:6379/0`` to cache in Redis instead. Every line it prints is measured, not
scripted: SQL statements are counted with an engine event, hits and misses come from
``cache.stats()``.
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import ForeignKey, String, create_engine, event, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload, sessionmaker

from sqlacache import Cache, CachingSession


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    active: Mapped[bool] = mapped_column(default=True)
    orders: Mapped[list[Order]] = relationship(back_populates="user", order_by="Order.id")


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    total: Mapped[int]
    user: Mapped[User] = relationship(back_populates="orders")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", metavar="URL", help="cache in Redis at URL instead of in memory")
    args = parser.parse_args()

    engine = create_engine("sqlite://")  # in-memory database
    Base.metadata.create_all(engine)
    if args.redis:
        # A prefix of our own: everything this script stores is deleted again at the end.
        cache = Cache(backend=args.redis, prefix=f"sqlacache-quickstart-{uuid.uuid4().hex[:8]}")
    else:
        cache = Cache(backend="memory://")
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)

    sql: list[str] = []
    event.listen(
        engine, "before_cursor_execute", lambda conn, cursor, statement, *rest: sql.append(statement)
    )

    with Session() as session:
        session.add_all(
            [
                User(id=1, name="alice", orders=[Order(id=10, total=25), Order(id=11, total=40)]),
                User(id=2, name="bob", orders=[Order(id=20, total=15)]),
                User(id=3, name="carol", active=False),
            ]
        )
        session.commit()

    def run(label: str, read: Callable[[Any], Any]) -> Any:
        """Run ``read`` in a fresh session; print whether the cache answered and how much SQL ran."""
        before_sql, before = len(sql), cache.stats()
        with Session() as session:
            value = read(session)
        after = cache.stats()
        n = len(sql) - before_sql
        if n == 0 and after["hits"] > before["hits"]:
            outcome = "HIT "
        elif after["stores"] > before["stores"]:
            outcome = "MISS, stored"
        elif after["stores_refused"] > before["stores_refused"]:
            outcome = "MISS, not stored (first read of a cold dependency)"
        else:
            outcome = "MISS"
        print(f"{label:<34} {outcome} ({n} SQL statement{'' if n == 1 else 's'}) -> {value!r}")
        return value

    def get_user(s: CachingSession) -> str:
        user = s.get(User, 1)
        assert user is not None
        return user.name

    def active_users(s: CachingSession) -> list[str]:
        return [u.name for u in s.scalars(select(User).where(User.active).order_by(User.name))]

    def count_orders(s: CachingSession) -> int:
        return s.scalar(select(func.count()).select_from(Order)) or 0

    def orders_of_alice(s: CachingSession) -> list[int]:
        alice = s.scalars(select(User).options(selectinload(User.orders)).where(User.id == 1)).one()
        return [o.total for o in alice.orders]  # no lazy load: the orders came with the cached user

    # The cache stores an entry only if none of its dependencies changed while it was read; on a
    # cold cache the first read of each query is stored all the same, so the second is a hit.
    run("get User 1", get_user)
    run("get User 1", get_user)
    run("get User 1", get_user)
    run("active users", active_users)
    run("active users", active_users)
    run("count orders", count_orders)
    run("count orders", count_orders)
    run("alice + orders (selectinload)", orders_of_alice)
    run("alice + orders (selectinload)", orders_of_alice)

    before_sql = len(sql)
    with Session() as session:
        alice = session.get(User, 1)
        assert alice is not None
        alice.name = "alicia"
        session.commit()  # the commit evicts every cached read that depends on user 1
    n = len(sql) - before_sql
    print(f"{'rename User 1 + commit':<34} ({n} SQL statement{'' if n == 1 else 's'})")

    run("get User 1", get_user)
    run("get User 1", get_user)
    run("active users", active_users)
    run("count orders", count_orders)  # orders did not change: still cached

    # "uncacheable" counts the selectinload's own query: it is never cached on its own, its rows
    # are stored inside the entry of the query that loaded them.
    print("cache.stats():", cache.stats())
    if args.redis:
        cache.invalidate_all()
    cache.close()
    engine.dispose()


if __name__ == "__main__":
    main()
