"""Fan-out: one thread per backend hears every process's evictions on ``<prefix>:fanout``.

The bump script publishes, in the same atomic step as the versions it moves,
``<born>.<n>\x1f<dep>…``: its place in the sequence kept in ``<prefix>:seq`` (a hash: ``n`` counts
bumps, ``born`` tells a counter that started again — Redis restarted empty, FLUSHDB — from one that
went on) and the dependencies it moved. Pub/sub is at most once, so the subscriber trusts nothing it
cannot check: it applies ``n`` only right after ``n - 1`` of the same ``born``. Anything else — a
skipped number, another ``born``, ``-`` (the sequence could not be kept), a new subscription
(redis-py reconnects on its own), a dropped connection, or silence past the heartbeat — makes it
``lost()`` (the near-cache empties and serves nothing) and then ``synced()`` again at the position
it reads afresh. With a secret (``Cache(secret=…)``) every message is signed and a subscriber
applies only those that check (signing.py): anything else is ignored, never a resync.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

from sqlacache.backends.base import Listener, Position
from sqlacache.backends.redis.signing import Verifier

log = logging.getLogger("sqlacache.fanout")


def parse_position(born: Any, n: Any) -> Position | None:
    """The position ``<prefix>:seq`` holds: (born, n), (0, 0) before the first bump; None for a
    value that isn't ours."""
    if born is None and n is None:
        return (0, 0)
    if not (isinstance(born, bytes) and isinstance(n, bytes) and born.isdigit() and n.isdigit()):
        return None
    return (int(born), int(n))


def _sync_class(connection_class: type) -> type:
    """The sync twin of a connection class (an asyncio client's pool holds the asyncio one)."""
    if not connection_class.__module__.startswith("redis.asyncio"):
        return connection_class
    twin = getattr(redis.connection, connection_class.__name__, None)
    if not isinstance(twin, type):
        raise ValueError(
            f"near_cache: no sync connection like {connection_class.__name__} for the subscriber "
            "thread; give RedisBackend(client=redis.Redis(…), async_client=…)"
        )
    return twin


def _own_client(client: Any, heartbeat: float) -> tuple[redis.Redis, Any]:
    """A sync client like ``client``'s for the subscriber, and the Sentinel manager it was made
    with (None for a plain client): on a Sentinel-managed client, one of the same service's master
    through the same sentinels, so that the subscription follows a failover."""
    pool = client.connection_pool
    kwargs = dict(pool.connection_kwargs)
    kwargs["socket_timeout"] = max(heartbeat, float(kwargs.get("socket_timeout") or 0))
    kwargs.pop("retry", None)
    # The server check (identity.py) is for the connections that serve entries; an asyncio hook
    # could not run on a sync connection anyway.
    kwargs.pop("redis_connect_func", None)
    manager = getattr(pool, "sentinel_manager", None)
    service = getattr(pool, "service_name", None)
    if manager is None or service is None:
        own = redis.Redis(
            connection_pool=redis.ConnectionPool(
                connection_class=_sync_class(pool.connection_class), max_connections=4, **kwargs
            )
        )
        return own, None
    kwargs.pop("connection_pool", None)
    ssl = issubclass(pool.connection_class, (redis.connection.SSLConnection, redis.asyncio.SSLConnection))
    sentinels = []
    for node in manager.sentinels:
        options = node.connection_pool.connection_kwargs
        sentinels.append((options["host"], options["port"]))
    sentinel_kwargs = {k: v for k, v in manager.sentinel_kwargs.items() if k != "retry"}
    sentinel_kwargs["retry"] = Retry(NoBackoff(), 0)
    own_manager = redis.sentinel.Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs)
    own = own_manager.master_for(service, ssl=ssl, max_connections=4, **kwargs)
    return own, own_manager


class _Silent(Exception):
    """No message and no answer to our PING within the heartbeat."""


