"""The near-cache (``Cache(near_cache=True)``) against real servers, real processes and real faults.

What a user can observe: a commit in one process evicts the entry held in another process's memory
(``fanout``: within a short window, measured and printed below; ``strict``: the other process's very
next transaction reads the new value); and under each fault — the subscriber's connection killed,
Redis paused past the heartbeat, published messages lost on the way, Redis restarted empty or
flushed, the subscriber's output buffer overflowing — the near-cache stops serving from memory
(``near_in_step`` False, ``near_hits`` still), reads stay correct (database or Redis), it gets in
step again, serves from memory again, and never serves what a commit replaced.

The near-cache's process is either a spawned child (commit → eviction, output buffer overflow) or
this test process, with the commits made in a spawned writer process (a second Cache in the same
process would be told of the commit directly, not through the fan-out). Redis for the faults is a
throwaway redis-server (``fresh_redis``), sometimes behind a ``TcpProxy``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

from sqlacache import Cache, CachingSession, ConfigurationError
from tests.conftest import _pg_schema_url, _truncate_sync
from tests.faults import RedisServer, TcpProxy
from tests.helpers import until
from tests.models import User

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

HEARTBEAT = 0.2  # near_heartbeat for the fault tests: silence is noticed within about 0.4 s
WINDOW_BOUND = 1.0  # s: a generous bound on commit() → eviction in another process (measured: ~1 ms)


# -- the processes -----------------------------------------------------------------------------


def read_name(Session: Any, uid: int) -> str:
    with Session() as s:
        return str(s.get(User, uid).name)


def write_name(Session: Any, uid: int, name: str) -> int:
    """Commit ``name`` on user ``uid``; the system-wide monotonic clock when commit() returned."""
    with Session() as s:
        s.get(User, uid).name = name
        s.commit()
        return time.monotonic_ns()


def hold(Session: Any, cache: Cache, uid: int) -> str:
    """Read user ``uid`` until the read is served from process memory; its name. (Retries for up to
    5 s: after a fault the breaker may keep Redis out for a while.)"""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        before = cache.stats()["near_hits"]
        name = read_name(Session, uid)
        if cache.stats()["near_hits"] > before:
            return name
        cache.wait_for_stores()
        time.sleep(0.02)
    raise AssertionError(f"user {uid} never served from the near-cache: {cache.stats()}")


def _serve(conn: Any, db_url: str, connect_args: dict[str, Any]) -> None:
    """A child process: an engine on the test database, a Cache opened on demand, commands on
    ``conn`` (see ``Child``)."""
    engine = create_engine(db_url, connect_args=connect_args)
    cache: Cache | None = None
    S: Any = None
    conn.send(os.getpid())
    while True:
        cmd, args = conn.recv()
        try:
            if cmd == "stop":
                break
            if cmd == "open":
                if cache is not None:
                    cache.close()
                url, prefix, kw = args
                cache = Cache(backend=url, prefix=prefix, **kw)
                S = sessionmaker(engine, class_=CachingSession, cache=cache)
                result: Any = None
            elif cmd == "read":
                result = read_name(S, *args)
            elif cmd == "write":
                result = write_name(S, *args)
            elif cmd == "hold":
                result = hold(S, cache, *args)
            elif cmd == "hold_until_evicted":
                # Hold the entry, say so, then watch it go: the clock when it went.
                uid, timeout = args
                hold(S, cache, uid)
                assert cache is not None and cache.near is not None
                before = cache.near.evictions
                conn.send(("held", None))
                deadline = time.monotonic() + timeout
                while cache.near.evictions == before and time.monotonic() < deadline:
                    time.sleep(0.0002)
                result = time.monotonic_ns() if cache.near.evictions > before else None
            elif cmd == "bump":  # n bumps of `width` rows each: big fan-out messages
                n, width, start = args
                for i in range(n):
                    base = start + i * width
                    cache.invalidate(User, pks=range(base, base + width))  # type: ignore[union-attr]
                result = None
            elif cmd == "stats":
                result = cache.stats() if cache is not None else {}
            else:
                raise ValueError(cmd)
            conn.send(("ok", result))
        except BaseException:
            conn.send(("failed", traceback.format_exc()))
    if cache is not None:
        cache.close()
    engine.dispose()


class Child:
    """A spawned interpreter running ``_serve``."""

    def __init__(self, db_url: str, connect_args: dict[str, Any]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, theirs = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(theirs, db_url, connect_args), daemon=True)
        self.process.start()
        self.pid: int = self._recv(60)

    def _recv(self, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise AssertionError(f"child {self.process.pid} did not answer within {timeout} s")
        return self.conn.recv()

    def send(self, cmd: str, *args: Any) -> None:
        self.conn.send((cmd, args))

    def answer(self, timeout: float = 30) -> Any:
        status, result = self._recv(timeout)
        assert status == "ok", result
        return result

    def answer_held(self) -> bool:
        status, result = self._recv(30)
        assert status == "held", result
        return True

    def call(self, cmd: str, *args: Any, timeout: float = 30) -> Any:
        self.send(cmd, *args)
        return self.answer(timeout)

    def close(self) -> None:
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGCONT)  # in case a test stopped it
        with contextlib.suppress(OSError):
            self.conn.send(("stop", ()))
        self.process.join(10)
        if self.process.is_alive():  # pragma: no cover
            self.process.kill()
            self.process.join(5)


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def db(pg_sync_url: str, pg_schema: str) -> tuple[str, dict[str, Any]]:
    return _pg_schema_url(pg_sync_url, pg_schema)


@pytest.fixture(scope="module")
def engine(db: tuple[str, dict[str, Any]]) -> Iterator[Any]:
    url, args = db
    e = create_engine(url, connect_args=args)
    yield e
    e.dispose()


@pytest.fixture
def users(engine: Any) -> None:
    """Users 1..3 named u1..u3, nothing else."""
    _truncate_sync(engine)
    with Session(engine) as s:
        s.add_all([User(id=i, name=f"u{i}") for i in range(1, 4)])
        s.commit()


@pytest.fixture(scope="module")
def writer(db: tuple[str, dict[str, Any]]) -> Iterator[Child]:
    """Another process that commits (a Cache without a near-cache, opened by each test)."""
    child = Child(*db)
    yield child
    child.close()


@pytest.fixture
def child(db: tuple[str, dict[str, Any]]) -> Iterator[Child]:
    """A process of the test's own (for a near-cache in another process)."""
    c = Child(*db)
    yield c
    c.close()


