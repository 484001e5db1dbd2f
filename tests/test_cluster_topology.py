"""Redis Cluster topology changes under a running cache, on a throwaway cluster of 3 masters with a
replica each (``cluster-node-timeout`` 1000 ms): a master killed (failover), the lost-bump case
(the promoted replica never got the last bump), a slot migrated while reads and commits run, and
a master restarted empty (no replica: its slots come back with nothing in them). No exception reaches
the application, and nothing older than a finished commit is served."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.crc
from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from sqlacache import Cache, CachingSession
from sqlacache.backends.redis.cluster import RedisClusterBackend
from tests.cluster import RedisClusterProcs
from tests.conftest import IN_CI, _pg_schema_url, _truncate_sync
from tests.faults import LOOPBACK
from tests.models import User


@pytest.fixture
def cluster6() -> Iterator[RedisClusterProcs]:
    if shutil.which("redis-server") is None:
        if IN_CI:
            pytest.fail("redis-server is not installed; CI must provide it (the Redis Cluster tests)")
        pytest.skip("redis-server is not installed; install it to run the Redis Cluster tests")
    cluster = RedisClusterProcs(replicas=1, node_timeout_ms=1000)
    try:
        cluster.start()
    except BaseException:
        cluster.close()
        raise
    yield cluster
    cluster.close()


@pytest.fixture
def engine(pg_schema: str, pg_sync_url: str) -> Iterator[Any]:
    url, args = _pg_schema_url(pg_sync_url, pg_schema)
    engine = create_engine(url, connect_args=args)
    _truncate_sync(engine)
    with Session(engine) as s:
        s.add_all([User(id=1, name="a"), User(id=2, name="x")])
        s.commit()
    yield engine
    engine.dispose()


def _cache(cluster: RedisClusterProcs, prefix: str, near_cache: bool = False, **kw: Any) -> Cache:
    near = {"near_cache": True, "near_coherence": kw.pop("near_coherence", "strict")} if near_cache else {}
    backend = RedisClusterBackend.from_url(cluster.url, prefix=prefix, socket_timeout=0.5, **kw)
    return Cache(backend=backend, prefix=prefix, **near)


def _name(engine: Any, cache: Cache, uid: int = 1) -> str:
    with sessionmaker(engine, class_=CachingSession, cache=cache)() as s:
        return str(s.scalar(select(User.name).where(User.id == uid)))


def _rename(engine: Any, cache: Cache, name: str, uid: int = 1) -> None:
    with sessionmaker(engine, class_=CachingSession, cache=cache)() as s:
        s.execute(update(User).where(User.id == uid).values(name=name))
        s.commit()


def _cached(engine: Any, cache: Cache, uid: int = 1) -> None:
    """Read until the value is a hit (a group first seen refuses the first store)."""
    for _ in range(5):
        hits = cache.stats()["hits"]
        _name(engine, cache, uid)
        if cache.stats()["hits"] > hits:
            return
    raise AssertionError(f"never a hit: {cache.stats()}")


def _master_of(cluster: RedisClusterProcs, backend: Any, table: str) -> int:
    """The index (in cluster.servers) of the master serving ``table``'s group."""
    return _owner(cluster, redis.crc.key_slot(f"{backend._base('t:' + table, '')}:gen".encode()))


def _owner(cluster: RedisClusterProcs, slot: int) -> int:
    for i, server in enumerate(cluster.servers):
        if not server.running:
            continue
        client = cluster.node(i)
        try:
            for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    port = master[1]
                    return next(j for j, s in enumerate(cluster.servers) if s.port == port)
        except redis.RedisError:
            continue
        finally:
            client.close()
    raise AssertionError(f"no node serves slot {slot}")


def _caught_up(primary: redis.Redis, replica: redis.Redis, timeout: float = 10.0) -> None:
    """Wait until ``replica`` has applied everything ``primary`` has written so far."""
    target = int(primary.info("replication")["master_repl_offset"])
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if int(replica.info("replication").get("slave_repl_offset", -1)) >= target:
                return
            time.sleep(0.02)
    finally:
        replica.close()
    raise AssertionError("the replica did not catch up")


def _wait_promoted(cluster: RedisClusterProcs, replica: int, timeout: float = 20.0) -> float:
    started = time.monotonic()
    client = cluster.node(replica)
    try:
        while time.monotonic() - started < timeout:
            try:
                role = client.execute_command("ROLE")[0]
                state = client.execute_command("CLUSTER", "INFO")
                if isinstance(state, dict):
                    ok = state.get("cluster_state") in ("ok", b"ok")
                else:
                    ok = b"cluster_state:ok" in state
                if role in (b"master", "master") and ok:
                    return time.monotonic() - started
            except redis.RedisError:
                pass
            time.sleep(0.05)
    finally:
        client.close()
    raise AssertionError("the replica was not promoted")