class Subscriber:
    """Reads ``<prefix>:fanout`` on a connection of its own, in a daemon thread, until closed.

    ``heartbeat``: after this long without hearing anything the subscriber PINGs on its
    connection; no answer within another ``heartbeat`` counts as a lost connection. It bounds how
    long a silent partition can go unnoticed (about ``2 * heartbeat``).
    """

    def __init__(
        self,
        client: Any,
        prefix: str,
        listener: Listener,
        heartbeat: float,
        verifier: Verifier,
    ) -> None:
        # A client of our own on the same server and settings (``client`` is the backend's, sync or
        # asyncio): the pub/sub connection must not come from (or go back to) the application's
        # pool, and its reads may wait longer than a command's socket_timeout.
        self._client, self._sentinel = _own_client(client, heartbeat)
        self.channel = f"{prefix}:fanout"
        self._prefix = prefix
        # With a secret, only signed messages are applied (signing.py); without, every one is.
        self._verifier = verifier
        self._seq_key = f"{prefix}:seq"
        self._listener = listener
        self._heartbeat = heartbeat
        self._closed = threading.Event()
        self._pubsub: Any = None
        self.position: Position | None = None  # the last bump applied; None while out of step
        self.resyncs = 0  # how many times it lost step (for stats and tests)
        self._thread = threading.Thread(target=self._run, name=f"sqlacache-fanout:{prefix}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        self._thread.join(max(2.0, 3 * self._heartbeat))
        self._client.close()
        if self._sentinel is not None:
            self._sentinel.close()

    # -- the loop --------------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.01
        while not self._closed.is_set():
            try:
                self._listen()
                backoff = 0.01
            except (redis.RedisError, OSError, _Silent, ValueError) as exc:
                log.debug("sqlacache: fan-out subscriber lost its connection: %r", exc)
            finally:
                self._lose()
                pubsub, self._pubsub = self._pubsub, None
                if pubsub is not None:
                    with contextlib.suppress(Exception):  # closing a broken connection
                        pubsub.close()
            self._closed.wait(backoff)
            backoff = min(backoff * 2, self._heartbeat)

    def _listen(self) -> None:
        pubsub = self._pubsub = self._client.pubsub()
        pubsub.subscribe(self.channel)
        heard = time.monotonic()
        pinged: float | None = None
        # The position read just before a PING: every bump up to it was published before the PING
        # was sent, so its message is in by the PONG — or it was lost, without any later message
        # to show the gap (pub/sub is at most once).
        expected: Position | None = None
        while not self._closed.is_set():
            message = pubsub.get_message(timeout=self._heartbeat / 4)
            now = time.monotonic()
            if message is None:
                if pinged is None and now - heard >= self._heartbeat:
                    expected = self._read_position() if self.position is not None else None
                    pubsub.ping()
                    pinged = now
                elif pinged is not None and now - pinged >= self._heartbeat:
                    raise _Silent(f"no answer on {self.channel} for {now - heard:.1f} s")
                continue
            heard, pinged = now, None
            kind = message.get("type")
            if kind == "subscribe":
                # The first subscription, or redis-py's own resubscription after a reconnect:
                # either way, what was published meanwhile is unknown.
                expected = None
                self._resync()
            elif kind == "message":
                # Checked out of step too: every nonce heard is remembered (signing.py).
                data = self._verifier.open(self._prefix, message["data"])
                if data is not None and self.position is not None:
                    self._message(data)
            elif kind == "pong" and expected is not None:
                if self.position is not None and not self.caught_up(expected):
                    self._resync()  # a message lost on the way
                expected = None

    @property
    def forged(self) -> int:
        """Messages ignored for a missing or bad signature, or a nonce heard before (with a secret)."""
        return self._verifier.forged

    def caught_up(self, position: Position) -> bool:
        """Whether every bump up to ``position`` (read from Redis) has been applied here."""
        mine = self.position
        return mine is not None and mine[0] == position[0] and mine[1] >= position[1]

    def covers(self, key: str, deps: Sequence[str]) -> bool:
        """Every bump is on the one channel: any entry is covered."""
        return True

    def _message(self, data: bytes) -> None:
        head, _, rest = data.partition(b"\x1f")
        mine = self.position
        born, dot, n = head.partition(b".")
        if mine is None or not (dot and born.isdigit() and n.isdigit()):
            self._resync()  # "-": the sequence could not be kept (Redis out of memory)
            return
        at = (int(born), int(n))
        if mine == (0, 0) and at[1] == 1:
            mine = (at[0], 0)  # the first bump since the sequence was missing: it starts it
        if at[0] == mine[0] and at[1] <= mine[1]:
            return  # published before we read the position: in Redis already when we synced
        if at != (mine[0], mine[1] + 1):
            self._resync()  # a message lost, or a sequence started again
            return
        self._listener.apply(frozenset(rest.decode().split("\x1f")) if rest else frozenset())
        self.position = at

    def _lose(self) -> None:
        if self.position is not None:
            self.resyncs += 1
        self.position = None
        self._listener.lost()

    def _read_position(self) -> Position:
        born, n = self._client.hmget(self._seq_key, ["born", "n"])
        position = parse_position(born, n)
        if position is None:
            raise ValueError(f"{self._seq_key} holds a value that isn't a sequence")
        return position

    def _resync(self) -> None:
        self._lose()
        self.position = self._read_position()
        self._listener.synced()
