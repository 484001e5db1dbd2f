"""Redis Sentinel: the backend's URL and client forms, and failovers on a real topology.

The topology is real: a master, a replica and three sentinels (quorum 2, ``down-after-milliseconds``
400), redis-server processes on loopback ports (tests/faults.py ``SentinelTopology``). A failover
kills the master with SIGKILL; the sentinels promote the replica within a few seconds.

What must hold through a failover: no exception reaches the application (reads go to the database
meanwhile), commits made during it still evict once Redis is back (kept and delivered), and nothing
stale is served afterwards — by this process, by another one, or by one started after the failover;
also when the promoted replica missed the last bump (replication is asynchronous): the server check
(sqlacache/backends/redis/identity.py) invalidates everything on a server the data was not written
on, before anything is served from it.

Passwords (master and replica, sentinels: each where the URL puts it, or in ``Sentinel(...)``'s
arguments) and TLS (``rediss+sentinel://`` with ``?ssl_ca_certs=``) are tested on topologies of
their own.

Processes: the writer that commits is a spawned child where it matters (a second Cache in this
process would be told of the commit by this process, not through Redis).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import shutil
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from sqlalchemy import create_engine, event, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker

from sqlacache import Cache, CachingAsyncSession, CachingSession, ConfigurationError
from sqlacache.backends import RedisBackend
from tests.cluster import make_tls_files
from tests.conftest import IN_CI
from tests.faults import RedisServer, SentinelTopology
from tests.helpers import until, wal
from tests.models import Base, User

pytestmark = [pytest.mark.redis]

SPAWN = multiprocessing.get_context("spawn")


def _require_redis_server() -> None:
    if shutil.which("redis-server") is None:
        if IN_CI:
            pytest.fail("redis-server is not installed; CI must provide it")
        pytest.skip("redis-server is not installed; install it to run the Sentinel tests")


@pytest.fixture(scope="module")
def topology() -> Iterator[SentinelTopology]:
    """One topology for the tests that do not fail it over."""
    _require_redis_server()
    t = SentinelTopology()
    t.start()
    yield t
    t.close()


@pytest.fixture
def fresh_topology() -> Iterator[SentinelTopology]:
    """A topology of the test's own, to fail over."""
    _require_redis_server()
    t = SentinelTopology()
    t.start()
    yield t
    t.close()


class App:
    """A sqlite database file, a Cache on ``backend`` and a session factory; counts SQL statements."""

    def __init__(self, db: str, backend: Any, prefix: str, **kw: Any) -> None:
        self.engine = create_engine(f"sqlite:///{db}")
        wal(self.engine)
        Base.metadata.create_all(self.engine)
        self.sql = 0

        @event.listens_for(self.engine, "before_cursor_execute")
        def _(*args: Any) -> None:
            self.sql += 1

        self.cache = Cache(backend=backend, prefix=prefix, **kw)
        self.Session = sessionmaker(self.engine, class_=CachingSession, cache=self.cache)

    def seed(self) -> None:
        with self.Session() as s:
            s.add_all([User(id=i, name=f"u{i}") for i in (1, 2, 3)])
            s.commit()

    def name(self, pk: int = 1) -> str:
        with self.Session() as s:
            user = s.get(User, pk)
            assert user is not None
            return user.name

    def names(self) -> list[str]:
        with self.Session() as s:
            return [u.name for u in s.scalars(select(User).order_by(User.id))]

    def rename(self, name: str, pk: int = 1) -> None:
        with self.Session() as s:
            user = s.get(User, pk, execution_options={"cache": False})
            assert user is not None
            user.name = name
            s.commit()

    def hit(self, read: Any) -> Any:
        """``read()`` twice; the second must be served from the cache (no SQL)."""
        read()
        self.cache.wait_for_stores()
        before = self.sql
        value = read()
        assert self.sql == before, "expected a cache hit"
        return value

    def close(self) -> None:
        self.cache.close()
        self.engine.dispose()


@pytest.fixture
def apps(tmp_path: Any, key_prefix: str) -> Iterator[Any]:
    made: list[App] = []

    def make(backend: Any, **kw: Any) -> App:
        app = App(str(tmp_path / "s.db"), backend, key_prefix, **kw)
        made.append(app)
        return app

    yield make
    for app in made:
        with contextlib.suppress(Exception):
            app.close()