class Near:
    """This process's near-cache on ``backend``, and its reads."""

    def __init__(self, engine: Any, backend: str, prefix: str, **kw: Any) -> None:
        kw.setdefault("near_heartbeat", HEARTBEAT)
        self.cache = Cache(backend=backend, prefix=prefix, near_cache=True, **kw)
        self.Session = sessionmaker(engine, class_=CachingSession, cache=self.cache)

    def read(self, uid: int) -> str:
        return read_name(self.Session, uid)

    def hold(self, uid: int) -> str:
        return hold(self.Session, self.cache, uid)

    def stat(self, name: str) -> Any:
        return self.cache.stats()[name]

    def in_step(self) -> bool:
        return bool(self.stat("near_in_step"))

    def reads_from_db_or_redis(self, uid: int, expected: str) -> None:
        """A read that is not served from memory, and gives ``expected``."""
        before = self.stat("near_hits")
        assert self.read(uid) == expected
        assert self.stat("near_hits") == before


@pytest.fixture
def near_factory(engine: Any, key_prefix: str, users: None) -> Iterator[Any]:
    made: list[Near] = []

    def make(backend: str, **kw: Any) -> Near:
        n = Near(engine, backend, key_prefix, **kw)
        made.append(n)
        return n

    yield make
    for n in made:
        n.cache.close()


def _open_writer(writer: Child, url: str, prefix: str) -> None:
    writer.call("open", url, prefix, {})


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "fix"),
    [
        ({"backend": "memory://"}, "Drop near_cache, or use a Redis backend"),
        ({"near_coherence": "eventual"}, "use 'strict'"),
        ({"near_max_entries": 0}, "near_max_entries=0: give an int >= 1"),
        ({"near_max_entries": 1.5}, "give an int >= 1"),
        ({"near_max_bytes": -1}, "near_max_bytes=-1: give an int >= 1"),
        ({"near_ttl": 0}, "near_ttl"),
        ({"near_heartbeat": -1.0}, "near_heartbeat"),
    ],
)
def test_invalid_near_cache_configuration_is_refused_with_the_fix(kw: dict[str, Any], fix: str) -> None:
    kw = {"backend": "redis://127.0.0.1:1/0", **kw}  # refused before anything connects
    with pytest.raises(ConfigurationError) as caught:
        Cache(near_cache=True, **kw)
    assert fix in str(caught.value)


