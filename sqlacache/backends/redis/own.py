"""Connections of our own, out of the client's connection pool, for the two calls every read makes.

On loopback, a redis-py client call spends about as long in its pool, retry and event machinery as
the round trip itself takes. The read path's lookup therefore writes its script call on a
connection of its own (one per thread), and a miss's store is written on another and not waited
for (``Sender``): a reader that missed has its rows, and the store's reply — stored, or refused
because a commit came first — changes nothing for it. The replies are read sixteen at a time, or
when someone asks for the counters. The scripts are unchanged: the same atomic, generation-checked
steps, which Redis runs as soon as the bytes arrive — a late store still cannot install stale data.
The connections are the client's own kind, made by its pool with its settings (timeouts, TLS, auth,
database). An asyncio client's lookups and stores run on connections of our own as well
(``AsyncConnections``: one per call in flight, sixteen at most), awaited as the client's are.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from redis.exceptions import ConnectionError as _Dropped
from redis.exceptions import NoScriptError, ResponseError

from sqlacache.backends.redis.errors import FAILURES

Call = tuple[Sequence[str], Sequence[Any]]  # a store script's keys and arguments


def can_own(client: Any) -> bool:
    """Whether ``client`` is a redis-py client (sync or asyncio) on a plain connection pool, or on
    a Sentinel pool of the master (not a fake, a cluster, a replica…).

    A Sentinel pool's ``make_connection()`` gives connections that ask the sentinels for the
    master's address whenever they connect, and that drop themselves on a ``READONLY`` reply (a
    master demoted to replica): ours then follow a failover as the pool's own do."""
    kinds: tuple[type, type, type]
    if type(client) is redis.Redis:
        kinds = (
            redis.ConnectionPool,
            redis.sentinel.SentinelConnectionPool,
            redis.connection.AbstractConnection,
        )
    elif type(client) is redis.asyncio.Redis:
        kinds = (
            redis.asyncio.ConnectionPool,
            redis.asyncio.sentinel.SentinelConnectionPool,
            redis.asyncio.connection.AbstractConnection,
        )
    else:
        return False
    plain, sentinel, connection = kinds
    pool = client.connection_pool
    connection_class = getattr(pool, "connection_class", None)
    return (
        (type(pool) is plain or (type(pool) is sentinel and pool.is_master))  # type: ignore[attr-defined]
        and isinstance(connection_class, type)
        and issubclass(connection_class, connection)
        and connection_class.__module__.startswith("redis.")
    )


def _connection_like(pool: Any) -> Any:
    """A connection made as ``pool`` makes its own, but not counted against its ``max_connections``
    (``make_connection`` counts every one it ever made: a thread's connection, gone with its thread,
    would use the pool up after that many threads)."""
    return pool.connection_class(**pool.connection_kwargs)


def _pack(connection: Any, parts: Sequence[Any]) -> Any:
    """A command in RESP. redis-py's packer, generic over encoders and buffer sizes, costs about 8 µs
    for a lookup's dozen short arguments; this one, for the str/int/bytes a script call carries,
    about 3 µs. Anything else goes to the client's packer."""
    encoder = connection.encoder  # the client's encoding: keys must be the bytes its other calls send
    encoding, errors = encoder.encoding, encoder.encoding_errors
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        if isinstance(part, str):
            part = part.encode(encoding, errors)
        elif type(part) is int:
            part = b"%d" % part
        elif not isinstance(part, bytes):
            return connection.pack_command(*parts)
        out.append(b"$%d\r\n%b\r\n" % (len(part), part))
    return [b"".join(out)]