def _writer(db: str, url: str, prefix: str, names: list[str], go: Any, done: Any) -> None:
    """A separate process: commits a rename of user 1 for each of ``names`` when told to."""
    try:
        app = App(db, url, prefix)
        for name in names:
            if not go.wait(60):
                return
            go.clear()
            app.rename(name)
            done.put(("ok", app.cache.stats()["pending_invalidations"]))
        app.close()
    except BaseException as exc:  # reported to the test, not lost in the child
        done.put(("error", repr(exc)))


@contextlib.contextmanager
def writer(db: str, url: str, prefix: str, names: list[str]) -> Iterator[Any]:
    go, done = SPAWN.Event(), SPAWN.Queue()
    proc = SPAWN.Process(target=_writer, args=(db, url, prefix, names, go, done), daemon=True)
    proc.start()

    def commit() -> int:
        go.set()
        status, detail = done.get(timeout=60)
        assert status == "ok", detail
        return int(detail)

    try:
        yield commit
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()


# ---------------------------------------------------------------------------------------------
# The URL and client forms


def test_url_form_reads_hit_and_commits_evict(topology: SentinelTopology, apps: Any) -> None:
    app = apps(topology.url)
    backend = app.cache.backend
    assert isinstance(backend, RedisBackend)
    assert backend._sender is not None  # connections of its own on the Sentinel pool (own.py)
    app.seed()
    assert app.hit(app.name) == "u1"
    assert app.hit(app.names) == ["u1", "u2", "u3"]
    app.rename("changed")
    assert app.name() == "changed" and app.names() == ["changed", "u2", "u3"]
    assert app.hit(app.name) == "changed"
    # The entries are on the master the sentinels name.
    with topology.master.client() as r:
        assert any(r.scan_iter(f"{app.cache.prefix}:e:*"))


def test_client_form_sync(topology: SentinelTopology, apps: Any) -> None:
    sentinel = redis.sentinel.Sentinel(topology.sentinel_addresses, socket_timeout=0.2)
    client = sentinel.master_for(topology.service, socket_timeout=0.2)
    try:
        app = apps(client)
        assert app.cache.backend._watch is not None  # type: ignore[attr-defined]
        app.seed()
        assert app.hit(app.name) == "u1"
        app.rename("changed")
        assert app.hit(app.name) == "changed"
    finally:
        client.close()
        sentinel.close()


async def test_client_form_asyncio(topology: SentinelTopology, tmp_path: Any, key_prefix: str) -> None:
    sentinel = redis.asyncio.sentinel.Sentinel(topology.sentinel_addresses, socket_timeout=0.2)
    client = sentinel.master_for(topology.service, socket_timeout=0.2)
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
    statements: list[str] = []
    event.listen(engine.sync_engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    cache = Cache(backend=client, prefix=key_prefix)
    Session = async_sessionmaker(engine, class_=CachingAsyncSession, cache=cache, expire_on_commit=False)
    try:
        async with Session() as s:
            s.add_all([User(id=1, name="u1"), User(id=2, name="u2")])
            await s.commit()

        async def name() -> str:
            async with Session() as s:
                user = await s.get(User, 1)
                assert user is not None
                return user.name

        assert await name() == "u1"
        await cache.await_for_stores()
        before = len(statements)
        assert await name() == "u1"
        assert len(statements) == before  # a hit
        async with Session() as s:
            user = await s.get(User, 1, execution_options={"cache": False})
            assert user is not None
            user.name = "changed"
            await s.commit()
        assert await name() == "changed"
        assert cache.backend._watch is not None  # type: ignore[attr-defined]
    finally:
        await cache.aclose()
        await client.aclose()
        await sentinel.aclose()
        await engine.dispose()


def test_url_with_auth_and_options(topology: SentinelTopology, apps: Any) -> None:
    """Userinfo authenticates to the master, sentinel_* options to the sentinels; redis-py's URL
    options (here a timeout) apply to the master's connections."""
    with topology.master.client() as r, topology.replica.client() as rr:  # type: ignore[union-attr]
        for c in (r, rr):
            c.acl_setuser(
                "app", enabled=True, passwords=["+s3cret"], commands=["+@all"], keys=["*"], channels=["*"]
            )
    hosts = ",".join(f"127.0.0.1:{port}" for _, port in topology.sentinel_addresses)
    app = apps(f"redis+sentinel://app:s3cret@{hosts}/{topology.service}/0?socket_timeout=0.3")
    pool = app.cache.backend.client.connection_pool  # type: ignore[attr-defined]
    assert pool.connection_kwargs["username"] == "app"
    assert pool.connection_kwargs["socket_timeout"] == 0.3
    app.seed()
    assert app.hit(app.name) == "u1"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel:///mymaster/0", "no sentinel host"),
        ("redis+sentinel://h1:26379,/mymaster/0", "no sentinel host"),
        ("redis+sentinel://h1:26379", "no service name"),
        ("redis+sentinel://h1:26379//0", "no service name"),
        ("redis+sentinel://h1:26379/mymaster/abc", "not a database number"),
        ("redis+sentinel://h1:26379/mymaster/0/1", "not a database number"),
        ("redis+sentinel://h1:port/mymaster/0", "not a port number"),
        ("redis+sentinel://h1:26379/mymaster/0?nonsense=1", "unknown query parameter"),
    ],
)
def test_wrong_url_parts_are_configuration_errors(url: str, says: str) -> None:
    with pytest.raises(ConfigurationError, match=says) as caught:
        Cache(backend=url)
    if "query" not in says:  # (that one lists the parameters redis-py knows)
        assert "redis+sentinel://host:26379" in str(caught.value)  # the fix, as an example


