"""The near-cache on Redis Cluster (sharded pub/sub, one channel and sequence per group: see
``sqlacache/backends/redis/cluster_fanout.py``) against a real 3-master cluster: a commit through one
Cache evicts another Cache's entry and a spawned process's (fanout, strict); a killed subscriber
connection and a lost message make it lose step, get in step again, and serve nothing stale."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from sqlacache import Cache, CachingSession
from tests.cluster import RedisClusterProcs
from tests.helpers import until
from tests.test_near_faults import WINDOW_BOUND, Child, db, engine, hold, read_name, users, write_name

pytestmark = [pytest.mark.postgres]
__all__ = ["db", "engine", "users"]  # fixtures, used by name

HEARTBEAT = 0.2


class Side:
    """A Cache of its own (its own backend, subscriber and engine): another process, as far as the
    near-cache can tell."""

    def __init__(self, db: tuple[str, dict[str, Any]], url: str, prefix: str, **kw: Any) -> None:
        self.engine = create_engine(db[0], connect_args=db[1])
        self.cache = Cache(backend=url, prefix=prefix, **kw)
        self.S = sessionmaker(self.engine, class_=CachingSession, cache=self.cache)

    def stat(self, name: str) -> Any:
        return self.cache.stats()[name]

    def close(self) -> None:
        self.cache.close()
        self.engine.dispose()


@pytest.fixture
def sides(
    db: tuple[str, dict[str, Any]], redis_cluster: RedisClusterProcs, key_prefix: str, users: None
) -> Iterator[Any]:
    made: list[Side] = []

    def make(**kw: Any) -> Side:
        made.append(Side(db, redis_cluster.url, key_prefix, **kw))
        return made[-1]

    yield make
    for side in made:
        side.close()


@pytest.mark.parametrize("coherence", ["fanout", "strict"])
def test_commit_evicts_another_caches_entry(coherence: str, sides: Any) -> None:
    reader = sides(near_cache=True, near_coherence=coherence, near_heartbeat=HEARTBEAT)
    writer = sides()
    for i in range(5):
        assert hold(reader.S, reader.cache, 1) == (f"v{i - 1}" if i else "u1")
        write_name(writer.S, 1, f"v{i}")
        if coherence == "strict":  # the very next transaction
            assert read_name(reader.S, 1) == f"v{i}"
        else:
            assert until(lambda i=i: read_name(reader.S, 1) == f"v{i}", timeout=WINDOW_BOUND)
    assert hold(reader.S, reader.cache, 1) == "v4"
    assert reader.stat("near_resyncs") == 0 and reader.stat("near_in_step")
    assert reader.stat("near_hits") >= 5


def test_commit_evicts_the_entry_in_another_process(
    db: tuple[str, dict[str, Any]], sides: Any, redis_cluster: RedisClusterProcs, key_prefix: str
) -> None:
    child = Child(*db)
    try:
        child.call("open", redis_cluster.url, key_prefix, {"near_cache": True, "near_coherence": "fanout"})
        writer = sides()
        for i in range(3):
            child.send("hold_until_evicted", 1, 10.0)
            assert child.answer_held()
            write_name(writer.S, 1, f"p{i}")
            assert child.answer() is not None, "the entry was never evicted in the other process"
            assert child.call("read", 1) == f"p{i}"
        child.call("open", redis_cluster.url, key_prefix, {"near_cache": True, "near_coherence": "strict"})
        for i in range(3):
            assert child.call("hold", 1) == (f"s{i - 1}" if i else "p2")
            write_name(writer.S, 1, f"s{i}")
            assert child.call("read", 1) == f"s{i}"
        stats = child.call("stats")
    finally:
        child.close()
    assert stats["near_resyncs"] == 0 and stats["near_in_step"], stats


def _kill_pubsub(cluster: RedisClusterProcs) -> int:
    killed = 0
    for i in range(len(cluster.servers)):
        with cluster.node(i) as node:
            killed += node.client_kill_filter(_type="pubsub")
    return int(killed)


@pytest.mark.parametrize("coherence", ["fanout", "strict"])
def test_killed_subscriber_connections(coherence: str, sides: Any, redis_cluster: RedisClusterProcs) -> None:
    """Every pub/sub connection killed: the near-cache loses step (empties), subscribes again, is in
    step again; a commit made meanwhile is never missed."""
    reader = sides(near_cache=True, near_coherence=coherence, near_heartbeat=HEARTBEAT)
    writer = sides()
    assert hold(reader.S, reader.cache, 1) == "u1"
    assert _kill_pubsub(redis_cluster) >= 1
    write_name(writer.S, 1, "after-kill")
    assert until(lambda: read_name(reader.S, 1) == "after-kill", timeout=WINDOW_BOUND)
    assert until(lambda: reader.stat("near_resyncs") >= 1 and reader.stat("near_in_step"), timeout=5)
    assert hold(reader.S, reader.cache, 1) == "after-kill"
    write_name(writer.S, 1, "later")
    assert until(lambda: read_name(reader.S, 1) == "later", timeout=WINDOW_BOUND)


def _users_group(cache: Cache) -> str:
    return str(cache.backend._base("t:users", ""))  # type: ignore[attr-defined]


def test_lost_message_is_noticed(sides: Any, redis_cluster: RedisClusterProcs) -> None:
    """A bump of the users group whose message is lost (its sequence moved, nothing published): the
    heartbeat notices within a few heartbeats and the near-cache empties; a commit after a lost
    message (a gap in the group's sequence) is noticed at once."""
    reader = sides(near_cache=True, near_coherence="fanout", near_heartbeat=HEARTBEAT)
    writer = sides()
    write_name(writer.S, 1, "first")  # the group's sequence starts
    assert until(lambda: read_name(reader.S, 1) == "first", timeout=WINDOW_BOUND)
    assert hold(reader.S, reader.cache, 1) == "first"
    raw = redis.cluster.RedisCluster("127.0.0.1", redis_cluster.ports[0])
    try:
        seq = _users_group(reader.cache) + ":seq"
        raw.hincrby(seq, "n", 1)  # as if a bump's message was lost, and no commit after it
        assert until(lambda: reader.stat("near_resyncs") >= 1, timeout=6 * HEARTBEAT)
        assert until(lambda: reader.stat("near_in_step"), timeout=5)
        assert hold(reader.S, reader.cache, 1) == "first"
        raw.hincrby(seq, "n", 1)  # lost again; the next commit's message shows the gap
        write_name(writer.S, 1, "gap")
        assert until(lambda: read_name(reader.S, 1) == "gap", timeout=WINDOW_BOUND)
        assert until(lambda: reader.stat("near_resyncs") >= 2 and reader.stat("near_in_step"), timeout=5)
        assert hold(reader.S, reader.cache, 1) == "gap"
    finally:
        raw.close()