def test_lost_bump_after_failover_is_not_served(
    cluster6: RedisClusterProcs, engine: Any, key_prefix: str
) -> None:
    """The promoted replica never got the last commit's bump. Without the node check a process
    (even a new one) serves the old value from then on; with it, every node found to be a new
    server gets ``*`` bumped before anything is read from it."""
    cache = _cache(cluster6, key_prefix)
    _cached(engine, cache)
    master = _master_of(cluster6, cache.backend, "users")
    replica = master + cluster6.masters
    primary = cluster6.node(master)
    # The cached entry must be on the replica before it is cut off (replication is asynchronous).
    _caught_up(primary, cluster6.node(replica))
    # Cut the replica off (stopped, its link closed by the master): the next bump stays on the master.
    cluster6.servers[replica].pause()
    primary.execute_command("CLIENT", "KILL", "TYPE", "replica")
    primary.close()
    _rename(engine, cache, "b")
    assert cache.stats()["pending_invalidations"] == 0  # the bump reached the master
    cluster6.servers[master].kill()
    cluster6.servers[replica].resume()
    took = _wait_promoted(cluster6, replica)
    # The lost bump is real: a backend without the node check, in a new process, serves "a".
    blind = _cache(cluster6, key_prefix, watch_servers=False)
    for _ in range(40):  # until redis-py has the new slot map
        try:
            value = blind.backend.lookup("probe", ["t:users"])  # noqa: F841
            break
        except Exception:
            time.sleep(0.05)
    assert _name(engine, blind) == "a", "the scenario did not lose the bump (test setup)"
    blind.close()
    # A new process with the check, and the process that committed: "b".
    fresh = _cache(cluster6, key_prefix)
    assert _name(engine, fresh) == "b"
    assert fresh.backend.server_changes >= 1  # type: ignore[attr-defined]
    assert _name(engine, cache) == "b"
    # And the cache works again on the new topology.
    _cached(engine, fresh)
    assert _name(engine, fresh) == "b"
    fresh.close()
    cache.close()
    print(f"\n[lost bump] promoted in {took:.1f}s")


def test_commit_during_failover_is_delivered(
    cluster6: RedisClusterProcs, engine: Any, key_prefix: str
) -> None:
    """A master killed: reads go to the database while its slots are down, a commit meanwhile is
    kept pending and delivered once the replica is promoted. The node check is off here, so that
    only the pending invalidation can outdate the entry."""
    cache = _cache(cluster6, key_prefix, watch_servers=False)
    other = _cache(cluster6, key_prefix, watch_servers=False)  # another process
    _cached(engine, cache)
    _cached(engine, other)
    master = _master_of(cluster6, cache.backend, "users")
    replica = master + cluster6.masters
    cluster6.servers[master].kill()
    _rename(engine, cache, "c")  # the bump fails: kept pending, retried
    errors: list[BaseException] = []
    reads = 0
    started = time.monotonic()
    promoted = False
    while time.monotonic() - started < 20:
        for c in (cache, other):
            try:
                assert _name(engine, c) == "c"
                reads += 1
            except BaseException as exc:  # anything reaching the app is a failure
                errors.append(exc)
        if not promoted:
            client = cluster6.node(replica)
            try:
                promoted = client.execute_command("ROLE")[0] in (b"master", "master")
            except redis.RedisError:
                pass
            finally:
                client.close()
        elif cache.stats()["pending_invalidations"] == 0:
            break
        time.sleep(0.02)
    assert not errors, errors[:3]
    assert promoted
    _wait_promoted(cluster6, replica)
    deadline = time.monotonic() + 10
    while cache.stats()["pending_invalidations"] and time.monotonic() < deadline:
        _name(engine, cache)
        time.sleep(0.05)
    assert not cache.stats()["pending_invalidations"], cache.stats()
    fresh = _cache(cluster6, key_prefix, watch_servers=False)
    assert _name(engine, fresh) == "c"
    assert _name(engine, other) == "c"
    _cached(engine, fresh)
    assert _name(engine, fresh) == "c"
    print(f"\n[failover] {reads} reads during it, none failed")
    for c in (fresh, other, cache):
        c.close()