class OwnScript:
    """A Lua script called on this thread's own connection: ``script(keys=…, args=…)``, as redis-py's
    ``Script`` is called."""

    def __init__(self, client: redis.Redis, text: bytes, sha: str, also: Sequence[bytes] = ()) -> None:
        self._client = client
        self._pool = client.connection_pool
        self._text = text
        self._also = also  # loaded with it after a NOSCRIPT (the Sender's store, read late)
        self.sha = sha
        self._local = threading.local()
        self._made: weakref.WeakSet[Any] = weakref.WeakSet()  # for close(): every thread's

    def _connection(self) -> Any:
        local = self._local
        connection = getattr(local, "connection", None)
        if connection is None or local.pid != os.getpid():  # (a forked child leaves the parent's be)
            connection = local.connection = _connection_like(self._pool)
            local.pid = os.getpid()
            self._made.add(connection)
        return connection

    def close(self) -> None:
        for connection in list(self._made):
            connection.disconnect()

    def __call__(self, keys: Sequence[str] = (), args: Sequence[Any] = ()) -> Any:
        return self.command("EVALSHA", self.sha, len(keys), *keys, *args)

    def command(self, *parts: Any) -> Any:
        """Any command on this thread's connection (the strict near-cache's position read too)."""
        connection = self._connection()
        packed = _pack(connection, parts)
        # Once more after each of the two things a restarted Redis does to a call (it closed the
        # connection, and it lost the scripts), never twice for the same one.
        reconnected = reloaded = False
        while True:
            try:
                if connection._sock is None:
                    # connect() itself: send_packed_command's own reconnect would go back to the
                    # last address, where a Sentinel-managed connection must ask for the master's.
                    connection.connect()
                connection.send_packed_command(packed, check_health=False)
                return connection.read_response()
            except NoScriptError:  # a Redis that restarted or flushed its scripts
                if reloaded:
                    raise
                reloaded = True
                for text in (self._text, *self._also):
                    self._client.script_load(text)
            except ResponseError:  # an error reply: the connection is fine
                raise
            except _Dropped:
                # A connection the server closed while idle: reconnect and try once more, as the
                # client's own retry does (a timeout is not a _Dropped: a server that doesn't answer
                # is not asked twice).
                connection.disconnect()
                if reconnected:
                    raise
                reconnected = True
            except BaseException:
                connection.disconnect()  # a late reply must not be read as the next call's
                raise


class Sender:
    """One connection of our own that only carries stores (the script ``text``)."""

    def __init__(self, client: redis.Redis, text: bytes) -> None:
        self._pool = client.connection_pool
        self._text = text
        self._lock = threading.Lock()
        self._connection: Any = None
        self._pid = os.getpid()
        self._sent: deque[Call] = deque()

    @property
    def pending(self) -> int:
        return len(self._sent)

    def _ready(self) -> Any:
        if self._pid != os.getpid():  # a forked child: the socket is the parent's, leave it be
            self._connection, self._pid = None, os.getpid()
            self._sent.clear()
        if self._connection is None:
            self._connection = _connection_like(self._pool)
        if self._connection._sock is None:
            self._connection.connect()  # (see OwnScript.command)
            # Loaded on every new connection (a Redis that restarted lost it): the replies are read
            # late, so a store refused with NOSCRIPT would only be run again then.
            self._connection.send_command("SCRIPT", "LOAD", self._text, check_health=False)
            self._connection.read_response()
        return self._connection

    def send(self, sha: str, call: Call) -> None:
        """Write the store script's call; raises the client's error if it could not be written."""
        keys, args = call
        with self._lock:
            for attempt in range(2):
                try:
                    connection = self._ready()
                    connection.send_packed_command(
                        _pack(connection, ("EVALSHA", sha, len(keys), *keys, *args)), check_health=False
                    )
                except _Dropped:
                    # A connection the server closed (its replies are read late, so this is where
                    # that shows): on a new one, once more, as OwnScript.command does.
                    self._drop()
                    if attempt:
                        raise
                    continue
                except BaseException:
                    self._drop()
                    raise
                self._sent.append(call)
                return

    def replies(self, rerun: Callable[[Call], Any]) -> list[Any]:
        """The replies of the stores sent so far, in order: each the script's reply, or the exception
        that stands for it. ``rerun`` runs a call again through the client (after NOSCRIPT: a Redis
        that restarted or flushed its scripts), which loads the script."""
        out: list[Any] = []
        with self._lock:
            while self._sent:
                call = self._sent.popleft()
                try:
                    out.append(self._connection.read_response())
                except NoScriptError:
                    try:
                        out.append(rerun(call))
                    except FAILURES as exc:
                        out.append(exc)
                except ResponseError as exc:  # an error reply (OOM, READONLY…): this store's only
                    out.append(exc)
                except FAILURES as exc:  # the connection is gone, and the replies it owed with it
                    out.extend([exc] * (1 + len(self._sent)))
                    self._drop()
        return out

    def _drop(self) -> None:
        connection, self._connection = self._connection, None
        self._sent.clear()
        if connection is not None and self._pid == os.getpid():
            connection.disconnect()

    def close(self) -> None:
        with self._lock:
            self._drop()