def test_unknown_service_and_passwords_in_messages(topology: SentinelTopology) -> None:
    hosts = ",".join(f"127.0.0.1:{port}" for _, port in topology.sentinel_addresses)
    with pytest.raises(ConfigurationError, match=f"no service named 'nope'.*{topology.service}"):
        Cache(backend=f"redis+sentinel://{hosts}/nope/0")
    with pytest.raises(ConfigurationError) as caught:
        Cache(backend="redis+sentinel://u:hunter2@h1:26379/m/x?sentinel_password=hunter3")
    assert "hunter" not in str(caught.value)


def test_sentinels_down_at_start_is_not_an_error(apps: Any) -> None:
    """Like a Redis that is down: the cache starts and reads go to the database."""
    app = apps("redis+sentinel://127.0.0.1:1,127.0.0.1:2/mymaster/0")
    app.seed()
    assert app.name() == "u1" and app.name() == "u1"
    assert app.cache.stats()["hits"] == 0


# ---------------------------------------------------------------------------------------------
# Failovers


def _entries_holding(server: RedisServer, prefix: str, text: bytes) -> list[bytes]:
    with server.client() as r:
        return [k for k in r.scan_iter(f"{prefix}:e:*") if text in (r.get(k) or b"")]


def test_failover_reads_and_commits_go_on_and_nothing_stale_after(
    fresh_topology: SentinelTopology, apps: Any, tmp_path: Any
) -> None:
    t = fresh_topology
    app = apps(t.url)
    other = apps(t.url)  # a second Cache: its own backend, pools and state
    app.seed()
    assert app.hit(app.name) == "u1" and other.hit(other.name) == "u1"
    done = threading.Event()
    took: list[float] = []
    thread = threading.Thread(target=lambda: (took.append(t.failover()), done.set()), daemon=True)
    thread.start()
    i = 0
    while not done.is_set():  # reads and commits all through the failover: none may raise
        i += 1
        app.rename(f"during-{i}")
        assert app.name() == f"during-{i}"
        assert other.name() == f"during-{i}"
        assert app.names()[0] == f"during-{i}"
        time.sleep(0.01)
    thread.join()
    assert i > 5
    # After the promotion: the last commit's eviction is delivered, and both serve hits again.
    assert until(lambda: app.cache.stats()["pending_invalidations"] == 0, 10)
    last = f"during-{i}"
    assert until(lambda: _is_hit(app, last) and _is_hit(other, last), 10)
    app.rename("after")
    assert app.name() == "after" and other.name() == "after"
    assert app.hit(app.name) == "after" and other.hit(other.name) == "after"
    assert app.cache.stats()["errors"] > 0  # the failover was seen ...
    assert app.cache.backend.server_changes >= 1  # type: ignore[attr-defined]
    print(f"\nfailover took {took[0]:.2f} s; {i} commits made meanwhile")