def test_resharding_under_load(cluster6: RedisClusterProcs, engine: Any, key_prefix: str) -> None:
    """The slots of the ``users`` group and of the entries' stripes migrate to another master (keys
    moved with MIGRATE, ASK and TRYAGAIN in between) while a thread reads and commits."""
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not installed")
    cache = _cache(cluster6, key_prefix)
    _cached(engine, cache)
    _cached(engine, cache, 2)
    backend: Any = cache.backend
    master = _master_of(cluster6, backend, "users")
    target = (master + 1) % cluster6.masters
    errors: list[BaseException] = []
    stale: list[str] = []
    stop = threading.Event()
    committed = {"n": 0}

    def load() -> None:
        n = 0
        while not stop.is_set():
            try:
                n += 1
                _rename(engine, cache, f"n{n}", 2)
                committed["n"] = n
                got = _name(engine, cache, 2)
                if got != f"n{n}":
                    stale.append(got)
                _name(engine, cache, 1)
            except BaseException as exc:
                errors.append(exc)

    thread = threading.Thread(target=load)
    thread.start()
    try:
        started = time.monotonic()
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "reshard",
                f"{LOOPBACK}:{cluster6.servers[master].port}",
                "--cluster-from",
                cluster6.node_id(master),
                "--cluster-to",
                cluster6.node_id(target),
                "--cluster-slots",
                "5461",
                "--cluster-yes",
                "--cluster-pipeline",
                "10",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        took = time.monotonic() - started
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join(30)
    assert _master_of(cluster6, backend, "users") == target
    assert not errors, errors[:3]
    assert not stale, stale[:5]
    assert committed["n"] > 5
    # Nothing stale afterwards, in this process and a new one.
    _rename(engine, cache, "z")
    fresh = _cache(cluster6, key_prefix)
    assert _name(engine, fresh) == "z" and _name(engine, cache) == "z"
    _cached(engine, fresh)
    print(f"\n[reshard] 5461 slots moved in {took:.1f}s under {committed['n']} commits")
    fresh.close()
    cache.close()


# -- a master that comes back empty ------------------------------------------------------------------
# No replica to promote: the node is restarted without its data (no persistence) and comes back with
# the same slots (its nodes.conf is kept), empty. What it held is gone: a table group's generation and
# versions (then a commit's bump was lost, or lands on the empty node), a stripe's copy of ``*`` and
# ``d:<db>`` with the entries of that stripe, a group's fan-out sequence, the node's run key.


@pytest.fixture
def cluster3() -> Iterator[RedisClusterProcs]:
    if shutil.which("redis-server") is None:
        if IN_CI:
            pytest.fail("redis-server is not installed; CI must provide it (the Redis Cluster tests)")
        pytest.skip("redis-server is not installed; install it to run the Redis Cluster tests")
    cluster = RedisClusterProcs(node_timeout_ms=3000)
    try:
        cluster.start()
    except BaseException:
        cluster.close()
        raise
    yield cluster
    cluster.close()


def _entry_nodes(cluster: RedisClusterProcs, prefix: str) -> set[int]:
    """The masters holding an entry of ``prefix``."""
    found = set()
    for i in range(cluster.masters):
        client = cluster.node(i)
        try:
            if any(True for _ in client.scan_iter(match=f"{prefix}:e:*", count=1000)):
                found.add(i)
        finally:
            client.close()
    return found


def _wait_state(cluster: RedisClusterProcs, i: int, state: str, timeout: float = 20) -> None:
    """Until node ``i`` says ``cluster_state:<state>``."""
    deadline = time.monotonic() + timeout
    while True:
        client = cluster.node(i)
        try:
            info = client.execute_command("CLUSTER", "INFO")
            now = info.get("cluster_state") if isinstance(info, dict) else info
            if state.encode() in now if isinstance(now, bytes) else now == state:
                return
        except redis.RedisError:
            pass
        finally:
            client.close()
        if time.monotonic() > deadline:
            raise AssertionError(f"node {i} never said cluster_state:{state}")
        time.sleep(0.05)


def _back_empty(cluster: RedisClusterProcs, i: int) -> None:
    """Restart master ``i`` without its data; wait until the cluster answers for its slots again."""
    cluster.servers[i].restart()
    deadline = time.monotonic() + 20
    while True:
        client = cluster.node(i)
        try:
            info = client.execute_command("CLUSTER", "INFO")
            ok = info.get("cluster_state") in ("ok", b"ok") if isinstance(info, dict) else b"state:ok" in info
            if ok:
                return
        except redis.RedisError:
            pass
        finally:
            client.close()
        if time.monotonic() > deadline:
            raise AssertionError("the restarted master did not rejoin")
        time.sleep(0.05)


