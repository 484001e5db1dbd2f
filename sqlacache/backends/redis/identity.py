"""Which Redis server holds the data: a failover, or a restart, is treated like data lost.

Redis replication is asynchronous. A commit's bump can reach the master and not its replica; when
the master dies and Sentinel promotes the replica, the new master holds the old versions *and* the
old entries, which then look valid to every process — stale reads, long after ``commit()``
returned. A restart from an older snapshot (RDB/AOF) is the same problem on one server.

The generation check of ``resilience/resilient.py`` catches this only in a process that had seen
the newer generation. This check needs no memory: ``<prefix>:run`` holds the ``run_id`` of the server
the data was last checked on (it replicates with the data). Every connection sqlacache opens
runs, before any other command, one script that compares it with the server's own ``run_id``
(``INFO server``: new for every start of a redis-server process, different on every server). When
they differ — a promoted replica, a restarted server, a flushed or brand-new one — the connection
first bumps ``*`` (every entry is outdated: the same as ``invalidate_all``, published to the
near-caches too) and then records the new ``run_id``; only then does it carry anything else. So
whichever process reaches the new master first invalidates everything there, before anything is
served from it, including in processes that never saw the old master.

The check runs inside the connection's own connect step (redis-py's ``redis_connect_func``), so a
reconnect made by redis-py's retry, by a Sentinel re-resolving the master, or by the pub/sub
subscriber cannot skip it. It costs one script call per new connection and nothing per command.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import ResponseError

from sqlacache.backends.redis import scripts
from sqlacache.backends.redis.signing import FanoutKeys, count_arg

log = logging.getLogger("sqlacache.backend")

# {1} when the server is the one recorded; else {0, its run_id, the recorded one or false}.
_CHECK = b"""
local info = redis.call('INFO', 'server')
local run = string.match(info, 'run_id:(%x+)')
if not run then
  return redis.error_reply('sqlacache: INFO server has no run_id')
end
local known = redis.call('GET', KEYS[1])
if known == run then
  return {1}
end
return {0, run, known}
"""

_ALL = "*"  # sqlacache.analysis.dependencies.ALL: every entry depends on it


class ServerWatch:
    """Installs the check on a client's connections (sync or asyncio) and counts what it found."""

    def __init__(self, prefix: str, version_ttl_ms: str) -> None:
        self.key = f"{prefix}:run"
        self._prefix = prefix
        self._version_ttl_ms = version_ttl_ms
        self.fanout_keys: FanoutKeys | None = None  # set by RedisBackend.sign_fanout: its bump is signed too
        self.changes = 0  # servers found with data written on another one (or on none)
        self._lock = threading.Lock()

    def install(self, client: Any) -> None:
        """Check every connection ``client``'s pool makes from now on, and its existing ones when
        they next connect (idle connected ones of a sync pool are disconnected for that)."""
        pool = client.connection_pool
        kwargs = pool.connection_kwargs
        previous = kwargs.get("redis_connect_func")
        if getattr(previous, "watch", None) is self:
            return
        asyncio = pool.connection_class.__module__.startswith("redis.asyncio")
        hook: Any = self._async_hook(previous) if asyncio else self._sync_hook(previous)
        hook.watch = self
        kwargs["redis_connect_func"] = hook
        for name in ("_available_connections", "_in_use_connections"):
            for connection in list(getattr(pool, name, ())):
                connection.redis_connect_func = hook
        if not asyncio:
            # Connected before the check was installed: they reconnect (and check) on next use.
            pool.disconnect(inuse_connections=False)

    # -- the hooks --------------------------------------------------------------------------------

    def _sync_hook(self, previous: Callable[[Any], None] | None) -> Callable[[Any], None]:
        def connected(connection: Any) -> None:
            if previous is not None:
                previous(connection)
            else:
                connection.on_connect()
            self._check(connection)

        return connected

    def _async_hook(self, previous: Callable[[Any], Any] | None) -> Callable[[Any], Awaitable[None]]:
        async def connected(connection: Any) -> None:
            if previous is not None:
                result = previous(connection)
                if isinstance(result, Awaitable):
                    await result
            else:
                await connection.on_connect()
            await self._acheck(connection)

        return connected

    def _check(self, connection: Any) -> None:
        connection.send_command("EVAL", _CHECK, 1, self.key)
        reply = connection.read_response()
        if self._same(reply):
            return
        run = reply[1]
        connection.send_command("EVAL", scripts.BUMP, 0, *self._bump_args())
        connection.read_response()
        connection.send_command("SET", self.key, run)
        # OOM: the bump got through (deleting "*"); the next connection does it again.
        with contextlib.suppress(ResponseError):
            connection.read_response()
        self._changed(connection, reply)

    async def _acheck(self, connection: Any) -> None:
        await connection.send_command("EVAL", _CHECK, 1, self.key)
        reply = await connection.read_response()
        if self._same(reply):
            return
        run = reply[1]
        await connection.send_command("EVAL", scripts.BUMP, 0, *self._bump_args())
        await connection.read_response()
        await connection.send_command("SET", self.key, run)
        with contextlib.suppress(ResponseError):
            await connection.read_response()
        self._changed(connection, reply)

    def _bump_args(self) -> tuple[str, ...]:
        return (self._prefix, self._version_ttl_ms, count_arg(self.fanout_keys, self._prefix, 1), _ALL)

    @staticmethod
    def _same(reply: Any) -> bool:
        if isinstance(reply, list) and reply and reply[0] == 1:
            return True
        if isinstance(reply, list) and len(reply) >= 2 and isinstance(reply[1], bytes):
            return False
        raise ResponseError(f"sqlacache: malformed reply to the server check: {reply!r}")

    def _changed(self, connection: Any, reply: list[Any]) -> None:
        with self._lock:
            self.changes += 1
        where = f"{getattr(connection, 'host', '?')}:{getattr(connection, 'port', '?')}"
        known = reply[2] if len(reply) > 2 and isinstance(reply[2], bytes) else None
        if known is None:
            log.info(
                "sqlacache: Redis at %s holds no record of the server the cache was written on "
                "(new, flushed or restarted empty): everything cached was invalidated",
                where,
            )
            return
        log.warning(
            "sqlacache: Redis at %s is not the server the cache's data was written on (run_id %s, "
            "was %s): a failover or a restart may have lost writes; everything cached was invalidated",
            where,
            reply[1].decode(),
            known.decode(),
        )