def _is_hit(app: App, expected: str) -> bool:
    assert app.name() == expected
    app.cache.wait_for_stores()
    before = app.sql
    assert app.name() == expected
    return app.sql == before


def test_a_bump_the_promoted_replica_missed_serves_nothing_stale(
    fresh_topology: SentinelTopology, apps: Any, tmp_path: Any, key_prefix: str
) -> None:
    """The scenario asynchronous replication allows: a commit's bump reaches the master, not the
    replica; the master dies; the replica, promoted, holds the old versions and the old entries.
    A process that kept running, and one started after the failover, must not serve them."""
    t = fresh_topology
    db = str(tmp_path / "s.db")
    reader = apps(t.url)
    reader.seed()
    assert reader.hit(reader.name) == "u1" and reader.hit(reader.names) == ["u1", "u2", "u3"]
    with writer(db, t.url, key_prefix, ["lost"]) as commit:
        with t.master.client() as r:
            assert r.wait(1, 2000) == 1  # the replica has the entries
        assert t.replica is not None
        # The replica misses what comes next: stopped, and its link closed by the master (a stopped
        # process's kernel would still take in what the master sends, and it would apply that later).
        t.replica.pause()
        try:
            with t.master.client() as r:
                assert r.client_kill_filter(_type="replica") == 1
            assert commit() == 0  # the writer's commit: its bump delivered (to the master only)
            t.master.kill()
        finally:
            t.replica.resume()
    new = t.replica
    t.wait_promoted(new)
    t.master, t.replica = new, None
    # The promoted replica holds the entries the commit invalidated, as valid: without the server
    # check, a lookup there is a hit on "u1".
    stale = _entries_holding(new, key_prefix, b"u1")
    assert stale, "the scenario did not happen: the replica got the bump"
    plain = RedisBackend.from_url(new.url, prefix=key_prefix, watch_server=False)
    try:
        assert any(plain.lookup(k.decode()[len(key_prefix) + 3 :]).entry is not None for k in stale)
    finally:
        plain.close()
    late = apps(t.url)  # a process started after the failover: it never saw the newer data
    for app in (late, reader):
        assert until(lambda app=app: _reads(app) == ("lost", ["lost", "u2", "u3"]), 10)
    assert reader.hit(reader.name) == "lost" and late.hit(late.names) == ["lost", "u2", "u3"]
    assert late.cache.backend.server_changes + reader.cache.backend.server_changes >= 1  # type: ignore[attr-defined]


def _reads(app: App) -> tuple[str, list[str]]:
    return app.name(), app.names()


def test_near_cache_in_step_again_after_a_failover(
    fresh_topology: SentinelTopology, apps: Any, tmp_path: Any, key_prefix: str
) -> None:
    t = fresh_topology
    db = str(tmp_path / "s.db")
    app = apps(t.url, near_cache=True, near_heartbeat=0.2)
    app.seed()
    assert until(lambda: app.cache.stats()["near_in_step"], 10)
    app.name(), app.name()
    with writer(db, t.url, key_prefix, ["before", "after"]) as commit:
        commit()
        assert until(lambda: app.name() == "before", 5)  # the fan-out works
        t.failover()
        assert app.name() == "before"
        assert until(lambda: app.cache.stats()["near_in_step"], 15)  # subscribed on the new master
        assert commit() == 0  # a commit in another process, on the new master
        assert until(lambda: app.name() == "after", 5)
    near_hits = app.cache.stats()["near_hits"]
    assert until(lambda: app.name() == "after" and app.cache.stats()["near_hits"] > near_hits, 5)
    assert app.names() == ["after", "u2", "u3"]


# ---------------------------------------------------------------------------------------------
# The same check on a single Redis (opt in: watch_server=True)


