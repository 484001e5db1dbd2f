"""PostgreSQL LISTEN/NOTIFY: writes made outside the application (psql, other services) evict too.

Every external write here goes through a plain psycopg connection, never through SQLAlchemy, and
every read through a caching session backed by the real Redis.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker

from sqlacache import Cache, CachingAsyncSession, CachingSession, ConfigurationError
from sqlacache.pg_notify import (
    AsyncPgListener,
    PgListener,
    install_triggers,
    tables_from_payload,
    uninstall_triggers,
)
from tests.conftest import _pg_schema_url, _truncate_sync
from tests.helpers import seed
from tests.models import Base, Order, Tag, User, user_tags

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


@dataclass
class Env:
    engine: Any
    cache: Cache
    Session: Any
    channel: str
    schema: str
    conninfo: str  # libpq URI of the test database, for the "other service" connections

    def external(self, sql: str, *, commit: bool = True, origin: str | None = None) -> None:
        """Run ``sql`` as another service would: its own psycopg connection, no SQLAlchemy."""
        options = f"-csearch_path={self.schema}" + (f" -csqlacache.origin={origin}" if origin else "")
        with psycopg.connect(self.conninfo, options=options) as conn:
            conn.execute(sql)
            if commit:
                conn.commit()
            else:
                conn.rollback()

    def read(self, read: Callable[[Any], Any]) -> tuple[Any, bool]:
        """``read`` in a fresh caching session: (value, whether it was a cache hit)."""
        hits = self.cache.stats()["hits"]
        with self.Session() as s:
            value = read(s)
        return value, self.cache.stats()["hits"] > hits

    def warm(self, read: Callable[[Any], Any]) -> Any:
        """Read until served from the cache (a dependency's first read after a cold start isn't stored)."""
        for _ in range(3):
            value, hit = self.read(read)
            if hit:
                return value
        pytest.fail("the read was never served from the cache")


def eventually(check: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        time.sleep(0.01)


async def aeventually(check: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not (await result if inspect.isawaitable(result := check()) else result):
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.01)


@pytest.fixture
def channel() -> str:
    return f"sqlacache_test_{uuid.uuid4().hex[:12]}"  # parallel runs share the database


@pytest.fixture
def env(pg_sync_url: str, pg_schema: str, redis_url: str, key_prefix: str, channel: str) -> Iterator[Env]:
    url, args = _pg_schema_url(pg_sync_url, pg_schema)
    engine = create_engine(url, connect_args=args)
    _truncate_sync(engine)
    install_triggers(engine, Base.metadata, channel=channel)
    cache = Cache(backend=redis_url, prefix=key_prefix, socket_timeout=1.0)  # a loaded CI box is slow
    conninfo = make_url(pg_sync_url).set(drivername="postgresql").render_as_string(hide_password=False)
    e = Env(
        engine, cache, sessionmaker(engine, class_=CachingSession, cache=cache), channel, pg_schema, conninfo
    )
    seed(e)
    yield e
    uninstall_triggers(engine, Base.metadata)
    cache.invalidate_all()
    cache.close()
    engine.dispose()


@pytest.fixture
def listener(env: Env) -> Iterator[PgListener]:
    with PgListener(env.cache, env.engine, channel=env.channel, reconnect_delay=0.02) as running:
        yield running


class Notes:
    """A bare LISTEN connection: shows exactly which notifications a write sent."""

    def __init__(self, env: Env, channel: str | None = None) -> None:
        self.channel = channel or env.channel
        self.conn = psycopg.connect(env.conninfo, autocommit=True)
        self.conn.execute(f'LISTEN "{self.channel}"')

    def until(self, table: str, timeout: float = 5.0) -> list[tuple[str, str]]:
        """(table, op) of every notification up to and including the first one for ``table``.
        Notifications arrive in commit order, so a later commit to ``table`` is a barrier."""
        seen: list[tuple[str, str]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for note in self.conn.notifies(timeout=deadline - time.monotonic(), stop_after=1):
                data = json.loads(note.payload)
                seen.append((data["table"], data["op"]))
                if data["table"] == table:
                    return seen
        pytest.fail(f"no notification for {table}; got {seen}")

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def notes(env: Env) -> Iterator[Notes]:
    n = Notes(env)
    yield n
    n.close()


def name_of_1(s: Any) -> str | None:
    user = s.get(User, 1)
    return None if user is None else user.name


def active_names(s: Any) -> list[str]:
    return list(s.scalars(select(User.name).where(User.active).order_by(User.id)))


# -- external writes evict ------------------------------------------------------------------------


def test_external_update_evicts_get_and_list(env: Env, listener: PgListener) -> None:
    assert env.warm(name_of_1) == "u1"
    assert env.warm(active_names) == ["u1", "u2", "u3"]
    env.external("UPDATE users SET name = 'changed' WHERE id = 1")
    eventually(lambda: env.read(name_of_1)[0] == "changed")
    assert env.read(active_names)[0] == ["changed", "u2", "u3"]
    assert listener.notifications >= 1


def test_external_insert_evicts_filtered_list_and_not_found(env: Env, listener: PgListener) -> None:
    assert env.warm(lambda s: s.get(User, 9)) is None
    env.warm(active_names)
    env.external(
        "INSERT INTO users (id, name, active, status, balance, joined, token) "
        "VALUES (9, 'nine', true, 'active', 0, now(), gen_random_uuid())"
    )
    eventually(lambda: env.read(active_names)[0] == ["u1", "u2", "u3", "nine"])
    assert env.read(name_of_1)[0] == "u1"
    assert env.read(lambda s: s.get(User, 9).name)[0] == "nine"


def test_external_delete_evicts_the_table_and_what_the_database_cascades_to(
    env: Env, listener: PgListener
) -> None:
    def orders_of_3(s: Any) -> list[int]:
        return list(s.scalars(select(Order.id).where(Order.user_id == 3).order_by(Order.id)))

    assert env.warm(orders_of_3) == [30, 31]
    assert env.warm(lambda s: s.get(User, 3) is not None)
    env.external("DELETE FROM users WHERE id = 3")  # ON DELETE CASCADE deletes the orders
    eventually(lambda: env.read(orders_of_3)[0] == [])
    assert env.read(lambda s: s.get(User, 3))[0] is None


def test_external_truncate_evicts(env: Env, listener: PgListener) -> None:
    def counts(s: Any) -> tuple[int, int]:
        return s.scalar(select(func.count()).select_from(User)), s.scalar(select(func.count(Order.id)))

    assert env.warm(counts) == (3, 6)
    assert env.warm(lambda s: s.get(User, 2).name) == "u2"
    env.external("TRUNCATE users CASCADE")  # orders and user_tags too: each one's trigger notifies
    eventually(lambda: env.read(lambda s: s.get(User, 2))[0] is None)
    eventually(lambda: env.read(counts)[0] == (0, 0))


def test_rolled_back_external_write_sends_nothing(env: Env, listener: PgListener) -> None:
    env.warm(name_of_1)
    before = listener.notifications
    env.external("UPDATE users SET name = 'rolled back' WHERE id = 1", commit=False)
    env.external("UPDATE tags SET label = label")  # committed after it: a barrier
    eventually(lambda: listener.notifications > before)
    assert listener.notifications == before + 1
    assert env.read(name_of_1) == ("u1", True)


def test_a_plain_notify_names_a_table_and_an_empty_one_means_everything(
    env: Env, listener: PgListener
) -> None:
    env.warm(name_of_1)
    env.warm(lambda s: s.get(Tag, 1).label)
    env.external(f"NOTIFY {env.channel}, '{env.schema}.tags'")
    eventually(lambda: not env.read(lambda s: s.get(Tag, 1).label)[1])
    assert env.read(name_of_1) == ("u1", True)  # users untouched
    env.external(f"NOTIFY {env.channel}")
    eventually(lambda: not env.read(name_of_1)[1])


# -- the application's own writes ----------------------------------------------------------------


def test_writes_from_app_connections_do_not_notify_unless_another_trigger_wrote(
    env: Env, notes: Notes
) -> None:
    env.external("UPDATE users SET name = 'app' WHERE id = 1", origin="app")
    env.external("UPDATE tags SET label = label")  # without the setting: notifies (and is the barrier)
    assert notes.until("tags") == [("tags", "UPDATE")]

    # A statement issued by a trigger is invisible to the app's session: it notifies regardless.
    env.external(
        "CREATE FUNCTION touch_orders() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN UPDATE orders SET total = total WHERE id = 10; RETURN NULL; END $$; "
        "CREATE TRIGGER touch_orders AFTER UPDATE ON tags FOR EACH STATEMENT EXECUTE FUNCTION touch_orders()"
    )
    try:
        env.external("UPDATE tags SET label = label", origin="app")
        env.external("UPDATE user_tags SET tag_id = tag_id")  # barrier
        assert notes.until("user_tags") == [("orders", "UPDATE"), ("user_tags", "UPDATE")]
    finally:
        env.external("DROP TRIGGER touch_orders ON tags; DROP FUNCTION touch_orders()")


def test_app_engine_with_origin_option_evicts_through_its_session_only(
    env: Env, notes: Notes, pg_sync_url: str
) -> None:
    url, args = _pg_schema_url(pg_sync_url, env.schema)
    app = create_engine(url, connect_args={"options": f"{args['options']} -c sqlacache.origin=app"})
    Session = sessionmaker(app, class_=CachingSession, cache=env.cache)
    try:
        with Session() as s:
            s.get(User, 1).name = "by the app"
            s.commit()
        assert env.read(name_of_1)[0] == "by the app"  # the session evicted at commit
        env.external("UPDATE tags SET label = label")
        assert notes.until("tags") == [("tags", "UPDATE")]
    finally:
        app.dispose()


# -- the listener's life -------------------------------------------------------------------------


def test_listener_survives_a_killed_connection_and_evicts_everything(env: Env, listener: PgListener) -> None:
    env.warm(name_of_1)
    pid = listener.backend_pid
    env.external(f"SELECT pg_terminate_backend({pid})")
    eventually(lambda: listener.reconnects == 1)
    assert listener.backend_pid not in (None, pid)
    # Writes made while it was disconnected are unknown: it evicted everything after reconnecting.
    assert env.read(name_of_1) == ("u1", False)
    env.warm(name_of_1)
    env.external("UPDATE users SET name = 'after' WHERE id = 1")
    eventually(lambda: env.read(name_of_1)[0] == "after")


def test_a_failing_invalidation_does_not_stop_the_listener(
    env: Env, listener: PgListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = env.cache.invalidate
    calls: list[Any] = []

    def failing_once(*args: Any, **kwargs: Any) -> None:
        calls.append(kwargs)
        if len(calls) == 1:
            raise RuntimeError("boom")
        real(*args, **kwargs)

    monkeypatch.setattr(env.cache, "invalidate", failing_once)
    env.warm(name_of_1)
    env.external("UPDATE users SET name = 'first' WHERE id = 1")
    eventually(lambda: listener.errors == 1)
    env.external("UPDATE users SET name = 'second' WHERE id = 1")
    eventually(lambda: env.read(name_of_1)[0] == "second")
    assert calls[0] == {"tables": [f"{env.schema}.users", "users"]}


def test_start_raises_when_the_first_connection_fails(env: Env) -> None:
    listener = PgListener(env.cache, "postgresql+psycopg://postgres@127.0.0.1:1/test")
    with pytest.raises(psycopg.OperationalError):
        listener.start()
    assert listener.backend_pid is None


def test_stop_is_prompt(env: Env) -> None:
    listener = PgListener(env.cache, env.engine, channel=env.channel)
    listener.start()
    started = time.monotonic()
    listener.stop()
    assert time.monotonic() - started < 1


async def test_async_listener(env: Env, pg_async_url: str) -> None:
    url, args = _pg_schema_url(pg_async_url, env.schema)
    args["server_settings"]["sqlacache.origin"] = "app"  # asyncpg's spelling of the opt-out
    engine = create_async_engine(url, connect_args=args)
    Session = async_sessionmaker(engine, class_=CachingAsyncSession, cache=env.cache, expire_on_commit=False)

    async def read() -> tuple[str, bool]:
        hits = env.cache.stats()["hits"]
        async with Session() as s:
            user = await s.get(User, 1)
        assert user is not None
        return user.name, env.cache.stats()["hits"] > hits

    async def warm() -> str:
        for _ in range(3):
            name, hit = await read()
            if hit:
                return name
        pytest.fail("the read was never served from the cache")

    async def name_is(expected: str) -> bool:
        return (await read())[0] == expected

    try:
        async with engine.begin() as conn:  # installing from async code (idempotent: already there)
            assert await conn.run_sync(install_triggers, User, channel=env.channel) == [f"{env.schema}.users"]
        async with AsyncPgListener(env.cache, pg_async_url, channel=env.channel, reconnect_delay=0.02) as lis:
            assert await warm() == "u1"
            await asyncio.to_thread(env.external, "UPDATE users SET name = 'external' WHERE id = 1")
            await aeventually(lambda: name_is("external"))

            # The app's own write evicts through its session, and sends no notification.
            before = lis.notifications
            async with Session() as s:
                (await s.get(User, 1)).name = "app"
                await s.commit()
            assert await warm() == "app"
            await asyncio.to_thread(env.external, "UPDATE tags SET label = label")  # barrier
            await aeventually(lambda: lis.notifications > before)
            assert lis.notifications == before + 1

            pid = lis.backend_pid
            await asyncio.to_thread(env.external, f"SELECT pg_terminate_backend({pid})")
            await aeventually(lambda: lis.reconnects == 1)
            assert lis.backend_pid not in (None, pid)
            assert await read() == ("app", False)  # everything was evicted after reconnecting
            await warm()
            await asyncio.to_thread(env.external, "UPDATE users SET name = 'later' WHERE id = 1")
            await aeventually(lambda: name_is("later"))
    finally:
        await engine.dispose()


# -- installing -----------------------------------------------------------------------------------


def test_install_is_idempotent_and_uninstall_removes_everything(env: Env, notes: Notes) -> None:
    def triggers() -> int:
        with env.engine.connect() as conn:
            return int(
                conn.exec_driver_sql(
                    "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                    f"WHERE t.tgname = 'sqlacache_notify' AND c.relnamespace = '{env.schema}'::regnamespace"
                ).scalar_one()
            )

    assert triggers() == 4
    installed = install_triggers(
        env.engine, [User, Base.metadata.tables["users"], "tags", user_tags], channel=env.channel
    )
    assert installed == [f"{env.schema}.users", f"{env.schema}.tags", f"{env.schema}.user_tags"]
    # Re-installing takes no table lock, so it can't queue behind (and block) the tables' users.
    with psycopg.connect(env.conninfo, options=f"-csearch_path={env.schema}") as reader:
        reader.execute("SELECT count(*) FROM users")  # holds a lock until the transaction ends
        with env.engine.begin() as conn:  # a Connection in a transaction: the caller commits
            conn.exec_driver_sql("SET LOCAL lock_timeout = '200ms'")
            install_triggers(conn, Base.metadata, channel=env.channel)
    assert triggers() == 4
    env.external("UPDATE users SET name = name WHERE id = 1; UPDATE users SET active = active")
    env.external("UPDATE tags SET label = label")
    # One notification per table and operation per transaction, however many statements.
    assert notes.until("tags") == [("users", "UPDATE"), ("tags", "UPDATE")]

    other = Notes(env, channel=f"{env.channel}_2")
    try:
        install_triggers(env.engine, Tag, channel=other.channel)  # switches the table to that channel
        env.external("UPDATE tags SET label = label; UPDATE users SET name = name")
        assert other.until("tags") == [("tags", "UPDATE")]
        assert notes.until("users") == [("users", "UPDATE")]
    finally:
        other.close()

    assert len(uninstall_triggers(env.engine, Base.metadata)) == 4
    assert triggers() == 0
    with env.engine.connect() as conn:
        assert (
            conn.exec_driver_sql(f"SELECT to_regprocedure('{env.schema}.sqlacache_notify()')").scalar()
            is None
        )
    assert uninstall_triggers(env.engine, Base.metadata)  # again: nothing to do, no error


def test_bad_arguments_fail_at_call_time_with_the_fix(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("Upper", "with-dash", "x; drop table users", "", "a" * 64):
        with pytest.raises(ConfigurationError, match="lowercase letters"):
            install_triggers(env.engine, Base.metadata, channel=bad)
        with pytest.raises(ConfigurationError, match="lowercase letters"):
            PgListener(env.cache, env.engine, channel=bad)
        with pytest.raises(ConfigurationError, match="lowercase letters"):
            AsyncPgListener(env.cache, env.engine, channel=bad)
    with pytest.raises(ConfigurationError, match="create the tables first"):
        install_triggers(env.engine, ["no_such_table"])
    with pytest.raises(ConfigurationError, match="not a Table, a mapped class or a table name"):
        install_triggers(env.engine, [42])  # type: ignore[list-item]
    with pytest.raises(ConfigurationError, match="need PostgreSQL"):
        install_triggers(create_engine("sqlite://"), Base.metadata)
    with pytest.raises(ConfigurationError, match="needs PostgreSQL"):
        PgListener(env.cache, "sqlite://")
    # Options the listener reads only after a lost connection: refused now, not then.
    for listener in (PgListener, AsyncPgListener):
        with pytest.raises(ConfigurationError, match=r"'memory://' is not a sqlacache\.Cache"):
            listener("memory://", env.engine)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="reconnect_delay=-1: give a positive number"):
            listener(env.cache, env.engine, reconnect_delay=-1)
        with pytest.raises(ConfigurationError, match="max_reconnect_delay='10s'"):
            listener(env.cache, env.engine, max_reconnect_delay="10s")  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="max_reconnect_delay=1 is below reconnect_delay=5"):
            listener(env.cache, env.engine, reconnect_delay=5, max_reconnect_delay=1)
        with pytest.raises(ConfigurationError, match=r"connect_kwargs=.*give a dict"):
            listener(env.cache, env.engine, connect_kwargs=[("sslmode", "require")])  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(ConfigurationError, match="pip install"):
        PgListener(env.cache, env.engine)


def test_payloads_name_the_table_both_qualified_and_bare() -> None:
    payload = json.dumps({"schema": "public", "table": "Users", "op": "UPDATE"})
    assert tables_from_payload(payload) == ["public.users", "users"]
    assert tables_from_payload("other.events") == ["other.events", "events"]
    assert tables_from_payload("events") == ["events"]
    assert tables_from_payload("") is None
    assert tables_from_payload("{not json") is None
