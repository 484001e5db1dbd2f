"""Signed fan-out (``Cache(secret=…)`` with ``near_cache=True``; sqlacache/backends/redis/signing.py)
against real Redis, PostgreSQL and processes.

The attack: something that can PUBLISH on ``<prefix>:fanout`` sends ``<born>.<n+1>`` with no
dependencies just before the real ``n + 1`` (a commit). Without a secret the near-cache applies the
forgery, skips the real message as already seen and keeps serving what the commit changed — the
control below shows it does. With a secret the forgery is ignored (counted ``near_forged``, no
resync), the real message is applied, and the reader's next read after ``commit()`` returned sees
the new value. The commits are made by another process (``writer``): a second Cache in this process
would be told of the commit directly, not through the fan-out.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import re
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.cluster import RedisClusterProcs
from tests.helpers import until
from tests.test_cluster_near import _users_group, sides
from tests.test_near_faults import (
    HEARTBEAT,
    WINDOW_BOUND,
    Child,
    db,
    engine,
    hold,
    near_factory,
    read_name,
    users,
    writer,
)
from tests.test_near_faults import write_name as commit_name

pytestmark = [pytest.mark.redis, pytest.mark.postgres]
__all__ = ["db", "engine", "near_factory", "sides", "users", "writer"]  # fixtures, used by name

SECRET = "s3cret-for-the-fan-out-tests-0001"
OTHER = "another-secret-never-used-to-sign"


def _position(client: redis.Redis, seq: str) -> tuple[bytes, int]:
    born, n = client.hmget(seq, ["born", "n"])
    return born, int(n)


def _forgery(kind: str, born: bytes, n: int, real: bytes) -> bytes:
    """A message for position ``born.n`` evicting nothing, made without the secret."""
    stamp = born + b".%d" % n
    if kind == "unsigned":
        return stamp + b"\x1f"
    if kind == "wrong mac":
        return b"\x1f".join([stamp, os.urandom(16).hex().encode(), os.urandom(20).hex().encode(), b""])
    assert kind == "reused", kind  # a real message's nonce and MAC, over another stamp and deps
    _, nonce, mac, _ = real.split(b"\x1f", 3)
    return b"\x1f".join([stamp, nonce, mac, b""])


class Attacker:
    """A client of the same Redis that hears the channel (to copy real messages) and publishes on it."""

    def __init__(self, url: str, prefix: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.channel = f"{prefix}:fanout"
        self.seq = f"{prefix}:seq"
        self.pubsub = self.client.pubsub()
        self.pubsub.subscribe(self.channel)
        assert self.pubsub.get_message(timeout=5)["type"] == "subscribe"

    def last_heard(self) -> bytes:
        heard = None
        while (message := self.pubsub.get_message(timeout=0.5)) is not None:
            heard = message["data"]
        assert heard is not None, "no real message heard"
        return heard

    def forge_next(self, kind: str, real: bytes) -> tuple[bytes, int]:
        born, n = _position(self.client, self.seq)
        self.client.publish(self.channel, _forgery(kind, born, n + 1, real))
        return born, n + 1

    def close(self) -> None:
        self.pubsub.close()
        self.client.close()


@pytest.fixture
def attacker(redis_url: str, key_prefix: str) -> Iterator[Attacker]:
    with contextlib.closing(Attacker(redis_url, key_prefix)) as a:
        yield a


def _fresh_after_commit(near: Any, coherence: str, name: str) -> bool:
    if coherence == "strict":  # the very next transaction
        return bool(read_name(near.Session, 1) == name)
    return until(lambda: read_name(near.Session, 1) == name, timeout=WINDOW_BOUND)


@pytest.mark.parametrize("coherence", ["fanout", "strict"])
def test_forged_messages_before_a_commit_never_make_it_stale(
    coherence: str, near_factory: Any, writer: Child, attacker: Attacker, redis_url: str, key_prefix: str
) -> None:
    near = near_factory(redis_url, near_coherence=coherence, secret=SECRET)
    writer.call("open", redis_url, key_prefix, {"secret": SECRET})
    writer.call("write", 1, "v0")
    assert _fresh_after_commit(near, coherence, "v0")
    real = attacker.last_heard()
    for i, kind in enumerate(["unsigned", "wrong mac", "reused"], 1):
        assert near.hold(1) == f"v{i - 1}"
        forged = near.stat("near_forged")
        attacker.forge_next(kind, real)
        assert until(lambda f=forged: near.stat("near_forged") == f + 1, timeout=5), kind
        writer.call("write", 1, f"v{i}")
        assert _fresh_after_commit(near, coherence, f"v{i}"), kind
        assert near.hold(1) == f"v{i}"  # the real message applied: served from memory again
    assert near.stat("near_forged") == 3
    assert near.stat("near_resyncs") == 0 and near.in_step()


@pytest.mark.parametrize("coherence", ["fanout", "strict"])
def test_without_a_secret_the_same_forgery_serves_a_stale_value(
    coherence: str, near_factory: Any, writer: Child, attacker: Attacker, redis_url: str, key_prefix: str
) -> None:
    """The control: why the fan-out is signed (and proof that the test above can fail)."""
    near = near_factory(redis_url, near_coherence=coherence)
    writer.call("open", redis_url, key_prefix, {})
    writer.call("write", 1, "before")  # the sequence starts
    assert until(lambda: read_name(near.Session, 1) == "before", timeout=WINDOW_BOUND)
    assert near.hold(1) == "before"
    subscription = near.cache.near.subscription
    at = attacker.forge_next("unsigned", b"")
    assert until(lambda: subscription.position == (int(at[0]), at[1]), timeout=5)
    writer.call("write", 1, "changed")
    assert until(lambda: _position(attacker.client, attacker.seq)[1] == at[1])
    hits = near.stat("near_hits")
    assert read_name(near.Session, 1) == "before"  # stale after commit, from process memory
    assert near.stat("near_hits") == hits + 1
    assert near.stat("near_forged") == 0


def _slowlog_bump_key(client: redis.Redis) -> tuple[str, bytes]:
    """The nonce and one-time key of the last bump, as SLOWLOG shows them to an admin."""
    for entry in client.slowlog_get(100_000):
        found = re.search(rb"\d+\x1f([0-9a-f]{32})\x1f([0-9a-f]{64})", entry["command"])
        if found:
            return found[1].decode(), bytes.fromhex(found[2].decode())
    raise AssertionError("no signed bump in SLOWLOG")


def test_a_one_time_key_read_from_slowlog_cannot_sign_the_next_message(
    near_factory: Any, writer: Child, fresh_redis: Any, key_prefix: str
) -> None:
    """An admin who reads a bump's arguments (SLOWLOG, MONITOR) gets its nonce and one-time key —
    never the secret. A message signed with them for the next position is refused (its nonce was
    heard already), and the next commit is seen."""
    url = fresh_redis.url
    admin = redis.Redis.from_url(url)
    try:
        admin.config_set("slowlog-log-slower-than", 0)  # every command, as an admin may ask
        admin.config_set("slowlog-max-len", 100_000)
        near = near_factory(url, near_coherence="fanout", secret=SECRET)
        writer.call("open", url, key_prefix, {"secret": SECRET})
        writer.call("write", 1, "v0")
        assert until(lambda: read_name(near.Session, 1) == "v0", timeout=WINDOW_BOUND)
        assert near.hold(1) == "v0"
        nonce, key = _slowlog_bump_key(admin)
        assert not any(SECRET.encode() in entry["command"] for entry in admin.slowlog_get(100_000))
        born, n = _position(admin, f"{key_prefix}:seq")
        stamp = born + b".%d" % (n + 1)
        mac = hmac.digest(key, stamp + b"\x1f", "sha1").hex().encode()  # over "<stamp>\x1f", no deps
        admin.publish(f"{key_prefix}:fanout", b"\x1f".join([stamp, nonce.encode(), mac, b""]))
        assert until(lambda: near.stat("near_forged") == 1, timeout=5)
        writer.call("write", 1, "v1")
        assert until(lambda: read_name(near.Session, 1) == "v1", timeout=WINDOW_BOUND)
        assert near.hold(1) == "v1"
        assert near.stat("near_resyncs") == 0
    finally:
        admin.close()


def test_rotation_a_reader_accepts_the_writers_older_secret(
    near_factory: Any, writer: Child, redis_url: str, key_prefix: str
) -> None:
    """Writer signs with A; the reader, rotated to [B, A], applies its messages (fanout coherence:
    only the messages evict its memory) without losing step."""
    near = near_factory(redis_url, near_coherence="fanout", secret=[OTHER, SECRET])
    writer.call("open", redis_url, key_prefix, {"secret": SECRET})
    for i in range(3):
        assert near.hold(1) == (f"r{i - 1}" if i else "u1")
        writer.call("write", 1, f"r{i}")
        assert until(lambda i=i: read_name(near.Session, 1) == f"r{i}", timeout=WINDOW_BOUND)
    assert near.stat("near_forged") == 0 and near.stat("near_resyncs") == 0


@pytest.mark.parametrize("coherence", ["fanout", "strict"])
def test_a_committer_without_the_secret_never_makes_a_signed_reader_stale(
    coherence: str, near_factory: Any, writer: Child, redis_url: str, key_prefix: str
) -> None:
    """Its messages are refused; the gap (next message, or the heartbeat) makes the reader resync,
    and strict coherence's position check keeps memory out meanwhile."""
    near = near_factory(redis_url, near_coherence=coherence, secret=SECRET)
    writer.call("open", redis_url, key_prefix, {})
    for i in range(3):
        assert near.hold(1) == (f"w{i - 1}" if i else "u1")
        writer.call("write", 1, f"w{i}")
        if coherence == "strict":
            assert read_name(near.Session, 1) == f"w{i}"
        else:  # the heartbeat notices the refused message within about 2 heartbeats
            window = WINDOW_BOUND + 4 * HEARTBEAT
            assert until(lambda i=i: read_name(near.Session, 1) == f"w{i}", timeout=window)
        assert until(near.in_step, timeout=5)
    assert near.stat("near_forged") >= 3 and near.stat("near_resyncs") >= 1


def test_cluster_forged_shard_message_before_a_commit(sides: Any, redis_cluster: RedisClusterProcs) -> None:
    """The same attack on a Redis Cluster group's shard channel (SPUBLISH): refused, and the reader's
    next transaction after the commit reads the new value."""
    reader = sides(near_cache=True, near_coherence="strict", near_heartbeat=HEARTBEAT, secret=SECRET)
    writer = sides(secret=SECRET)
    commit_name(writer.S, 1, "first")
    assert read_name(reader.S, 1) == "first"
    assert hold(reader.S, reader.cache, 1) == "first"
    raw = redis.cluster.RedisCluster("127.0.0.1", redis_cluster.ports[0])
    try:
        group = _users_group(reader.cache)
        born, n = _position(raw, f"{group}:seq")  # type: ignore[arg-type]
        raw.spublish(f"{group}:fanout", _forgery("unsigned", born, n + 1, b""))
        assert until(lambda: reader.stat("near_forged") == 1, timeout=5)
        commit_name(writer.S, 1, "second")
        assert read_name(reader.S, 1) == "second"
        assert hold(reader.S, reader.cache, 1) == "second"
        assert reader.stat("near_resyncs") == 0
    finally:
        raw.close()
