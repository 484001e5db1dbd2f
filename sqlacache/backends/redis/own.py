"""Connections of our own, out of the client's connection pool, for the two calls every read makes.

On loopback, a redis-py client call spends about as long in its pool, retry and event machinery as
the round trip itself takes. The read path's lookup therefore writes its script call on a
connection of its own, one per thread (a ``_Line``).

A miss's store goes on the same line, and is not even written at once: it waits in the line's
outbox and goes out in the same write as the thread's next command (its next lookup, usually), whose
reply is read after the store's. A reader that missed has its rows, and the store's reply — stored,
or refused because a commit came first — changes nothing for it. Writing it at once would cost the
miss a second write, and on a machine with few cores that write is dear: it wakes Redis while the
reader still works (measured in ``benchmarks/bench_anatomy.py``). A thread that issues no command
for ``_FLUSH_AFTER`` has its outbox written by the line's flusher thread, so a store never waits
longer than that (the fill lease it releases, and readers in other processes, wait no longer).
The scripts are unchanged: the same atomic, generation-checked steps, which Redis runs when the
bytes arrive — a late store still cannot install stale data.

The connections are the client's own kind, made by its pool with its settings (timeouts, TLS, auth,
database).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import redis
import redis.sentinel
from redis.exceptions import ConnectionError as _Dropped
from redis.exceptions import NoScriptError, ResponseError

from sqlacache.backends.redis.errors import FAILURES

Call = tuple[Sequence[str], Sequence[Any]]  # a store script's keys and arguments


def can_own(client: Any) -> bool:
    """Whether ``client`` is a redis-py client on a plain connection pool, or on a Sentinel pool
    of the master (not a fake, a cluster, a replica…).

    A Sentinel pool's ``make_connection()`` gives connections that ask the sentinels for the
    master's address whenever they connect, and that drop themselves on a ``READONLY`` reply (a
    master demoted to replica): ours then follow a failover as the pool's own do."""
    pool = getattr(client, "connection_pool", None)
    connection_class = getattr(pool, "connection_class", None)
    plain = type(pool) is redis.ConnectionPool
    sentinel = type(pool) is redis.sentinel.SentinelConnectionPool and pool.is_master  # type: ignore[union-attr]
    return (
        type(client) is redis.Redis
        and (plain or sentinel)
        and isinstance(connection_class, type)
        and issubclass(connection_class, redis.connection.AbstractConnection)
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


_FLUSH_AFTER = 0.002  # the longest a store waits in a line's outbox for the thread's next command
_IDLE = 0.25  # the flusher sleeps on its condition after this long without a store
_OUTBOX_BYTES = 1 << 16  # an outbox this full is written at once


class _Line:
    """One thread's connection: its commands, and the stores waiting to go out with the next one.

    ``owed``: the stores whose replies are still to be read, in the order they were (or will be)
    written; the last ``len(outbox)`` of them are still in ``outbox``. Every use holds ``lock``
    (the flusher and ``replies`` may use another thread's line)."""

    __slots__ = ("__weakref__", "connection", "lock", "outbox", "owed", "pid", "since", "thread")

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.pid = os.getpid()
        self.thread = threading.current_thread()
        self.lock = threading.Lock()
        self.outbox: list[bytes] = []
        self.owed: deque[Call] = deque()
        self.since = 0.0  # when the outbox took its first store


class OwnScript:
    """A Lua script called on this thread's own connection: ``script(keys=…, args=…)``, as redis-py's
    ``Script`` is called; and the stores sent on it without waiting (``send_store``/``replies``)."""

    def __init__(self, client: redis.Redis, text: bytes, sha: str) -> None:
        self._client = client
        self._pool = client.connection_pool
        self._text = text
        self.sha = sha
        self._local = threading.local()
        self._lines: weakref.WeakSet[_Line] = weakref.WeakSet()  # every thread's, for replies/close
        self._lines_lock = threading.Lock()  # (a WeakSet can't be copied while another thread adds)
        self._answers: deque[tuple[Call, Any]] = deque()  # store replies read, not yet collected
        self._flusher: _Flusher | None = None
        self._closed = False

    def _line(self) -> _Line:
        local = self._local
        line: _Line | None = getattr(local, "line", None)
        if line is None or line.pid != os.getpid():  # (a forked child leaves the parent's be)
            line = local.line = _Line(_connection_like(self._pool))
            with self._lines_lock:
                self._lines.add(line)
        return line

    def _all_lines(self) -> list[_Line]:
        with self._lines_lock:
            return [line for line in self._lines if line.pid == os.getpid()]

    def close(self) -> None:
        self._closed = True
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            flusher.stop()
        for line in self._all_lines():
            with line.lock:
                with contextlib.suppress(*FAILURES):
                    self._settle(line)  # the stores waiting here still go out
                line.connection.disconnect()

    def __call__(self, keys: Sequence[str] = (), args: Sequence[Any] = ()) -> Any:
        return self.command("EVALSHA", self.sha, len(keys), *keys, *args)

    def command(self, *parts: Any) -> Any:
        """Any command on this thread's connection (the strict near-cache's position read too),
        written with the stores waiting in its outbox, whose replies are read first."""
        line = self._line()
        connection = line.connection
        packed = _pack(connection, parts)
        with line.lock:
            for attempt in range(2):
                try:
                    if connection._sock is None:
                        # connect() itself: send_packed_command's own reconnect would go back to the
                        # last address, where a Sentinel-managed connection must ask for the master's.
                        connection.connect()
                    if line.outbox:
                        packed = [b"".join([*line.outbox, *packed])]
                        line.outbox = []
                    connection.send_packed_command(packed, check_health=False)
                    if line.owed:
                        self._read_owed(line)
                    return connection.read_response()
                except NoScriptError:  # a Redis that restarted or flushed its scripts
                    if attempt:
                        raise
                    self._client.script_load(self._text)
                    packed = _pack(connection, parts)
                except ResponseError:  # an error reply: the connection is fine
                    raise
                except _Dropped:
                    # A connection the server closed while idle: reconnect and try once more, as the
                    # client's own retry does (a timeout is not a _Dropped: a server that doesn't
                    # answer is not asked twice).
                    self._lose(line)
                    if attempt:
                        raise
                    packed = _pack(connection, parts)
                except BaseException:
                    self._lose(line)  # a late reply must not be read as the next call's
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    # -- stores sent without waiting ----------------------------------------------------------

    def send_store(self, call: Call, sha: str) -> None:
        """Put the store script's call in this thread's outbox: it is written with the thread's next
        command, or by the flusher within ``_FLUSH_AFTER``."""
        keys, args = call
        line = self._line()
        packed = _pack(line.connection, ("EVALSHA", sha, len(keys), *keys, *args))
        with line.lock:
            first = not line.outbox
            line.outbox.extend(packed)
            line.owed.append(call)
            if first:
                line.since = time.monotonic()
            elif sum(map(len, line.outbox)) >= _OUTBOX_BYTES:
                self._write(line)
                return
        if first:
            self._flusher_for_this_process().watch(line)

    def flush(self) -> None:
        """Write this thread's outbox now and read what it owes: its stores are in Redis on return
        (a reader here that waited for this thread's fill looks next)."""
        line = getattr(self._local, "line", None)
        if line is not None and line.owed:
            with line.lock, contextlib.suppress(*FAILURES):
                self._settle(line)

    def replies(self, rerun: Callable[[Call], Any], wait: bool = True) -> list[Any]:
        """The replies of the stores sent so far, in order: each the script's reply, or the exception
        that stands for it. ``wait``: write every thread's outbox and read what it owes first (else
        only the replies read already). ``rerun`` runs a call again through the client (after
        NOSCRIPT: a Redis that restarted or flushed its scripts), which loads the script."""
        if wait:
            for line in self._all_lines():
                if line.owed:
                    with line.lock, contextlib.suppress(*FAILURES):
                        self._settle(line)
        out: list[Any] = []
        while self._answers:
            call, reply = self._answers.popleft()
            if isinstance(reply, NoScriptError):
                try:
                    reply = rerun(call)
                except FAILURES as exc:
                    reply = exc
            out.append(reply)
        return out

    # -- under the line's lock ------------------------------------------------------------------

    def _write(self, line: _Line) -> None:
        """Write the outbox (its replies stay owed)."""
        if not line.outbox:
            return
        out, line.outbox = b"".join(line.outbox), []
        connection = line.connection
        try:
            if connection._sock is None:
                connection.connect()
            connection.send_packed_command([out], check_health=False)
        except BaseException:
            self._lose(line)
            raise

    def _settle(self, line: _Line) -> None:
        """Write the outbox and read every reply owed."""
        self._write(line)
        if line.owed:
            try:
                self._read_owed(line)
            except BaseException:
                self._lose(line)
                raise

    def _read_owed(self, line: _Line) -> None:
        connection = line.connection
        while line.owed:
            call = line.owed[0]
            try:
                reply: Any = connection.read_response()
            except ResponseError as exc:  # an error reply (OOM, READONLY, NOSCRIPT…): this store's only
                reply = exc
            except FAILURES as exc:
                self._fail_owed(line, exc)
                raise
            line.owed.popleft()
            self._answers.append((call, reply))

    def _fail_owed(self, line: _Line, exc: BaseException) -> None:
        # The connection is gone, and the replies it owed with it (unwritten stores too: their
        # leases expire on their own).
        self._answers.extend((call, exc) for call in line.owed)
        line.owed.clear()
        line.outbox = []

    def _lose(self, line: _Line) -> None:
        if line.owed:
            self._fail_owed(line, _Dropped("the connection was closed with store replies owed"))
        line.connection.disconnect()

    def _flusher_for_this_process(self) -> _Flusher:
        flusher = self._flusher
        if flusher is None or flusher.pid != os.getpid():  # (a forked child has no threads of ours)
            flusher = self._flusher = _Flusher(self)
        return flusher

    def flush_idle(self, line: _Line, now: float) -> bool:
        """The flusher's turn with ``line``: write an outbox that waited ``_FLUSH_AFTER`` (and read
        what a line whose thread is gone owes). True once nothing is left for the flusher to do."""
        if not line.lock.acquire(blocking=False):
            return False  # its thread is writing it (its outbox goes out with its command)
        try:
            if line.pid != os.getpid():
                return True
            if line.outbox and now - line.since < _FLUSH_AFTER:
                return False
            with contextlib.suppress(*FAILURES):
                if line.thread.is_alive():
                    self._write(line)  # the thread reads the replies with its next command
                else:
                    self._settle(line)
            return True
        finally:
            line.lock.release()


class _Flusher:
    """Writes the outboxes of threads that went quiet, in a daemon thread of its own; sleeps on a
    condition after ``_IDLE`` without a store, so an idle process is not woken."""

    def __init__(self, script: OwnScript) -> None:
        self.pid = os.getpid()
        self._script = weakref.ref(script)
        self._cond = threading.Condition(threading.Lock())
        self._lines: set[_Line] = set()
        self._awake = False
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="sqlacache-store-flusher", daemon=True)
        self._thread.start()

    def watch(self, line: _Line) -> None:
        with self._cond:
            self._lines.add(line)
            if not self._awake:
                self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        quiet_since = time.monotonic()
        while True:
            with self._cond:
                if not self._lines and time.monotonic() - quiet_since >= _IDLE:
                    self._awake = False
                    while not self._lines and not self._stopped:
                        self._cond.wait()
                    self._awake = True
                if self._stopped:
                    return
                lines = list(self._lines)
            time.sleep(_FLUSH_AFTER)
            script = self._script()
            if script is None:
                return
            now = time.monotonic()
            done = [line for line in lines if script.flush_idle(line, now)]
            del script
            with self._cond:
                self._lines.difference_update(done)
                if self._lines:
                    quiet_since = time.monotonic()