# -- a commit in another process ---------------------------------------------------------------


def test_commit_evicts_the_entry_in_another_process_fanout(
    child: Child, engine: Any, redis_url: str, key_prefix: str, users: None, capsys: Any
) -> None:
    """Process B (fanout) holds user 1 in memory; this process commits a change: B's entry is gone
    within WINDOW_BOUND of commit() returning (measured: around a millisecond), and B then reads the
    new value, served from memory again on the next reads."""
    child.call("open", redis_url, key_prefix, {"near_cache": True, "near_coherence": "fanout"})
    writer = Cache(backend=redis_url, prefix=key_prefix)
    S = sessionmaker(engine, class_=CachingSession, cache=writer)
    windows = []
    try:
        for i in range(5):
            child.send("hold_until_evicted", 1, 10.0)
            assert child.answer_held()
            committed = write_name(S, 1, f"v{i}")
            gone = child.answer()
            assert gone is not None, "the entry was never evicted in the other process"
            windows.append((gone - committed) / 1e6)
            assert child.call("read", 1) == f"v{i}"
            assert child.call("hold", 1) == f"v{i}"
        stats = child.call("stats")
    finally:
        writer.close()
    assert stats["near_resyncs"] == 0 and stats["near_in_step"], stats
    with capsys.disabled():
        print(f"\n  commit() -> eviction in another process, ms: {[round(w, 2) for w in windows]}")
    assert max(windows) < WINDOW_BOUND * 1000, windows


def test_strict_next_transaction_in_another_process_reads_the_new_value(
    child: Child, engine: Any, redis_url: str, key_prefix: str, users: None
) -> None:
    """Process B (strict) holds user 1; right after each commit here returns, B's next transaction
    reads the new value — never the one its memory held — and B keeps serving from memory between
    commits."""
    child.call("open", redis_url, key_prefix, {"near_cache": True, "near_coherence": "strict"})
    writer = Cache(backend=redis_url, prefix=key_prefix)
    S = sessionmaker(engine, class_=CachingSession, cache=writer)
    try:
        for i in range(15):
            assert child.call("hold", 1) == (f"s{i - 1}" if i else "u1")
            write_name(S, 1, f"s{i}")
            assert child.call("read", 1) == f"s{i}"
        stats = child.call("stats")
    finally:
        writer.close()
    assert stats["near_hits"] >= 15 and stats["near_in_step"], stats


# -- faults ------------------------------------------------------------------------------------


@pytest.mark.parametrize("coherence", ["strict", "fanout"])
def test_killed_subscription(
    coherence: str, fresh_redis: RedisServer, near_factory: Any, writer: Child, key_prefix: str
) -> None:
    """CLIENT KILL TYPE pubsub: the near-cache empties, resubscribes, is in step again; a commit
    made while it was reconnecting is never missed."""
    near = near_factory(fresh_redis.url, near_coherence=coherence)
    _open_writer(writer, fresh_redis.url, key_prefix)
    assert near.hold(1) == "u1"
    with fresh_redis.client() as admin:
        assert admin.client_kill_filter(_type="pubsub") >= 1
    writer.call("write", 1, "after-kill")  # likely before the subscriber is back
    if coherence == "strict":
        assert near.read(1) == "after-kill"
    else:
        assert until(lambda: near.read(1) == "after-kill", timeout=WINDOW_BOUND)
    assert until(lambda: near.stat("near_resyncs") >= 1 and near.in_step(), timeout=5)
    assert near.hold(1) == "after-kill"
    for _ in range(3):
        assert near.read(1) == "after-kill"