def test_single_redis_back_with_older_data_seen_by_a_new_process(
    fresh_redis: RedisServer, apps: Any, key_prefix: str
) -> None:
    """A restart from an old snapshot, read by a process that never saw the newer data: the
    generation check cannot tell; the server check can."""
    app = apps(RedisBackend.from_url(fresh_redis.url, prefix=key_prefix, watch_server=True))
    app.seed()
    assert app.hit(app.name) == "u1"
    restore = fresh_redis.restore_snapshot_later()  # holds the "u1" entries
    app.rename("after")
    assert app.hit(app.name) == "after"
    app.close()
    restore()
    unwatched = apps(RedisBackend.from_url(fresh_redis.url, prefix=key_prefix))
    # The hole it closes: a new process without the check is served the entry from before.
    assert unwatched.name() == "u1"
    watched = apps(RedisBackend.from_url(fresh_redis.url, prefix=key_prefix, watch_server=True))
    assert watched.name() == "after" and watched.hit(watched.name) == "after"
    assert watched.cache.backend.server_changes == 1  # type: ignore[attr-defined]
    assert watched.cache.stats()["server_changes"] == 1
    assert unwatched.name() == "after"  # the check's invalidation holds for every process


# ---------------------------------------------------------------------------------------------
# Passwords: the master and the replica (requirepass, masterauth) and the sentinels (requirepass)


@pytest.fixture(scope="module")
def auth_topology() -> Iterator[SentinelTopology]:
    """Every server asks for a password: the master's and replica's is ``MASTER_PW`` (the sentinels
    know it as ``auth-pass``), the sentinels' own is ``SENTINEL_PW``."""
    _require_redis_server()
    t = SentinelTopology(password=MASTER_PW, sentinel_password=SENTINEL_PW)
    t.start()
    yield t
    t.close()


MASTER_PW = "m@st3r:pw%"  # characters a URL must escape
SENTINEL_PW = "s3ntinel/pw"


def _auth_url(t: SentinelTopology, master: str = MASTER_PW, sentinel: str | None = SENTINEL_PW) -> str:
    hosts = ",".join(f"127.0.0.1:{port}" for _, port in t.sentinel_addresses)
    query = "" if sentinel is None else "?sentinel_password=" + quote(sentinel, safe="")
    return f"redis+sentinel://:{quote(master, safe='')}@{hosts}/{t.service}/0{query}"


def test_passwords_url_form(auth_topology: SentinelTopology, apps: Any) -> None:
    """The password in the URL's userinfo authenticates to the master (and to the replica once it is
    promoted); ``?sentinel_password=`` to the sentinels. Both percent-encoded."""
    for server in (auth_topology.master, auth_topology.replica):  # really required
        assert server is not None
        with pytest.raises(redis.AuthenticationError), server.client(password=None) as r:
            r.ping()
    for sentinel in auth_topology.sentinels:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=sentinel.port, socket_timeout=2).ping()
    app = apps(_auth_url(auth_topology))
    backend: Any = app.cache.backend
    assert backend.client.connection_pool.connection_kwargs["password"] == MASTER_PW
    assert (
        backend.client.connection_pool.sentinel_manager.sentinels[0].connection_pool.connection_kwargs[
            "password"
        ]
        == SENTINEL_PW
    )
    app.seed()
    assert app.hit(app.name) == "u1"
    app.rename("changed")
    assert app.hit(app.name) == "changed"
    assert app.cache.stats()["errors"] == 0, app.cache.stats()


def test_passwords_client_form(auth_topology: SentinelTopology, apps: Any) -> None:
    """``Sentinel(..., sentinel_kwargs={"password": …}, password=…).master_for(service)``."""
    sentinel = redis.sentinel.Sentinel(
        auth_topology.sentinel_addresses,
        sentinel_kwargs={"password": SENTINEL_PW, "socket_timeout": 0.2},
        socket_timeout=0.2,
        password=MASTER_PW,
    )
    client = sentinel.master_for(auth_topology.service)
    try:
        app = apps(client)
        app.seed()
        assert app.hit(app.name) == "u1"
        app.rename("changed")
        assert app.hit(app.name) == "changed"
        assert app.cache.stats()["errors"] == 0, app.cache.stats()
    finally:
        client.close()
        sentinel.close()


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (lambda t: _auth_url(t, master="nope"), "the master refused the credentials"),
        (lambda t: _auth_url(t, sentinel=None), "sentinel_password="),
        (lambda t: _auth_url(t, sentinel="nope"), "the sentinels refused the credentials"),
    ],
    ids=["master", "sentinel-missing", "sentinel-wrong"],
)
def test_a_wrong_password_is_a_configuration_error(
    auth_topology: SentinelTopology, url: Any, says: str
) -> None:
    """Servers that answer and refuse the password: said at configuration time, with which password
    goes where, and without showing the passwords."""
    with pytest.raises(ConfigurationError, match=says) as caught:
        Cache(backend=url(auth_topology))
    assert MASTER_PW not in str(caught.value) and "nope" not in str(caught.value)
    assert quote(MASTER_PW, safe="") not in str(caught.value)


