"""Deploy time: the statement-level NOTIFY trigger on each table, installed and removed idempotently.

The payload it sends is read by :func:`~sqlacache.pg_notify.listener.tables_from_payload`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator

from sqlalchemy import Engine, MetaData, Table, inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapper

from sqlacache.policy import ConfigurationError

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


def check_channel(channel: str) -> str:
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
    check_channel(channel)
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