@pytest.mark.parametrize("coherence", ["strict", "fanout"])
def test_paused_redis(
    coherence: str, fresh_redis: RedisServer, near_factory: Any, writer: Child, key_prefix: str
) -> None:
    """Redis SIGSTOPped for 4 heartbeats: the subscriber's PING goes unanswered, the near-cache
    stops serving from memory within about 2 heartbeats, reads come from the database; once Redis
    is back it is in step again and serves what was committed during the pause."""
    near = near_factory(fresh_redis.url, near_coherence=coherence)
    _open_writer(writer, fresh_redis.url, key_prefix)
    assert near.hold(1) == "u1"
    with fresh_redis.paused():
        paused = time.monotonic()
        assert until(lambda: not near.in_step(), timeout=10 * HEARTBEAT)
        noticed = time.monotonic() - paused
        assert near.stat("near_entries") == 0
        near.reads_from_db_or_redis(1, "u1")
        writer.call("write", 1, "during-pause")  # its bump waits in the writer
        near.reads_from_db_or_redis(1, "during-pause")
        time.sleep(max(0.0, 4 * HEARTBEAT - (time.monotonic() - paused)))
        assert not near.in_step()
    assert noticed < 5 * HEARTBEAT, noticed
    assert until(lambda: writer.call("stats")["pending_invalidations"] == 0, timeout=5)
    assert until(near.in_step, timeout=5)
    assert near.read(1) == "during-pause"
    assert near.hold(1) == "during-pause"
    writer.call("write", 1, "after-pause")
    assert until(lambda: near.read(1) == "after-pause", timeout=WINDOW_BOUND)


def _lose_a_message(proxy: TcpProxy, writer: Child, uid: int, name: str) -> None:
    """``writer`` commits while everything the server sends through ``proxy`` is discarded: the
    fan-out message of that commit never reaches the near-cache, whose connection stays open."""
    proxy.mute_server()
    try:
        writer.call("write", uid, name)
        time.sleep(0.1)  # the message is through the proxy (and discarded)
    finally:
        proxy.mute_server(False)


@pytest.mark.parametrize("coherence", ["strict", "fanout"])
def test_lost_message_is_noticed_at_the_next_message(
    coherence: str,
    proxy: TcpProxy,
    fresh_redis: RedisServer,
    near_factory: Any,
    writer: Child,
    key_prefix: str,
) -> None:
    """A commit's message is lost (the connection stays up); the next commit's message shows the
    gap: the near-cache empties and gets in step again. Strict mode never serves the lost
    commit's entry at all (the position it reads is ahead of what it applied)."""
    near = near_factory(proxy.url, near_coherence=coherence, near_heartbeat=2.0)
    _open_writer(writer, fresh_redis.url, key_prefix)
    assert near.hold(1) == "u1" and near.hold(2) == "u2"
    _lose_a_message(proxy, writer, 1, "lost")
    assert near.stat("near_resyncs") == 0
    if coherence == "strict":
        near.reads_from_db_or_redis(1, "lost")
    writer.call("write", 3, "next")
    assert until(lambda: near.stat("near_resyncs") == 1 and near.in_step(), timeout=WINDOW_BOUND)
    assert near.read(1) == "lost" and near.read(2) == "u2" and near.read(3) == "next"
    assert near.hold(1) == "lost"


def test_lost_message_is_noticed_by_the_heartbeat(
    proxy: TcpProxy, fresh_redis: RedisServer, near_factory: Any, writer: Child, key_prefix: str
) -> None:
    """Fanout mode, a commit's message lost and no commit after it: within a few heartbeats the
    near-cache stops serving the entry that commit replaced."""
    heartbeat = 0.5
    near = near_factory(proxy.url, near_coherence="fanout", near_heartbeat=heartbeat)
    _open_writer(writer, fresh_redis.url, key_prefix)
    assert near.hold(1) == "u1"
    _lose_a_message(proxy, writer, 1, "lost")
    assert until(lambda: near.read(1) == "lost", timeout=4 * heartbeat), near.cache.stats()
    assert until(near.in_step, timeout=5)
    assert near.hold(1) == "lost"