class AsyncConnections:
    """Connections of our own for an asyncio client: the read path's lookup and a miss's store.

    On loopback, a ``redis.asyncio`` script call spends some 25 µs in the client's command
    machinery, its pool and its packer — a quarter of the round trip. A connection here carries
    one call at a time (asyncio tasks interleave, so each call in flight holds one); at most
    ``most`` are open, and a call beyond that goes through the client as before. Like the
    client's, they belong to the event loop they were opened on (one backend per event loop, as
    for the client)."""

    def __init__(self, client: redis.asyncio.Redis, most: int = 16) -> None:
        self._client = client
        self._pool = client.connection_pool
        self._most = most
        self._idle: list[Any] = []
        self._open = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def take(self) -> Any:
        """An idle connection, a new one, or None when ``most`` are in use (use the client)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # another loop's connections can't be used (nor closed) here
            self._loop, self._idle, self._open = loop, [], 0
        if self._idle:
            return self._idle.pop()
        if self._open >= self._most:
            return None
        self._open += 1
        return _connection_like(self._pool)

    def give_back(self, connection: Any) -> None:
        if asyncio.get_running_loop() is self._loop:  # (else the backend moved to another loop)
            self._idle.append(connection)

    async def lose(self, connection: Any) -> None:
        """A connection that must not be used again (a reply may still be on its way): closed."""
        if asyncio.get_running_loop() is self._loop:
            self._open -= 1
        with contextlib.suppress(Exception):  # redis-py has mostly closed it already
            await connection.disconnect(nowait=True)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        self._open -= len(idle)
        for connection in idle:
            with contextlib.suppress(Exception):
                await connection.disconnect(nowait=True)

    def forget(self) -> None:
        """Off the event loop (a sync ``close()``): let go of the idle connections, as the client's
        own pool does there (they can only be closed on their loop)."""
        self._idle, self._open = [], 0


class AsyncOwnScript:
    """A Lua script called on a connection of ``connections`` (see :class:`AsyncConnections`);
    awaited as redis-py's ``AsyncScript`` is: ``await script(keys=…, args=…)``."""

    def __init__(self, connections: AsyncConnections, client: redis.asyncio.Redis, text: bytes) -> None:
        self._connections = connections
        self._client = client
        self._text = text
        self._fallback = client.register_script(text)  # when every connection of ours is busy
        self.sha = self._fallback.sha

    async def __call__(self, keys: Sequence[str] = (), args: Sequence[Any] = ()) -> Any:
        connections = self._connections
        connection = connections.take()
        if connection is None:
            return await self._fallback(keys=keys, args=args)
        packed = _pack(connection, ("EVALSHA", self.sha, len(keys), *keys, *args))
        reconnected = reloaded = False  # (see OwnScript.command)
        while True:
            try:
                if not connection.is_connected:
                    await connection.connect()  # (see OwnScript.command: a Sentinel-managed one asks)
                await connection.send_packed_command(packed, check_health=False)
                reply = await connection.read_response()
            except NoScriptError:  # a Redis that restarted or flushed its scripts
                if reloaded:
                    connections.give_back(connection)
                    raise
                reloaded = True
                try:
                    await self._client.script_load(self._text)
                except BaseException:
                    connections.give_back(connection)
                    raise
            except ResponseError:  # an error reply: the connection is fine
                connections.give_back(connection)
                raise
            except _Dropped:  # closed by the server while idle: once more, on a new socket
                await connection.disconnect(nowait=True)
                if reconnected:
                    await connections.lose(connection)
                    raise
                reconnected = True
            except BaseException:  # a timeout, a cancelled task: a late reply must not be read
                await connections.lose(connection)  # as the next call's
                raise
            else:
                connections.give_back(connection)
                return reply