@pytest.mark.parametrize(
    "watch, near",
    [(True, False), (False, False), (True, True)],
    ids=["node-check", "no-node-check", "near-cache"],
)
@pytest.mark.parametrize(
    "when", ["bump-lost", "bump-lands-on-empty", "bump-pending-while-down", "bump-pending-while-clusterdown"]
)
def test_table_group_node_back_empty(
    cluster3: RedisClusterProcs, engine: Any, key_prefix: str, when: str, watch: bool, near: bool
) -> None:
    """The master of the ``users`` group restarts empty. Whether the commit's bump was lost with it
    (made before the restart), lands on the empty node (made after), or was pending while the node
    was down (delivered to the empty node) — also down long enough for the whole cluster to answer
    CLUSTERDOWN (a slot without a master: every command fails) — every process reads the new value,
    and nothing raises.
    Without the node check the missing versions alone make the old entry a miss (a missing version
    is never "older than" the entry), so both are tested. With a near-cache (strict) in every
    process, the group's fan-out sequence is lost too and starts again: the near-caches resync."""
    kw: dict[str, Any] = {"near_cache": True, "near_coherence": "strict"} if near else {}
    cache = _cache(cluster3, key_prefix, watch_servers=watch, **kw)
    other = _cache(cluster3, key_prefix, watch_servers=watch, **kw)  # another process, entry cached too
    _cached(engine, cache)
    _cached(engine, other)
    node = _master_of(cluster3, cache.backend, "users")
    if when == "bump-lost":
        _rename(engine, cache, "b")
        assert cache.stats()["pending_invalidations"] == 0  # the bump reached the node...
        _back_empty(cluster3, node)  # ...and is lost with it
    elif when == "bump-lands-on-empty":
        _back_empty(cluster3, node)
        _rename(engine, cache, "b")
    else:
        cluster3.servers[node].kill()
        if when == "bump-pending-while-clusterdown":
            _wait_state(cluster3, (node + 1) % cluster3.masters, "fail")
        _rename(engine, cache, "b")  # the bump fails: pending
        for c in (other, cache):  # the group's node is down: a miss, read from the database
            for _ in range(3):
                assert _name(engine, c) == "b"
        assert cache.stats()["pending_invalidations"] > 0
        _back_empty(cluster3, node)
    for c in (cache, other):
        for _ in range(3):
            assert _name(engine, c) == "b"
    fresh = _cache(cluster3, key_prefix, watch_servers=watch, **kw)  # a process started afterwards
    assert _name(engine, fresh) == "b"
    # The cache works again on the restarted node, and a commit still evicts.
    for c in (cache, other, fresh):
        _cached(engine, c)
        assert _name(engine, c) == "b"
    assert not cache.stats()["pending_invalidations"], cache.stats()
    _rename(engine, other, "c")
    for c in (cache, other, fresh):
        assert _name(engine, c) == "c"
    if watch:
        assert fresh.backend.server_changes + cache.backend.server_changes >= 1  # type: ignore[attr-defined]
    for c in (fresh, other, cache):
        c.close()


@pytest.mark.parametrize("watch", [True, False], ids=["node-check", "no-node-check"])
def test_entry_node_back_empty(
    cluster3: RedisClusterProcs, engine: Any, key_prefix: str, watch: bool
) -> None:
    """The master holding the entry (its stripe's slot: the entry, its lease and the stripe's copy of
    ``*`` and ``d:``) restarts empty. A reader whose generation was observed before an
    ``invalidate_all`` (``*`` bumped in every stripe, then lost with the node) stores afterwards: the
    store is never served (the lost ``*`` is created "bumped now"). Reads and commits go on."""
    cache = _cache(cluster3, key_prefix, watch_servers=watch)
    _cached(engine, cache)
    held = _entry_nodes(cluster3, key_prefix)
    assert len(held) == 1, held
    (node,) = held
    backend: Any = cache.backend
    # A key whose stripe is on the same node, for the reader that started before.
    key = next(
        k
        for k in (f"k{i}" for i in range(10000))
        if _owner(cluster3, redis.crc.key_slot(backend._entry_keys(k)[0].encode())) == node
    )
    deps = ["*", "d:main"]
    for _ in range(3):  # a group first seen refuses the first store: until the reader's key is stored
        found = backend.lookup(key, deps)
        if found.entry is None:
            backend.store(key, b"old", deps, found.generation, 60.0)
    assert backend.lookup(key, deps).entry is not None
    before = backend.lookup(key + "-reader", deps).generation  # a reader begins (its key: a miss)
    cache.invalidate_all()  # a write it does not see
    _back_empty(cluster3, node)  # and the bump of * in this stripe is lost
    stored = False
    for _ in range(3):  # the old reader's store, however often (the first may fail on the reconnect)
        with contextlib.suppress(Exception):
            stored = backend.store(key + "-reader", b"old", deps, before, 60.0) or stored
    assert not stored
    assert backend.lookup(key, deps).entry is None  # lost with the node
    assert _name(engine, cache) == "a"  # the entry is gone: a miss, the database says "a"
    _rename(engine, cache, "b")
    assert _name(engine, cache) == "b"
    _cached(engine, cache)
    assert _name(engine, cache) == "b"
    fresh = _cache(cluster3, key_prefix, watch_servers=watch)
    assert _name(engine, fresh) == "b"
    fresh.close()
    cache.close()
