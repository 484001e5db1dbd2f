"""PostgreSQL LISTEN/NOTIFY: writes made outside the application evict cached reads too.

A caching session evicts what *it* commits. Writes by another service, ``psql`` or a cron job
never pass through one. This module closes that gap for PostgreSQL, opt-in, in two parts:

* :func:`install_triggers` puts one ``AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE … FOR EACH
  STATEMENT`` trigger on each table. It calls ``pg_notify(channel, '{"schema": …, "table": …,
  "op": …}')``. Statement level keeps bulk writes cheap (one call per statement, not per row) and
  is the only level TRUNCATE has. NOTIFY is transactional: it is delivered only if the writing
  transaction commits, and identical notifications within one transaction are delivered once.
* :class:`PgListener` (a thread, psycopg 3) and :class:`AsyncPgListener` (asyncio, asyncpg)
  ``LISTEN`` on the channel and turn each notification into ``cache.invalidate(tables=[…])``.

The application's own writes need no notification: its sessions evict at commit. Connections
started with ``sqlacache.origin=app`` skip the notify. Statements issued by other triggers
(``pg_trigger_depth() > 1``) still notify, because the session doesn't see those writes.

Limits (see the README): between an external commit and the listener's eviction, reads may still
hit the old entry (typically a few milliseconds); a store racing with the eviction is refused as
usual, so the window closes when the eviction lands. While the listener is disconnected nothing is
evicted; after reconnecting it evicts everything, because it cannot know what it missed. If no
listener runs, TTLs are the only backstop. Eviction is per table (a notification names no rows).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from sqlalchemy import Engine, MetaData, Table, inspect, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Mapper

from sqlacache.cache import Cache
from sqlacache.policy import ConfigurationError

log = logging.getLogger("sqlacache.pg_notify")

__all__ = ["AsyncPgListener", "PgListener", "install_triggers", "tables_from_payload", "uninstall_triggers"]

DEFAULT_CHANNEL = "sqlacache"
_FUNCTION = "sqlacache_notify"  # the trigger function, created in the schema of each table
_TRIGGER = "sqlacache_notify"  # one per table: installing again (any channel) replaces it
_INSTALL_LOCK = int.from_bytes(b"sqlacach", "big")  # advisory lock key: concurrent installs queue up
# Lowercase only: LISTEN folds unquoted names to lowercase while pg_notify() doesn't, and a name
# that means the same thing everywhere can't be mismatched between trigger and listener.
_CHANNEL_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")

# The notify is skipped only for statements the application's sessions issued themselves
# (they evict at commit). Depth > 1 means another trigger wrote: the session can't see that.
_FUNCTION_BODY = """
BEGIN
    IF pg_trigger_depth() > 1
       OR current_setting('sqlacache.origin', true) IS DISTINCT FROM 'app' THEN
        PERFORM pg_notify(
            TG_ARGV[0],
            json_build_object('schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME, 'op', TG_OP)::text
        );
    END IF;
    RETURN NULL;
END
"""

TableSpec = Table | type | str


def _check_channel(channel: str) -> str:
    if not isinstance(channel, str) or not _CHANNEL_RE.fullmatch(channel):
        raise ConfigurationError(
            f"channel {channel!r} is not a valid channel name: use 1-63 lowercase letters, digits and "
            "underscores, starting with a letter or underscore (e.g. channel='sqlacache_orders')"
        )
    return channel


# -- triggers -----------------------------------------------------------------------------------


def _tables(spec: MetaData | TableSpec | Iterable[TableSpec]) -> list[Table]:
    if isinstance(spec, MetaData):
        return list(spec.sorted_tables)
    items: Iterable[TableSpec] = [spec] if isinstance(spec, (Table, type, str)) else spec
    out: list[Table] = []
    for item in items:
        if isinstance(item, Table):
            out.append(item)
        elif isinstance(item, str):
            # Interpreted as SQLAlchemy's Table(name) would be: lowercase is case-insensitive.
            schema, _, name = item.rpartition(".")
            out.append(Table(name, MetaData(), schema=schema or None))
        else:
            mapper: object = inspect(item, raiseerr=False)
            if not isinstance(mapper, Mapper):
                raise ConfigurationError(
                    f"{item!r} is not a Table, a mapped class or a table name; pass e.g. "
                    "Base.metadata, [User, 'audit_log', 'other_schema.events']"
                )
            out.extend(t for t in mapper.tables if isinstance(t, Table))
    return out


@contextlib.contextmanager
def _transaction(bind: Engine | Connection) -> Iterator[Connection]:
    if not isinstance(bind, (Engine, Connection)):
        raise ConfigurationError(
            f"{bind!r} is not an Engine or a Connection; with an AsyncEngine use "
            "`async with engine.begin() as conn: await conn.run_sync(install_triggers, metadata)`"
        )
    if bind.dialect.name != "postgresql":
        raise ConfigurationError(
            f"triggers need PostgreSQL, not {bind.dialect.name}; for other databases call "
            "cache.invalidate(tables=[...]) after external writes"
        )
    with contextlib.ExitStack() as stack:
        if isinstance(bind, Engine):
            conn = stack.enter_context(bind.begin())
        else:
            conn = bind
            if not conn.in_transaction():  # else the caller's (e.g. an Alembic migration's) commits
                stack.enter_context(conn.begin())
        # CREATE OR REPLACE FUNCTION from two processes at once fails ("tuple concurrently updated").
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _INSTALL_LOCK})
        yield conn


def _resolve(conn: Connection, table: Table) -> tuple[str, str] | None:
    """The (schema, name) the server resolves ``table`` to (search_path for unqualified names)."""
    sql = conn.dialect.identifier_preparer.format_table(table)
    row = conn.execute(
        text(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.oid = to_regclass(:name)"
        ),
        {"name": sql},
    ).one_or_none()
    return None if row is None else (row[0], row[1])


# pg_trigger.tgtype of ours: INSERT (4) | DELETE (8) | UPDATE (16) | TRUNCATE (32), AFTER, STATEMENT.
_TGTYPE = 4 | 8 | 16 | 32


def _in_place(conn: Connection, target: str, function: str, channel: str) -> bool:
    """Is our trigger already there, as we would create it? Re-running install_triggers (at every
    start-up, say) then takes no lock: DROP TRIGGER would wait for, and block, the table's users."""
    found = conn.execute(
        text(
            "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass(:target) AND tgname = :name "
            "AND tgfoid = to_regprocedure(:function) AND tgtype = :type AND tgenabled <> 'D' "
            "AND tgargs = convert_to(:channel, 'UTF8') || decode('00', 'hex'))"
        ),
        {
            "target": target,
            "name": _TRIGGER,
            "function": f"{function}()",
            "type": _TGTYPE,
            "channel": channel,
        },
    ).scalar()
    return bool(found)


def install_triggers(
    bind: Engine | Connection,
    tables: MetaData | TableSpec | Iterable[TableSpec],
    *,
    channel: str = DEFAULT_CHANNEL,
) -> list[str]:
    """Make every committed write to ``tables`` send a notification on ``channel``.

    ``tables``: a ``MetaData`` (all its tables), or Tables, mapped classes and ``"name"`` /
    ``"schema.name"`` strings. Idempotent: a trigger already in place is left alone (no table
    lock), so calling it at every start-up is fine; installing with another channel switches the
    table to it (a brief exclusive lock on the table). With a Connection already in a transaction,
    the caller commits. Returns the tables as the server resolved them, ``"schema.name"``.
    """
    _check_channel(channel)
    todo = _tables(tables)
    done: list[str] = []
    with _transaction(bind) as conn:
        quote = conn.dialect.identifier_preparer.quote_identifier
        schemas: set[str] = set()
        for table in todo:
            found = _resolve(conn, table)
            if found is None:
                raise ConfigurationError(
                    f"table {table.fullname!r} does not exist (for unqualified names: not on the "
                    "search_path); create the tables first, e.g. metadata.create_all(engine)"
                )
            schema, name = found
            if f"{schema}.{name}" in done:  # a table named twice (a class and its Table, say)
                continue
            function = f"{quote(schema)}.{quote(_FUNCTION)}"
            if schema not in schemas:
                schemas.add(schema)
                conn.execute(
                    text(
                        f"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql "
                        f"AS $sqlacache${_FUNCTION_BODY}$sqlacache$"
                    )
                )
            target = f"{quote(schema)}.{quote(name)}"
            if not _in_place(conn, target, function, channel):
                conn.execute(text(f"DROP TRIGGER IF EXISTS {quote(_TRIGGER)} ON {target}"))
                conn.execute(
                    text(
                        f"CREATE TRIGGER {quote(_TRIGGER)} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE "
                        f"ON {target} FOR EACH STATEMENT EXECUTE FUNCTION {function}('{channel}')"
                    )
                )
            done.append(f"{schema}.{name}")
    return done


def uninstall_triggers(
    bind: Engine | Connection, tables: MetaData | TableSpec | Iterable[TableSpec]
) -> list[str]:
    """Remove the triggers from ``tables`` (missing tables and triggers are skipped), and the trigger
    function from each schema where no table uses it any more. Returns the tables it looked at."""
    done: list[str] = []
    with _transaction(bind) as conn:
        quote = conn.dialect.identifier_preparer.quote_identifier
        schemas: set[str] = set()
        for table in _tables(tables):
            found = _resolve(conn, table)
            if found is not None:
                schema, name = found
                conn.execute(
                    text(f"DROP TRIGGER IF EXISTS {quote(_TRIGGER)} ON {quote(schema)}.{quote(name)}")
                )
                schemas.add(schema)
                done.append(f"{schema}.{name}")
        for schema in sorted(schemas):
            function = f"{quote(schema)}.{quote(_FUNCTION)}"
            in_use = conn.execute(
                text("SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgfoid = to_regprocedure(:f))"),
                {"f": f"{function}()"},
            ).scalar()
            if not in_use:
                conn.execute(text(f"DROP FUNCTION IF EXISTS {function}()"))
    return done


# -- listeners ----------------------------------------------------------------------------------


def tables_from_payload(payload: str) -> list[str] | None:
    """The sqlacache table names a notification names; ``None`` means "evict everything".

    The trigger sends JSON. A plain ``"name"`` or ``"schema.name"`` (``NOTIFY sqlacache, 'users'``
    from psql or another service) works too; an empty or unreadable payload evicts everything.
    """
    payload = payload.strip()
    if not payload:
        return None
    if payload.startswith("{"):
        try:
            data = json.loads(payload)
            schema, name = str(data["schema"]), str(data["table"])
        except (ValueError, KeyError, TypeError):
            log.warning("sqlacache: unreadable notification %r; evicting everything", payload)
            return None
    else:
        schema, _, name = payload.rpartition(".")
    # A Table without a schema reads whatever the search_path (or a schema_translate_map) points
    # it at, and sqlacache names it without one: evict the bare name too. Over-evicting a same-named
    # table of another schema costs a miss; under-evicting would serve stale data.
    return [f"{schema}.{name}".lower(), name.lower()] if schema else [name.lower()]


def _dsn(url_or_engine: str | URL | Engine | AsyncEngine) -> str:
    """A libpq URI (what psycopg and asyncpg both take) from a SQLAlchemy URL or engine."""
    if isinstance(url_or_engine, (Engine, AsyncEngine)):
        url = url_or_engine.url
    elif isinstance(url_or_engine, (str, URL)):
        url = make_url(url_or_engine)
    else:
        raise ConfigurationError(f"{url_or_engine!r} is not a database URL or an engine")
    if url.get_backend_name() != "postgresql":
        raise ConfigurationError(f"LISTEN/NOTIFY needs PostgreSQL; {url!r} is {url.get_backend_name()}")
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def _import(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigurationError(
            f"{module} is not installed; the listener needs it: pip install {extra!r}"
        ) from exc


class _Listener:
    """What both listeners share: configuration and counters."""

    application_name = "sqlacache-listener"
    _driver = ("", "")  # (module, what to pip install): imported at construction, not at import

    def __init__(
        self,
        cache: Cache,
        url_or_engine: str | URL | Engine | AsyncEngine,
        *,
        channel: str = DEFAULT_CHANNEL,
        reconnect_delay: float = 0.1,
        max_reconnect_delay: float = 10.0,
        connect_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.cache = cache
        self.channel = _check_channel(channel)
        self.dsn = _dsn(url_or_engine)
        self.reconnect_delay = reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self.connect_kwargs = dict(connect_kwargs or {})
        self.notifications = 0  # notifications handled
        self.reconnects = 0  # connections re-established after a loss (each evicted everything)
        self.errors = 0  # failed invalidations (logged; the listener carries on)
        self.backend_pid: int | None = None  # the listening connection's server process, if connected
        self._db: Any = _import(*self._driver)

    def _log_invalidation_error(self, exc: BaseException) -> None:
        self.errors += 1
        log.error("sqlacache: invalidation after a notification failed", exc_info=exc)

    def _log_reconnected(self) -> None:
        self.reconnects += 1  # counted once the eviction is done, so a caller seeing it can rely on it
        log.warning(
            "sqlacache: listener on channel %r reconnected; notifications may have been missed while "
            "disconnected, so everything was evicted",
            self.channel,
        )


class PgListener(_Listener):
    """Evicts on every notification, from a daemon thread with its own psycopg 3 connection.

    ``start()`` returns once ``LISTEN`` is in place (and raises if the first connection fails);
    ``stop()`` joins the thread. The cache must be usable from plain threads (a ``"redis://"`` URL,
    a sync client or memory); with only a ``redis.asyncio`` client use :class:`AsyncPgListener`.
    ``connect_kwargs`` go to ``psycopg.connect`` (e.g. ``sslmode``, ``password``).
    """

    _driver = ("psycopg", "psycopg[binary]>=3.2")
    poll_interval = 0.2  # how often the thread looks up from waiting to check for stop()
    _thread: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            return
        # Fresh events per run: a previous thread that is slow to exit can't be confused by them.
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(self._stopping,), name=f"sqlacache-listen-{self.channel}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise TimeoutError(f"sqlacache: listener could not LISTEN on {self.channel!r} within {timeout}s")
        if self._failure is not None:
            self.stop()
            raise self._failure

    def stop(self, timeout: float = 5.0) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping.set()
            thread.join(timeout)

    def __enter__(self) -> PgListener:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _connect(self) -> Any:
        # Keepalives make a silently dead network path fail within ~25 s instead of hanging forever.
        kwargs = {
            "application_name": self.application_name,
            "connect_timeout": 5,
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            **self.connect_kwargs,
        }
        conn = self._db.connect(self.dsn, autocommit=True, **kwargs)
        try:
            conn.execute(f'LISTEN "{self.channel}"')  # the channel name is validated
        except BaseException:
            conn.close()
            raise
        return conn

    def _run(self, stopping: threading.Event) -> None:
        delay = self.reconnect_delay
        connected_before = False
        while not stopping.is_set():
            try:
                conn = self._connect()
            except Exception as exc:
                if not connected_before:  # a wrong URL or password: start() raises it
                    self._failure = exc
                    self._ready.set()
                    return
                log.warning("sqlacache: listener cannot reconnect (retrying in %.1fs): %s", delay, exc)
                stopping.wait(delay)
                delay = min(delay * 2, self.max_reconnect_delay)
                continue
            delay = self.reconnect_delay
            with conn:
                self.backend_pid = conn.info.backend_pid
                if connected_before:
                    # LISTEN is in place again, so whatever commits after this eviction is heard.
                    self._invalidate(None)
                    self._log_reconnected()
                connected_before = True
                self._ready.set()
                try:
                    while not stopping.is_set():
                        for note in conn.notifies(timeout=self.poll_interval):
                            self._handle(note.payload)
                except self._db.Error as exc:
                    log.warning("sqlacache: listener lost its connection: %s", exc)
                finally:
                    self.backend_pid = None

    def _handle(self, payload: str) -> None:
        self.notifications += 1
        self._invalidate(tables_from_payload(payload))

    def _invalidate(self, tables: list[str] | None) -> None:
        try:
            if tables is None:
                self.cache.invalidate_all()
            else:
                self.cache.invalidate(tables=tables)
        except Exception as exc:  # the listener must outlive any one invalidation
            self._log_invalidation_error(exc)


_LOST = object()  # queued when the connection is gone


class AsyncPgListener(_Listener):
    """:class:`PgListener` for asyncio: an asyncpg connection and a task on the running loop.

    ``await start()`` returns once ``LISTEN`` is in place; ``await stop()`` ends it. The connection
    is checked every ``health_interval`` seconds when idle. ``connect_kwargs`` go to
    ``asyncpg.connect``.
    """

    _driver = ("asyncpg", "asyncpg")
    health_interval = 10.0
    _conn: Any = None
    _task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is not None:
            return
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._conn = await self._connect()  # a wrong URL or password raises here
        self._task = asyncio.get_running_loop().create_task(self._supervise())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        conn, self._conn = self._conn, None
        self.backend_pid = None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5)
            conn.terminate()  # no-op if closed

    async def __aenter__(self) -> AsyncPgListener:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _connect(self) -> Any:
        settings = {"application_name": self.application_name}
        kwargs = {"timeout": 5, **self.connect_kwargs}
        kwargs["server_settings"] = {**settings, **kwargs.get("server_settings", {})}
        conn = await self._db.connect(self.dsn, **kwargs)
        try:
            await conn.add_listener(self.channel, self._on_notify)
        except BaseException:
            conn.terminate()
            raise
        # Only this connection's end counts: closing an old one later must not look like a loss.
        conn.add_termination_listener(lambda c: self._queue.put_nowait(_LOST) if c is self._conn else None)
        self.backend_pid = conn.get_server_pid()
        return conn

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self._queue.put_nowait(payload)

    async def _supervise(self) -> None:
        while True:
            try:
                item = await asyncio.wait_for(self._queue.get(), self.health_interval)
            except asyncio.TimeoutError:
                item = None if await self._healthy() else _LOST
            if item is _LOST:
                await self._reconnect()
            elif isinstance(item, str):
                self.notifications += 1
                await self._invalidate(tables_from_payload(item))

    async def _healthy(self) -> bool:
        try:
            await asyncio.wait_for(self._conn.fetchval("SELECT 1"), 5)
            return True
        except Exception:
            return False

    async def _reconnect(self) -> None:
        old, self._conn = self._conn, None
        self.backend_pid = None
        if old is not None:
            old.terminate()
        log.warning("sqlacache: listener lost its connection; reconnecting")
        delay = self.reconnect_delay
        while True:
            try:
                self._conn = await self._connect()
                break
            except Exception as exc:
                log.warning("sqlacache: listener cannot reconnect (retrying in %.1fs): %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_reconnect_delay)
        # LISTEN is in place again, so whatever commits after this eviction is heard.
        await self._invalidate(None)
        self._log_reconnected()

    async def _invalidate(self, tables: list[str] | None) -> None:
        try:
            if tables is None:
                await self.cache.ainvalidate_all()
            else:
                await self.cache.ainvalidate(tables=tables)
        except Exception as exc:  # the listener must outlive any one invalidation
            self._log_invalidation_error(exc)
