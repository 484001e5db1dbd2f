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

Limits (see docs/pg_notify.rst): between an external commit and the listener's eviction, reads may still
hit the old entry (typically a few milliseconds); a store racing with the eviction is refused as
usual, so the window closes when the eviction lands. While the listener is disconnected nothing is
evicted; after reconnecting it evicts everything, because it cannot know what it missed. If no
listener runs, TTLs are the only backstop. Eviction is per table (a notification names no rows).
"""

from sqlacache.pg_notify.listener import AsyncPgListener, PgListener, tables_from_payload
from sqlacache.pg_notify.triggers import DEFAULT_CHANNEL as DEFAULT_CHANNEL
from sqlacache.pg_notify.triggers import install_triggers, uninstall_triggers

__all__ = ["AsyncPgListener", "PgListener", "install_triggers", "tables_from_payload", "uninstall_triggers"]
