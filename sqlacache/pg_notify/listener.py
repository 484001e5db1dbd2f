"""Run time: the listeners that turn notifications into ``cache.invalidate(tables=[…])``.

:class:`PgListener` is a thread (psycopg 3), :class:`AsyncPgListener` a task (asyncio, asyncpg).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import math
import threading
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from sqlacache.cache import Cache
from sqlacache.pg_notify.triggers import DEFAULT_CHANNEL, check_channel
from sqlacache.policy import ConfigurationError

log = logging.getLogger("sqlacache.pg_notify")


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
        name = type(self).__name__
        if not isinstance(cache, Cache):
            raise ConfigurationError(
                f"{name}: {cache!r} is not a sqlacache.Cache; pass {name}(cache, url_or_engine)"
            )
        self.cache = cache
        self.channel = check_channel(channel)
        self.dsn = _dsn(url_or_engine)
        # Checked here: the listener's thread/task reads them only after a lost connection, where
        # a wrong one would fail (or spin) with no one to tell.
        for option, value in (
            ("reconnect_delay", reconnect_delay),
            ("max_reconnect_delay", max_reconnect_delay),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigurationError(f"{name}: {option}={value!r}: give a positive number of seconds")
        if max_reconnect_delay < reconnect_delay:
            raise ConfigurationError(
                f"{name}: max_reconnect_delay={max_reconnect_delay!r} is below "
                f"reconnect_delay={reconnect_delay!r}: the delay doubles up to the maximum; "
                "give a maximum >= it"
            )
        if connect_kwargs is not None and not isinstance(connect_kwargs, Mapping):
            raise ConfigurationError(
                f"{name}: connect_kwargs={connect_kwargs!r}: give a dict of the driver's connect() "
                "arguments, e.g. {'sslmode': 'require'}"
            )
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