@pytest.mark.parametrize("coherence", ["strict", "fanout"])
def test_redis_restarted_empty(
    coherence: str, fresh_redis: RedisServer, near_factory: Any, writer: Child, key_prefix: str
) -> None:
    """Redis restarted empty on the same port: the near-cache empties, resubscribes, takes the new
    sequence (another ``born``) from its first bump and goes on applying it in step."""
    near = near_factory(fresh_redis.url, near_coherence=coherence)
    _open_writer(writer, fresh_redis.url, key_prefix)
    writer.call("write", 2, "before")  # a sequence that the restart forgets
    assert near.hold(1) == "u1"
    fresh_redis.restart()
    assert until(lambda: near.stat("near_resyncs") >= 1 and near.in_step(), timeout=5)
    assert near.stat("near_entries") == 0
    writer.call("write", 1, "reborn")
    if coherence == "strict":
        assert near.read(1) == "reborn"
    assert until(lambda: near.read(1) == "reborn", timeout=WINDOW_BOUND)
    assert near.hold(1) == "reborn"
    resyncs = near.stat("near_resyncs")
    writer.call("write", 1, "again")  # message 2 of the new sequence: applied in step
    assert until(lambda: near.read(1) == "again", timeout=WINDOW_BOUND)
    assert near.stat("near_resyncs") == resyncs and near.in_step()
    assert near.hold(1) == "again"


@pytest.mark.parametrize("coherence", ["strict", "fanout"])
def test_redis_flushed(
    coherence: str, fresh_redis: RedisServer, near_factory: Any, writer: Child, key_prefix: str
) -> None:
    """FLUSHALL (the connection stays up): the next bump starts another sequence; the near-cache
    sees another ``born`` and empties instead of applying it as the next of the old one."""
    near = near_factory(fresh_redis.url, near_coherence=coherence)
    _open_writer(writer, fresh_redis.url, key_prefix)
    writer.call("write", 2, "before")
    assert near.hold(1) == "u1"
    fresh_redis.flushall()
    writer.call("write", 1, "flushed")
    if coherence == "strict":
        assert near.read(1) == "flushed"
    assert until(lambda: near.stat("near_resyncs") == 1, timeout=WINDOW_BOUND)
    assert near.read(1) == "flushed"
    assert near.hold(1) == "flushed"


def test_output_buffer_overflow_disconnects_a_stopped_subscriber(
    child: Child, fresh_redis: RedisServer, writer: Child, key_prefix: str, users: None
) -> None:
    """The near-cache's process is stopped (SIGSTOP) while commits go on until Redis closes its
    subscriber connection for its output buffer (``pubsub 64kb 32kb 1``). Resumed, its next
    transaction (strict) reads the commit made meanwhile; it gets in step again and serves from
    memory again."""
    with fresh_redis.client() as admin:
        default = admin.config_get("client-output-buffer-limit")["client-output-buffer-limit"]
        admin.config_set("client-output-buffer-limit", "pubsub 64kb 32kb 1")
        try:
            child.call("open", fresh_redis.url, key_prefix, {"near_cache": True, "near_heartbeat": HEARTBEAT})
            _open_writer(writer, fresh_redis.url, key_prefix)
            assert child.call("hold", 1) == "u1"
            assert len(admin.client_list(_type="pubsub")) == 1
            os.kill(child.pid, signal.SIGSTOP)
            try:
                writer.call("write", 1, "while-stopped")
                deadline = time.monotonic() + 30
                start = 0
                while admin.client_list(_type="pubsub") and time.monotonic() < deadline:
                    writer.call("bump", 20, 400, 1000 + start)
                    start += 20 * 400
                assert not admin.client_list(_type="pubsub"), "Redis never disconnected the subscriber"
            finally:
                os.kill(child.pid, signal.SIGCONT)
            assert child.call("read", 1) == "while-stopped"
            assert until(
                lambda: (s := child.call("stats"))["near_resyncs"] >= 1 and s["near_in_step"], timeout=5
            )
            assert child.call("hold", 1) == "while-stopped"
            writer.call("write", 1, "resumed")
            assert child.call("read", 1) == "resumed"
        finally:
            admin.config_set("client-output-buffer-limit", default)


def test_no_spurious_resync_over_a_quiet_connection(
    fresh_redis: RedisServer, near_factory: Any, writer: Child, key_prefix: str
) -> None:
    """Silence is not a fault: across several heartbeats with nothing published the near-cache
    stays in step (its PINGs are answered) and keeps serving from memory."""
    near = near_factory(fresh_redis.url, near_coherence="fanout")
    _open_writer(writer, fresh_redis.url, key_prefix)
    assert near.hold(1) == "u1"
    time.sleep(5 * HEARTBEAT)
    assert near.in_step() and near.stat("near_resyncs") == 0
    assert near.hold(1) == "u1"