def test_a_password_refused_later_is_not_an_outage(fresh_auth_topology: SentinelTopology, apps: Any) -> None:
    """The password changed on the servers after the cache started: reads go to the database, a
    commit goes through, and the cache's errors count it."""
    app = apps(_auth_url(fresh_auth_topology))
    app.seed()
    assert app.hit(app.name) == "u1"
    for server in (fresh_auth_topology.master, fresh_auth_topology.replica):
        assert server is not None
        with server.client() as r:
            r.config_set("requirepass", "rotated")
            r.client_kill_filter(_type="normal", skipme=True)
    app.rename("changed")
    assert app.name() == "changed" and app.name() == "changed"
    assert app.cache.stats()["errors"] > 0


def test_passwords_through_a_failover(fresh_auth_topology: SentinelTopology, apps: Any) -> None:
    """The promoted replica asks for the same password: the URL form follows it there."""
    t = fresh_auth_topology
    app = apps(_auth_url(t))
    app.seed()
    assert app.hit(app.name) == "u1"
    t.failover()
    app.rename("after")
    assert until(lambda: _is_hit(app, "after"), 15)
    assert app.cache.backend.server_changes >= 1  # type: ignore[attr-defined]


@pytest.fixture
def fresh_auth_topology() -> Iterator[SentinelTopology]:
    _require_redis_server()
    t = SentinelTopology(password=MASTER_PW, sentinel_password=SENTINEL_PW)
    t.start()
    yield t
    t.close()


# ---------------------------------------------------------------------------------------------
# TLS: rediss+sentinel:// with ?ssl_ca_certs=, to the sentinels and to the master


@pytest.fixture
def tls_topology(tmp_path: Any) -> Iterator[SentinelTopology]:
    """Master, replica and sentinels listening with TLS (a throwaway certificate, its own CA); the
    sentinels watch the servers' TLS ports, so that is where they send clients."""
    _require_redis_server()
    if shutil.which("openssl") is None:
        if IN_CI:
            pytest.fail("openssl is not installed; CI must provide it (the TLS tests)")
        pytest.skip("openssl is not installed")
    t = SentinelTopology(tls=make_tls_files(str(tmp_path)))
    t.start()
    yield t
    t.close()


def test_tls_url_form_through_a_failover(tls_topology: SentinelTopology, apps: Any) -> None:
    """``rediss+sentinel://…?ssl_ca_certs=<CA>``: the sentinels and the master are spoken to over
    TLS, verified against the CA; after a failover the promoted replica too."""
    t = tls_topology
    app = apps(t.tls_url)
    pool = app.cache.backend.client.connection_pool  # type: ignore[attr-defined]
    assert pool.connection_class.__name__ == "SentinelManagedSSLConnection"
    sentinel_pool = pool.sentinel_manager.sentinels[0].connection_pool
    assert sentinel_pool.connection_kwargs["ssl_ca_certs"] == t.tls[0]  # type: ignore[index]
    app.seed()
    assert app.hit(app.name) == "u1"
    app.rename("changed")
    assert app.hit(app.name) == "changed"
    assert app.cache.stats()["errors"] == 0, app.cache.stats()
    t.failover()
    app.rename("after")
    assert until(lambda: _is_hit(app, "after"), 15)
    # Without the CA the certificate is not trusted: a backend error the cache reads around.
    untrusting = apps(t.tls_url.partition("?")[0])
    assert untrusting.name() == "after"
    assert untrusting.cache.stats()["errors"] > 0 and untrusting.cache.stats()["hits"] == 0
